"""Shared fixtures: generated test media and a local HTTP server for them.

Session-scoped, made once per test run:

- ``media_dir`` (``Path``): a directory holding every file in ``tests.media.CATALOG`` (3 s tones
  in MP3, AAC/M4A, Opus in WebM and Ogg, FLAC and WAV at 8/16/24/32-bit and float, mono/stereo/5.1,
  22.05/44.1/48/96 kHz; 6 s chirps for seeking), plus ``truncated.mp3``, ``truncated.m4a``
  (first half of a file), ``video-only.mkv`` (no audio stream) and ``unknown-codec.wav`` (an
  audio codec FFmpeg does not know). Each tone has its own
  frequency (``CATALOG[name].freq``) so that a mix-up shows. Do not write into it; make your
  own files with ``tests.media.write_tone`` under ``tmp_path`` (or add them to the server with
  ``media_server.add_file``).
- ``media_server`` (``tests.media.MediaServer``): serves ``media_dir`` on 127.0.0.1 (ephemeral
  port) with Range and HEAD, plus these routes:

  - ``/pages/nomedia.html``: an HTML page with no media (yt-dlp: "Unsupported URL").
  - ``/pages/list.html``: three ``<audio src>`` entries, which yt-dlp's generic extractor turns
    into a playlist of three (``LIST_ENTRIES``).
  - ``/pages/long-list.html``: twelve entries (for playlist caps).
  - ``/pages/feed.xml``: an RSS feed of the ``FEED_ENTRIES`` files, which yt-dlp reads as a
    flat playlist (the entries are not fetched until each is resolved).
  - ``/search?q=WORDS``: a page listing every catalog file whose name contains each word; use
    ``ResolverSettings(search_provider=media_server.url("search?q={query}"))``.
  - ``/stall.html`` and ``/stall.mp3``: headers, then nothing (after 0 and 2000 bytes) until the
    server stops: for timeouts.
  - any missing path answers 404.

  Add your own with ``media_server.add_route(path, body=..., status=..., truncate_at=N,
  stall_after=N, fail_after=N, fail_status=403)`` or ``add_route(path, handler=fn)``; see
  ``tests.media.Route``; ``handler=tests.media.Trickle(body, rate=1000)`` serves a body slower
  than real time (no Content-Length). ``media_server.request_count(path)`` counts requests to a
  path.
  Give added routes names unique to your test: the server is shared by the whole session.
- ``media_url(name)``: the server's URL for a file or route name.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from tests.media import (
    CATALOG,
    MediaServer,
    Route,
    audio_list_page,
    html_page,
    make_catalog,
    rss_feed,
    send_html,
)

LIST_ENTRIES = ("webm-opus-stereo.webm", "mp3-44k-stereo.mp3", "m4a-44k-stereo.m4a")
FEED_ENTRIES = ("ogg-opus-stereo.ogg", "flac-44k-mono-s16.flac", "wav-44k-stereo-s16.wav")


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test media file, generated once per session."""
    directory = tmp_path_factory.mktemp("media")
    make_catalog(directory)
    return directory


def _search_handler(request: BaseHTTPRequestHandler) -> None:
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query).get("q", [""])[0]
    words = query.lower().split()
    names = sorted(name for name in CATALOG if all(word in name for word in words))
    send_html(request, audio_list_page(f"Results for {query}", [f"/{name}" for name in names]))


@pytest.fixture(scope="session")
def media_server(media_dir: Path) -> Iterator[MediaServer]:
    """The session's HTTP server for ``media_dir`` and the standard routes (see the module)."""
    server = MediaServer(media_dir).start()
    server.add_route("pages/nomedia.html", body=html_page("Nothing here", "<p>Just words.</p>"))
    server.add_route(
        "pages/list.html", body=audio_list_page("A list", [f"/{name}" for name in LIST_ENTRIES])
    )
    tones = sorted(name for name in CATALOG if not name.startswith("chirp"))
    long_list = [f"/{tones[i % len(tones)]}?n={i}" for i in range(12)]
    server.add_route("pages/long-list.html", body=audio_list_page("A long list", long_list))
    feed = [(Path(name).stem, server.url(name)) for name in FEED_ENTRIES]
    server.add_route("pages/feed.xml", body=rss_feed("A feed", feed))
    server.add_route("search", Route(handler=_search_handler))
    server.add_route("stall.html", body=html_page("Slow", "<p>never</p>"), stall_after=0)
    server.add_route("stall.mp3", body=media_dir / "mp3-44k-stereo.mp3", stall_after=2000)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def media_url(media_server: MediaServer) -> Callable[[str], str]:
    """``media_url(name)``: the URL of a file or route on ``media_server``."""
    return media_server.url
