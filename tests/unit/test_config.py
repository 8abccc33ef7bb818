"""The configuration file: defaults, every key's validation, error wording, env overrides."""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import legato
from legato import hosts, resolve_config
from legato.audio import urlguard
from legato.config import (
    BotConfig,
    Config,
    PermissionsConfig,
    PlaybackConfig,
    SandboxConfig,
    StorageConfig,
    VoiceConfig,
    config_path,
    load_config,
    parse_config,
)
from legato.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "legato.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    return str(info.value)


def test_missing_file_means_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(env={})
    assert cfg == Config()
    assert cfg.source is None
    assert cfg.playback.default_volume == 100
    assert cfg.voice.transport == "auto"
    assert cfg.voice.gateway_version == "auto"
    assert cfg.permissions.dj_role == ""


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, env={})
    assert str(info.value) == f"{missing}: no such configuration file"


def test_env_named_missing_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nope.toml"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(env={"LEGATO_CONFIG": str(missing)})
    assert str(info.value) == (
        f"{missing}: no such configuration file (named by $LEGATO_CONFIG or legato.configure())"
    )


def test_bot_config_path_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="no such configuration file"):
        resolve_config(SimpleNamespace(legato_config_path=str(missing)))


def test_configured_path_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEGATO_CONFIG", raising=False)  # monkeypatch restores it afterwards
    monkeypatch.chdir(tmp_path)
    legato.configure(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="no such configuration file"):
        resolve_config(SimpleNamespace())
    legato.configure(None)
    assert resolve_config(SimpleNamespace()).source is None  # ./legato.toml may be absent


def test_path_order_explicit_then_env_then_default(tmp_path: Path) -> None:
    env = {"LEGATO_CONFIG": str(tmp_path / "from-env.toml")}
    assert config_path(tmp_path / "x.toml", env=env) == tmp_path / "x.toml"
    assert config_path(None, env=env) == tmp_path / "from-env.toml"
    assert config_path(None, env={}) == Path("legato.toml")


def test_env_named_file_is_read(tmp_path: Path) -> None:
    path = write(tmp_path, "[playback]\nmax_volume = 180\n", "other.toml")
    cfg = load_config(env={"LEGATO_CONFIG": str(path)})
    assert cfg.playback.max_volume == 180
    assert cfg.source == str(path)


def test_default_file_in_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, '[voice]\ntransport = "udp"\n')
    monkeypatch.chdir(tmp_path)
    assert load_config(env={}).voice.transport == "udp"


FULL = """
[voice]
transport = "webrtc"
gateway_version = 8
bitrate = 96000
self_deaf = false
opus_complexity = 5
fec = true
expected_packet_loss = 10
connect_timeout = 12.5

[playback]
default_volume = 80
max_volume = 200
announce_now_playing = false
idle_timeout = 30
leave_when_alone_after = 0
max_queue_length = 20
max_track_duration = 600
max_playlist_size = 7
allowed_domains = ["Example.COM", "media.test."]
allow_local_files = true
allow_private_addresses = true
allowed_hosts = ["127.0.0.1:8000", "[::1]:9000", "media.lan"]
search_provider = "http://127.0.0.1:9/search?q={query}"
search_results = 3
resolve_timeout = 5
stream_timeout = 4
stall_timeout = 2.5
max_reopens = 0
starve_window = 8
starve_limit = 3.5

[permissions]
dj_role = "DJ"
skip = "requester"
stop = "everyone"
clear = "requester"
vote_skip_ratio = 0.75

[sandbox]
host = "::1"
gateway_port = 5001
rest_port = 5002
voice_port = 5003
media_port = 5004
demo_guild = "My Demo"
demo_listeners = ["carol"]
demo_tone_hz = 880
demo_seconds = 3

[storage]
enabled = true
path = "state/guilds.db"
save_interval = 1.5

[bot]
sync_commands = false
log_level = "DEBUG"
api_base = "http://127.0.0.1:3001/api/v9/"
gateway_url = "ws://127.0.0.1:3002/"
connect_attempts = 2
connect_backoff = 0.5
connect_backoff_max = 4
"""


