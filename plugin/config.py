"""Legato's configuration: a TOML file read into frozen dataclasses, overridden by the environment.

Where the file is: an explicit path (``load_config(path)``, ``bot.legato_config_path`` or
:func:`legato.configure`), else ``$LEGATO_CONFIG``, else ``legato.toml`` in the working directory.
A path so named must exist; only the implicit ``legato.toml`` may be absent, which means
defaults.

Every key may be overridden by ``LEGATO_<SECTION>_<KEY>`` (``LEGATO_PLAYBACK_MAX_VOLUME=150``),
parsed to the key's type. Every bad value raises :class:`~legato.errors.ConfigError` naming the
file (or variable), the dotted key, the value and what was expected; unknown keys are errors with
a "did you mean". The bot token is never read from the file: only ``DISCORD_TOKEN`` holds it.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
import stat
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias, cast

from legato.errors import ConfigError
from legato.hosts import HostEntryError, canonical_hosts
from legato.sourcecheck import CookieFileError, check_cookie_file, readable_by_others, runtime_kind

__all__ = [
    "DEFAULT_PATH",
    "ENV_CONFIG",
    "ENV_PREFIX",
    "ENV_TOKEN",
    "BotConfig",
    "Config",
    "PermissionsConfig",
    "PlaybackConfig",
    "SandboxConfig",
    "SourcesConfig",
    "StorageConfig",
    "VoiceConfig",
    "WhoMay",
    "config_path",
    "load_config",
    "parse_config",
]

_log = logging.getLogger(__name__)

#: Read when no explicit path and no ``LEGATO_CONFIG`` is given.
DEFAULT_PATH: Final = "legato.toml"
#: Environment variable naming the configuration file.
ENV_CONFIG: Final = "LEGATO_CONFIG"
#: Prefix of the per-key override variables: ``LEGATO_<SECTION>_<KEY>``.
ENV_PREFIX: Final = "LEGATO_"
#: The only place the bot token is read from.
ENV_TOKEN: Final = "DISCORD_TOKEN"

#: Who may run a command that affects everyone listening.
WhoMay: TypeAlias = Literal["requester", "dj", "everyone"]

_TOKEN_KEYS: Final = frozenset({"token", "bot_token", "discord_token"})
_TOKEN_HINT: Final = (
    "the bot token must not be in the configuration file; set the DISCORD_TOKEN environment "
    "variable instead (and remove the key, and rotate the token if the file was shared)"
)


class _Bad(Exception):
    """Raised by a converter: ``expected`` says what a good value looks like; ``hint``, when
    given, which part of the value is wrong and how to fix it."""

    def __init__(self, expected: str, hint: str = "") -> None:
        super().__init__(expected)
        self.expected = expected
        self.hint = hint

    def explain(self) -> str:
        """``expected ...`` and the hint, for the end of an error message."""
        return f"expected {self.expected}" + (f"; {self.hint}" if self.hint else "")


@dataclass(frozen=True, slots=True)
class _Conv:
    """How one key is read: from a TOML value and from an environment string."""

    from_toml: Callable[[object], object]
    from_env: Callable[[str], object]


def _key(default: object, conv: _Conv, doc: str) -> Any:
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable default")  # pragma: no cover - a programming error
    return field(default=default, metadata={"conv": conv, "doc": doc})


# --- converters -------------------------------------------------------------------------------

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _boolean() -> _Conv:
    expected = "true or false"

    def from_toml(v: object) -> bool:
        if isinstance(v, bool):
            return v
        raise _Bad(expected)

    def from_env(s: str) -> bool:
        low = s.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise _Bad("true/false, yes/no, on/off or 1/0")

    return _Conv(from_toml, from_env)


def _integer(lo: int, hi: int, unit: str = "") -> _Conv:
    suffix = f" ({unit})" if unit else ""
    expected = f"an integer from {lo} to {hi}{suffix}"

    def check(v: int) -> int:
        if not lo <= v <= hi:
            raise _Bad(expected)
        return v

    def from_toml(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad(expected)
        return check(v)

    def from_env(s: str) -> int:
        try:
            return check(int(s.strip().replace("_", "")))
        except ValueError:
            raise _Bad(expected) from None

    return _Conv(from_toml, from_env)


def _number(lo: float, hi: float, unit: str = "") -> _Conv:
    suffix = f" {unit}" if unit else ""
    expected = f"a number from {lo:g} to {hi:g}{suffix}"

    def check(v: float) -> float:
        if v != v or not lo <= v <= hi:  # NaN compares false with everything
            raise _Bad(expected)
        return float(v)

    def from_toml(v: object) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Bad(expected)
        return check(v)

    def from_env(s: str) -> float:
        try:
            return check(float(s.strip()))
        except ValueError:
            raise _Bad(expected) from None

    return _Conv(from_toml, from_env)


def _choice(*options: str | int) -> _Conv:
    expected = "one of " + ", ".join(repr(o) for o in options)

    def from_toml(v: object) -> str | int:
        for o in options:
            if type(v) is type(o) and v == o:
                return o
        raise _Bad(expected)

    def from_env(s: str) -> str | int:
        for o in options:
            if str(o) == s.strip():
                return o
        raise _Bad(expected)

    return _Conv(from_toml, from_env)


def _text(pattern: str | None = None, expected: str = "a string") -> _Conv:
    rx = re.compile(pattern) if pattern else None

    def from_toml(v: object) -> str:
        if not isinstance(v, str) or (rx is not None and not rx.fullmatch(v)):
            raise _Bad(expected)
        return v

    return _Conv(from_toml, from_toml)


def _role() -> _Conv:
    expected = 'a role name, a role id (integer) or "" for none'

    def from_toml(v: object) -> str | int:
        if isinstance(v, bool):
            raise _Bad(expected)
        if isinstance(v, int):
            if v <= 0:
                raise _Bad(expected)
            return v
        if isinstance(v, str):
            return v.strip()
        raise _Bad(expected)

    def from_env(s: str) -> str | int:
        s = s.strip()
        return int(s) if s.isdigit() else s

    return _Conv(from_toml, from_env)


def _listed(
    check: Callable[[list[object]], tuple[str, ...]],
    expected: str | Callable[[], str],
    sep: str = ",",
) -> _Conv:
    """A list key: a TOML array, or in the environment ``sep``-separated items (each stripped,
    blank ones dropped); either list goes whole to ``check``. ``expected`` may be a function,
    for a message that is costly to build."""

    def from_toml(v: object) -> tuple[str, ...]:
        if not isinstance(v, list):
            raise _Bad(expected() if callable(expected) else expected)
        return check(v)

    def from_env(s: str) -> tuple[str, ...]:
        return check([x.strip() for x in s.split(sep) if x.strip()])

    return _Conv(from_toml, from_env)


_DOMAIN: Final = re.compile(
    r"(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9-]{1,63}"
)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _domains() -> _Conv:
    expected = 'a list of bare domain names such as ["youtube.com", "soundcloud.com"]'

    def one(v: object) -> str:
        if not isinstance(v, str):
            raise _Bad(expected)
        d = v.strip().lower().rstrip(".")
        if not _DOMAIN.fullmatch(d) or _is_address(d):
            raise _Bad(expected)
        return d

    return _listed(lambda items: tuple(one(x) for x in items), expected)


def _hosts() -> _Conv:
    expected = (
        'a list of "host", "host:port", "[v6]" or "[v6]:port" entries (port 1 to 65535; no '
        'scheme, path or user name) such as ["127.0.0.1:8000", "media.lan"]'
    )

    def check(items: list[object]) -> tuple[str, ...]:
        if not all(isinstance(x, str) for x in items):
            raise _Bad(expected)
        try:
            return canonical_hosts(cast(list[str], items))
        except HostEntryError as exc:
            raise _Bad(expected, f"entry {exc.entry!r} {exc.why}") from None

    return _listed(check, expected)


def _loopback_host() -> _Conv:
    expected = 'a loopback address such as "127.0.0.1", "::1" or "localhost"'

    def from_toml(v: object) -> str:
        if not isinstance(v, str):
            raise _Bad(expected)
        if v == "localhost":
            return v
        try:
            if ipaddress.ip_address(v).is_loopback:
                return v
        except ValueError:
            pass
        raise _Bad(expected)

    return _Conv(from_toml, from_toml)


def _names() -> _Conv:
    expected = "a list of 1 to 10 names of 1 to 32 letters, digits, '_' or '-'"
    rx = re.compile(r"[A-Za-z0-9_-]{1,32}")

    def check(items: list[object]) -> tuple[str, ...]:
        if not 1 <= len(items) <= 10 or not all(isinstance(x, str) for x in items):
            raise _Bad(expected)
        names = tuple(cast(str, x) for x in items)
        if not all(rx.fullmatch(n) for n in names) or len(set(names)) != len(names):
            raise _Bad(expected)
        return names

    return _listed(check, expected)


def _provider() -> _Conv:
    expected = (
        "one of 'youtube', 'soundcloud', 'none', or an http(s) URL template containing {query}"
    )

    def from_toml(v: object) -> str:
        if isinstance(v, str) and v in ("youtube", "soundcloud", "none"):
            return v
        if (
            isinstance(v, str)
            and re.fullmatch(r"https?://[^\s]+", v) is not None
            and "{query}" in v
        ):
            return v
        raise _Bad(expected)

    return _Conv(from_toml, from_toml)


def _base_url(schemes: tuple[str, ...], expected: str, *, strip_slash: bool) -> _Conv:
    """``""``, or an absolute URL with one of ``schemes``, a host, and no query, fragment or
    user name; ``strip_slash`` drops a trailing ``/`` (for a base that paths are appended to)."""

    def from_toml(v: object) -> str:
        if not isinstance(v, str):
            raise _Bad(expected)
        if v == "":
            return v
        try:
            parts = urllib.parse.urlsplit(v)
            parts.port  # noqa: B018 - raises ValueError on a port that is not a number
        except ValueError:
            raise _Bad(expected) from None
        if (
            parts.scheme not in schemes
            or not parts.hostname
            or parts.query
            or parts.fragment
            or "@" in parts.netloc
            or re.search(r"[\s\\]", v)
        ):
            raise _Bad(expected)
        return v.rstrip("/") if strip_slash else v

    return _Conv(from_toml, from_toml)


def _port() -> _Conv:
    return _integer(0, 65535, "0 picks a free port")


def _file_path() -> _Conv:
    expected = 'a file path, or "" for none'

    def from_toml(v: object) -> str:
        if not isinstance(v, str) or "\x00" in v or len(v) > 4096:
            raise _Bad(expected)
        return v.strip()

    return _Conv(from_toml, from_toml)


def _player_clients() -> _Conv:
    def known() -> list[str]:
        # yt-dlp's own list (yt_dlp/extractor/youtube/_base.py), so a new client needs no
        # change here; names starting with "_" are yt-dlp's internal ones.
        from yt_dlp.extractor.youtube._base import INNERTUBE_CLIENTS

        return sorted(c for c in INNERTUBE_CLIENTS if not c.startswith("_"))

    def expected() -> str:
        return (
            "a list of YouTube player clients: 'default', 'all', "
            + ", ".join(repr(c) for c in known())
            + " (a leading '-' leaves one out)"
        )

    def check(items: list[object]) -> tuple[str, ...]:
        clients = known()
        names: list[str] = []
        for item in items:
            if not isinstance(item, str):
                raise _Bad(expected())
            name = item.strip()
            if name not in ("default", "all") and name.removeprefix("-") not in clients:
                raise _Bad(expected())
            names.append(name)
        return tuple(names)

    return _listed(check, expected)


_EXTRACTOR: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_ARG_KEY: Final = re.compile(r"[a-z0-9_][a-z0-9_-]{0,63}")
_ARG_VALUE: Final = re.compile(r"[^\x00-\x1f\x7f]{0,1000}")
#: Extractor arguments refused in extractor_args: they have keys of their own, or are yt-dlp's
#: developer switches (which turn the EJS scripts' hash checks off).
_OWN_KEYS: Final = {
    ("youtube", "player_client"): "sources.youtube_player_clients",
    ("youtubepot-bgutilhttp", "base_url"): "sources.pot_provider",
    ("youtubepot-bgutilscript", "server_home"): "sources.pot_provider",
}


def _extractor_args() -> _Conv:
    expected = (
        'a table of yt-dlp extractor arguments, {extractor = {key = ["value", ...]}}, such as '
        '{youtube = {player_skip = ["webpage"]}} (in the environment: '
        "'youtube:player_skip=webpage,configs;key=value other:key=value')"
    )

    def triple(extractor: object, key: object, values: object) -> tuple[str, str, tuple[str, ...]]:
        if not isinstance(extractor, str) or not _EXTRACTOR.fullmatch(extractor.lower()):
            raise _Bad(expected)
        if not isinstance(key, str) or not _ARG_KEY.fullmatch(key.lower()):
            raise _Bad(expected)
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list) or not all(
            isinstance(x, str) and _ARG_VALUE.fullmatch(x) for x in values
        ):
            raise _Bad(expected)
        name, arg = extractor.lower(), key.lower().replace("-", "_")
        if name == "youtube-ejs":
            raise _Bad("no 'youtube-ejs' arguments: they are yt-dlp's developer switches")
        own = _OWN_KEYS.get((name, arg))
        if own is not None:
            raise _Bad(f"{own} instead of {name}.{arg}")
        return name, arg, tuple(cast(list[str], values))

    def from_toml(v: object) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
        if not isinstance(v, dict):
            raise _Bad(expected)
        out: list[tuple[str, str, tuple[str, ...]]] = []
        for extractor, table in v.items():
            if not isinstance(table, dict):
                raise _Bad(expected)
            out.extend(triple(extractor, key, values) for key, values in table.items())
        return tuple(out)

    def from_env(s: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
        out: list[tuple[str, str, tuple[str, ...]]] = []
        for part in s.split():
            extractor, colon, rest = part.partition(":")
            if not colon:
                raise _Bad(expected)
            for pair in filter(None, rest.split(";")):
                key, eq, values = pair.partition("=")
                if not eq:
                    raise _Bad(expected)
                out.append(triple(extractor, key, values.split(",")))
        return tuple(out)

    return _Conv(from_toml, from_env)


def _optional_text(expected: str, accept: Callable[[str], str]) -> _Conv:
    """A string without NUL, stripped: ``""`` for none, else what ``accept`` makes of it
    (``accept`` raises ``_Bad`` on a value it refuses)."""

    def from_toml(v: object) -> str:
        if not isinstance(v, str) or "\x00" in v:
            raise _Bad(expected)
        v = v.strip()
        return accept(v) if v else v

    return _Conv(from_toml, from_toml)


def _pot_provider() -> _Conv:
    expected = (
        'the PO-token provider\'s address ("http://127.0.0.1:4416"), the directory of its script '
        'server, or "" for none'
    )

    def accept(v: str) -> str:
        if re.fullmatch(r"https?://[^\s/?#]+/?", v) or os.path.isabs(v):
            return v.rstrip("/") if v.startswith("http") else v
        raise _Bad(expected)

    return _optional_text(expected, accept)


def _directories() -> _Conv:
    expected = "a list of absolute directory paths"

    def check(items: list[object]) -> tuple[str, ...]:
        if not all(isinstance(x, str) and os.path.isabs(x) and "\x00" not in x for x in items):
            raise _Bad(expected)
        return tuple(cast(list[str], items))

    return _listed(check, expected, os.pathsep)


def _js_runtime() -> _Conv:
    expected = (
        'a deno, node, bun or qjs executable (a path, or a name looked up in PATH), or "" for '
        "the Deno installed with Legato"
    )

    def accept(v: str) -> str:
        try:
            runtime_kind(v)
        except ValueError:
            raise _Bad(expected) from None
        return v

    return _optional_text(expected, accept)


_WHO: Final = _choice("requester", "dj", "everyone")


# --- sections ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VoiceConfig:
    """``[voice]``: how Legato connects to voice and encodes audio."""

    transport: Literal["webrtc", "udp", "auto"] = _key(
        "auto",
        _choice("webrtc", "udp", "auto"),
        "media transport; auto: udp first toward Discord, webrtc first elsewhere",
    )
    gateway_version: Literal[6, 8, "auto"] = _key(
        "auto", _choice(6, 8, "auto"), "voice gateway version; auto: 8 toward Discord, 6 elsewhere"
    )
    bitrate: int = _key(128_000, _integer(8_000, 512_000, "bits per second"), "Opus bitrate")
    self_deaf: bool = _key(True, _boolean(), "join deafened (Legato never listens)")
    opus_complexity: int = _key(10, _integer(0, 10), "Opus encoder effort, 0 fastest, 10 best")
    fec: bool = _key(False, _boolean(), "Opus in-band forward error correction")
    expected_packet_loss: int = _key(0, _integer(0, 100, "percent"), "steers FEC")
    connect_timeout: float = _key(
        30.0, _number(1, 300, "seconds"), "give up connecting to voice after this long"
    )


@dataclass(frozen=True, slots=True)
class PlaybackConfig:
    """``[playback]``: what may be played and how the player behaves."""

    default_volume: int = _key(100, _integer(0, 200, "percent"), "volume of a new player")
    max_volume: int = _key(150, _integer(1, 200, "percent"), "highest /volume accepted")
    announce_now_playing: bool = _key(True, _boolean(), "post each new track where /play ran")
    idle_timeout: float = _key(
        300.0, _number(0, 86_400, "seconds"), "leave after this long with nothing playing; 0 never"
    )
    leave_when_alone_after: float = _key(
        60.0, _number(0, 86_400, "seconds"), "leave after this long alone in the channel; 0 never"
    )
    max_queue_length: int = _key(500, _integer(1, 100_000), "tracks a guild's queue may hold")
    max_track_duration: float = _key(
        10_800.0, _number(0, 604_800, "seconds"), "longest track accepted; 0 no limit"
    )
    max_playlist_size: int = _key(100, _integer(1, 10_000), "tracks taken from one playlist")
    allowed_domains: tuple[str, ...] = _key(
        (), _domains(), "URL hosts accepted (subdomains included); empty allows all"
    )
    allow_local_files: bool = _key(False, _boolean(), "accept paths on the bot's disk")
    allow_private_addresses: bool = _key(
        False,
        _boolean(),
        "fetch from loopback, private and link-local addresses (never cloud metadata ones)",
    )
    allowed_hosts: tuple[str, ...] = _key(
        (),
        _hosts(),
        'exact "host", "host:port", "[v6]" or "[v6]:port" exceptions to the address and domain'
        " rules",
    )
    search_provider: str = _key(
        "youtube", _provider(), "what a non-URL query searches; a URL template with {query} works"
    )
    search_results: int = _key(5, _integer(1, 25), "suggestions offered by /play autocomplete")
    resolve_timeout: float = _key(
        20.0, _number(1, 300, "seconds"), "give up resolving a query after this long"
    )
    resolve_processes: int = _key(
        0,
        _integer(0, 32),
        "run yt-dlp in this many worker processes, off the bot's GIL; 0 in the bot's threads",
    )
    decode_processes: int = _key(
        2,
        _integer(0, 32),
        "worker processes that read, decode and encode tracks, off the bot's GIL (started with the"
        " first track); 0 does it all in the bot's threads",
    )
    decode_threads_first: int = _key(
        0,
        _integer(0, 10_000),
        "tracks decoded in the bot's threads before the worker processes take the rest (Opus"
        " streams then stay in the bot too); 0 sends every track to the worker processes",
    )
    thread_switch_interval_ms: float = _key(
        1.0,
        _number(0, 100, "milliseconds"),
        "longest a thread holds Python's interpreter lock while another waits for it (Python's"
        " own default is 5); 0 leaves the interpreter's setting alone",
    )
    keep_queue_on_disconnect: bool = _key(
        False,
        _boolean(),
        "when kicked from voice or the channel is deleted, keep the queue for the next /join",
    )
    stream_timeout: float = _key(
        20.0,
        _number(1, 300, "seconds"),
        "a track's stream may take this long to open, and to answer any one read",
    )
    stall_timeout: float = _key(
        10.0,
        _number(1, 300, "seconds"),
        "a playing track whose server sends nothing for this long is skipped (silence meanwhile)",
    )
    max_reopens: int = _key(
        2,
        _integer(0, 10),
        "times a stream that breaks off mid-track is resolved again and reopened where it stopped",
    )
    starve_window: float = _key(
        20.0,
        _number(1, 600, "seconds"),
        "the stretch of time over which a track's server is judged too slow (see starve_limit)",
    )
    starve_limit: float = _key(
        10.0,
        _number(0.5, 300, "seconds"),
        "a track that leaves the player without audio (waiting for its server) for more than this"
        " within starve_window is skipped as too slow; also bounds the wait for its first audio",
    )


@dataclass(frozen=True, slots=True)
class PermissionsConfig:
    """``[permissions]``: who may change what others hear."""

    dj_role: str | int = _key("", _role(), 'role (name or id) that counts as DJ; "" for none')
    skip: Literal["requester", "dj", "everyone"] = _key(
        "everyone", _WHO, "who may skip outright (others vote)"
    )
    stop: Literal["requester", "dj", "everyone"] = _key("dj", _WHO, "who may /stop")
    clear: Literal["requester", "dj", "everyone"] = _key("dj", _WHO, "who may /clear")
    vote_skip_ratio: float = _key(
        0.5, _number(0, 1), "share of listeners whose votes skip; 0 turns voting off"
    )
    cooldown_commands: int = _key(
        10, _integer(0, 1000), "commands one user may run per cooldown_seconds; 0 no limit"
    )
    cooldown_seconds: float = _key(
        10.0, _number(1, 3600, "seconds"), "the window cooldown_commands counts in"
    )


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """``[sandbox]``: the local Discord stand-in used by tests and ``make demo``."""

    host: str = _key("127.0.0.1", _loopback_host(), "address every sandbox server binds")
    gateway_port: int = _key(0, _port(), "gateway WebSocket port")
    rest_port: int = _key(0, _port(), "REST port")
    voice_port: int = _key(0, _port(), "voice gateway and media port")
    media_port: int = _key(0, _port(), "local media server port")
    demo_guild: str = _key(
        "Legato Demo", _text(r"[^\x00-\x1f]{2,100}", "a name of 2 to 100 characters"), "guild name"
    )
    demo_listeners: tuple[str, ...] = _key(("alice", "bob"), _names(), "scripted users")
    demo_tone_hz: float = _key(440.0, _number(20, 20_000, "Hz"), "tone the demo plays")
    demo_seconds: float = _key(10.0, _number(1, 3600, "seconds"), "length of the demo's tone")


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """``[storage]``: where each guild's queue and position are kept across restarts."""

    enabled: bool = _key(False, _boolean(), "keep queues and positions, and resume after a restart")
    path: str = _key(
        "legato-state.db",
        _text(r"[^\x00]{1,4096}", "a file path"),
        "SQLite database file; relative to the working directory",
    )
    save_interval: float = _key(
        1.0, _number(0.2, 60, "seconds"), "how often the playback position is written"
    )


