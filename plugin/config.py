"""Legato's configuration: a TOML file read into frozen dataclasses, overridden by the environment.

Where the file is: an explicit path (``load_config(path)``, ``bot.legato_config_path`` or
:func:`legato.configure`), else ``$LEGATO_CONFIG``, else ``legato.toml`` in the working directory.
A path so named must exist; only the implicit ``legato.toml`` may be absent, which means
defaults.

Every key may be overridden by ``LEGATO_<SECTION>_<KEY>`` (``LEGATO_PLAYBACK_MAX_VOLUME=150``),
parsed to the key's type. Every bad value raises :class:`~legato.errors.ConfigError` naming the
file (or variable), the dotted key, the value and what was expected; unknown keys are errors with
a "did you mean". The bot token is never read from the file: only ``DISCORD_TOKEN`` holds it.

The rooms: this module holds the sections (each key, its default, its converter and what it
means), the rules between keys, and the public API; :mod:`legato.config_values` the converters
(what a good value of each kind is); :mod:`legato.config_load` finding and reading the file and
the environment, and the error messages for unknown names. Import from here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

from legato import config_values as values
from legato.config_load import (
    DEFAULT_PATH,
    ENV_CONFIG,
    ENV_PREFIX,
    ENV_TOKEN,
    apply_env,
    config_path,
    read_config_file,
    read_tables,
)
from legato.config_values import key, show
from legato.errors import ConfigError
from legato.sourcecheck import CookieFileError, check_cookie_file, readable_by_others

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

#: Who may run a command that affects everyone listening.
WhoMay: TypeAlias = Literal["requester", "dj", "everyone"]


# --- sections ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VoiceConfig:
    """``[voice]``: how Legato connects to voice and encodes audio."""

    transport: Literal["webrtc", "udp", "auto"] = key(
        "auto",
        values.choice("webrtc", "udp", "auto"),
        "media transport; auto: udp first toward Discord, webrtc first elsewhere",
    )
    gateway_version: Literal[6, 8, "auto"] = key(
        "auto",
        values.choice(6, 8, "auto"),
        "voice gateway version; auto: 8 toward Discord, 6 elsewhere",
    )
    bitrate: int = key(128_000, values.integer(8_000, 512_000, "bits per second"), "Opus bitrate")
    self_deaf: bool = key(True, values.boolean(), "join deafened (Legato never listens)")
    opus_complexity: int = key(10, values.integer(0, 10), "Opus encoder effort, 0 fastest, 10 best")
    fec: bool = key(False, values.boolean(), "Opus in-band forward error correction")
    expected_packet_loss: int = key(0, values.integer(0, 100, "percent"), "steers FEC")
    connect_timeout: float = key(
        30.0, values.number(1, 300, "seconds"), "give up connecting to voice after this long"
    )


@dataclass(frozen=True, slots=True)
class PlaybackConfig:
    """``[playback]``: what may be played and how the player behaves."""

    default_volume: int = key(100, values.integer(0, 200, "percent"), "volume of a new player")
    max_volume: int = key(150, values.integer(1, 200, "percent"), "highest /volume accepted")
    announce_now_playing: bool = key(True, values.boolean(), "post each new track where /play ran")
    idle_timeout: float = key(
        300.0,
        values.number(0, 86_400, "seconds"),
        "leave after this long with nothing playing; 0 never",
    )
    leave_when_alone_after: float = key(
        60.0,
        values.number(0, 86_400, "seconds"),
        "leave after this long alone in the channel; 0 never",
    )
    max_queue_length: int = key(500, values.integer(1, 100_000), "tracks a guild's queue may hold")
    max_track_duration: float = key(
        10_800.0, values.number(0, 604_800, "seconds"), "longest track accepted; 0 no limit"
    )
    max_playlist_size: int = key(100, values.integer(1, 10_000), "tracks taken from one playlist")
    allowed_domains: tuple[str, ...] = key(
        (), values.domains(), "URL hosts accepted (subdomains included); empty allows all"
    )
    allow_local_files: bool = key(False, values.boolean(), "accept paths on the bot's disk")
    allow_private_addresses: bool = key(
        False,
        values.boolean(),
        "fetch from loopback, private and link-local addresses (never cloud metadata ones)",
    )
    allowed_hosts: tuple[str, ...] = key(
        (),
        values.hosts(),
        'exact "host", "host:port", "[v6]" or "[v6]:port" exceptions to the address and domain'
        " rules",
    )
    search_provider: str = key(
        "youtube",
        values.provider(),
        "what a non-URL query searches; a URL template with {query} works",
    )
    search_results: int = key(5, values.integer(1, 25), "suggestions offered by /play autocomplete")
    resolve_timeout: float = key(
        20.0, values.number(1, 300, "seconds"), "give up resolving a query after this long"
    )
    resolve_processes: int = key(
        0,
        values.integer(0, 32),
        "run yt-dlp in this many worker processes, off the bot's GIL; 0 in the bot's threads",
    )
    decode_processes: int = key(
        2,
        values.integer(0, 32),
        "worker processes that read, decode and encode tracks, off the bot's GIL (started with the"
        " first track); 0 does it all in the bot's threads",
    )
    decode_threads_first: int = key(
        0,
        values.integer(0, 10_000),
        "tracks decoded in the bot's threads before the worker processes take the rest (Opus"
        " streams then stay in the bot too); 0 sends every track to the worker processes",
    )
    thread_switch_interval_ms: float = key(
        1.0,
        values.number(0, 100, "milliseconds"),
        "longest a thread holds Python's interpreter lock while another waits for it (Python's"
        " own default is 5); 0 leaves the interpreter's setting alone",
    )
    keep_queue_on_disconnect: bool = key(
        False,
        values.boolean(),
        "when kicked from voice or the channel is deleted, keep the queue for the next /join",
    )
    stream_timeout: float = key(
        20.0,
        values.number(1, 300, "seconds"),
        "a track's stream may take this long to open, and to answer any one read",
    )
    stall_timeout: float = key(
        10.0,
        values.number(1, 300, "seconds"),
        "a playing track whose server sends nothing for this long is skipped (silence meanwhile)",
    )
    max_reopens: int = key(
        2,
        values.integer(0, 10),
        "times a stream that breaks off mid-track is resolved again and reopened where it stopped",
    )
    starve_window: float = key(
        20.0,
        values.number(1, 600, "seconds"),
        "the stretch of time over which a track's server is judged too slow (see starve_limit)",
    )
    starve_limit: float = key(
        10.0,
        values.number(0.5, 300, "seconds"),
        "a track that leaves the player without audio (waiting for its server) for more than this"
        " within starve_window is skipped as too slow; also bounds the wait for its first audio",
    )


@dataclass(frozen=True, slots=True)
class PermissionsConfig:
    """``[permissions]``: who may change what others hear."""

    dj_role: str | int = key("", values.role(), 'role (name or id) that counts as DJ; "" for none')
    skip: Literal["requester", "dj", "everyone"] = key(
        "everyone", values.WHO, "who may skip outright (others vote)"
    )
    stop: Literal["requester", "dj", "everyone"] = key("dj", values.WHO, "who may /stop")
    clear: Literal["requester", "dj", "everyone"] = key("dj", values.WHO, "who may /clear")
    vote_skip_ratio: float = key(
        0.5, values.number(0, 1), "share of listeners whose votes skip; 0 turns voting off"
    )
    cooldown_commands: int = key(
        10, values.integer(0, 1000), "commands one user may run per cooldown_seconds; 0 no limit"
    )
    cooldown_seconds: float = key(
        10.0, values.number(1, 3600, "seconds"), "the window cooldown_commands counts in"
    )


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """``[sandbox]``: the local Discord stand-in used by tests and ``make demo``."""

    host: str = key("127.0.0.1", values.loopback_host(), "address every sandbox server binds")
    gateway_port: int = key(0, values.port(), "gateway WebSocket port")
    rest_port: int = key(0, values.port(), "REST port")
    voice_port: int = key(0, values.port(), "voice gateway and media port")
    media_port: int = key(0, values.port(), "local media server port")
    demo_guild: str = key(
        "Legato Demo",
        values.text(r"[^\x00-\x1f]{2,100}", "a name of 2 to 100 characters"),
        "guild name",
    )
    demo_listeners: tuple[str, ...] = key(("alice", "bob"), values.names(), "scripted users")
    demo_tone_hz: float = key(440.0, values.number(20, 20_000, "Hz"), "tone the demo plays")
    demo_seconds: float = key(10.0, values.number(1, 3600, "seconds"), "length of the demo's tone")


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """``[storage]``: where each guild's queue and position are kept across restarts."""

    enabled: bool = key(
        False, values.boolean(), "keep queues and positions, and resume after a restart"
    )
    path: str = key(
        "legato-state.db",
        values.text(r"[^\x00]{1,4096}", "a file path"),
        "SQLite database file; relative to the working directory",
    )
    save_interval: float = key(
        1.0, values.number(0.2, 60, "seconds"), "how often the playback position is written"
    )