def test_every_key_is_read(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL), env={})
    assert cfg.voice == VoiceConfig(
        transport="webrtc",
        gateway_version=8,
        bitrate=96000,
        self_deaf=False,
        opus_complexity=5,
        fec=True,
        expected_packet_loss=10,
        connect_timeout=12.5,
    )
    assert cfg.playback == PlaybackConfig(
        default_volume=80,
        max_volume=200,
        announce_now_playing=False,
        idle_timeout=30.0,
        leave_when_alone_after=0.0,
        max_queue_length=20,
        max_track_duration=600.0,
        max_playlist_size=7,
        allowed_domains=("example.com", "media.test"),
        allow_local_files=True,
        allow_private_addresses=True,
        allowed_hosts=("127.0.0.1:8000", "[::1]:9000", "media.lan"),
        search_provider="http://127.0.0.1:9/search?q={query}",
        search_results=3,
        resolve_timeout=5.0,
        stream_timeout=4.0,
        stall_timeout=2.5,
        max_reopens=0,
        starve_window=8.0,
        starve_limit=3.5,
    )
    assert cfg.permissions == PermissionsConfig(
        dj_role="DJ", skip="requester", stop="everyone", clear="requester", vote_skip_ratio=0.75
    )
    assert cfg.sandbox == SandboxConfig(
        host="::1",
        gateway_port=5001,
        rest_port=5002,
        voice_port=5003,
        media_port=5004,
        demo_guild="My Demo",
        demo_listeners=("carol",),
        demo_tone_hz=880.0,
        demo_seconds=3.0,
    )
    assert cfg.storage == StorageConfig(enabled=True, path="state/guilds.db", save_interval=1.5)
    assert cfg.bot == BotConfig(
        sync_commands=False,
        log_level="DEBUG",
        api_base="http://127.0.0.1:3001/api/v9",
        gateway_url="ws://127.0.0.1:3002/",
        connect_attempts=2,
        connect_backoff=0.5,
        connect_backoff_max=4.0,
    )


def test_example_file_has_every_key_and_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "legato.toml"
    cfg = load_config(example, env={})
    text = example.read_text(encoding="utf-8")
    for section in ("voice", "playback", "permissions", "sandbox", "sources", "bot"):
        assert f"[{section}]" in text
        for f in dataclasses.fields(getattr(cfg, section)):
            assert f"\n{f.name} = " in text, f"examples/legato.toml lacks {section}.{f.name}"
    # The example documents the defaults, so loading it changes nothing.
    assert dataclasses.replace(cfg, source=None) == Config()


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.playback.max_volume = 5  # type: ignore[misc]  # the point: assignment is refused


HOSTS_EXPECTED = 'a list of "host", "host:port", "[v6]" or "[v6]:port" entries'

