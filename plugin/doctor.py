"""``python -m legato doctor``: what a working bot needs, checked here and now, as a table.

Each check gives a :class:`Row`: ``ok``, ``warn`` (works, but look) or ``FAIL`` (a blocker).
The JavaScript runtime and the EJS scripts are reported as yt-dlp itself detects them (its
verbose header, made with the options Legato gives it). The ready-made bot logs the rows at start.
"""

from __future__ import annotations

import datetime
import enum
import importlib.metadata
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from legato.audio.sources import (
    CookieFileError,
    SourceSettings,
    read_cookies,
    readable_by_others,
    ydl_params,
)
from legato.cogs.build import source_settings
from legato.config import Config, load_config
from legato.errors import ConfigError

__all__ = ["Row", "Status", "check_all", "format_table", "log_rows"]

_log = logging.getLogger(__name__)

#: yt-dlp older than this is flagged: YouTube changes often, and yt-dlp follows within days.
YTDLP_MAX_AGE: Final = datetime.timedelta(weeks=6)

#: Decoders and demuxers Legato plays through (decode.py): the essential ones fail the check.
_DECODERS: Final = {"opus": True, "aac": True, "mp3": True, "vorbis": False, "flac": False}
_DEMUXERS: Final = {
    "matroska": True,  # WebM, YouTube's Opus
    "mov": True,  # MP4/M4A, YouTube's AAC
    "ogg": True,
    "mp3": True,
    "hls": False,  # live streams
    "flac": False,
    "wav": False,
}


class Status(enum.Enum):
    """How a check went."""

    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Row:
    """One check's outcome: what was checked, how it went, and what was found."""

    check: str
    status: Status
    detail: str


def _libopus() -> Row:
    try:
        import opuslib.api.info

        from legato.audio.encode import OpusEncoder
        from legato.audio.source import FRAME_BYTES

        version = opuslib.api.info.get_version_string().decode()
        packet = OpusEncoder().encode(bytes(FRAME_BYTES))
    except Exception as exc:  # noqa: BLE001 - any failure to load or encode is the finding
        return Row("libopus", Status.FAIL, f"cannot encode Opus: {exc}")
    return Row("libopus", Status.OK, f"{version}; encoded a 20 ms frame ({len(packet)} bytes)")


def _pyav() -> list[Row]:
    try:
        import av
        import av.codec
        import av.format
    except ImportError as exc:
        return [Row("PyAV", Status.FAIL, f"cannot import PyAV: {exc}")]
    libs = av.library_versions
    libav = ", ".join(f"{name} {'.'.join(map(str, libs[name]))}" for name in sorted(libs))
    rows = [Row("PyAV", Status.OK, f"PyAV {av.__version__}, FFmpeg {av.ffmpeg_version_info}")]
    rows.append(Row("FFmpeg libraries", Status.OK, libav))
    missing: list[tuple[str, bool]] = []
    for name, essential in _DECODERS.items():
        try:
            av.codec.Codec(name, "r")
        except ValueError:  # UnknownCodecError
            missing.append((f"decoder {name}", essential))
    for name, essential in _DEMUXERS.items():
        try:
            av.format.ContainerFormat(name, "r")
        except ValueError:
            missing.append((f"demuxer {name}", essential))
    found = f"decoders {', '.join(_DECODERS)}; demuxers {', '.join(_DEMUXERS)}"
    if not missing:
        rows.append(Row("codecs, demuxers", Status.OK, found))
    else:
        status = Status.FAIL if any(essential for _, essential in missing) else Status.WARN
        names = ", ".join(name for name, _ in missing)
        rows.append(Row("codecs, demuxers", status, f"this FFmpeg lacks {names}"))
    return rows


def _ytdlp_version(today: datetime.date) -> Row:
    try:
        import yt_dlp.version
    except ImportError as exc:
        return Row("yt-dlp", Status.FAIL, f"cannot import yt-dlp: {exc}")
    version = str(yt_dlp.version.__version__)
    match = re.match(r"(\d{4})\.(\d{1,2})\.(\d{1,2})", version)
    if match is None:
        return Row("yt-dlp", Status.WARN, f"{version}: cannot tell its date")
    released = datetime.date(*map(int, match.groups()))
    age = today - released
    if age > YTDLP_MAX_AGE:
        return Row(
            "yt-dlp",
            Status.WARN,
            f"{version} is {age.days} days old; YouTube changes often: "
            "pip install -U 'yt-dlp[default,deno]'",
        )
    return Row("yt-dlp", Status.OK, f"{version} ({age.days} days old)")


