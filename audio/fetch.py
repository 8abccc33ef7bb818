"""Every request a track makes, made through the URL guard.

The guard (:mod:`legato.audio.urlguard`) is only a guard if nothing fetches around it. A track's
requests come from two libraries that would otherwise fetch on their own:

- **yt-dlp** reads the page a link names, follows its redirects, reads HLS and DASH manifests to
  list formats. :func:`guard_ydl` gives a ``YoutubeDL`` one request handler and no other:
  yt-dlp's own urllib handler with its connections made by :meth:`UrlPolicy.connect` and every
  redirect hop checked and counted. No FTP, no proxies, no other handler (``requests``,
  ``curl_cffi``, websockets) that would make its own connections.
- **FFmpeg** (through PyAV) reads the stream, and its HLS, DASH and concat demuxers open more
  URLs themselves: playlist entries, segments, ``#EXT-X-KEY`` keys, manifests. :func:`open_media`
  hands PyAV an ``io_open`` callback, which FFmpeg calls for the main input and for every file a
  demuxer opens, so each of them is a :class:`GuardedReader` over this module's HTTP client;
  FFmpeg's own network protocols are never used (its ``protocol_whitelist`` names none).
  HLS's AES-128 segments (``crypto+https://...``) are fetched the same way and decrypted here.

Each connection goes to an address checked for that same connection (one lookup, every address
checked, connect to a checked one), each redirect hop is checked before it is followed, and a
stream that drops is reopened at its position with a ``Range`` request through the same path.
Reopening an expired stream URL is the resolver's job, and so it is guarded too.

Why not check, then hand FFmpeg the URL (as before)? A server can answer the check and the fetch
differently, a name's DNS answer can change in between, and a playlist's entries are never seen
by the check at all. Why not a proxy in front of FFmpeg? It would be one more server, thread and
hop per stream for the same result; ``io_open`` is the seam FFmpeg already has.
"""

from __future__ import annotations

import errno
import functools
import http.client
import io
import logging
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from legato.audio.urlguard import NOT_ALLOWED, TOO_MANY_REDIRECTS, UrlPolicy, _short
from legato.errors import ResolveError

__all__ = [
    "PROTOCOL_WHITELIST",
    "VOUCHED",
    "FragmentReader",
    "GuardedReader",
    "HttpStatusError",
    "IoOpener",
    "guard_ydl",
    "request",
]

_log = logging.getLogger(__name__)

#: The policy for URLs a caller vouches for (a resolver without a policy, as tests use): private
#: addresses allowed, cloud metadata still refused, and still fetched only by this module.
VOUCHED: Final = UrlPolicy(allow_private=True)

#: FFmpeg's protocols the demuxers may open by themselves: none. Every URL goes to ``io_open``;
#: should a demuxer ever bypass it, it finds no protocol it may use ("none" names none).
PROTOCOL_WHITELIST: Final = "none"

_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})

#: Reopening a dropped stream at its position: how many tries, and the longest wait between two.
_REOPEN_TRIES: Final = 4
_REOPEN_DELAY_MAX: Final = 4.0

#: A forward seek this short reads and drops bytes instead of opening a new request.
_SKIP_BY_READING: Final = 64 * 1024


class HttpStatusError(OSError):
    """The server answered an error status (404, 403...)."""

    def __init__(self, url: str, status: int, reason: str) -> None:
        super().__init__(errno.EIO, f"HTTP {status} {reason} from {_short(url)}")
        self.url = url
        self.status = status


@functools.cache
def _tls() -> ssl.SSLContext:
    try:
        import certifi  # type: ignore[import-not-found, unused-ignore]  # with yt-dlp[default]
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


def _connection(policy: UrlPolicy, url: str, timeout: float) -> http.client.HTTPConnection:
    """An HTTP(S) connection to ``url``'s host whose socket :meth:`UrlPolicy.connect` makes."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    conn: http.client.HTTPConnection
    if parts.scheme.lower() == "https":
        conn = http.client.HTTPSConnection(host, parts.port, timeout=timeout, context=_tls())
    else:
        conn = http.client.HTTPConnection(host, parts.port, timeout=timeout)
    return _pin(conn, policy)


def _pin(conn: http.client.HTTPConnection, policy: UrlPolicy) -> http.client.HTTPConnection:
    """Have :meth:`UrlPolicy.connect` make ``conn``'s socket."""
    conn._create_connection = policy.connect  # type: ignore[attr-defined]  # http.client's seam
    return conn


