"""The resolver: real yt-dlp against the local media server."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import socket
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yt_dlp.utils

from legato.audio.opener import STREAM_FRESH_FOR, make_opener
from legato.audio.resolve import (
    NO_AUDIO,
    NO_LOCAL,
    NO_RESULTS,
    NOT_A_URL,
    NOT_FOUND,
    REFUSED,
    TOO_SLOW,
    UNREACHABLE,
    UNSUPPORTED_SCHEME,
    Resolver,
    ResolverSettings,
)
from legato.audio.source import FrameReader
from legato.audio.track import Track
from legato.errors import ResolveError
from tests.conftest import FEED_ENTRIES, LIST_ENTRIES
from tests.media import MediaServer, audio_list_page

pytestmark = pytest.mark.integration


@pytest.fixture
def executor() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="test-resolve") as pool:
        yield pool


@pytest.fixture
def resolver(executor: concurrent.futures.ThreadPoolExecutor) -> Resolver:
    return Resolver(ResolverSettings(timeout=20.0), executor)


async def test_direct_media_url(resolver: Resolver, media_url: Callable[[str], str]) -> None:
    url = media_url("mp3-44k-stereo.mp3")
    tracks = await resolver.resolve(url, requester_id=42)
    assert len(tracks) == 1
    track = tracks[0]
    assert track.url == url
    assert track.title == "mp3-44k-stereo"
    assert track.requester_id == 42
    # Extracted in full, so it carries its stream: the opener need not resolve it again.
    assert track.stream is not None
    assert track.stream.url == url
    assert track.stream.codec == "mp3"


async def test_stream_resolves_again_at_play_time(
    resolver: Resolver, media_server: MediaServer
) -> None:
    name = "webm-opus-stereo.webm"
    [track] = await resolver.resolve(media_server.url(name))
    before = media_server.request_count(name)
    info = await resolver.stream(track)
    assert media_server.request_count(name) > before  # yt-dlp asked the server again
    assert info.url == media_server.url(name)
    assert not info.is_local
    assert any(key.lower() == "user-agent" for key in info.http_headers)
    again = await resolver.stream(track)
    assert again == info
    assert media_server.request_count(name) > before + 1


async def test_page_with_audio_entries_is_a_playlist(
    resolver: Resolver, media_server: MediaServer
) -> None:
    page = media_server.url("pages/list.html")
    tracks = await resolver.resolve(page, requester_id=7)
    assert [t.url for t in tracks] == [media_server.url(name) for name in LIST_ENTRIES]
    assert all(t.requester_id == 7 for t in tracks)
    assert all(t.page_url == page for t in tracks)
    assert len({t.uid for t in tracks}) == len(tracks)
    # Entries are resolved lazily: stream() gives the entry's own media.
    info = await resolver.stream(tracks[1])
    assert info.url == media_server.url(LIST_ENTRIES[1])
    assert info.codec == "mp3"


async def test_feed_is_read_flat_and_entries_resolved_when_played(
    resolver: Resolver, media_server: MediaServer
) -> None:
    before = len(media_server.request_log)
    tracks = await resolver.resolve(media_server.url("pages/feed.xml"))
    assert [t.title for t in tracks] == [Path(name).stem for name in FEED_ENTRIES]
    assert [t.page_url for t in tracks] == [media_server.url(name) for name in FEED_ENTRIES]
    fetched = {r.path for r in media_server.request_log[before:]}
    assert fetched == {"/pages/feed.xml"}  # no entry was fetched to list them
    played = media_server.request_count(FEED_ENTRIES[2])
    info = await resolver.stream(tracks[2])
    assert info.url == media_server.url(FEED_ENTRIES[2])
    assert media_server.request_count(FEED_ENTRIES[2]) > played


async def test_playlist_is_capped(
    executor: concurrent.futures.ThreadPoolExecutor, media_url: Callable[[str], str]
) -> None:
    page = media_url("pages/long-list.html")
    capped = Resolver(ResolverSettings(max_playlist=5), executor)
    tracks = await capped.resolve(page)
    assert len(tracks) == 5
    uncapped = Resolver(ResolverSettings(max_playlist=100), executor)
    assert len(await uncapped.resolve(page)) == 12


async def test_search_through_a_url_template(
    executor: concurrent.futures.ThreadPoolExecutor, media_server: MediaServer
) -> None:
    settings = ResolverSettings(
        search_provider=media_server.url("search?q={query}"), search_results=2
    )
    resolver = Resolver(settings, executor)
    tracks = await resolver.resolve("opus stereo", requester_id=3)
    assert len(tracks) == 2
    assert all("opus" in t.url and "stereo" in t.url for t in tracks)
    assert ("GET", "/search") in media_server.requests
    info = await resolver.stream(tracks[0])
    assert info.url == tracks[0].url


async def test_search_with_no_results(
    executor: concurrent.futures.ThreadPoolExecutor, media_server: MediaServer
) -> None:
    settings = ResolverSettings(search_provider=media_server.url("search?q={query}"))
    with pytest.raises(ResolveError) as caught:
        await Resolver(settings, executor).resolve("no such thing anywhere")
    assert caught.value.user_message == NO_RESULTS


async def test_not_found(resolver: Resolver, media_url: Callable[[str], str]) -> None:
    url = media_url("missing.mp3")
    with pytest.raises(ResolveError) as caught:
        await resolver.resolve(url)
    assert caught.value.user_message == NOT_FOUND
    assert "not found" in caught.value.user_message
    assert "404" in str(caught.value)
    assert url in str(caught.value)
    assert isinstance(caught.value.__cause__, yt_dlp.utils.DownloadError)


async def test_forbidden(resolver: Resolver, media_server: MediaServer, media_dir: Path) -> None:
    url = media_server.add_route(
        "resolve-test/forbidden.mp3", body=media_dir / "mp3-44k-stereo.mp3", fail_after=0
    )
    with pytest.raises(ResolveError) as caught:
        await resolver.resolve(url)
    assert caught.value.user_message == REFUSED
    assert "403" in str(caught.value)


async def test_unreachable_server(resolver: Resolver) -> None:
    # A port nothing listens on: bind one, note it, close it.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ResolveError) as caught:
        await resolver.resolve(f"http://127.0.0.1:{port}/song.mp3")
    assert caught.value.user_message == UNREACHABLE


async def test_html_page_without_media(resolver: Resolver, media_url: Callable[[str], str]) -> None:
    with pytest.raises(ResolveError) as caught:
        await resolver.resolve(media_url("pages/nomedia.html"))
    assert caught.value.user_message == NO_AUDIO
    assert "no playable audio" in caught.value.user_message
    assert "Unsupported URL" in str(caught.value)


async def test_slow_server_takes_too_long(
    executor: concurrent.futures.ThreadPoolExecutor, media_url: Callable[[str], str]
) -> None:
    resolver = Resolver(ResolverSettings(timeout=1.0), executor)
    async with asyncio.timeout(30):
        with pytest.raises(ResolveError) as caught:
            await resolver.resolve(media_url("stall.html"))
    assert caught.value.user_message == TOO_SLOW
    assert "took too long" in caught.value.user_message


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("ftp://127.0.0.1/song.mp3", UNSUPPORTED_SCHEME),
        ("rtmp://127.0.0.1/live", UNSUPPORTED_SCHEME),
        ("file:///etc/passwd", NO_LOCAL),
        ("/etc/passwd", NO_LOCAL),
        ("./song.mp3", NO_LOCAL),
    ],
)
async def test_refused_queries(resolver: Resolver, query: str, message: str) -> None:
    with pytest.raises(ResolveError) as caught:
        await resolver.resolve(query)
    assert caught.value.user_message == message
    assert query in str(caught.value)


@pytest.mark.parametrize(
    "url", ["http://[::1", "http://[127.0.0.1]/", "https://]/", "http://x:abc/", "file://[::1"]
)
async def test_malformed_links_are_a_resolve_error(
    executor: concurrent.futures.ThreadPoolExecutor, url: str
) -> None:
    # Brackets and ports urlsplit cannot make sense of: refused in words, not a ValueError,
    # whether the link is resolved for /play or again at play time.
    resolver = Resolver(ResolverSettings(allow_local_files=True), executor)
    with pytest.raises(ResolveError) as caught:
        await resolver.resolve(url)
    assert caught.value.user_message == NOT_A_URL
    with pytest.raises(ResolveError) as caught:
        await resolver.stream(Track(url=url, title="x"))
    assert caught.value.user_message == NOT_A_URL


async def test_words_around_a_url_are_searched(
    executor: concurrent.futures.ThreadPoolExecutor, media_server: MediaServer
) -> None:
    settings = ResolverSettings(search_provider=media_server.url("search?q={query}"))
    resolver = Resolver(settings, executor)
    with pytest.raises(ResolveError) as caught:
        await resolver.resolve("play http://example.invalid/x please")
    assert caught.value.user_message == NO_RESULTS
    searched = [r.target for r in media_server.request_log if r.path == "/search"]
    assert searched[-1] == "/search?q=play+http%3A%2F%2Fexample.invalid%2Fx+please"


async def test_empty_query(resolver: Resolver) -> None:
    with pytest.raises(ResolveError):
        await resolver.resolve("   ")


async def test_local_files_when_enabled(
    executor: concurrent.futures.ThreadPoolExecutor, media_dir: Path
) -> None:
    resolver = Resolver(ResolverSettings(allow_local_files=True), executor)
    path = media_dir / "flac-44k-mono-s16.flac"
    [track] = await resolver.resolve(str(path), requester_id=9)
    assert track.url == str(path)
    assert track.duration == pytest.approx(3.0, abs=0.05)
    [by_uri] = await resolver.resolve(path.as_uri())
    assert by_uri.url == str(path)
    info = await resolver.stream(track)
    assert info.is_local
    assert info.codec == "flac"
    assert info.sample_rate == 44100
    with pytest.raises(ResolveError) as caught:
        await resolver.resolve(str(media_dir / "nope.mp3"))
    assert "does not exist" in caught.value.user_message


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="max_playlist"):
        ResolverSettings(max_playlist=0)
    with pytest.raises(ValueError, match=r"\{query\}"):
        ResolverSettings(search_provider="http://127.0.0.1/search")
    with pytest.raises(ValueError, match="prefix"):
        ResolverSettings(search_provider="yt search")
    with pytest.raises(ValueError, match="timeout"):
        ResolverSettings(timeout=0)


async def test_one_worker_resolves_many_queries_without_sharing_cookies_or_failures(
    media_server: MediaServer, media_dir: Path
) -> None:
    # One worker thread: every call runs on the YoutubeDL that thread keeps and reuses.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="test-reuse") as one:
        resolver = Resolver(ResolverSettings(timeout=20.0), one)
        page = audio_list_page("Cookies", [f"/{name}" for name in LIST_ENTRIES])

        def with_cookie(request: BaseHTTPRequestHandler) -> None:
            request.send_response(200)
            request.send_header("Content-Type", "text/html; charset=utf-8")
            request.send_header("Content-Length", str(len(page)))
            request.send_header("Set-Cookie", "sid=from-the-first-query; Path=/")
            request.end_headers()
            request.wfile.write(page)

        first = media_server.add_route("reuse/first.html", handler=with_cookie)
        second = media_server.add_route("reuse/second.html", body=page)
        assert len(await resolver.resolve(first)) == len(LIST_ENTRIES)
        mark = len(media_server.request_log)
        with pytest.raises(ResolveError) as caught:
            await resolver.resolve(media_server.url("reuse/missing.mp3"))
        assert caught.value.user_message == NOT_FOUND
        tracks = await resolver.resolve(second)
        info = await resolver.stream(tracks[0])
    # A failure in between changes nothing for the next query, on the same worker.
    assert [t.url for t in tracks] == [media_server.url(name) for name in LIST_ENTRIES]
    assert info.url == media_server.url(LIST_ENTRIES[0])
    later = media_server.request_log[mark:]
    assert {"/reuse/missing.mp3", "/reuse/second.html", "/" + LIST_ENTRIES[0]} <= {
        r.path for r in later
    }
    # The first page's cookie went nowhere after its own query.
    assert [r.path for r in later if any(k.lower() == "cookie" for k in r.headers)] == []


async def test_extractions_in_worker_processes(
    executor: concurrent.futures.ThreadPoolExecutor, media_server: MediaServer
) -> None:
    # The same answers and the same classified failures as in threads; close() ends the pool.
    resolver = Resolver(ResolverSettings(timeout=20.0), executor, processes=1)
    try:
        tracks = await resolver.resolve(media_server.url("pages/list.html"), requester_id=3)
        assert [t.url for t in tracks] == [media_server.url(name) for name in LIST_ENTRIES]
        info = await resolver.stream(tracks[0])
        assert info.url == media_server.url(LIST_ENTRIES[0])
        threads = Resolver(ResolverSettings(timeout=20.0), executor)
        in_threads = await threads.resolve(media_server.url("pages/list.html"), requester_id=3)
        assert [dataclasses.replace(t, uid=0) for t in tracks] == [
            dataclasses.replace(t, uid=0) for t in in_threads
        ]
        # yt-dlp picks its user agent's browser version at random, once per process.
        expected = await threads.stream(tracks[0])
        assert set(info.http_headers) == set(expected.http_headers)
        assert dataclasses.replace(info, http_headers={}) == dataclasses.replace(
            expected, http_headers={}
        )
        with pytest.raises(ResolveError) as caught:
            await resolver.resolve(media_server.url("missing.mp3"))
        assert caught.value.user_message == NOT_FOUND
        assert "404" in str(caught.value)
        with pytest.raises(ResolveError) as caught:
            await resolver.resolve(media_server.url("pages/nomedia.html"))
        assert caught.value.user_message == NO_AUDIO
    finally:
        resolver.close()
    with pytest.raises(RuntimeError, match="after shutdown"):
        await resolver.resolve(media_server.url("pages/list.html"))


class _Clock:
    """A monotonic clock a test moves (``make_opener(clock=...)``)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _one_audio_page(media_server: MediaServer, name: str) -> str:
    """Serve ``name/page.html`` naming one MP3; its URL."""
    media_server.add_route(f"{name}/a.mp3", body=media_server.root / "mp3-44k-stereo.mp3")
    page = audio_list_page(name, [f"/{name}/a.mp3"])
    return media_server.add_route(f"{name}/page.html", body=page, content_type="text/html")