# (section, key, bad TOML value, words the expectation must contain)
BAD: list[tuple[str, str, str, str]] = [
    ("voice", "transport", '"tcp"', "'webrtc', 'udp', 'auto'"),
    ("voice", "gateway_version", "7", "6, 8, 'auto'"),
    ("voice", "gateway_version", '"8"', "6, 8, 'auto'"),
    ("voice", "bitrate", "1000", "an integer from 8000 to 512000"),
    ("voice", "bitrate", "96000.5", "an integer from 8000 to 512000"),
    ("voice", "self_deaf", '"yes"', "true or false"),
    ("voice", "opus_complexity", "11", "an integer from 0 to 10"),
    ("voice", "fec", "1", "true or false"),
    ("voice", "expected_packet_loss", "-1", "an integer from 0 to 100"),
    ("voice", "connect_timeout", "0", "a number from 1 to 300"),
    ("playback", "default_volume", "true", "an integer from 0 to 200"),
    ("playback", "max_volume", "0", "an integer from 1 to 200"),
    ("playback", "announce_now_playing", '"no"', "true or false"),
    ("playback", "idle_timeout", "-1", "a number from 0 to 86400"),
    ("playback", "idle_timeout", "nan", "a number from 0 to 86400"),
    ("playback", "leave_when_alone_after", '"1m"', "a number from 0 to 86400"),
    ("playback", "max_queue_length", "0", "an integer from 1 to 100000"),
    ("playback", "max_track_duration", "inf", "a number from 0 to 604800"),
    ("playback", "max_playlist_size", "10001", "an integer from 1 to 10000"),
    ("playback", "allowed_domains", '"example.com"', "a list of bare domain names"),
    ("playback", "allowed_domains", '["https://example.com"]', "a list of bare domain names"),
    ("playback", "allowed_domains", '["10.0.0.1"]', "a list of bare domain names"),
    ("playback", "allow_local_files", "0", "true or false"),
    ("playback", "allow_private_addresses", '"yes"', "true or false"),
    ("playback", "allowed_hosts", '"127.0.0.1:8000"', HOSTS_EXPECTED),
    ("playback", "allowed_hosts", '["a@b:1"]', HOSTS_EXPECTED),
    ("playback", "allowed_hosts", '["host:port"]', HOSTS_EXPECTED),
    ("storage", "enabled", "1", "true or false"),
    ("storage", "path", '""', "a file path"),
    ("storage", "save_interval", "0.1", "a number from 0.2 to 60"),
    ("playback", "search_provider", '"google"', "'youtube', 'soundcloud', 'none'"),
    ("playback", "search_provider", '"http://x.test/s"', "URL template containing {query}"),
    ("playback", "search_results", "26", "an integer from 1 to 25"),
    ("playback", "resolve_timeout", "0.5", "a number from 1 to 300"),
    ("playback", "resolve_processes", "-1", "an integer from 0 to 32"),
    ("playback", "resolve_processes", "33", "an integer from 0 to 32"),
    ("playback", "decode_processes", "-1", "an integer from 0 to 32"),
    ("playback", "decode_processes", "33", "an integer from 0 to 32"),
    ("playback", "decode_processes", "1.5", "an integer from 0 to 32"),
    ("playback", "decode_threads_first", "-1", "an integer from 0 to 10000"),
    ("playback", "decode_threads_first", "1.5", "an integer from 0 to 10000"),
    ("playback", "thread_switch_interval_ms", "-1", "a number from 0 to 100 milliseconds"),
    ("playback", "thread_switch_interval_ms", "500", "a number from 0 to 100 milliseconds"),
    ("playback", "thread_switch_interval_ms", '"1"', "a number from 0 to 100 milliseconds"),
    ("playback", "keep_queue_on_disconnect", '"yes"', "true or false"),
    ("playback", "stream_timeout", "0", "a number from 1 to 300"),
    ("playback", "stream_timeout", "301", "a number from 1 to 300"),
    ("playback", "stall_timeout", "0.5", "a number from 1 to 300"),
    ("playback", "stall_timeout", "nan", "a number from 1 to 300"),
    ("playback", "stall_timeout", '"10s"', "a number from 1 to 300"),
    ("playback", "max_reopens", "-1", "an integer from 0 to 10"),
    ("playback", "max_reopens", "11", "an integer from 0 to 10"),
    ("playback", "max_reopens", "1.5", "an integer from 0 to 10"),
    ("playback", "starve_window", "0.5", "a number from 1 to 600"),
    ("playback", "starve_limit", "0", "a number from 0.5 to 300"),
    ("permissions", "dj_role", "[1]", "a role name, a role id"),
    ("permissions", "dj_role", "-3", "a role name, a role id"),
    ("permissions", "skip", '"admins"', "'requester', 'dj', 'everyone'"),
    ("permissions", "stop", '"DJ"', "'requester', 'dj', 'everyone'"),
    ("permissions", "clear", "1", "'requester', 'dj', 'everyone'"),
    ("permissions", "vote_skip_ratio", "1.5", "a number from 0 to 1"),
    ("permissions", "cooldown_commands", "-1", "an integer from 0 to 1000"),
    ("permissions", "cooldown_commands", "2.5", "an integer from 0 to 1000"),
    ("permissions", "cooldown_seconds", "0.5", "a number from 1 to 3600"),
    ("sandbox", "host", '"0.0.0.0"', "a loopback address"),
    ("sandbox", "host", '"10.0.0.1"', "a loopback address"),
    ("sandbox", "gateway_port", "70000", "an integer from 0 to 65535"),
    ("sandbox", "rest_port", "-1", "an integer from 0 to 65535"),
    ("sandbox", "voice_port", '"80"', "an integer from 0 to 65535"),
    ("sandbox", "media_port", "1.5", "an integer from 0 to 65535"),
    ("sandbox", "demo_guild", '"x"', "a name of 2 to 100 characters"),
    ("sandbox", "demo_listeners", "[]", "a list of 1 to 10 names"),
    ("sandbox", "demo_listeners", '["a b"]', "a list of 1 to 10 names"),
    ("sandbox", "demo_listeners", '["a", "a"]', "a list of 1 to 10 names"),
    ("sandbox", "demo_tone_hz", "5", "a number from 20 to 20000"),
    ("sandbox", "demo_seconds", "0", "a number from 1 to 3600"),
    ("bot", "sync_commands", '"true"', "true or false"),
    ("bot", "log_level", '"debug"', "'DEBUG', 'INFO', 'WARNING', 'ERROR'"),
    ("bot", "api_base", '"discord.com/api/v10"', "an http(s) URL of a Discord-compatible"),
    ("bot", "api_base", '"ws://127.0.0.1:3001/api"', "an http(s) URL of a Discord-compatible"),
    ("bot", "api_base", '"http://127.0.0.1:3001/api?v=9"', "an http(s) URL"),
    ("bot", "api_base", '"http://u:p@127.0.0.1/api"', "an http(s) URL"),
    ("bot", "api_base", '"http://127.0.0.1:port/api"', "an http(s) URL"),
    ("bot", "gateway_url", '"http://127.0.0.1:3001/"', "a ws:// or wss:// URL"),
    ("bot", "gateway_url", '"wss://"', "a ws:// or wss:// URL"),
    ("bot", "gateway_url", "1", "a ws:// or wss:// URL"),
    ("bot", "connect_attempts", "0", "an integer from 1 to 100"),
    ("bot", "connect_attempts", "2.5", "an integer from 1 to 100"),
    ("bot", "connect_backoff", "0", "a number from 0.01 to 60 seconds"),
    ("bot", "connect_backoff", '"1s"', "a number from 0.01 to 60 seconds"),
    ("bot", "connect_backoff_max", "601", "a number from 0.01 to 600 seconds"),
]


