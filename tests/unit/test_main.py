"""``python -m legato run``: refuses to start without a token, and says how to get one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from legato.__main__ import NO_TOKEN_MESSAGE, main


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
