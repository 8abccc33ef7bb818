"""discord.py's stock client joins the default command-line sandbox and plays, with DAVE.

``python -m legato.sandbox discord`` runs as a subprocess with no options; a stock discord.py bot
(``stock_voice_client.py``, another subprocess) is given only what the sandbox printed: the URLs,
the token, a voice channel, and the CA ``.pem`` as ``SSL_CERT_FILE``. discord.py's own
``VoiceClient`` connects to ``wss://`` at v8, forms a DAVE group with the sandbox's listener and
plays a tone; on Ctrl-C the sandbox reports what its listener decrypted and heard.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

GUARD = 60.0  # only against hangs
CLIENT = Path(__file__).with_name("stock_voice_client.py")


async def _read_until(stream: asyncio.StreamReader, marker: str, lines: list[str]) -> None:
    while not lines or marker not in lines[-1]:
        line = await stream.readline()
        assert line, "the sandbox exited:\n" + "".join(lines)
        lines.append(line.decode())


def _value(lines: list[str], label: str) -> str:
    (line,) = [line for line in lines if line.strip().startswith(label)]
    return line.split()[-1]


async def test_stock_discord_py_joins_the_default_cli_sandbox_with_dave() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"}
    sandbox = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "legato.sandbox",
        "--log-level",
        "WARNING",
        "discord",
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    assert sandbox.stdout is not None
    printed: list[str] = []
    try:
        async with asyncio.timeout(GUARD):
            await _read_until(sandbox.stdout, "python -m legato run", printed)
        api_base = _value(printed, "API base")
        gateway = _value(printed, "gateway")
        token = _value(printed, "bot token")
        ca_file = _value(printed, "CA certificate")
        assert ca_file.endswith(".pem")
        (general,) = [line for line in printed if "(#General)" in line]
        channel_id = general.split()[2]
        (path,) = [line for line in printed if line.strip().startswith("voice path")]
        assert "wss://localhost:" in path
        assert "/?v=8, DAVE required" in path

        client = await asyncio.create_subprocess_exec(
            sys.executable,
            str(CLIENT),
            api_base,
            gateway,
            token,
            channel_id,
            env={**env, "SSL_CERT_FILE": ca_file},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(2 * GUARD):
            out, err = await client.communicate()
        said = out.decode()
        assert client.returncode == 0, said + err.decode()
        assert "done" in said.splitlines()
        assert "mode aead_xchacha20_poly1305_rtpsize" in said.splitlines()
        assert "dave 1" in said.splitlines()
        privacy = re.search(r"^privacy (\d+)$", said, re.MULTILINE)
        assert privacy is not None, said
    finally:
        if sandbox.returncode is None:
            sandbox.send_signal(signal.SIGINT)
        async with asyncio.timeout(GUARD):
            rest = (await sandbox.stdout.read()).decode()
            code = await sandbox.wait()
    assert code == 0, rest
    report = rest.splitlines()
    (group,) = [line for line in report if line.startswith("DAVE group")]
    decrypted = int(re.search(r"decrypted (\d+)", group).group(1))  # type: ignore[union-attr]  # the format above
    assert decrypted >= 100  # the whole tone reached the listener encrypted and was decrypted
    assert "failed 0" in group
    (heard,) = [line for line in report if " frames (" in line]
    assert "gaps 0" in heard
    dominant = float(re.search(r"dominant ([\d.]+) Hz", heard).group(1))  # type: ignore[union-attr]  # the format above
    assert dominant == pytest.approx(440.0, abs=2.0)