def test_bad_table_covers_every_key() -> None:
    covered = {(s, k) for s, k, _, _ in BAD}
    for section, cls in [
        ("voice", VoiceConfig),
        ("playback", PlaybackConfig),
        ("permissions", PermissionsConfig),
        ("sandbox", SandboxConfig),
        ("storage", StorageConfig),
        ("bot", BotConfig),
    ]:
        for f in dataclasses.fields(cls):
            assert (section, f.name) in covered, f"no bad-value test for {section}.{f.name}"


@pytest.mark.parametrize(("section", "key", "value", "expected"), BAD)
def test_bad_value_names_file_key_value_and_expectation(
    tmp_path: Path, section: str, key: str, value: str, expected: str
) -> None:
    message = error_of(tmp_path, f"[{section}]\n{key} = {value}\n")
    assert message.startswith(str(tmp_path / "legato.toml") + ": ")
    assert f"{section}.{key} = " in message
    assert "is invalid: expected " in message
    assert expected in message


def test_bad_value_is_shown(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[playback]\nmax_volume = 5000\n")
    assert message == (
        f"{tmp_path / 'legato.toml'}: playback.max_volume = 5000 is invalid: "
        "expected an integer from 1 to 200 (percent)"
    )


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("http://127.0.0.1:8000/", 'is a URL; did you mean "127.0.0.1:8000"?'),
        ("https://media.lan", 'is a URL; did you mean "media.lan:443"?'),
        ("http://[::1]:9000/a.mp3", 'is a URL; did you mean "[::1]:9000"?'),
        ("//127.0.0.1:8000", 'is a URL; did you mean "127.0.0.1:8000"?'),
        ("127.0.0.1:8000/", 'has a path or query; did you mean "127.0.0.1:8000"?'),
        ("media.lan?x=1", 'has a path or query; did you mean "media.lan"?'),
        ("user@media.lan:80", 'has a user name; did you mean "media.lan:80"?'),
        ("127.0.0.1:0", "has port 0, not from 1 to 65535"),
        ("127.0.0.1:65536", "has port 65536, not from 1 to 65535"),
        ("media.lan:", "is malformed"),
        ("media.lan:http", "is malformed"),
        ("::1", 'needs brackets around an IPv6 address; did you mean "[::1]"?'),
        ("[127.0.0.1]", "is not an IPv6 address"),
        ("[::1", "is malformed"),
        ("my_nas", "is not a valid host name"),
        ("media lan", "is not a valid host name"),
        ("", "is empty"),
    ],
)
def test_allowed_hosts_entry_is_host_or_host_port(tmp_path: Path, entry: str, why: str) -> None:
    message = error_of(tmp_path, f"[playback]\nallowed_hosts = ['{entry}']\n")
    assert message.startswith(
        f"{tmp_path / 'legato.toml'}: playback.allowed_hosts = ['{entry}'] is invalid: "
        f"expected {HOSTS_EXPECTED}"
    )
    assert f"entry '{entry}' " in message
    assert why in message


