"""``python -m legato doctor``: all green in this venv; blockers named in a broken environment."""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yt_dlp.version

from legato.doctor import Row, Status, check_all, format_table, log_rows

SECRET = "s3cr3t-cookie-value-d0c"
RELEASED = datetime.date(*map(int, str(yt_dlp.version.__version__).split(".")[:3]))


def doctor(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "legato", "doctor", "--config", str(config)],
        env=env if env is not None else dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def rows_of(output: str) -> dict[str, tuple[str, str]]:
    """{check: (status, detail)} from the printed table (header, rows, summary)."""
    header, *lines, _summary = output.splitlines()
    status_at, detail_at = header.index("status"), header.index("detail")
    return {
        line[:status_at].strip(): (line[status_at:detail_at].strip(), line[detail_at:].strip())
        for line in lines
    }


def test_every_row_is_green_in_this_venv(tmp_path: Path) -> None:
    cookies = tmp_path / "cookies.txt"
    cookies.write_text(f".youtube.com\tTRUE\t/\tTRUE\t4102444800\tSID\t{SECRET}\n", "utf-8")
    cookies.chmod(0o600)
    config = tmp_path / "legato.toml"
    config.write_text(f'[sources]\ncookies_file = "{cookies}"\n', encoding="utf-8")
    # Measured on yt-dlp's release day, so that its age cannot turn the row yellow.
    rows = check_all(str(config), today=RELEASED)
    assert [r for r in rows if r.status is not Status.OK] == []
    checks = [r.check for r in rows]
    assert checks == [
        "libopus",
        "PyAV",
        "FFmpeg libraries",
        "codecs, demuxers",
        "yt-dlp",
        "JS runtime",
        "EJS scripts",
        "davey (DAVE)",
        "configuration",
        "cookies file",
    ]
    by_check = {r.check: r.detail for r in rows}
    assert by_check["cookies file"] == f"{cookies}: 1 cookies, readable by its owner only"
    assert by_check["JS runtime"].startswith("yt-dlp finds deno-")
    done = doctor(config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert set(rows_of(done.stdout)) == set(checks)
    assert done.stdout.splitlines()[-1].startswith("10 checks: 0 blocker(s)")


def test_no_js_runtime_on_the_path_and_a_bad_cookies_file_are_blockers(tmp_path: Path) -> None:
    cookies = tmp_path / "cookies.txt"
    cookies.write_text(f"SID={SECRET}; Domain=.youtube.com\n", encoding="utf-8")  # not Netscape
    cookies.chmod(0o600)
    config = tmp_path / "legato.toml"
    config.write_text(
        f'[sources]\njs_runtime = "deno"\ncookies_file = "{cookies}"\n', encoding="utf-8"
    )
    env = dict(os.environ, PATH=str(tmp_path / "empty"))  # no deno (nor anything) on PATH
    done = doctor(config, env)
    assert done.returncode == 1
    rows = rows_of(done.stdout)
    assert rows["JS runtime"] == ("FAIL", "yt-dlp finds none (looked for deno on PATH)")
    status, detail = rows["cookies file"]
    assert status == "FAIL"
    assert "is not in Netscape format: line 1 has 1 tab-separated fields" in detail
    assert rows["configuration"][0] == "ok"  # the file exists and is readable: a valid key
    assert rows["EJS scripts"][0] == "ok"
    assert done.stdout.splitlines()[-1].startswith("10 checks: 2 blocker(s)")
    assert SECRET not in done.stdout + done.stderr


def test_an_invalid_configuration_is_a_blocker(tmp_path: Path) -> None:
    config = tmp_path / "legato.toml"
    config.write_text('[sources]\ncookies_file = "/no/such/cookies.txt"\n', encoding="utf-8")
    done = doctor(config)
    assert done.returncode == 1
    rows = rows_of(done.stdout)
    assert rows["configuration"][0] == "FAIL"
    assert "sources.cookies_file" in rows["configuration"][1]
    assert "does not exist" in rows["configuration"][1]
    assert rows["cookies file"] == ("warn", "not checked: the configuration did not load")


def test_an_old_yt_dlp_is_a_warning(tmp_path: Path) -> None:
    rows = {r.check: r for r in check_all(None, today=RELEASED + datetime.timedelta(days=60))}
    assert rows["yt-dlp"].status is Status.WARN
    assert "60 days old" in rows["yt-dlp"].detail
    assert "pip install -U" in rows["yt-dlp"].detail
    assert {r.status for r in rows.values() if r.check != "yt-dlp"} == {Status.OK}


def test_rows_are_logged_by_severity(caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        Row("a", Status.OK, "fine"),
        Row("b", Status.WARN, "look"),
        Row("c", Status.FAIL, "broken"),
    ]
    with caplog.at_level(logging.DEBUG, logger="legato.doctor"):
        log_rows(rows)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "doctor: 3 checks: 1 blocker(s), 1 warning(s)"),
        ("DEBUG", "doctor: a: fine"),
        ("WARNING", "doctor: b: look"),
        ("ERROR", "doctor: c: broken"),
    ]
    assert format_table(rows).splitlines() == [
        "check  status  detail",
        "a      ok      fine",
        "b      warn    look",
        "c      FAIL    broken",
        "3 checks: 1 blocker(s), 1 warning(s)",
    ]
