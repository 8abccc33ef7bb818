"""Headless Chromium for the integration tests: find it, start it, stop it.

Chromium must be installed: ``make test`` installs it (``scripts/system-deps.sh test``), as set-up
belongs there and not in a test. When it is missing the test FAILS with how to install it: a
browser fidelity test that silently does not run proves nothing.
"""

from __future__ import annotations

import asyncio
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
    """The Chromium binary; fails the test, saying how to install it, when there is none."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail(
            "Chromium is missing: `make test` installs it (scripts/system-deps.sh test), or "
            "`sudo apt-get install chromium`"
        )
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
