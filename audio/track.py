"""What the queue holds: a track's metadata, and the stream it was resolved to, if it was.

A stream URL expires, so a track keeps the :class:`StreamInfo` its resolve produced only with
the time it was resolved: the opener (:mod:`legato.audio.opener`) plays a fresh one as it is and
resolves again when there is none (a track restored from the store, a flat playlist entry), when
it is too old, or when the stream broke off mid-track (an expired URL's 403).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from legato.audio.urlguard import UrlPolicy

_ids = itertools.count(1)


@dataclass(frozen=True)
class StreamInfo:
    """Where to read a track's audio from, now (stream URLs expire: get a fresh one to play).

    Attributes:
        url: A media URL (or a local path when ``is_local``).
        http_headers: Headers the server expects (user agent, cookies, referer).
        codec: Audio codec name when known (``opus``, ``mp3``, ``aac``...).
        sample_rate: Hz, when known.
        duration: Seconds, when known.
        is_local: ``url`` is a path on this machine.
        url_policy: What the decoder may fetch for it (``None``: the caller vouches for it).
        fragments: A DASH stream's fragment URLs, in order (``url`` is then its manifest).
    """

    url: str
    http_headers: dict[str, str] = field(default_factory=dict)
    codec: str | None = None
    sample_rate: int | None = None
    duration: float | None = None
    is_local: bool = False
    url_policy: UrlPolicy | None = None
    fragments: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Track:
    """One playable item.

    Attributes:
        url: What to resolve (again) at play time: a page URL yt-dlp understands, a direct media
            URL or a local path.
        title: Display title.
        duration: Length in seconds, or ``None`` for live streams and unknown lengths (a direct
            media URL's length is known only once it is opened).
        live: A live stream (yt-dlp's ``is_live``): it has no length and no end to seek to.
        page_url: The page a user can open (may equal ``url``).
        thumbnail: Image URL or ``None``.
        requester_id: Discord user id of whoever asked for it (0 when not from a user).
        uid: Identity within the process; two adds of the same URL are two different tracks.
        stream: Where its audio was found when it was resolved (``None``: not resolved to a
            stream yet); not stored, not compared.
        resolved_at: ``time.monotonic()`` when ``stream`` was found.
    """

    url: str
    title: str
    duration: float | None = None
    page_url: str | None = None
    thumbnail: str | None = None
    requester_id: int = 0
    live: bool = False
    uid: int = field(default_factory=lambda: next(_ids), compare=True)
    stream: StreamInfo | None = field(default=None, compare=False, repr=False)
    resolved_at: float | None = field(default=None, compare=False, repr=False)

    def with_stream(self, stream: StreamInfo | None, resolved_at: float | None) -> Track:
        """Return this track (same ``uid``) carrying ``stream``, found at ``resolved_at``."""
        return replace(self, stream=stream, resolved_at=resolved_at)
