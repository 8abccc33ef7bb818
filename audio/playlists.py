"""Plain playlist files (M3U, PLS): a list of tracks, not one stream.

yt-dlp reads an ``#EXTM3U`` file as an HLS stream (its entries become "formats" of one video, of
which one plays) and a ``.pls`` as a direct media link. Neither is what a user who shares a
playlist means, so :func:`parse_playlist` reads them as what they are; HLS playlists (any
``#EXT-X-`` tag) are left to yt-dlp and the HLS demuxer. Pure: text in, entries out.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Final

__all__ = ["PlaylistEntry", "looks_like_playlist", "parse_playlist"]

#: Path endings that name a playlist file.
_SUFFIXES: Final = (".m3u", ".m3u8", ".pls")

_EXTINF: Final = re.compile(r"#EXTINF:\s*(-?[0-9.]+)[^,]*,(.*)")
_PLS_LINE: Final = re.compile(r"(File|Title|Length)(\d+)=(.*)", re.IGNORECASE)
#: What an entry line of a plain (not ``#EXTM3U``) list must look like: one URL or path.
_LOCATION: Final = re.compile(r"[^\s<>\"{}|\\^`]+")


@dataclass(frozen=True, slots=True)
class PlaylistEntry:
    """One entry: an absolute URL, with the title and length the file gives, if any."""

    url: str
    title: str | None = None
    duration: float | None = None


def looks_like_playlist(url: str) -> bool:
    """Whether ``url``'s path ends like a playlist file's."""
    return urllib.parse.urlsplit(url).path.lower().endswith(_SUFFIXES)


def parse_playlist(text: str, base_url: str) -> list[PlaylistEntry] | None:
    """The entries of an M3U or PLS playlist, relative URLs made absolute against ``base_url``.

    Returns:
        The entries in order (possibly none), or ``None`` when ``text`` is an HLS playlist or
        not a playlist at all.
    """
    text = text.lstrip("\ufeff")
    if "#EXT-X-" in text:
        return None
    lines = [line.strip() for line in text.splitlines()]
    first = next((line for line in lines if line), "")
    if first.lower() == "[playlist]":
        return _pls(lines, base_url)
    entries: list[PlaylistEntry] = []
    title: str | None = None
    duration: float | None = None
    for line in lines:
        info = _EXTINF.match(line)
        if info:
            seconds = float(info.group(1))
            duration = seconds if seconds > 0 else None
            title = info.group(2).strip() or None
        elif line and not line.startswith("#"):
            if first != "#EXTM3U" and not _LOCATION.fullmatch(line):
                return None  # a plain list holds locations only: this is some other text
            entries.append(PlaylistEntry(urllib.parse.urljoin(base_url, line), title, duration))
            title = duration = None
    if not entries and first != "#EXTM3U":
        return None
    return entries


def _pls(lines: list[str], base_url: str) -> list[PlaylistEntry]:
    fields: dict[int, dict[str, str]] = {}
    for line in lines:
        match = _PLS_LINE.fullmatch(line)
        if match:
            fields.setdefault(int(match.group(2)), {})[match.group(1).lower()] = match.group(3)
    entries = []
    for _, entry in sorted(fields.items()):
        if "file" not in entry:
            continue
        length = entry.get("length", "")
        try:
            seconds: float | None = float(length)
        except ValueError:
            seconds = None
        entries.append(
            PlaylistEntry(
                urllib.parse.urljoin(base_url, entry["file"].strip()),
                entry.get("title", "").strip() or None,
                seconds if seconds is not None and seconds > 0 else None,
            )
        )
    return entries
