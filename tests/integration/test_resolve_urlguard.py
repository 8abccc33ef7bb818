"""The Resolver with a URL policy: real yt-dlp against the local media server and redirects.

The policy allows exactly the media server (``allowed_hosts``), as the sandbox needs; a second
server on 127.0.0.1 stands for an internal service and counts what reaches it.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator

import pytest

from legato.audio.resolve import Resolver, ResolverSettings
from legato.audio.urlguard import NOT_ALLOWED, UrlPolicy
from legato.errors import ResolveError
from tests.integration.test_urlguard_redirects import Target, redirect
from tests.media import MediaServer, audio_list_page

pytestmark = pytest.mark.integration

TONE = "mp3-44k-stereo.mp3"


@pytest.fixture(scope="module")
def executor() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        yield pool


@pytest.fixture(scope="module")
def internal() -> Iterator[Target]:
    target = Target("127.0.0.1")
    yield target
    target.close()


@pytest.fixture
def resolver(
    media_server: MediaServer, executor: concurrent.futures.ThreadPoolExecutor
) -> Resolver:
    policy = UrlPolicy(allowed_hosts=(f"127.0.0.1:{media_server.port}",))
    return Resolver(ResolverSettings(timeout=20.0, url_policy=policy), executor)


async def test_allowed_media_resolves_and_streams_from_the_end_of_its_redirects(
    resolver: Resolver, media_server: MediaServer
) -> None:
    final = media_server.url(TONE)
    start = media_server.add_route("resolve-guard/moved.mp3", redirect(final, 301))
    (track,) = await resolver.resolve(start)
    info = await resolver.stream(track)
    assert info.url == final  # what the decoder opens: no redirect left for FFmpeg to follow
    assert info.codec == "mp3"


async def test_playlist_page_on_the_allowed_host_lists_its_entries(
    resolver: Resolver, media_server: MediaServer
) -> None:
    tracks = await resolver.resolve(media_server.url("pages/list.html"))
    assert len(tracks) == 3


async def test_redirect_inside_is_refused_before_yt_dlp_fetches_it(
    resolver: Resolver, media_server: MediaServer, internal: Target
) -> None:
    start = media_server.add_route(
        "resolve-guard/to-internal.mp3", redirect(internal.url("secret.mp3"))
    )
    with pytest.raises(ResolveError) as info:
        await resolver.resolve(start)
    assert info.value.user_message == NOT_ALLOWED
    assert internal.hits == []


async def test_page_listing_internal_media_is_refused(
    resolver: Resolver, media_server: MediaServer, internal: Target
) -> None:
    page = audio_list_page("Inside", [internal.url("a.mp3"), internal.url("b.mp3")])
    url = media_server.add_route("resolve-guard/inside.html", body=page)
    with pytest.raises(ResolveError) as info:
        await resolver.resolve(url)
    assert info.value.user_message == NOT_ALLOWED


async def test_entry_redirecting_inside_is_refused_when_it_is_played(
    resolver: Resolver, media_server: MediaServer, internal: Target
) -> None:
    hop = media_server.add_route("resolve-guard/hop.mp3", redirect(internal.url("c.mp3")))
    page = audio_list_page("Hop", [hop, media_server.url(TONE)])
    url = media_server.add_route("resolve-guard/hop.html", body=page)
    first, _ = await resolver.resolve(url)  # listing reads no entry
    with pytest.raises(ResolveError) as info:
        await resolver.stream(first)
    assert info.value.user_message == NOT_ALLOWED
    assert internal.hits == []


async def test_default_policy_refuses_the_loopback_media_server(
    media_server: MediaServer, executor: concurrent.futures.ThreadPoolExecutor
) -> None:
    strict = Resolver(ResolverSettings(url_policy=UrlPolicy()), executor)
    url = media_server.url("resolve-guard/never-fetched.mp3")
    with pytest.raises(ResolveError) as info:
        await strict.resolve(url)
    assert info.value.user_message == NOT_ALLOWED
    assert media_server.request_count("resolve-guard/never-fetched.mp3") == 0


async def test_search_page_configured_by_the_operator_is_trusted(
    media_server: MediaServer, executor: concurrent.futures.ThreadPoolExecutor
) -> None:
    # A configured search page on the media server is the operator's; its results are still
    # checked (they are on the allowed host here).
    policy = UrlPolicy(allowed_hosts=(f"127.0.0.1:{media_server.port}",))
    settings = ResolverSettings(
        search_provider=media_server.url("search?q={query}"), url_policy=policy
    )
    tracks = await Resolver(settings, executor).resolve("opus")
    assert tracks
    internal_results = ResolverSettings(
        search_provider=media_server.url("search?q={query}"),
        url_policy=UrlPolicy(allowed_domains=("example.com",)),
    )
    with pytest.raises(ResolveError) as info:
        await Resolver(internal_results, executor).resolve("opus")
    assert info.value.user_message == NOT_ALLOWED
