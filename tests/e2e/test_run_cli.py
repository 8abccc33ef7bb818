"""``python -m legato run`` pointed at a Discord-compatible server by ``[bot] api_base`` and
``gateway_url``: the real command, as a subprocess, logs in to the sandbox and connects."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from legato.sandbox.server import Sandbox

pytestmark = pytest.mark.e2e

CONNECTED = "has connected to Gateway"


async def test_run_reaches_a_discord_compatible_server(tmp_path: Path) -> None:
    async with Sandbox(with_voice=False, timeout=20.0) as sb:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEGATO_")}
        env.update(
            DISCORD_TOKEN=sb.bot_token,
            LEGATO_BOT_API_BASE=sb.api_base,
            LEGATO_BOT_GATEWAY_URL=sb.gateway_url,
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "legato",
            "run",
            env=env,
            cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        seen: list[str] = []
        try:
            async with asyncio.timeout(60):  # only a guard against a hang
                while not any(CONNECTED in line for line in seen):
                    line = await proc.stderr.readline()
                    assert line, "the bot exited:\n" + "".join(seen)
                    seen.append(line.decode())
        finally:
            proc.kill()
            await proc.wait()
    assert not any("Traceback" in line for line in seen), "".join(seen)
    assert any("synced" in line and "application commands" in line for line in seen)
    assert sb.bot_token not in "".join(seen)