@dataclass(frozen=True, slots=True)
class SourcesConfig:
    """``[sources]``: what yt-dlp is given for sites that check who is asking (YouTube)."""

    cookies_file: str = _key(
        "",
        _file_path(),
        'Netscape-format cookies file sent with yt-dlp\'s requests (only read); "" for none',
    )
    youtube_player_clients: tuple[str, ...] = _key(
        (), _player_clients(), "YouTube player clients yt-dlp tries, in order; empty: its default"
    )
    extractor_args: tuple[tuple[str, str, tuple[str, ...]], ...] = _key(
        (), _extractor_args(), "more yt-dlp extractor arguments"
    )
    pot_provider: str = _key(
        "",
        _pot_provider(),
        "PO-token provider (bgutil-ytdlp-pot-provider): its address or script server's directory",
    )
    plugin_dirs: tuple[str, ...] = _key(
        (), _directories(), "directories of yt-dlp plugins not installed with pip"
    )
    js_runtime: str = _key(
        "", _js_runtime(), 'JavaScript runtime for yt-dlp; "" the Deno installed with Legato'
    )


@dataclass(frozen=True, slots=True)
class BotConfig:
    """``[bot]``: the ready-made bot of ``python -m legato run``. The token is not here."""

    sync_commands: bool = _key(True, _boolean(), "sync the slash commands on start")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _key(
        "INFO", _choice("DEBUG", "INFO", "WARNING", "ERROR"), "logging level"
    )
    api_base: str = _key(
        "",
        _base_url(
            ("http", "https"),
            "an http(s) URL of a Discord-compatible REST API such as "
            '"http://127.0.0.1:3001/api/v9" (no query), or "" for Discord\'s',
            strip_slash=True,
        ),
        'REST API of a Discord-compatible server (Spacebar, the sandbox); "" is Discord\'s',
    )
    gateway_url: str = _key(
        "",
        _base_url(
            ("ws", "wss"),
            'a ws:// or wss:// URL such as "ws://127.0.0.1:3001/" (no query), or "" for Discord\'s',
            strip_slash=False,
        ),
        'gateway WebSocket of a Discord-compatible server; "" is Discord\'s',
    )
    connect_attempts: int = _key(
        5,
        _integer(1, 100),
        "tries to reach Discord at start while the cause may pass (refused, reset, timed out,"
        " temporary DNS failure); a lasting one (bad token, unknown host) stops at once",
    )
    connect_backoff: float = _key(
        1.0,
        _number(0.01, 60, "seconds"),
        "wait after the first failed try; each further wait doubles",
    )
    connect_backoff_max: float = _key(
        30.0, _number(0.01, 600, "seconds"), "longest wait between two tries"
    )


