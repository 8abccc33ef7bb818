"""``[sources]``: its keys' validation, the yt-dlp options they become, the cookies file reader."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from legato.audio.sources import (
    CookieFileError,
    SourceSettings,
    bundled_deno,
    read_cookies,
    runtime_kind,
    ydl_params,
)
from legato.cogs.build import source_settings
from legato.config import SourcesConfig, load_config
from legato.errors import ConfigError

SECRET = "s3cr3t-cookie-value"
FAR = "4102444800"  # 2100-01-01


def cookies_text(*lines: str) -> str:
    return "# Netscape HTTP Cookie File\n" + "".join(line + "\n" for line in lines)


def write_cookies(path: Path, *lines: str, mode: int = 0o600) -> Path:
    path.write_text(cookies_text(*lines), encoding="utf-8")
    path.chmod(mode)
    return path


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> SourcesConfig:
    path = tmp_path / "legato.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env=env or {}).sources


def refusal(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, env)
    return str(info.value)


# ---- the yt-dlp options


def test_defaults_point_yt_dlp_at_the_bundled_deno_and_nothing_else() -> None:
    deno = bundled_deno()
    assert deno is not None, "the deno package is one of Legato's dependencies"
    assert os.access(deno, os.X_OK)
    assert source_settings(SourcesConfig()) == SourceSettings()
    assert ydl_params(SourceSettings()) == {"js_runtimes": {"deno": {"path": deno}}}


_RACE = """
import threading
from legato.audio.sources import bundled_deno
n = 32
gate = threading.Barrier(n)
found, errors = [], []
def look():
    gate.wait()
    try:
        found.append(bundled_deno())
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=look) for _ in range(n)]
for t in threads: t.start()
for t in threads: t.join()
print(len(found), len(set(found)), errors[:1])
"""


def test_the_bundled_deno_is_found_by_many_threads_at_once_in_a_fresh_process() -> None:
    # Several /play resolving at once look it up from yt-dlp threads; Python 3.11's lazy
    # sysconfig set-up under the deno package made some of them raise TypeError (4 fresh
    # processes in 5 before the fix). A fresh interpreter each time: the set-up happens once.
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-c", _RACE], capture_output=True, text=True, timeout=60, check=True
        )
        assert done.stdout.split() == ["32", "1", "[]"], done.stdout + done.stderr


def test_every_key_becomes_yt_dlp_options(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    cookies = write_cookies(tmp_path / "cookies.txt", f".youtube.com\tTRUE\t/\tTRUE\t{FAR}\tA\tb")
    src = load(
        tmp_path,
        f"""
[sources]
cookies_file = "{cookies}"
youtube_player_clients = ["tv", "web_safari", "-ios"]
pot_provider = "http://127.0.0.1:4416/"
plugin_dirs = ["{plugins}"]
js_runtime = "/opt/node-22/bin/node"

