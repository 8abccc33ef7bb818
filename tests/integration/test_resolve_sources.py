"""``[sources]`` in the resolver: cookies reach the server (and nothing else does), refusals read
as one sentence, in the bot's threads and in resolver worker processes alike.

The refusals come from a yt-dlp plugin in ``tests/ytdlp_plugins`` loaded through
``[sources] plugin_dirs``: it fails the way yt-dlp's YouTube extractor does, with YouTube's
reasons and yt-dlp's own raising helpers, so the strings are yt-dlp's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from legato.audio.resolve import COOKIES_BROKEN, REFUSED, Resolver, ResolverSettings
from legato.audio.sources import (
    AGE_RESTRICTED,
    LIVE_NOT_STARTED,
    NO_FORMAT,
    PRIVATE,
    REGION_BLOCKED,
    REMOVED,
    SIGN_IN,
    SourceSettings,
)
from legato.errors import ResolveError
from tests.media import MediaServer, audio_list_page, send_html

pytestmark = pytest.mark.integration

SECRET = "s3cr3t-cookie-value-7f3a"
OTHER_SECRET = "not-for-this-site-91c2"
FAR = "4102444800"  # 2100-01-01
PLUGINS = str(Path(__file__).resolve().parents[1] / "ytdlp_plugins")


@pytest.fixture
def executor() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="test-sources") as pool:
        yield pool


def cookies_file(tmp_path: Path) -> Path:
    path = tmp_path / "cookies.txt"
    path.write_text(
        "# Netscape HTTP Cookie File\n"
        f"127.0.0.1\tFALSE\t/\tFALSE\t{FAR}\tlegato_session\t{SECRET}\n"
        f".example.com\tTRUE\t/\tFALSE\t{FAR}\tother\t{OTHER_SECRET}\n",
        encoding="utf-8",
    )
    path.chmod(0o600)
    return path


def members_only(media_server: MediaServer, name: str) -> str:
    """A page listing one track, answered only to a request carrying the session cookie."""

    def handler(request: BaseHTTPRequestHandler) -> None:
        if f"legato_session={SECRET}" not in (request.headers.get("Cookie") or ""):
            request.send_response(403)
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        send_html(request, audio_list_page("members", [media_server.url("webm-opus-stereo.webm")]))

    return media_server.add_route(name, handler=handler)


@pytest.mark.parametrize("processes", [0, 1], ids=["threads", "worker-process"])
async def test_cookies_reach_the_server_and_nowhere_else(
    media_server: MediaServer,
    executor: concurrent.futures.ThreadPoolExecutor,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    processes: int,
) -> None:
    page = members_only(media_server, f"members-{processes}.html")
    without = Resolver(ResolverSettings(timeout=20.0), executor, processes=processes)
    try:
        with pytest.raises(ResolveError) as refused:
            await without.resolve(page)
    finally:
        without.close()
    assert refused.value.user_message == REFUSED

    path = cookies_file(tmp_path)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    settings = ResolverSettings(timeout=20.0, sources=SourceSettings(cookies_file=str(path)))
    resolver = Resolver(settings, executor, processes=processes)
    try:
        with caplog.at_level(logging.DEBUG):
            [track] = await resolver.resolve(page)
            # At play time, again: the jar was emptied after the first call, the file is read
            # again for this one.
            stream = await resolver.stream(track)
    finally:
        resolver.close()
    assert track.url == page
    assert stream.url == media_server.url("webm-opus-stereo.webm")
    assert not any(SECRET in value for value in stream.http_headers.values())
    sent = [
        r.headers.get("Cookie", "")
        for r in media_server.request_log
        if r.path == f"/members-{processes}.html"
    ]
    assert sent.count(f"legato_session={SECRET}") == 2  # only this site's cookie, once a call
    assert not any(OTHER_SECRET in header for header in sent)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before  # read, never written
    assert SECRET not in caplog.text


async def test_a_cookies_file_gone_bad_fails_the_query_and_tells_the_operator(
    media_server: MediaServer,
    executor: concurrent.futures.ThreadPoolExecutor,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "cookies.json"
    path.write_text(f'[{{"name": "legato_session", "value": "{SECRET}"}}]', encoding="utf-8")
    settings = ResolverSettings(timeout=20.0, sources=SourceSettings(cookies_file=str(path)))
    with caplog.at_level(logging.DEBUG), pytest.raises(ResolveError) as info:
        await Resolver(settings, executor).resolve(media_server.url("mp3-44k-stereo.mp3"))
    assert info.value.user_message == COOKIES_BROKEN
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "fix `[sources] cookies_file`" in error.getMessage()
    assert "is JSON" in error.getMessage()
    assert SECRET not in caplog.text


# (plugin path, the user's sentence, words of the operator's remedy or None)
REFUSALS = [
    ("bot", SIGN_IN, "YouTube asked this bot to sign in: set `[sources] cookies_file`"),
    ("age", AGE_RESTRICTED, "set `[sources] cookies_file`"),
    ("private", PRIVATE, None),
    ("private-signin", PRIVATE, None),
    ("removed", REMOVED, None),
    ("terminated", REMOVED, None),
    ("live", LIVE_NOT_STARTED, None),
    ("premiere", LIVE_NOT_STARTED, None),
    ("region", REGION_BLOCKED, "blocked in the country"),
    ("images", NO_FORMAT, "python -m legato doctor"),
]


@pytest.mark.parametrize(("kind", "message", "remedy"), REFUSALS, ids=[r[0] for r in REFUSALS])
async def test_refusals_read_as_one_sentence(
    executor: concurrent.futures.ThreadPoolExecutor,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    message: str,
    remedy: str | None,
) -> None:
    settings = ResolverSettings(timeout=20.0, sources=SourceSettings(plugin_dirs=(PLUGINS,)))
    with caplog.at_level(logging.INFO, logger="legato"), pytest.raises(ResolveError) as info:
        await Resolver(settings, executor).resolve(f"http://127.0.0.1:9/legato-refuse/{kind}")
    assert info.value.user_message == message
    assert "[legato-refusals]" in str(info.value)  # yt-dlp's text is kept for the log...
    for raw in ("yt-dlp", "--cookies", "ERROR", "Sign in", "This video", "begin in"):
        assert raw not in info.value.user_message  # ...and never reaches the user
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if remedy is None:
        assert warnings == []
    else:
        assert len(warnings) == 1
        assert remedy in warnings[0]


async def test_worker_processes_load_the_same_plugins_and_map_the_same(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = ResolverSettings(timeout=30.0, sources=SourceSettings(plugin_dirs=(PLUGINS,)))
    resolver = Resolver(settings, processes=1)
    try:
        with caplog.at_level(logging.INFO, logger="legato"):
            outcomes = await asyncio.gather(
                *(
                    resolver.resolve(f"http://127.0.0.1:9/legato-refuse/{k}")
                    for k in ("bot", "age")
                ),
                return_exceptions=True,
            )
    finally:
        resolver.close()
    assert [e.user_message for e in outcomes if isinstance(e, ResolveError)] == [
        SIGN_IN,
        AGE_RESTRICTED,
    ]
    # The remedy is logged in the bot's process, where the operator reads the log.
    assert any(
        "YouTube asked this bot to sign in: set `[sources] cookies_file`" in r.getMessage()
        and r.process == os.getpid()
        for r in caplog.records
    )