@dataclass(frozen=True, slots=True)
class SourcesConfig:
    """``[sources]``: what yt-dlp is given for sites that check who is asking (YouTube)."""

    cookies_file: str = key(
        "",
        values.file_path(),
        'Netscape-format cookies file sent with yt-dlp\'s requests (only read); "" for none',
    )
    youtube_player_clients: tuple[str, ...] = key(
        (),
        values.player_clients(),
        "YouTube player clients yt-dlp tries, in order; empty: its default",
    )
    extractor_args: tuple[tuple[str, str, tuple[str, ...]], ...] = key(
        (), values.extractor_args(), "more yt-dlp extractor arguments"
    )
    pot_provider: str = key(
        "",
        values.pot_provider(),
        "PO-token provider (bgutil-ytdlp-pot-provider): its address or script server's directory",
    )
    plugin_dirs: tuple[str, ...] = key(
        (), values.directories(), "directories of yt-dlp plugins not installed with pip"
    )
    js_runtime: str = key(
        "", values.js_runtime(), 'JavaScript runtime for yt-dlp; "" the Deno installed with Legato'
    )


@dataclass(frozen=True, slots=True)
class BotConfig:
    """``[bot]``: the ready-made bot of ``python -m legato run``. The token is not here."""

    sync_commands: bool = key(True, values.boolean(), "sync the slash commands on start")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = key(
        "INFO", values.choice("DEBUG", "INFO", "WARNING", "ERROR"), "logging level"
    )
    api_base: str = key(
        "",
        values.base_url(
            ("http", "https"),
            "an http(s) URL of a Discord-compatible REST API such as "
            '"http://127.0.0.1:3001/api/v9" (no query), or "" for Discord\'s',
            strip_slash=True,
        ),
        'REST API of a Discord-compatible server (Spacebar, the sandbox); "" is Discord\'s',
    )
    gateway_url: str = key(
        "",
        values.base_url(
            ("ws", "wss"),
            'a ws:// or wss:// URL such as "ws://127.0.0.1:3001/" (no query), or "" for Discord\'s',
            strip_slash=False,
        ),
        'gateway WebSocket of a Discord-compatible server; "" is Discord\'s',
    )
    connect_attempts: int = key(
        5,
        values.integer(1, 100),
        "tries to reach Discord at start while the cause may pass (refused, reset, timed out,"
        " temporary DNS failure); a lasting one (bad token, unknown host) stops at once",
    )
    connect_backoff: float = key(
        1.0,
        values.number(0.01, 60, "seconds"),
        "wait after the first failed try; each further wait doubles",
    )
    connect_backoff_max: float = key(
        30.0, values.number(0.01, 600, "seconds"), "longest wait between two tries"
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
    data, source = read_config_file(path, environ)
    return parse_config(data, source=source, env=environ)


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
    tables = read_tables(data, _SECTIONS, where)
    apply_env(tables, _SECTIONS, env or {})
    built = {name: _SECTIONS[name](**tables.get(name, {})) for name in _SECTIONS}
    cfg = Config(**built, source=source)
    _cross_check(cfg, where)
    return cfg


# --- rules between keys -----------------------------------------------------------------------


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
                f"{where}: sources.cookies_file = {show(src.cookies_file)} is invalid: {exc}"
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
                f"{where}: sources.plugin_dirs = {show(list(src.plugin_dirs))} is invalid: "
                f"{directory} is not a directory"
            )
    provider = src.pot_provider
    if provider and not provider.startswith("http") and not os.path.isdir(provider):
        raise ConfigError(
            f"{where}: sources.pot_provider = {show(provider)} is invalid: expected an "
            "http(s) address or an existing directory (the provider's script server)"
        )