[sources.extractor_args]
youtube = {{ player_skip = ["webpage", "configs"] }}
generic = {{ impersonate = "chrome" }}
""",
    )
    settings = source_settings(src)
    assert settings.cookies_file == str(cookies)
    assert settings.plugin_dirs == (str(plugins),)
    assert ydl_params(settings) == {
        "js_runtimes": {"node": {"path": "/opt/node-22/bin/node"}},
        "extractor_args": {
            "youtube": {
                "player_skip": ["webpage", "configs"],
                "player_client": ["tv", "web_safari", "-ios"],
            },
            "generic": {"impersonate": ["chrome"]},
            "youtubepot-bgutilhttp": {"base_url": ["http://127.0.0.1:4416"]},
        },
    }
    assert "cookiefile" not in ydl_params(settings)  # yt-dlp would write the jar back to it


def test_a_relative_cookies_file_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_cookies(tmp_path / "cookies.txt", f".youtube.com\tTRUE\t/\tTRUE\t{FAR}\tA\tb")
    src = load(tmp_path, '[sources]\ncookies_file = "cookies.txt"\n')
    assert src.cookies_file == "cookies.txt"
    assert source_settings(src).cookies_file == str(tmp_path / "cookies.txt")


def test_a_provider_directory_is_its_script_server(tmp_path: Path) -> None:
    src = load(tmp_path, f'[sources]\npot_provider = "{tmp_path}"\n')
    assert ydl_params(source_settings(src))["extractor_args"] == {
        "youtubepot-bgutilscript": {"server_home": [str(tmp_path)]}
    }


def test_environment_overrides(tmp_path: Path) -> None:
    src = load(
        tmp_path,
        "",
        env={
            "LEGATO_SOURCES_YOUTUBE_PLAYER_CLIENTS": "tv,web",
            "LEGATO_SOURCES_EXTRACTOR_ARGS": (
                "youtube:player_skip=webpage,configs;lang=en generic:x=1"
            ),
            "LEGATO_SOURCES_JS_RUNTIME": "bun",
        },
    )
    assert src.youtube_player_clients == ("tv", "web")
    assert src.extractor_args == (
        ("youtube", "player_skip", ("webpage", "configs")),
        ("youtube", "lang", ("en",)),
        ("generic", "x", ("1",)),
    )
    assert ydl_params(source_settings(src))["js_runtimes"] == {"bun": {"path": "bun"}}


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("deno", "deno"),
        ("/usr/local/bin/node", "node"),
        ("/usr/bin/nodejs", "node"),
        ("C:\\bun\\bun.exe", "bun"),
        ("/opt/qjs", "quickjs"),
        ("/opt/node-22/bin/node22", "node"),
    ],
)
def test_runtime_kind_from_the_executable_name(path: str, kind: str) -> None:
    assert runtime_kind(path.replace("\\", "/")) == kind


# ---- refused values


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('youtube_player_clients = ["web", "netscape"]', "'tv'"),
        ('youtube_player_clients = "web"', "a list of YouTube player clients"),
        ("extractor_args = { youtube = 1 }", "a table of yt-dlp extractor arguments"),
        ('extractor_args = { "You Tube" = { a = "b" } }', "a table of yt-dlp extractor arguments"),
        (
            'extractor_args = { youtube = { a = ["b\\n"] } }',
            "a table of yt-dlp extractor arguments",
        ),
        ('extractor_args = { youtube = { player_client = ["tv"] } }', "youtube_player_clients"),
        ('extractor_args = { youtube-ejs = { dev = ["true"] } }', "developer switches"),
        ('pot_provider = "ftp://127.0.0.1:4416"', "the PO-token provider's address"),
        ('pot_provider = "relative/dir"', "the PO-token provider's address"),
        ('pot_provider = "/no/such/provider"', "an existing directory"),
        ('plugin_dirs = ["relative"]', "a list of absolute directory paths"),
        ('plugin_dirs = ["/no/such/plugins"]', "/no/such/plugins is not a directory"),
        ('js_runtime = "/usr/bin/python3"', "a deno, node, bun or qjs executable"),
    ],
)
def test_bad_values_are_refused_with_the_key(tmp_path: Path, text: str, words: str) -> None:
    key = text.split(" =")[0]
    message = refusal(tmp_path, f"[sources]\n{text}\n")
    assert f"sources.{key}" in message
    assert words in message


def test_missing_cookies_file_is_refused_at_load(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    message = refusal(tmp_path, f'[sources]\ncookies_file = "{missing}"\n')
    assert f"sources.cookies_file = '{missing}' is invalid" in message
    assert "does not exist" in message
    message = refusal(tmp_path, f'[sources]\ncookies_file = "{tmp_path}"\n')
    assert "is not a regular file" in message


def test_cookies_file_others_may_read_is_warned_about_without_its_contents(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cookies = write_cookies(
        tmp_path / "cookies.txt", f".youtube.com\tTRUE\t/\tTRUE\t{FAR}\tSID\t{SECRET}", mode=0o644
    )
    with caplog.at_level(logging.DEBUG):
        load(tmp_path, f'[sources]\ncookies_file = "{cookies}"\n')
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "can be read by other users" in warning.getMessage()
    assert "chmod 600" in warning.getMessage()
    caplog.clear()
    cookies.chmod(0o600)
    with caplog.at_level(logging.DEBUG):
        load(tmp_path, f'[sources]\ncookies_file = "{cookies}"\n')
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert SECRET not in caplog.text


# ---- the cookies file reader


def test_netscape_cookies_are_read(tmp_path: Path) -> None:
    path = write_cookies(
        tmp_path / "c.txt",
        f".youtube.com\tTRUE\t/\tTRUE\t{FAR}\tSID\t{SECRET}",
        f"#HttpOnly_.youtube.com\tTRUE\t/\tTRUE\t{FAR}\tHSID\thttp-only",
        "www.youtube.com\tFALSE\t/watch\tFALSE\t0\tPREF\tsession",
        ".youtube.com\tTRUE\t/\tTRUE\t1000\tOLD\texpired-long-ago",
        "",
        "# a comment",
    )
    cookies = {c.name: c for c in read_cookies(path)}
    assert set(cookies) == {"SID", "HSID", "PREF"}
    assert cookies["SID"].value == SECRET
    assert cookies["SID"].domain == ".youtube.com"
    assert cookies["SID"].secure
    assert cookies["SID"].expires == int(FAR)
    assert cookies["HSID"].has_nonstandard_attr("HttpOnly")
    assert cookies["PREF"].path == "/watch"
    assert cookies["PREF"].discard  # a session cookie
    assert not cookies["PREF"].domain_specified


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (f"[{{'name': 'SID', 'value': '{SECRET}'}}]", "is JSON"),
        (f"youtube.com SID {SECRET}\n", "line 1 has 1 tab-separated fields"),
        (f".youtube.com\tyes\t/\tTRUE\t{FAR}\tSID\t{SECRET}\n", "TRUE or FALSE"),
        (f".youtube.com\tTRUE\t/\tTRUE\tsoon\tSID\t{SECRET}\n", "expiry is not a number"),
    ],
)
def test_a_bad_cookies_file_is_refused_without_quoting_it(
    tmp_path: Path, text: str, words: str
) -> None:
    path = tmp_path / "c.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CookieFileError) as info:
        read_cookies(path)
    assert words in str(info.value)
    assert str(path) in str(info.value)
    assert SECRET not in str(info.value)