_SECTIONS: Final[dict[str, type[Any]]] = {
    "voice": VoiceConfig,
    "playback": PlaybackConfig,
    "permissions": PermissionsConfig,
    "sandbox": SandboxConfig,
    "storage": StorageConfig,
    "sources": SourcesConfig,
    "bot": BotConfig,
}


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration.

    Attributes:
        source: The file it was read from, or ``None`` when no file existed (defaults).
    """

    voice: VoiceConfig = field(default_factory=VoiceConfig)
    playback: PlaybackConfig = field(default_factory=PlaybackConfig)
    permissions: PermissionsConfig = field(default_factory=PermissionsConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    bot: BotConfig = field(default_factory=BotConfig)
    source: str | None = None


# --- loading ----------------------------------------------------------------------------------


def config_path(explicit: str | os.PathLike[str] | None = None, *, env: Mapping[str, str]) -> Path:
    """Return the file to read: ``explicit``, else ``$LEGATO_CONFIG``, else ``legato.toml``."""
    if explicit is not None and str(explicit) != "":
        return Path(explicit)
    named = env.get(ENV_CONFIG, "")
    if named:
        return Path(named)
    return Path(DEFAULT_PATH)


def load_config(
    path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> Config:
    """Read the configuration file and apply ``LEGATO_*`` overrides.

    Args:
        path: The file; ``None`` means ``$LEGATO_CONFIG``, else ``legato.toml``.
        env: The environment (default ``os.environ``).

    Returns:
        The configuration; defaults (plus overrides) when no path is named (neither ``path``
        nor ``$LEGATO_CONFIG``) and ``legato.toml`` does not exist.

    Raises:
        ConfigError: A named file does not exist; the file is not a regular file, cannot be
            read or parsed; a key is unknown, a value is bad, or an override variable is.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    file = config_path(path, env=environ)
    try:
        raw = _read_regular_file(file)
    except FileNotFoundError:
        if path is not None and str(path) != "":
            raise ConfigError(f"{file}: no such configuration file") from None
        if environ.get(ENV_CONFIG):
            raise ConfigError(
                f"{file}: no such configuration file (named by ${ENV_CONFIG} or legato.configure())"
            ) from None
        # Only the implicit ./legato.toml may be absent: a path someone named is a mistake.
        return parse_config({}, source=None, env=environ)
    except OSError as exc:
        raise ConfigError(f"{file}: cannot be read: {exc.strerror or exc}") from exc
    try:
        # utf-8-sig drops a leading byte order mark, which Windows editors write.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: is not UTF-8 text (byte {exc.start})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: is not valid TOML: {exc}") from exc
    return parse_config(data, source=str(file), env=environ)