async def test_play_resolves_once(
    resolver: Resolver,
    executor: concurrent.futures.ThreadPoolExecutor,
    media_server: MediaServer,
) -> None:
    """What ``/play`` does: resolve the link into a track, then open it to play. The page is
    asked for once: the opener plays the stream the resolve found."""
    page = _one_audio_page(media_server, "once")
    clock = _Clock()
    [track] = await resolver.resolve(page)
    assert track.stream is not None
    assert media_server.request_count("once/page.html", "GET") == 1
    opener = make_opener(resolver, executor=executor, clock=clock)
    clock.now = track.resolved_at or 0.0
    reader = await opener(track, 0.0)
    try:
        assert isinstance(reader, FrameReader)
        assert (await reader.read_chunk(5)).frames
    finally:
        reader.close()
    assert media_server.request_count("once/page.html", "GET") == 1


@pytest.mark.parametrize("why", ["unresolved", "stale", "reopen"])
async def test_a_track_is_resolved_again_when_its_stream_cannot_serve(
    why: str,
    resolver: Resolver,
    executor: concurrent.futures.ThreadPoolExecutor,
    media_server: MediaServer,
) -> None:
    """A track with no stream (restored from the store, a playlist entry), one resolved longer
    ago than ``fresh_for``, and a reopen (the feeder drops the stream of a track whose stream
    broke off) are each resolved again when opened."""
    page = _one_audio_page(media_server, f"again-{why}")
    clock = _Clock()
    [track] = await resolver.resolve(page)
    assert track.stream is not None
    assert track.resolved_at is not None
    clock.now = track.resolved_at
    if why == "unresolved":
        track = Track(url=track.url, title=track.title)
    elif why == "stale":
        clock.now += STREAM_FRESH_FOR + 1
    else:
        track = track.with_stream(None, None)
    opener = make_opener(resolver, executor=executor, clock=clock)
    reader = await opener(track, 0.0)
    reader.close()
    assert media_server.request_count(f"again-{why}/page.html", "GET") == 2
