"""Headless Chromium for the integration tests: find (or install) it, start it, stop it.

Chromium must be installed (``make test`` installs it through ``scripts/system-deps.sh``); when
it is missing the set-up tries ``apt-get install chromium`` and otherwise FAILS: a browser
fidelity test that silently does not run proves nothing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
)


async def ensure_chromium() -> str:
    """The Chromium binary, installed with apt-get if missing; fails the test if impossible."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(
            "Chromium is missing and cannot be installed here (need root and apt-get): "
            "install it with `sudo apt-get install chromium`"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (("apt-get", "update", "-qq"), ("apt-get", "install", "-y", "-qq", "chromium")):
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            pytest.fail(f"`{' '.join(argv)}` failed ({proc.returncode}): {err.decode()[-2000:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.fail("apt-get installed chromium but no `chromium` binary is on PATH")
    return found


@asynccontextmanager
async def running_chromium(
    url: str, profile: Path, log: Path, extra_flags: Sequence[str] = ()
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Headless Chromium on ``url`` (stdout and stderr to ``log``), stopped on exit."""
    chromium = await ensure_chromium()
    with log.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            chromium,
            *CHROMIUM_FLAGS,
            *extra_flags,
            f"--user-data-dir={profile}",
            url,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