_NOT_REGULAR: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _refuse_unless_regular(file: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _NOT_REGULAR if test(mode)), "an unusual kind of file")
    raise ConfigError(f"{file}: cannot be read: it is {kind}, not a regular file")


def _read_regular_file(file: Path) -> bytes:
    """The bytes of ``file``, refusing anything but a regular file before reading it.

    A FIFO would block the open (and the bot's start) until some writer came; a device could
    be endless. The mode is checked before opening, and again on the open descriptor (opened
    non-blocking, so a FIFO swapped in between cannot block either).

    Raises:
        FileNotFoundError: There is no such file.
        ConfigError: It is not a regular file.
        OSError: It cannot be read.
    """
    _refuse_unless_regular(file, os.stat(file).st_mode)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(file, flags)
    with os.fdopen(fd, "rb") as handle:
        _refuse_unless_regular(file, os.fstat(handle.fileno()).st_mode)
        return handle.read()


def parse_config(
    data: Mapping[str, object], *, source: str | None, env: Mapping[str, str] | None = None
) -> Config:
    """Build a :class:`Config` from parsed TOML and the environment.

    Args:
        data: What ``tomllib`` returned.
        source: File name used in error messages (``None``: no file).
        env: Environment with ``LEGATO_<SECTION>_<KEY>`` overrides (default: none).

    Raises:
        ConfigError: As :func:`load_config`.
    """
    where = source or "configuration"
    _refuse_token(data, where, prefix="")
    sections: dict[str, dict[str, object]] = {}
    for name, table in data.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{where}: unknown section [{name}]{_did_you_mean(name, _SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(
                f"{where}: {name} = {_show(table)} is invalid: expected a table [{name}]"
            )
        sections[name] = _read_section(name, table, where)
    _apply_env(sections, env or {})
    built = {name: _SECTIONS[name](**sections.get(name, {})) for name in _SECTIONS}
    cfg = Config(**built, source=source)
    _cross_check(cfg, where)
    return cfg


def _read_section(name: str, table: dict[str, object], where: str) -> dict[str, object]:
    cls = _SECTIONS[name]
    known = {f.name: f for f in fields(cls)}
    out: dict[str, object] = {}
    for key, value in table.items():
        dotted = f"{name}.{key}"
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{dotted}'{_did_you_mean(key, known, name)}")
        conv: _Conv = known[key].metadata["conv"]
        try:
            out[key] = conv.from_toml(value)
        except _Bad as bad:
            raise ConfigError(
                f"{where}: {dotted} = {_show(value)} is invalid: {bad.explain()}"
            ) from None
    return out


def _apply_env(sections: dict[str, dict[str, object]], env: Mapping[str, str]) -> None:
    if env.get(ENV_PREFIX + "BOT_TOKEN") is not None:
        raise ConfigError(f"environment variable {ENV_PREFIX}BOT_TOKEN: {_TOKEN_HINT}")
    for var, value in sorted(env.items()):
        if not var.startswith(ENV_PREFIX) or var == ENV_CONFIG:
            continue
        rest = var[len(ENV_PREFIX) :]
        section = next((s for s in _SECTIONS if rest.startswith(s.upper() + "_")), None)
        if section is None:
            continue  # LEGATO_* variables of other tools are not ours to judge
        key = rest[len(section) + 1 :].lower()
        known = {f.name: f for f in fields(_SECTIONS[section])}
        if key not in known:
            hint = _did_you_mean(key, known, section, env_style=True)
            raise ConfigError(
                f"environment variable {var}: no key '{section}.{key}' to override{hint}"
            )
        conv: _Conv = known[key].metadata["conv"]
        try:
            sections.setdefault(section, {})[key] = conv.from_env(value)
        except _Bad as bad:
            raise ConfigError(
                f"environment variable {var} = {_show(value)} ({section}.{key}) is invalid: "
                f"{bad.explain()}"
            ) from None


def _cross_check(cfg: Config, where: str) -> None:
    pb = cfg.playback
    if pb.default_volume > pb.max_volume:
        raise ConfigError(
            f"{where}: playback.default_volume = {pb.default_volume} is invalid: expected at most "
            f"playback.max_volume ({pb.max_volume})"
        )
    if pb.starve_limit >= pb.starve_window:
        raise ConfigError(
            f"{where}: playback.starve_limit = {pb.starve_limit:g} is invalid: expected less than "
            f"playback.starve_window ({pb.starve_window:g})"
        )
    sb = cfg.sandbox
    ports = [(n, getattr(sb, n)) for n in ("gateway_port", "rest_port", "voice_port", "media_port")]
    seen: dict[int, str] = {}
    for name, port in ports:
        if port and port in seen:
            raise ConfigError(
                f"{where}: sandbox.{name} = {port} is invalid: expected a port other than "
                f"sandbox.{seen[port]}'s (or 0)"
            )
        seen[port] = name
    _check_sources(cfg.sources, where)


def _check_sources(src: SourcesConfig, where: str) -> None:
    if src.cookies_file:
        try:
            check_cookie_file(src.cookies_file)
        except CookieFileError as exc:
            raise ConfigError(
                f"{where}: sources.cookies_file = {_show(src.cookies_file)} is invalid: {exc}"
            ) from None
        if readable_by_others(src.cookies_file):
            # Cookies sign in as the account they came from.
            _log.warning(
                "%s: sources.cookies_file %s can be read by other users of this machine; "
                "make it readable by the bot's user only (chmod 600)",
                where,
                src.cookies_file,
            )
    for directory in src.plugin_dirs:
        if not os.path.isdir(directory):
            raise ConfigError(
                f"{where}: sources.plugin_dirs = {_show(list(src.plugin_dirs))} is invalid: "
                f"{directory} is not a directory"
            )
    provider = src.pot_provider
    if provider and not provider.startswith("http") and not os.path.isdir(provider):
        raise ConfigError(
            f"{where}: sources.pot_provider = {_show(provider)} is invalid: expected an "
            "http(s) address or an existing directory (the provider's script server)"
        )


def _refuse_token(data: Mapping[str, object], where: str, *, prefix: str) -> None:
    for key, value in data.items():
        if key.lower() in _TOKEN_KEYS:
            # The value is never echoed: it may be a live token.
            raise ConfigError(f"{where}: key '{prefix}{key}' is refused: {_TOKEN_HINT}")
        if isinstance(value, dict):
            _refuse_token(value, where, prefix=f"{prefix}{key}.")


def _did_you_mean(
    word: str,
    known: Mapping[str, object],
    section: str | None = None,
    *,
    env_style: bool = False,
) -> str:
    close = difflib.get_close_matches(word.lower(), list(known), n=1, cutoff=0.6)
    if not close:
        options = ", ".join(sorted(known))
        return f" (known: {options})"
    if env_style and section is not None:
        return f"; did you mean {ENV_PREFIX}{section.upper()}_{close[0].upper()}?"
    dotted = f"{section}.{close[0]}" if section else f"[{close[0]}]"
    return f"; did you mean '{dotted}'?"


def _show(value: object) -> str:
    shown = repr(value) if not isinstance(value, bool) else str(value).lower()
    return shown if len(shown) <= 80 else shown[:77] + "..."