def _check_hop(policy: UrlPolicy, url: str, following: str, hops: int, seen: set[str]) -> None:
    """Check redirect number ``hops`` from ``url`` to ``following`` (``seen``: the chain so far,
    ``url`` included) before it is followed: no loop, no more than ``max_redirects``, and a URL
    the policy takes.

    Raises:
        ResolveError: It is refused.
    """
    if following in seen or hops > policy.max_redirects:
        why = "a redirect loop" if following in seen else f"more than {hops - 1} redirects"
        _log.info("refused %s: %s", _short(url), why)
        raise ResolveError(f"{_short(url)}: {why}", user_message=TOO_MANY_REDIRECTS)
    policy.check_url(following)


def request(
    policy: UrlPolicy,
    url: str,
    headers: Mapping[str, str] | None = None,
    *,
    offset: int = 0,
    timeout: float = 20.0,
) -> tuple[http.client.HTTPResponse, str]:
    """GET ``url`` through the guard, following its redirects. Blocking.

    Every hop is checked (:meth:`UrlPolicy.check_url`) before it is requested and connected to
    through :meth:`UrlPolicy.connect`; a loop, or more than ``policy.max_redirects`` hops, is
    refused.

    Args:
        policy: What may be fetched.
        url: Where to start.
        headers: Request headers (yt-dlp's ``http_headers``), checked first.
        offset: Ask for the body from this byte on (``Range``).
        timeout: Seconds for connecting and for each read.

    Returns:
        The response (its status 200 or 206) and the URL it came from.

    Raises:
        ResolveError: A hop is refused, or there are too many.
        HttpStatusError: The server answered an error.
        OSError: The connection failed (``TimeoutError`` when it took too long).
    """
    sent = {str(k): str(v) for k, v in (headers or {}).items()}
    policy.check_headers(sent)
    sent.setdefault("Accept-Encoding", "identity")
    if offset:
        sent["Range"] = f"bytes={offset}-"
    seen = {url}
    hops = 0
    policy.check_url(url)
    while True:
        parts = urllib.parse.urlsplit(url)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        conn = _connection(policy, url, timeout)
        try:
            conn.request("GET", target, headers=sent)
            response = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        if response.status in _REDIRECTS:
            location = response.getheader("Location")
            response.close()
            conn.close()
            if not location:
                policy._refuse(url, f"a {response.status} with no Location")
            hops += 1
            following = urllib.parse.urljoin(url, location.strip())
            _check_hop(policy, url, following, hops, seen)
            seen.add(following)
            url = following
            continue
        if response.status >= 400 or (offset and response.status != 206):
            status, reason = response.status, response.reason
            response.close()
            conn.close()
            raise HttpStatusError(url, status, reason)
        return response, url


