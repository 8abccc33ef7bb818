"""What the queue holds: a track's metadata, never its (expiring) stream URL."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Track:
    """One playable item.

    Attributes:
        url: What to resolve again at play time: a page URL yt-dlp understands, a direct media URL
            or a local path. Stream URLs expire, so none is stored here.
        title: Display title.
        duration: Length in seconds, or ``None`` for live streams and unknown lengths (a direct
            media URL's length is known only once it is opened).
        live: A live stream (yt-dlp's ``is_live``): it has no length and no end to seek to.
        page_url: The page a user can open (may equal ``url``).
        thumbnail: Image URL or ``None``.
        requester_id: Discord user id of whoever asked for it (0 when not from a user).
        uid: Identity within the process; two adds of the same URL are two different tracks.
    """

    url: str
    title: str
    duration: float | None = None
    page_url: str | None = None
    thumbnail: str | None = None
    requester_id: int = 0
    live: bool = False
    uid: int = field(default_factory=lambda: next(_ids), compare=True)

    def with_requester(self, requester_id: int) -> Track:
        """Return a copy (with a new ``uid``) attributed to ``requester_id``."""
        return Track(
            url=self.url,
            title=self.title,
            duration=self.duration,
            page_url=self.page_url,
            thumbnail=self.thumbnail,
            requester_id=requester_id,
            live=self.live,
        )
