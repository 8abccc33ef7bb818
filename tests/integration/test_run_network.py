"""``python -m legato run`` when Discord cannot be reached, or refuses the token: one line, no
traceback, a non-zero exit.

The real command runs as a subprocess, pointed with ``LEGATO_BOT_API_BASE`` at a loopback port
where a socket is bound but not listening (every connection is refused), or at the sandbox's
REST API (which refuses a wrong token). The retry schedule is shortened through
``LEGATO_BOT_CONNECT_*``, so the command's own waits are a few milliseconds.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from legato.sandbox.server import Sandbox

pytestmark = pytest.mark.integration

FAKE_TOKEN = "MTIz.not-a-real-token.abc"


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so no one else takes it), not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


def run_env(**legato: str) -> dict[str, str]:
    """This environment without Legato's variables, plus a token and ``legato`` as LEGATO_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEGATO_")}
    env["DISCORD_TOKEN"] = FAKE_TOKEN
    env.update({f"LEGATO_{k.upper()}": v for k, v in legato.items()})
    return env


async def run_cli(env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    """Run ``python -m legato run``; its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "legato",
        "run",
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(90):  # only a guard against a hang
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_unreachable_discord_retries_then_says_so_in_one_line(
    refusing_port: int, tmp_path: Path
) -> None:
    env = run_env(
        bot_api_base=f"http://127.0.0.1:{refusing_port}/api/v10",
        bot_connect_attempts="3",
        bot_connect_backoff="0.01",
        bot_connect_backoff_max="0.02",
    )
    code, out, err = await run_cli(env, tmp_path)
    assert code == 1
    assert "Traceback" not in out + err
    assert out == ""
    lines = err.splitlines()
    ours = [line for line in lines if line.startswith("legato: ")]
    assert ours == [
        f"legato: cannot reach Discord: 127.0.0.1:{refusing_port}: connection refused "
        "(gave up after 3 attempts)"
    ]
    assert lines[-1] == ours[0]
    # Each attempt but the last is logged with the wait before the next.
    retries = [line for line in lines if "retrying in" in line]
    assert len(retries) == 2
    assert "attempt 1 of 3" in retries[0]
    assert "attempt 2 of 3" in retries[1]
    assert all("connection refused" in line for line in retries)
    assert "not-a-real-token" not in err


async def test_unreachable_discord_is_exactly_one_line_when_logs_are_quiet(
    refusing_port: int, tmp_path: Path
) -> None:
    env = run_env(
        bot_api_base=f"http://127.0.0.1:{refusing_port}/api/v10",
        bot_connect_attempts="1",
        bot_log_level="ERROR",
    )
    code, out, err = await run_cli(env, tmp_path)
    assert (code, out) == (1, "")
    assert err == (
        f"legato: cannot reach Discord: 127.0.0.1:{refusing_port}: connection refused "
        "(gave up after 1 attempt)\n"
    )


async def test_refused_token_fails_fast_in_one_line(tmp_path: Path) -> None:
    async with Sandbox(with_voice=False, timeout=20.0) as sb:
        env = run_env(
            bot_api_base=sb.api_base,
            bot_gateway_url=sb.gateway_url,
            bot_connect_attempts="5",
            bot_connect_backoff="60",  # a retry would show as a hang, caught by the guard
        )
        code, out, err = await run_cli(env, tmp_path)
    assert code == 2
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert [line for line in lines if line.startswith("legato: ")] == [
        "legato: Discord refused the token in DISCORD_TOKEN; reset it in the developer portal."
    ]
    assert lines[-1].startswith("legato: Discord refused the token")
    assert not any("retrying in" in line for line in lines)
    assert "not-a-real-token" not in err


async def test_wrong_api_path_fails_fast_in_one_line(tmp_path: Path) -> None:
    async with Sandbox(with_voice=False, timeout=20.0) as sb:
        base = sb.api_base + "/nowhere"
        env = run_env(bot_api_base=base, bot_connect_attempts="5", bot_connect_backoff="60")
        code, out, err = await run_cli(env, tmp_path)
    assert code == 1
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert [line for line in lines if line.startswith("legato: ")] == [
        f"legato: cannot reach Discord: the server answered 404 Not Found to GET {base}/users/@me"
    ]
    assert not any("retrying in" in line for line in lines)