class _Stream(io.RawIOBase):
    """A readable stream whose ``read`` its subclass gives; ``readinto`` is made from it."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)


class _Refused(Exception):
    """A reopen answered with an error status (inside :class:`GuardedReader` only)."""


class GuardedReader(_Stream):
    """A remote file read through :func:`request`, for PyAV: seekable when the server takes
    ``Range`` requests and says how long the file is, reopened at its position when the
    connection drops (a few times, with growing waits, as FFmpeg's ``reconnect`` options did).

    The first request is made by the constructor, so that a refusal or an error status is
    raised where the stream is opened, not from inside FFmpeg. A connection that drops for good
    later (its reopen refused, as an expired signed URL's is, or no ``Range`` support) ends the
    file where it broke, as FFmpeg's own reader did, and says so to ``on_failure``: the decoder
    then reports the stream lost (the player resolves it again and reads on from there), where
    FFmpeg's demuxers would take an error mid-probe for a broken file.
    """

    def __init__(
        self,
        policy: UrlPolicy,
        url: str,
        headers: Mapping[str, str] | None = None,
        *,
        timeout: float = 20.0,
        sleep: Callable[[float], None] = time.sleep,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        self._on_failure = on_failure
        self._ended = False
        self._policy = policy
        self._headers = dict(headers or {})
        self._timeout = timeout
        self._sleep = sleep
        self._pos = 0  # where the next read starts
        self._at = 0  # the open response's position (its next byte)
        self._response: http.client.HTTPResponse | None
        self._response, self.url = request(policy, url, self._headers, timeout=timeout)
        length = self._response.getheader("Content-Length")
        self.size: int | None = int(length) if length and length.isdigit() else None
        ranges = (self._response.getheader("Accept-Ranges") or "").lower()
        self._rangeable = self.size is not None and "bytes" in ranges

    # ---- io.RawIOBase

    def seekable(self) -> bool:
        return self._rangeable

    def tell(self) -> int:
        return self._pos

    def read(self, size: int = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed stream")
        if size == 0 or self._ended or (self.size is not None and self._pos >= self.size):
            return b""
        want = size if size > 0 else 1 << 20
        tries = 0
        while True:
            try:
                data = self._read_some(want)
            except (ConnectionError, http.client.HTTPException, ssl.SSLError, _Refused) as exc:
                data, failure = b"", exc
            else:
                if data or self.size is None or self._pos >= self.size:
                    self._pos += len(data)
                    return data
                failure = ConnectionError(f"ended at byte {self._pos} of {self.size}")
            tries += 1
            self._drop()
            if isinstance(failure, _Refused) or not self._rangeable or tries > _REOPEN_TRIES:
                return self._end(
                    f"reading {_short(self.url)} failed at byte {self._pos}: {failure}"
                )
            _log.info("%s dropped at byte %d (%s); reopening", _short(self.url), self._pos, failure)
            self._sleep(min(_REOPEN_DELAY_MAX, 0.25 * 2**tries))

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the position; the next read asks for it (FFmpeg asks for the size by seeking
        to the end and back, which costs no request)."""
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        elif whence == io.SEEK_END and self.size is not None:
            target = self.size + offset
        else:
            raise OSError(errno.ESPIPE, "the stream's length is unknown")
        if target < 0:
            raise OSError(errno.EINVAL, "seek before the start")
        if not self._rangeable and target != self._pos and not self._reachable(target):
            raise OSError(errno.ESPIPE, f"{_short(self.url)} cannot be seeked")
        self._pos = target
        return target

    def close(self) -> None:
        self._drop()
        super().close()

    # ---- internals

    def _reachable(self, target: int) -> bool:
        """Whether the open response gets to ``target`` by reading a little more of it."""
        ahead = target - self._at
        return self._response is not None and 0 <= ahead <= _SKIP_BY_READING

    def _read_some(self, want: int) -> bytes:
        if self._response is not None and self._at != self._pos:
            if self._reachable(self._pos):
                while self._at < self._pos:
                    dropped = self._response.read1(min(self._pos - self._at, 65536))
                    if not dropped:
                        return b""
                    self._at += len(dropped)
            else:
                self._drop()
        if self._response is None:
            if self.size is not None and self._pos >= self.size:
                return b""
            try:
                self._response, _ = request(
                    self._policy, self.url, self._headers, offset=self._pos, timeout=self._timeout
                )
            except HttpStatusError as exc:
                # An expired stream URL (403) or a vanished file: no use trying again here.
                raise _Refused(f"reopening it was refused: {exc}") from exc
            self._at = self._pos
        data = self._response.read1(want)
        self._at += len(data)
        return data

    def _end(self, why: str) -> bytes:
        """End the file here for good: no more bytes, and ``on_failure`` told why."""
        _log.info("%s", why)
        self._ended = True
        if self._on_failure is not None:
            self._on_failure(why)
        return b""

    def _drop(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None


class FragmentReader(_Stream):
    """The fragments of a DASH stream (yt-dlp lists them: an initialisation segment, then the
    media segments) read one after another, each a :class:`GuardedReader`: one fragmented MP4
    or WebM file for PyAV (whose FFmpeg has no DASH demuxer). Not seekable."""

    def __init__(
        self,
        policy: UrlPolicy,
        urls: Sequence[str],
        headers: Mapping[str, str] | None = None,
        *,
        timeout: float = 20.0,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError("no fragments")
        self._on_failure = on_failure
        self._policy = policy
        self._urls = list(urls)
        self._headers = dict(headers or {})
        self._timeout = timeout
        self._next = 1
        self._current: GuardedReader | None = self._open(self._urls[0])

    def read(self, size: int = -1) -> bytes:
        while self._current is not None:
            data = self._current.read(size)
            if data:
                return data
            self._current.close()
            self._current = None
            if self._next < len(self._urls):
                url = self._urls[self._next]
                self._next += 1
                self._current = self._open(url)
        return b""

    def _open(self, url: str) -> GuardedReader:
        return GuardedReader(
            self._policy, url, self._headers, timeout=self._timeout, on_failure=self._on_failure
        )

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        super().close()


class _Decrypting(_Stream):
    """HLS's AES-128: a segment encrypted in CBC mode with PKCS#7 padding, decrypted as read."""

    def __init__(self, inner: GuardedReader, key: bytes, iv: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        super().__init__()
        self._inner = inner
        self._cipher = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        self._held = b""  # the last decrypted block: padding, when the input ends
        self._done = False

    def read(self, size: int = -1) -> bytes:
        while not self._done:
            chunk = self._inner.read(65536)
            if not chunk:
                self._done = True
                data = self._held + self._cipher.finalize()
                pad = data[-1] if data else 0
                if not 1 <= pad <= 16 or data[-pad:] != bytes([pad]) * pad:
                    raise OSError(errno.EIO, "an HLS segment's padding is wrong (bad key?)")
                return data[:-pad]
            data = self._held + self._cipher.update(chunk)
            self._held, data = data[-16:], data[:-16]
            if data:
                return data
        return b""

    def close(self) -> None:
        self._inner.close()
        super().close()


class IoOpener:
    """PyAV's ``io_open``: every URL FFmpeg opens (the stream itself, playlist entries,
    segments, keys, manifests) becomes a :class:`GuardedReader` with ``headers``.

    Anything but ``http``/``https`` (``file:``, FFmpeg's ``subfile:``, ``concat:``...) is
    refused, except HLS's ``crypto+`` prefix, which this module decrypts. ``failures`` collects
    why any of its readers ended early (see :class:`GuardedReader`).
    """

    def __init__(
        self, policy: UrlPolicy, headers: Mapping[str, str] | None, timeout: float
    ) -> None:
        self.policy = policy
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.failures: list[str] = []

    def reader(self, url: str) -> GuardedReader:
        """A guarded reader of ``url`` that reports to :attr:`failures`."""
        return GuardedReader(
            self.policy,
            url,
            self.headers,
            timeout=self.timeout,
            on_failure=self.failures.append,
        )

    def __call__(self, url: str, flags: int, options: dict[str, str]) -> io.RawIOBase:
        key = iv = None
        for prefix in ("crypto+", "crypto:"):
            if url.startswith(prefix):
                url = url[len(prefix) :]
                key, iv = options.get("key"), options.get("iv")
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            _log.info("refused %s: FFmpeg may only open web URLs here", _short(url))
            raise ResolveError(f"refused {_short(url)}: not a web URL", user_message=NOT_ALLOWED)
        reader = self.reader(url)
        if key is None:
            return reader
        try:
            return _Decrypting(reader, bytes.fromhex(key), bytes.fromhex(iv or "0" * 32))
        except ValueError as exc:
            reader.close()
            raise OSError(errno.EINVAL, f"bad HLS key for {_short(url)}: {exc}") from exc


# ---- yt-dlp


def guard_ydl(ydl: Any, policy: UrlPolicy) -> None:
    """Make every request ``ydl`` (a ``yt_dlp.YoutubeDL``) sends go through ``policy``.

    Its request director is replaced by one with a single handler: yt-dlp's urllib handler,
    whose connections :meth:`UrlPolicy.connect` makes and whose redirects are checked hop by
    hop. A refusal travels up as a yt-dlp ``RequestError`` whose cause is the
    :class:`~legato.errors.ResolveError`, so its user message is kept.
    """
    handler = functools.partial(_guarded_handler_class(), policy=policy)
    ydl._request_director = ydl.build_request_director([handler])


@functools.cache
def _guarded_handler_class() -> type:
    """The yt-dlp request handler class (made on first use: importing yt-dlp's networking
    modules costs time the decoder alone does not need)."""
    import yt_dlp.networking._urllib as ydl_urllib
    from yt_dlp.networking.exceptions import RequestError, TransportError

    class Refused(RequestError):  # type: ignore[misc]  # yt-dlp is untyped
        """A request the URL guard refused (the ResolveError is its cause)."""

    class GuardedHTTPHandler(ydl_urllib.HTTPHandler):  # type: ignore[misc]
        def __init__(self, policy: UrlPolicy, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.policy = policy

        def _pinned(self, cls: type[http.client.HTTPConnection], *args: Any, **kw: Any) -> Any:
            return _pin(cls(*args, **kw), self.policy)

        def http_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(functools.partial(self._pinned, http.client.HTTPConnection), req)

        def https_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(
                functools.partial(self._pinned, http.client.HTTPSConnection),
                req,
                context=self._context,
            )

    class CheckedRedirects(ydl_urllib.RedirectHandler):  # type: ignore[misc]
        def __init__(self, policy: UrlPolicy) -> None:
            super().__init__()
            self.policy = policy

        def redirect_request(
            self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, new: str
        ) -> Any:
            hops = getattr(req, "legato_hops", 0) + 1
            seen: set[str] = getattr(req, "legato_seen", {req.full_url})
            _check_hop(self.policy, req.full_url, new, hops, seen)
            following = super().redirect_request(req, fp, code, msg, headers, new)
            if following is not None:
                following.legato_hops = hops
                following.legato_seen = seen | {new}
            return following

    class GuardedRH(ydl_urllib.UrllibRH):  # type: ignore[misc]
        _SUPPORTED_URL_SCHEMES = ("http", "https", "data")
        _SUPPORTED_PROXY_SCHEMES = ()
        RH_NAME = "legato-guarded"

        def __init__(self, *, policy: UrlPolicy, **kwargs: Any) -> None:
            kwargs["proxies"] = {}
            kwargs.pop("enable_file_urls", None)
            super().__init__(**kwargs)
            self.policy = policy

        def _check_proxies(self, proxies: Any) -> None:
            # Connections go straight to a checked address: a proxy (from the environment)
            # would be a connection the guard cannot check the far end of. Not used.
            del proxies

        def _create_instance(
            self, proxies: Any, cookiejar: Any, legacy_ssl_support: Any = None
        ) -> Any:
            opener = urllib.request.OpenerDirector()
            for handler in (
                GuardedHTTPHandler(
                    self.policy,
                    context=self._make_sslcontext(legacy_ssl_support=legacy_ssl_support),
                    source_address=self.source_address,
                ),
                ydl_urllib.HTTPCookieProcessor(cookiejar),
                ydl_urllib.DataHandler(),
                ydl_urllib.UnknownHandler(),
                ydl_urllib.HTTPDefaultErrorHandler(),
                ydl_urllib.HTTPErrorProcessor(),
                CheckedRedirects(self.policy),
            ):
                opener.add_handler(handler)
            opener.addheaders = []
            return opener

        def _send(self, request: Any) -> Any:
            try:
                if not request.url.lower().startswith("data:"):
                    self.policy.check_url(request.url)
                return super()._send(request)
            except ResolveError as exc:
                raise Refused(str(exc), cause=exc) from exc
            except TransportError as exc:
                refusal = exc.__cause__
                if isinstance(refusal, ResolveError):
                    raise Refused(str(refusal), cause=refusal) from refusal
                raise

    return GuardedRH