def test_allowed_hosts_url_message_in_full(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[playback]\nallowed_hosts = ["http://127.0.0.1:8000/"]\n')
    assert message == (
        f"{tmp_path / 'legato.toml'}: playback.allowed_hosts = ['http://127.0.0.1:8000/'] is "
        'invalid: expected a list of "host", "host:port", "[v6]" or "[v6]:port" entries (port 1 '
        'to 65535; no scheme, path or user name) such as ["127.0.0.1:8000", "media.lan"]; '
        "entry 'http://127.0.0.1:8000/' is a URL; did you mean \"127.0.0.1:8000\"?"
    )


def test_allowed_hosts_bad_env_entry_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({}, source=None, env={"LEGATO_PLAYBACK_ALLOWED_HOSTS": "http://h.lan:81/"})
    message = str(info.value)
    assert message.startswith("environment variable LEGATO_PLAYBACK_ALLOWED_HOSTS = ")
    assert 'did you mean "h.lan:81"?' in message


@pytest.mark.parametrize(
    "entry",
    [
        "http://127.0.0.1:8000/",
        "https://media.lan",
        "user@media.lan:80",
        "127.0.0.1:65536",
        "::1",
        "[127.0.0.1]",
        "[fe80::1%eth0]",
        "my_nas",
        "",
        "LOCALHOST",
        "0x7f.1:80",
        "2130706433",
        "0177.0.0.1:9",
        "256.1.1.1",
        "[::ffff:127.0.0.1]:8080",
        "Bücher.example:8080",
        "media.lan.",
        "a" * 64 + ".lan",
    ],
)
def test_allowed_hosts_read_as_the_url_guard_reads_them(entry: str) -> None:
    """An entry the configuration takes is one the URL guard takes and honours (its exception
    lets that host through); one the configuration refuses, the guard refuses the same way."""
    try:
        (canonical,) = hosts.canonical_hosts([entry])
    except hosts.HostEntryError as exc:
        config_says: str | None = exc.why
    else:
        config_says = None
    if config_says is not None:
        with pytest.raises(hosts.HostEntryError) as guard_exc:
            urlguard.UrlPolicy(allowed_hosts=(entry,))
        assert guard_exc.value.why == config_says
        return
    policy = urlguard.UrlPolicy(allowed_hosts=(canonical,))
    host, port = hosts.parse_host_entry(canonical)
    policy.check_url(f"http://{hosts.show_host(host, port or 80)}/a.mp3")


def test_allowed_hosts_good_entries_in_canonical_form(tmp_path: Path) -> None:
    entries = (
        '["[::1]", "[::1]:9000", "Bücher.example:8080", "media.lan.", "127.0.0.1:65535", "h:1"]'
    )
    cfg = load_config(write(tmp_path, f"[playback]\nallowed_hosts = {entries}\n"), env={})
    assert cfg.playback.allowed_hosts == (
        "[::1]",
        "[::1]:9000",
        "xn--bcher-kva.example:8080",
        "media.lan",
        "127.0.0.1:65535",
        "h:1",
    )


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[playback]\nmax_volum = 100\n")
    assert "unknown key 'playback.max_volum'" in message
    assert "did you mean 'playback.max_volume'?" in message
    assert str(tmp_path / "legato.toml") in message


def test_unknown_key_without_close_match_lists_known(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[bot]\nzzzzzz = 1\n")
    assert "unknown key 'bot.zzzzzz'" in message
    assert (
        "known: api_base, connect_attempts, connect_backoff, connect_backoff_max, gateway_url"
        in message
    )


def test_unknown_section_suggests(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[playbak]\nmax_volume = 100\n")
    assert "unknown section [playbak]; did you mean '[playback]'?" in message


def test_section_must_be_a_table(tmp_path: Path) -> None:
    assert "voice = 3 is invalid: expected a table [voice]" in error_of(tmp_path, "voice = 3\n")


def test_default_volume_above_max_names_both(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[playback]\ndefault_volume = 200\nmax_volume = 150\n")
    assert "playback.default_volume = 200" in message
    assert "playback.max_volume (150)" in message


def test_starve_limit_must_be_under_its_window(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[playback]\nstarve_window = 5\nstarve_limit = 5\n")
    assert "playback.starve_limit = 5 is invalid: expected less than" in message
    assert "playback.starve_window (5)" in message
    cfg = load_config(write(tmp_path, "[playback]\nstarve_window = 3\nstarve_limit = 1\n"), env={})
    assert (cfg.playback.starve_window, cfg.playback.starve_limit) == (3.0, 1.0)
    assert (PlaybackConfig().starve_window, PlaybackConfig().starve_limit) == (20.0, 10.0)


def test_duplicate_sandbox_ports(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[sandbox]\nrest_port = 5000\nvoice_port = 5000\n")
    assert "sandbox.voice_port = 5000" in message
    assert "sandbox.rest_port" in message


@pytest.mark.parametrize(
    "text",
    [
        'token = "MTIz.secret.value"\n',
        '[bot]\ntoken = "MTIz.secret.value"\n',
        '[voice]\ndiscord_token = "MTIz.secret.value"\n',
    ],
)
def test_token_in_file_is_refused_without_echoing_it(tmp_path: Path, text: str) -> None:
    message = error_of(tmp_path, text)
    assert "token" in message
    assert "DISCORD_TOKEN" in message
    assert "secret" not in message


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[voice]\ntransport = \n")
    assert message.startswith(str(tmp_path / "legato.toml") + ": is not valid TOML")
    assert "line 2" in message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "legato.toml"
    path.write_bytes(b"[voice]\ntransport = '\xff'\n")
    with pytest.raises(ConfigError, match="is not UTF-8"):
        load_config(path, env={})


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    # Windows editors (Notepad, PowerShell's Out-File) start UTF-8 files with a byte order mark.
    path = tmp_path / "legato.toml"
    path.write_bytes(b"\xef\xbb\xbf[voice]\ntransport = 'udp'\n")
    assert load_config(path, env={}).voice.transport == "udp"


def test_bom_elsewhere_is_still_an_error(tmp_path: Path) -> None:
    path = tmp_path / "legato.toml"
    path.write_bytes(b"[voice]\n\xef\xbb\xbftransport = 'udp'\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(path, env={})


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, env={})
    assert str(info.value) == f"{tmp_path}: cannot be read: it is a directory, not a regular file"


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "legato.toml"
    os.mkfifo(fifo)
    outcome: list[object] = []

    def load() -> None:
        try:
            outcome.append(load_config(fifo, env={}))
        except ConfigError as exc:
            outcome.append(exc)

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(timeout=30)  # only a guard: a refusal returns at once
    if reader.is_alive():
        # Opening the write end and closing it gives the blocked reader an end of file.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join()
        pytest.fail("load_config blocked opening a FIFO")
    (result,) = outcome
    assert isinstance(result, ConfigError)
    assert str(result) == (f"{fifo}: cannot be read: it is a FIFO (named pipe), not a regular file")


def test_config_error_user_message_is_generic(tmp_path: Path) -> None:
    path = write(tmp_path, "[playback]\nmax_volume = 5000\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "5000" not in info.value.user_message
    assert "misconfigured" in info.value.user_message


# --- environment ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "value", "section", "key", "parsed"),
    [
        ("LEGATO_VOICE_TRANSPORT", "udp", "voice", "transport", "udp"),
        ("LEGATO_VOICE_GATEWAY_VERSION", "6", "voice", "gateway_version", 6),
        ("LEGATO_VOICE_GATEWAY_VERSION", "auto", "voice", "gateway_version", "auto"),
        ("LEGATO_VOICE_BITRATE", "64_000", "voice", "bitrate", 64000),
        ("LEGATO_VOICE_SELF_DEAF", "off", "voice", "self_deaf", False),
        ("LEGATO_VOICE_FEC", "Yes", "voice", "fec", True),
        ("LEGATO_PLAYBACK_MAX_VOLUME", "180", "playback", "max_volume", 180),
        ("LEGATO_PLAYBACK_IDLE_TIMEOUT", "2.5", "playback", "idle_timeout", 2.5),
        (
            "LEGATO_PLAYBACK_ALLOWED_DOMAINS",
            "a.test, B.test",
            "playback",
            "allowed_domains",
            ("a.test", "b.test"),
        ),
        (
            "LEGATO_PLAYBACK_ALLOWED_HOSTS",
            "127.0.0.1:8000, Media.LAN",
            "playback",
            "allowed_hosts",
            ("127.0.0.1:8000", "media.lan"),
        ),
        (
            "LEGATO_STORAGE_PATH",
            "/var/lib/legato/state.db",
            "storage",
            "path",
            "/var/lib/legato/state.db",
        ),
        ("LEGATO_STORAGE_SAVE_INTERVAL", "5", "storage", "save_interval", 5.0),
        ("LEGATO_PERMISSIONS_DJ_ROLE", "1234", "permissions", "dj_role", 1234),
        ("LEGATO_PERMISSIONS_DJ_ROLE", "Music", "permissions", "dj_role", "Music"),
        ("LEGATO_PERMISSIONS_VOTE_SKIP_RATIO", "0", "permissions", "vote_skip_ratio", 0.0),
        ("LEGATO_PERMISSIONS_COOLDOWN_COMMANDS", "0", "permissions", "cooldown_commands", 0),
        ("LEGATO_PERMISSIONS_COOLDOWN_SECONDS", "30", "permissions", "cooldown_seconds", 30.0),
        (
            "LEGATO_PLAYBACK_KEEP_QUEUE_ON_DISCONNECT",
            "yes",
            "playback",
            "keep_queue_on_disconnect",
            True,
        ),
        ("LEGATO_PLAYBACK_STALL_TIMEOUT", "2", "playback", "stall_timeout", 2.0),
        ("LEGATO_PLAYBACK_MAX_REOPENS", "0", "playback", "max_reopens", 0),
        ("LEGATO_PLAYBACK_STREAM_TIMEOUT", "7.5", "playback", "stream_timeout", 7.5),
        ("LEGATO_SANDBOX_HOST", "localhost", "sandbox", "host", "localhost"),
        ("LEGATO_SANDBOX_DEMO_LISTENERS", "x,y", "sandbox", "demo_listeners", ("x", "y")),
        ("LEGATO_BOT_LOG_LEVEL", "WARNING", "bot", "log_level", "WARNING"),
        (
            "LEGATO_BOT_API_BASE",
            "http://127.0.0.1:3001/api/v9/",
            "bot",
            "api_base",
            "http://127.0.0.1:3001/api/v9",
        ),
        ("LEGATO_BOT_GATEWAY_URL", "wss://gw.example/", "bot", "gateway_url", "wss://gw.example/"),
        ("LEGATO_BOT_CONNECT_ATTEMPTS", "1", "bot", "connect_attempts", 1),
        ("LEGATO_BOT_CONNECT_BACKOFF", "0.01", "bot", "connect_backoff", 0.01),
    ],
)
def test_env_overrides(
    tmp_path: Path, var: str, value: str, section: str, key: str, parsed: Any
) -> None:
    path = write(tmp_path, "[playback]\nmax_volume = 150\n[voice]\ntransport = 'webrtc'\n")
    cfg = load_config(path, env={var: value})
    assert getattr(getattr(cfg, section), key) == parsed


@pytest.mark.parametrize(
    ("var", "value", "key", "expected"),
    [
        ("LEGATO_PLAYBACK_MAX_VOLUME", "loud", "playback.max_volume", "an integer from 1 to 200"),
        ("LEGATO_VOICE_SELF_DEAF", "maybe", "voice.self_deaf", "true/false, yes/no"),
        ("LEGATO_VOICE_GATEWAY_VERSION", "7", "voice.gateway_version", "6, 8, 'auto'"),
        ("LEGATO_PERMISSIONS_VOTE_SKIP_RATIO", "2", "permissions.vote_skip_ratio", "0 to 1"),
        (
            "LEGATO_PERMISSIONS_COOLDOWN_COMMANDS",
            "many",
            "permissions.cooldown_commands",
            "0 to 1000",
        ),
        ("LEGATO_PERMISSIONS_COOLDOWN_SECONDS", "0", "permissions.cooldown_seconds", "1 to 3600"),
        ("LEGATO_SANDBOX_HOST", "0.0.0.0", "sandbox.host", "a loopback address"),
    ],
)
def test_bad_env_value_names_the_variable(var: str, value: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({}, source=None, env={var: value})
    message = str(info.value)
    assert message.startswith(f"environment variable {var} = '{value}' ({key}) is invalid")
    assert expected in message


def test_unknown_env_key_suggests_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({}, source=None, env={"LEGATO_PLAYBACK_MAX_VOLUM": "3"})
    assert "LEGATO_PLAYBACK_MAX_VOLUM" in str(info.value)
    assert "did you mean LEGATO_PLAYBACK_MAX_VOLUME?" in str(info.value)


def test_unrelated_legato_variables_are_ignored() -> None:
    cfg = parse_config({}, source=None, env={"LEGATO_BENCH_SECONDS": "3"})
    assert cfg == Config()


def test_token_override_variable_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({}, source=None, env={"LEGATO_BOT_TOKEN": "MTIz.secret"})
    assert "DISCORD_TOKEN" in str(info.value)
    assert "secret" not in str(info.value)


def test_env_override_is_checked_against_file_values(tmp_path: Path) -> None:
    path = write(tmp_path, "[playback]\nmax_volume = 150\n")
    with pytest.raises(ConfigError, match=r"playback\.default_volume = 200"):
        load_config(path, env={"LEGATO_PLAYBACK_DEFAULT_VOLUME": "200"})


def test_cooldown_and_keep_queue_defaults_and_file_values(tmp_path: Path) -> None:
    defaults = Config()
    assert defaults.permissions.cooldown_commands == 10
    assert defaults.permissions.cooldown_seconds == 10.0
    assert defaults.playback.keep_queue_on_disconnect is False
    path = write(
        tmp_path,
        "[permissions]\ncooldown_commands = 3\ncooldown_seconds = 60\n"
        "[playback]\nkeep_queue_on_disconnect = true\n",
    )
    cfg = load_config(path, env={})
    assert cfg.permissions.cooldown_commands == 3
    assert cfg.permissions.cooldown_seconds == 60.0
    assert cfg.playback.keep_queue_on_disconnect is True
    off = load_config(path, env={"LEGATO_PERMISSIONS_COOLDOWN_COMMANDS": "0"})
    assert off.permissions.cooldown_commands == 0


def test_decode_processes_default_file_and_env(tmp_path: Path) -> None:
    assert Config().playback.decode_processes == 2
    assert Config().playback.decode_threads_first == 0
    path = write(tmp_path, "[playback]\ndecode_processes = 4\n")
    assert load_config(path, env={}).playback.decode_processes == 4
    env = {"LEGATO_PLAYBACK_DECODE_PROCESSES": "32"}
    assert load_config(path, env=env).playback.decode_processes == 32
    with pytest.raises(ConfigError, match="an integer from 0 to 32"):
        load_config(path, env={"LEGATO_PLAYBACK_DECODE_PROCESSES": "33"})
