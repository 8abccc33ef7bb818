"""``python -m legato run``: refuses to start without a token, and says how to get one."""

from __future__ import annotations

import errno
import itertools
import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from legato.__main__ import NO_TOKEN_MESSAGE, Unreachable, backoff_delays, main, unreachable


def test_no_token_explains_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert err == NO_TOKEN_MESSAGE
    assert "DISCORD_TOKEN is not set" in err
    assert "developer portal" in err
    assert '"Bot" page' in err
    assert "Reset Token" in err
    assert "make demo" in err


def test_blank_token_counts_as_none(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", "   ")
    assert main(["run"]) == 2
    assert "make demo" in capsys.readouterr().err


def test_bad_config_exits_2_with_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "legato.toml"
    path.write_text("[voice]\ntransport = 'tcp'\n", encoding="utf-8")
    monkeypatch.setenv("DISCORD_TOKEN", "MTIz.not-a-real-token.abc")
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: voice.transport = 'tcp' is invalid" in err
    assert "not-a-real-token" not in err


def test_missing_config_named_by_option_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.toml"
    monkeypatch.setenv("DISCORD_TOKEN", "MTIz.not-a-real-token.abc")
    assert main(["run", "--config", str(missing)]) == 2
    assert capsys.readouterr().err == f"legato: {missing}: no such configuration file\n"


def test_module_entry_point() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "legato", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "developer portal" in done.stderr
    assert done.stdout == ""


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["dance"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_backoff_doubles_up_to_the_cap() -> None:
    assert list(itertools.islice(backoff_delays(1.0, 30.0), 7)) == [1, 2, 4, 8, 16, 30, 30]
    assert list(itertools.islice(backoff_delays(0.5, 0.25), 2)) == [0.25, 0.25]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
            Unreachable("temporary DNS failure (Temporary failure in name resolution)", True),
        ),
        (
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            Unreachable("host name not found (Name or service not known)", False),
        ),
        (ConnectionRefusedError(errno.ECONNREFUSED, "x"), Unreachable("connection refused", True)),
        (
            ConnectionResetError(errno.ECONNRESET, "x"),
            Unreachable("connection reset by peer", True),
        ),
        (OSError(errno.ENETUNREACH, "x"), Unreachable("network is unreachable", True)),
        (OSError(errno.EACCES, "x"), Unreachable("permission denied", False)),
        (TimeoutError(), Unreachable("timed out", True)),
        (aiohttp.ServerTimeoutError("read"), Unreachable("timed out", True)),
        (aiohttp.ServerDisconnectedError(), Unreachable("the server closed the connection", True)),
        (OSError("Multiple exceptions: [...]"), Unreachable("Multiple exceptions: [...]", True)),
        (ValueError("not ours"), None),
    ],
)
def test_unreachable_reads_the_cause(exc: BaseException, expected: Unreachable | None) -> None:
    assert unreachable(exc) == expected