class _Lines:
    """A yt-dlp logger keeping its debug lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def debug(self, msg: str) -> None:
        self.lines.append(msg)

    def info(self, msg: str) -> None:
        self.lines.append(msg)

    def warning(self, msg: str) -> None:
        self.lines.append(msg)

    def error(self, msg: str) -> None:
        self.lines.append(msg)


def _header_value(lines: Sequence[str], name: str) -> str | None:
    for line in lines:
        if line.startswith(f"[debug] {name}: "):
            return line.split(": ", 1)[1].strip()
    return None


def _javascript(settings: SourceSettings) -> list[Row]:
    """The JS runtime and the EJS scripts, from yt-dlp's verbose header."""
    try:
        import yt_dlp
        from yt_dlp.extractor.youtube.jsc._builtin.vendor import VERSION as EJS_EXPECTED
    except ImportError as exc:
        return [Row("JS runtime", Status.FAIL, f"cannot import yt-dlp's challenge solver: {exc}")]
    logger = _Lines()
    params = ydl_params(settings)
    options = {"quiet": True, "verbose": True, "logger": logger, "cachedir": False, **params}
    with yt_dlp.YoutubeDL(options):  # verbose: it writes its debug header as it starts
        pass
    configured = ", ".join(
        f"{kind} at {path}" if os.sep in (path := conf.get("path") or "") else f"{kind} on PATH"
        for kind, conf in params["js_runtimes"].items()
    )
    runtimes = _header_value(logger.lines, "JS runtimes") or "none"
    if runtimes.startswith("none"):
        js = Row("JS runtime", Status.FAIL, f"yt-dlp finds none (looked for {configured})")
    elif "unsupported" in runtimes:
        js = Row("JS runtime", Status.FAIL, f"yt-dlp finds {runtimes}: too old")
    else:
        js = Row("JS runtime", Status.OK, f"yt-dlp finds {runtimes} ({configured})")
    libraries = _header_value(logger.lines, "Optional libraries") or ""
    found = re.search(r"yt_dlp_ejs-([\w.]+)", libraries)
    wanted = ".".join(EJS_EXPECTED.split(".")[:2])
    if found is None:
        ejs = Row(
            "EJS scripts",
            Status.FAIL,
            f"yt-dlp finds no yt-dlp-ejs (it needs {EJS_EXPECTED}): pip install 'yt-dlp[default]'",
        )
    elif ".".join(found.group(1).split(".")[:2]) != wanted:
        ejs = Row(
            "EJS scripts",
            Status.FAIL,
            f"yt-dlp-ejs {found.group(1)}, but this yt-dlp needs {EJS_EXPECTED}",
        )
    else:
        ejs = Row("EJS scripts", Status.OK, f"yt-dlp-ejs {found.group(1)} (yt-dlp needs {wanted})")
    return [js, ejs]


def _davey() -> Row:
    try:
        import davey  # noqa: F401 - importing it is the check

        version = importlib.metadata.version("davey")
    except (ImportError, importlib.metadata.PackageNotFoundError) as exc:
        return Row("davey (DAVE)", Status.FAIL, f"cannot import davey: {exc}")
    return Row("davey (DAVE)", Status.OK, f"davey {version}")


def _cookies(config: Config | None) -> Row:
    if config is None:
        return Row("cookies file", Status.WARN, "not checked: the configuration did not load")
    path = config.sources.cookies_file
    if not path:
        return Row(
            "cookies file", Status.OK, "not set (set [sources] cookies_file if YouTube asks)"
        )
    try:
        count = len(read_cookies(path))
    except CookieFileError as exc:
        return Row("cookies file", Status.FAIL, str(exc))
    if count == 0:
        return Row("cookies file", Status.WARN, f"{path} holds no unexpired cookies")
    if readable_by_others(path):
        return Row(
            "cookies file",
            Status.WARN,
            f"{path}: {count} cookies, but other users may read it (chmod 600 it)",
        )
    return Row("cookies file", Status.OK, f"{path}: {count} cookies, readable by its owner only")


def check_all(
    config_path: str | None = None,
    *,
    config: Config | None = None,
    today: datetime.date | None = None,
    load: Callable[[str | None], Config] = load_config,
) -> list[Row]:
    """Run every check.

    Args:
        config_path: The configuration file to check (``None``: where Legato looks).
        config: An already loaded configuration (the ready-made bot's); then not loaded again.
        today: The date yt-dlp's age is measured to (default: today, UTC).
        load: Reads the configuration.

    Returns:
        One row per check, in a fixed order.
    """
    today = today or datetime.datetime.now(datetime.UTC).date()
    rows = [_libopus(), *_pyav(), _ytdlp_version(today)]
    config_row: Row
    if config is None:
        try:
            config = load(config_path)
        except ConfigError as exc:
            config_row = Row("configuration", Status.FAIL, str(exc))
        else:
            where = config.source or "no file: the defaults"
            config_row = Row("configuration", Status.OK, f"valid ({where})")
    else:
        config_row = Row("configuration", Status.OK, f"valid ({config.source or 'the defaults'})")
    settings = source_settings(config.sources) if config is not None else SourceSettings()
    rows += _javascript(settings)
    rows += [_davey(), config_row, _cookies(config)]
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a plain-text table, with a last line counting blockers and warnings."""
    width = max(len("check"), *(len(r.check) for r in rows))
    lines = [f"{'check':<{width}}  status  detail"]
    lines += [f"{r.check:<{width}}  {r.status.value:<6}  {r.detail}" for r in rows]
    lines.append(_summary(rows))
    return "\n".join(lines)


def _summary(rows: Sequence[Row]) -> str:
    fails = sum(r.status is Status.FAIL for r in rows)
    warns = sum(r.status is Status.WARN for r in rows)
    return f"{len(rows)} checks: {fails} blocker(s), {warns} warning(s)"


def log_rows(rows: Sequence[Row], logger: logging.Logger = _log) -> None:
    """Log the summary, then each row that is not ``ok`` (blockers as errors)."""
    logger.info("doctor: %s", _summary(rows))
    for row in rows:
        if row.status is Status.FAIL:
            logger.error("doctor: %s: %s", row.check, row.detail)
        elif row.status is Status.WARN:
            logger.warning("doctor: %s: %s", row.check, row.detail)
        else:
            logger.debug("doctor: %s: %s", row.check, row.detail)
