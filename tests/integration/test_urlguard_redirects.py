"""The guarded HTTP client (``legato.audio.fetch.request``) against real redirects on 127.0.0.1.

The policy allows exactly the media server (``allowed_hosts=("127.0.0.1:PORT",)``), as the
sandbox does. The "internal" targets are two more servers: one on 127.0.0.1 at another port and
one on 127.0.0.2 at the media server's own port, so neither the port nor the address alone can
let a hop through. Each counts the requests it gets: a refused hop must reach nobody.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from legato.audio.fetch import HttpStatusError, request
from legato.audio.urlguard import NOT_ALLOWED, TOO_MANY_REDIRECTS, UrlPolicy
from legato.errors import ResolveError
from tests.media import MediaServer, Route

pytestmark = pytest.mark.integration

TONE = "mp3-44k-stereo.mp3"


class Target:
    """A server that must never be reached: it counts requests and answers 200 "secret".

    ``host`` is an IPv4 or IPv6 address (``::1``).
    """

    def __init__(self, host: str, port: int = 0) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "6")
                self.end_headers()
                self.wfile.write(b"secret")

            do_HEAD = do_GET

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.server = Server((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return str(self.server.server_address[0])

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def url(self, path: str) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}/{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


async def follow(policy: UrlPolicy, url: str) -> str:
    """Where ``url``'s redirects end, fetched through the guard (the body is not read)."""
    response, final = await asyncio.to_thread(request, policy, url, timeout=5.0)
    response.close()
    return final


@pytest.fixture(scope="module")
def other_port() -> Iterator[Target]:
    target = Target("127.0.0.1")
    yield target
    target.close()


@pytest.fixture(scope="module")
def other_address(media_server: MediaServer) -> Iterator[Target]:
    target = Target("127.0.0.2", media_server.port)
    yield target
    target.close()


@pytest.fixture
def policy(media_server: MediaServer) -> UrlPolicy:
    return UrlPolicy(allowed_hosts=(f"127.0.0.1:{media_server.port}",))


def redirect(location: str, status: int = 302, *, head_status: int | None = None) -> Route:
    """A route answering ``status`` with ``Location: location`` (``head_status`` for HEAD)."""

    def handler(request: BaseHTTPRequestHandler) -> None:
        code = head_status if head_status is not None and request.command == "HEAD" else status
        request.send_response(code)
        if 300 <= code < 400:
            request.send_header("Location", location)
        request.send_header("Content-Length", "0")
        request.end_headers()

    return Route(handler=handler)


@pytest.fixture
def route(media_server: MediaServer, request: pytest.FixtureRequest) -> Callable[..., str]:
    """``route(name, location, ...)``: add a redirect unique to this test; return its URL."""
    prefix = f"urlguard/{request.node.name}/"

    def add(name: str, location: str, status: int = 302, **kw: int | None) -> str:
        return media_server.add_route(prefix + name, redirect(location, status, **kw))

    return add


async def test_allowed_chain_ends_at_the_media(
    policy: UrlPolicy, media_server: MediaServer, route: Callable[..., str]
) -> None:
    final = media_server.url(TONE)
    second = route("second", final, 301)
    first = route("first", second.replace(media_server.base_url, ""), 307)  # relative Location
    before = media_server.request_count(TONE)
    assert await follow(policy, first) == final
    # Each hop asked for once: the media itself once.
    assert media_server.request_count(TONE) == before + 1


async def test_url_without_redirects_is_returned_as_is(
    policy: UrlPolicy, media_server: MediaServer
) -> None:
    url = media_server.url(TONE)
    assert await follow(policy, url) == url


@pytest.mark.parametrize("which", ["other_port", "other_address"])
async def test_hop_to_an_internal_server_is_refused_before_it_is_reached(
    policy: UrlPolicy,
    route: Callable[..., str],
    request: pytest.FixtureRequest,
    which: str,
) -> None:
    target: Target = request.getfixturevalue(which)
    secret = target.url("secret")
    # Without the guard the chain works: the target really is reachable from here.
    assert await follow(UrlPolicy(allow_private=True), route("probe", secret)) == secret
    assert target.hits == ["/secret"]
    target.hits.clear()

    start = route("start", route("middle", secret))
    with pytest.raises(ResolveError) as info:
        await follow(policy, start)
    assert info.value.user_message == NOT_ALLOWED
    assert "127.0.0." in str(info.value)
    assert target.hits == []


@pytest.mark.parametrize(
    "location",
    [
        "http://2130706433:{port}/secret",
        "http://0x7f.1:{port}/secret",
        "http://[::ffff:127.0.0.1]:{port}/secret",
        "http://evil@127.0.0.1:{port}/secret",
        "http://localhost:{port}/secret",
    ],
)
async def test_hop_in_another_spelling_is_refused(
    policy: UrlPolicy, route: Callable[..., str], other_port: Target, location: str
) -> None:
    port = other_port.server.server_address[1]
    with pytest.raises(ResolveError) as info:
        await follow(policy, route("start", location.format(port=port)))
    assert info.value.user_message == NOT_ALLOWED
    assert other_port.hits == []


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://10.0.0.1/admin",
        "file:///etc/passwd",
        "ftp://127.0.0.1/x",
        "gopher://127.0.0.1:6379/_INFO",
    ],
)
async def test_hop_to_metadata_private_or_local_scheme_is_refused(
    policy: UrlPolicy, route: Callable[..., str], location: str
) -> None:
    # The refusal comes before any connection: nothing is sent to these addresses.
    with pytest.raises(ResolveError) as info:
        await follow(policy, route("start", location))
    assert info.value.user_message == NOT_ALLOWED


async def test_hops_are_bounded(
    policy: UrlPolicy, media_server: MediaServer, route: Callable[..., str]
) -> None:
    final = media_server.url(TONE)
    url = final
    for i in range(5):
        url = route(f"hop{i}", url)
    assert await follow(policy, url) == final  # exactly five: fine
    with pytest.raises(ResolveError, match="more than 5 redirects") as info:
        await follow(policy, route("sixth", url))
    assert info.value.user_message == TOO_MANY_REDIRECTS
    loop_url = media_server.url("urlguard/test_hops_are_bounded/loop")
    assert route("loop", loop_url) == loop_url
    with pytest.raises(ResolveError, match="redirect loop") as info:
        await follow(policy, loop_url)
    assert info.value.user_message == TOO_MANY_REDIRECTS


async def test_error_answer_ends_the_walk(
    policy: UrlPolicy, media_server: MediaServer, route: Callable[..., str]
) -> None:
    missing = media_server.url("urlguard/no-such-file.mp3")
    with pytest.raises(HttpStatusError) as info:
        await follow(policy, route("to-404", missing))
    assert info.value.status == 404
    assert info.value.url == missing


async def test_redirect_without_location_is_refused(
    policy: UrlPolicy, route: Callable[..., str]
) -> None:
    media_url = route("nowhere", "", 302)
    with pytest.raises(ResolveError):
        await follow(policy, media_url)


async def test_unreachable_host_is_reported() -> None:
    closed = Target("127.0.0.1")
    url = closed.url("gone")
    closed.close()
    allowing = UrlPolicy(allowed_hosts=(url.split("/")[2],))
    with pytest.raises(ConnectionRefusedError):
        await follow(allowing, url)
