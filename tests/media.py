"""Test media made with PyAV, and a local HTTP server to fetch it from.

``write_tone`` writes a sine (or a linear chirp) in any container/codec the tests need.
``MediaServer`` serves a directory on 127.0.0.1 with HTTP Range and HEAD (PyAV seeks over HTTP
with Range requests), plus routes a test adds: fixed bodies (HTML pages, 404s), and files with
faults (truncated, stalling after N bytes, failing after N requests).
"""

from __future__ import annotations

import html
import math
import re
import shutil
import struct
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Final

import av
import numpy as np

#: Container name (as the tests spell it) -> FFmpeg muxer.
MUXERS: Final = {
    "mp3": "mp3",
    "m4a": "ipod",
    "webm": "webm",
    "ogg": "ogg",
    "flac": "flac",
    "wav": "wav",
}

LAYOUTS: Final = {1: "mono", 2: "stereo", 6: "5.1"}

CONTENT_TYPES: Final = {
    ".mp3": "audio/mpeg",
    ".m4a": "audio/mp4",
    ".webm": "audio/webm",
    ".ogg": "audio/ogg",
    ".opus": "audio/ogg",
    ".flac": "audio/flac",
    ".wav": "audio/wav",
    ".html": "text/html; charset=utf-8",
    ".xml": "application/rss+xml; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".mkv": "video/x-matroska",
}

_CHUNK: Final = 64 * 1024


def tone_samples(
    start: int,
    count: int,
    *,
    rate: int,
    freq: float,
    freq_end: float | None,
    seconds: float,
    amplitude: float,
) -> np.ndarray:
    """Samples ``start .. start+count`` of the tone ``write_tone`` writes (float64, mono)."""
    t = np.arange(start, start + count, dtype=np.float64) / rate
    phase = freq * t
    if freq_end is not None:
        # Linear chirp: the instantaneous frequency goes from freq to freq_end over `seconds`.
        phase += (freq_end - freq) * t * t / (2.0 * seconds)
    return amplitude * np.sin(2.0 * np.pi * phase)


def write_tone(
    path: Path | str,
    *,
    container: str,
    codec: str,
    freq: float = 440.0,
    seconds: float = 3.0,
    rate: int = 48000,
    channels: int = 2,
    sample_fmt: str | None = None,
    freq_end: float | None = None,
    amplitude: float = 0.5,
    bitrate: int = 128_000,
) -> Path:
    """Write a sine of ``freq`` Hz (or a chirp to ``freq_end``) with PyAV.

    Every channel carries the same signal.

    Args:
        path: Where to write; the parent must exist.
        container: One of ``MUXERS`` (``mp3``, ``m4a``, ``webm``, ``ogg``, ``flac``, ``wav``).
        codec: An FFmpeg encoder: ``libmp3lame``, ``aac``, ``libopus``, ``flac``, ``pcm_s16le``,
            ``pcm_u8``, ``pcm_s32le``, ``pcm_f32le``...
        freq: Tone frequency in Hz (the chirp's start).
        seconds: Length.
        rate: Sample rate of the file.
        channels: 1, 2 or 6 (5.1).
        sample_fmt: Encoder sample format when the codec allows several (``s16``, ``s32``...).
        freq_end: When set, a linear chirp from ``freq`` to ``freq_end``.
        amplitude: Peak level, full scale 1.0.
        bitrate: For lossy codecs.

    Returns:
        ``path`` as a ``Path``.
    """

    def samples(start: int, count: int) -> np.ndarray:
        return tone_samples(
            start,
            count,
            rate=rate,
            freq=freq,
            freq_end=freq_end,
            seconds=seconds,
            amplitude=amplitude,
        )

    return _encode(
        Path(path),
        samples,
        total=round(rate * seconds),
        container=container,
        codec=codec,
        rate=rate,
        channels=channels,
        sample_fmt=sample_fmt,
        bitrate=bitrate,
    )


def write_steps(
    path: Path | str,
    steps: Sequence[tuple[float, float]],
    *,
    container: str,
    codec: str,
    rate: int = 48000,
    amplitude: float = 0.5,
) -> Path:
    """Write sines one after the other: ``steps`` is ``(freq, seconds)`` per segment.

    What is heard tells the position: seeking, or a track starting over, shows as a change of
    frequency (stereo, the same signal on both channels).

    Args:
        path: Where to write; the parent must exist.
        steps: Each segment's frequency in Hz and length in seconds, in order.
        container: One of ``MUXERS``.
        codec: An FFmpeg encoder (see :func:`write_tone`).
        rate: Sample rate of the file.
        amplitude: Peak level, full scale 1.0.

    Returns:
        ``path`` as a ``Path``.
    """
    bounds = np.cumsum([0, *(round(rate * seconds) for _, seconds in steps)])
    freqs = np.array([freq for freq, _ in steps])

    def samples(start: int, count: int) -> np.ndarray:
        index = np.arange(start, start + count)
        segment = np.searchsorted(bounds, index, side="right") - 1
        t = (index - bounds[segment]) / rate
        wave: np.ndarray = amplitude * np.sin(2.0 * np.pi * freqs[segment] * t)
        return wave

    return _encode(
        Path(path),
        samples,
        total=int(bounds[-1]),
        container=container,
        codec=codec,
        rate=rate,
        channels=2,
        sample_fmt=None,
        bitrate=128_000,
    )


def _encode(
    path: Path,
    samples: Callable[[int, int], np.ndarray],
    *,
    total: int,
    container: str,
    codec: str,
    rate: int,
    channels: int,
    sample_fmt: str | None,
    bitrate: int,
) -> Path:
    """Encode ``samples(start, count)`` (mono, float) to ``path`` through a temporary file."""
    tmp = path.with_name(path.name + ".part")
    layout = LAYOUTS[channels]
    with av.open(str(tmp), "w", format=MUXERS[container]) as out:
        options = {"frame_duration": "20", "application": "audio"} if codec == "libopus" else {}
        stream = out.add_stream(codec, rate=rate, options=options)
        assert isinstance(stream, av.AudioStream), f"{codec} is not an audio encoder"
        stream.layout = layout
        if sample_fmt is not None:
            stream.format = sample_fmt
        if codec in {"libmp3lame", "aac", "libopus"}:
            stream.bit_rate = bitrate
        step = 1024
        for i in range(0, total, step):
            mono = samples(i, min(step, total - i)).astype(np.float32)
            planes = np.repeat(mono[np.newaxis, :], channels, axis=0)
            frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=layout)
            frame.sample_rate = rate
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    tmp.replace(path)
    return path


def rss_feed(title: str, enclosures: Sequence[tuple[str, str]]) -> bytes:
    """An RSS 2.0 feed with one ``(title, media URL)`` item each.

    yt-dlp's generic extractor reads it as a flat playlist: it lists the items without fetching
    any of them.
    """
    items = "".join(
        f"<item><title>{html.escape(name)}</title><link>{html.escape(url)}</link>"
        f"<enclosure url='{html.escape(url)}' type='audio/mpeg' length='0'/>"
        f"<guid>{i}</guid></item>"
        for i, (name, url) in enumerate(enclosures)
    )
    return (
        "<?xml version='1.0' encoding='UTF-8'?><rss version='2.0'><channel>"
        f"<title>{html.escape(title)}</title><link>http://127.0.0.1/</link>"
        f"<description>{html.escape(title)}</description>{items}</channel></rss>"
    ).encode()


def html_page(title: str, body: str) -> bytes:
    """A minimal HTML document."""
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"</head><body>{body}</body></html>"
    ).encode()


def audio_list_page(title: str, sources: Sequence[str]) -> bytes:
    """An HTML page with one ``<audio src>`` per source: yt-dlp's generic extractor lists them."""
    items = "".join(f"<audio controls src='{html.escape(src)}'></audio>\n" for src in sources)
    return html_page(title, f"<h1>{html.escape(title)}</h1>\n{items}")


@dataclass
class Route:
    """What one path answers.

    Attributes:
        body: Bytes to send, or a file to send (read per request, so it may be written later).
        status: HTTP status; bodies of error statuses are sent as they are, without Range.
        content_type: ``Content-Type``; guessed from the file suffix when ``None``.
        truncate_at: Announce the full length but close the connection after this many bytes
            of the body (a download cut short).
        stall_after: Send this many bytes of the body, then hold the connection open sending
            nothing until the server stops (a stalled server).
        fail_after: Answer normally this many times, then ``fail_status`` for every later request.
        fail_status: The status used once ``fail_after`` requests have been served.
        count_heads: Whether HEAD requests count toward ``fail_after``; ``False`` counts GETs
            only (a signed URL that expires after its download, whatever probed it before).
        handler: When set, called with the request handler instead of all the above.
    """

    body: bytes | Path = b""
    status: int = 200
    content_type: str | None = None
    truncate_at: int | None = None
    stall_after: int | None = None
    fail_after: int | None = None
    fail_status: int = 403
    count_heads: bool = True
    handler: Callable[[BaseHTTPRequestHandler], None] | None = None
    requests: int = field(default=0, init=False)


@dataclass(frozen=True)
class LoggedRequest:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    target: str = ""  # the path with its query string, as requested


class MediaServer:
    """A threaded HTTP server on 127.0.0.1 serving ``root`` and added routes.

    Files under ``root`` are served with ``Content-Length``, ``Accept-Ranges`` and single-range
    ``Range`` requests (206/416); HEAD answers the headers only. Routes added with ``add_route``
    take precedence over files. Every request path is recorded in ``requests``.

    Use as a context manager, or call ``start`` and ``stop``.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str]] = []
        #: Every request, in order, with its headers.
        self.request_log: list[LoggedRequest] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    def start(self) -> MediaServer:
        """Bind an ephemeral port and serve in a daemon thread."""
        handler = _make_handler(self)
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Release stalled connections, stop serving and close the socket."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MediaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- routes and URLs

    @property
    def port(self) -> int:
        """The bound port."""
        assert self._server is not None, "server not started"
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` (with or without a leading slash)."""
        return f"{self.base_url}/{path.lstrip('/')}"

    def add_route(self, path: str, route: Route | None = None, **kwargs: object) -> str:
        """Answer ``path`` with ``route`` (or ``Route(**kwargs)``); return its URL."""
        if route is None:
            route = Route(**kwargs)  # type: ignore[arg-type]  # the caller names Route's fields
        with self._lock:
            self.routes["/" + path.lstrip("/")] = route
        return self.url(path)

    def add_file(self, name: str, source: Path) -> str:
        """Copy ``source`` into the served directory as ``name``; return its URL."""
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return self.url(name)

    def request_count(self, path: str, method: str | None = None) -> int:
        """How many requests (of ``method``, else any) reached ``path``."""
        wanted = "/" + path.lstrip("/")
        with self._lock:
            return sum(1 for m, p in self.requests if p == wanted and method in (None, m.upper()))

    # ---- used by the handler

    def _record(self, method: str, target: str, path: str, headers: dict[str, str]) -> Route | None:
        with self._lock:
            self.requests.append((method, path))
            self.request_log.append(LoggedRequest(method, path, headers, target))
            route = self.routes.get(path)
            if route is not None and (route.count_heads or method.upper() != "HEAD"):
                route.requests += 1
            return route


_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


def _make_handler(server: MediaServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "LegatoTestMedia/1.0"

        def log_message(self, format: str, *args: object) -> None:
            """Keep test output quiet."""

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _serve(self, *, head: bool) -> None:
            path = urllib.parse.urlsplit(self.path).path
            route = server._record(self.command, self.path, path, dict(self.headers.items()))
            if route is not None and route.handler is not None:
                route.handler(self)
                return
            if route is None:
                file = (server.root / urllib.parse.unquote(path).lstrip("/")).resolve()
                if not file.is_file() or server.root not in file.parents:
                    self._send_simple(404, b"not found", head=head)
                    return
                route = Route(body=file)
            if route.fail_after is not None and route.requests > route.fail_after:
                self._send_simple(route.fail_status, b"refused", head=head)
                return
            body = route.body.read_bytes() if isinstance(route.body, Path) else route.body
            ctype = route.content_type
            if ctype is None:
                suffix = route.body.suffix if isinstance(route.body, Path) else Path(path).suffix
                ctype = CONTENT_TYPES.get(suffix.lower(), "application/octet-stream")
            if route.status >= 300:
                self._send_simple(route.status, body, head=head, content_type=ctype)
                return
            self._send_body(route, body, ctype, head=head)

        def end_headers(self) -> None:
            # Every answer closes its connection, and says so: FFmpeg otherwise tries to reuse
            # the connection for its next (Range) request although it asked for a close.
            self.send_header("Connection", "close")
            self.close_connection = True
            super().end_headers()

        def _send_simple(
            self, status: int, body: bytes, *, head: bool, content_type: str = "text/plain"
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _send_body(self, route: Route, body: bytes, ctype: str, *, head: bool) -> None:
            size = len(body)
            start, end = 0, size - 1
            status = 200
            header = self.headers.get("Range")
            match = _RANGE.match(header.strip()) if header else None
            if match and (match.group(1) or match.group(2)):
                if match.group(1):
                    start = int(match.group(1))
                    end = int(match.group(2)) if match.group(2) else size - 1
                else:  # a suffix range: the last N bytes
                    start = max(0, size - int(match.group(2)))
                end = min(end, size - 1)
                if start >= size or start > end:
                    self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if head:
                return
            limit = end + 1
            if route.truncate_at is not None:
                limit = min(limit, route.truncate_at)
            stall_at = route.stall_after
            pos = start
            try:
                while pos < limit:
                    if stall_at is not None and pos >= stall_at:
                        break
                    stop = min(limit, pos + _CHUNK)
                    if stall_at is not None:
                        stop = min(stop, stall_at)
                    self.wfile.write(body[pos:stop])
                    pos = stop
                self.wfile.flush()
                if stall_at is not None and pos < end + 1:
                    # Hold the connection, sending nothing, until the server stops.
                    server._stopping.wait()
            except (BrokenPipeError, ConnectionResetError):
                return
            if pos < end + 1:
                self.close_connection = True

    return Handler


def send_html(request: BaseHTTPRequestHandler, body: bytes) -> None:
    """Answer ``request`` (in a route handler) with the HTML page ``body``; a HEAD gets the
    headers only."""
    request.send_response(200)
    request.send_header("Content-Type", "text/html; charset=utf-8")
    request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    if request.command != "HEAD":
        request.wfile.write(body)


def serve_page(page: Callable[[], bytes]) -> Callable[[BaseHTTPRequestHandler], None]:
    """A route handler answering with ``page()``, made anew for every request."""

    def handler(request: BaseHTTPRequestHandler) -> None:
        send_html(request, page())

    return handler


@dataclass(frozen=True)
class Expiring:
    """A page naming a stream URL that stops working mid-track, and the URL that replaces it."""

    page: str
    first: str
    second: str


def expiring_stream(server: MediaServer, name: str, body: Path, *, renewed: bool) -> Expiring:
    """Serve ``name/page.html``, whose ``<audio>`` names ``tok-1.mp3`` until that URL expires.

    ``tok-1.mp3`` cuts its first download at two fifths of the file and refuses (403) every
    later GET: FFmpeg's reconnect is refused, as an expired signed URL is. HEADs before that (a
    URL guard walking redirects) are answered and do not count. From then on the page names
    ``tok-2.mp3``, which serves the file (or, when not ``renewed``, refuses it too).
    """
    size = body.stat().st_size
    first, second = f"{name}/tok-1.mp3", f"{name}/tok-2.mp3"
    server.add_route(first, body=body, truncate_at=size * 2 // 5, fail_after=1, count_heads=False)
    server.add_route(second, body=body, fail_after=None if renewed else 0)

    def page() -> bytes:
        expired = server.request_count(first, "GET") > 1
        return audio_list_page(name, ["/" + (second if expired else first)])

    url = server.add_route(f"{name}/page.html", handler=serve_page(page))
    return Expiring(url, first, second)


class Trickle:
    """A route handler (``add_route(path, handler=Trickle(body))``) that sends ``body`` at
    ``rate`` bytes a second, after its first ``burst`` bytes at once, with no Content-Length: a
    server slower than real time (issue #11). It stops early, closing the connection, once
    :meth:`stop` is called, so that no decoder waits on it after the test.

    Attributes:
        gets: GET requests answered so far.
    """

    def __init__(
        self, body: bytes, *, rate: int = 1000, burst: int = 0, content_type: str = "audio/mpeg"
    ) -> None:
        self.body = body
        self.rate = rate
        self.burst = burst
        self.content_type = content_type
        self.gets = 0
        self._stopped = threading.Event()

    def __call__(self, request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Type", self.content_type)
        request.end_headers()
        if request.command == "HEAD":
            return
        self.gets += 1
        step = max(1, self.rate // 10)  # a tenth of a second's worth every tenth of a second
        try:
            request.wfile.write(self.body[: self.burst])
            request.wfile.flush()
            pos = self.burst
            while pos < len(self.body) and not self._stopped.wait(0.1):
                request.wfile.write(self.body[pos : pos + step])
                request.wfile.flush()
                pos += step
        except (BrokenPipeError, ConnectionResetError):
            return

    def stop(self) -> None:
        """End every response under way, and any later one after its burst."""
        self._stopped.set()


def expected_frames(seconds: float) -> int:
    """The number of 20 ms frames a source of ``seconds`` yields (the last one padded)."""
    return math.ceil(round(seconds * 48000) / 960)


@dataclass(frozen=True)
class ToneSpec:
    """One file of the shared catalog: the arguments ``write_tone`` gets."""

    container: str
    codec: str
    freq: float
    rate: int = 48000
    channels: int = 2
    sample_fmt: str | None = None
    seconds: float = 3.0
    freq_end: float | None = None

    def write(self, path: Path) -> Path:
        """Write this file to ``path``."""
        return write_tone(
            path,
            container=self.container,
            codec=self.codec,
            freq=self.freq,
            seconds=self.seconds,
            rate=self.rate,
            channels=self.channels,
            sample_fmt=self.sample_fmt,
            freq_end=self.freq_end,
        )

    def freq_at(self, t: float) -> float:
        """The instantaneous frequency at ``t`` seconds."""
        if self.freq_end is None:
            return self.freq
        return self.freq + (self.freq_end - self.freq) * t / self.seconds

    def time_of(self, freq: float) -> float:
        """When a chirp passes ``freq`` Hz."""
        assert self.freq_end is not None, "only chirps sweep"
        return (freq - self.freq) * self.seconds / (self.freq_end - self.freq)


#: The shared media: file name -> how it is made. Each tone has its own frequency.
CATALOG: Final[dict[str, ToneSpec]] = {
    "mp3-44k-stereo.mp3": ToneSpec("mp3", "libmp3lame", 440.0, 44100),
    "mp3-22k-mono.mp3": ToneSpec("mp3", "libmp3lame", 330.0, 22050, 1),
    "mp3-48k-stereo.mp3": ToneSpec("mp3", "libmp3lame", 550.0, 48000),
    "m4a-44k-stereo.m4a": ToneSpec("m4a", "aac", 660.0, 44100),
    "m4a-48k-5.1.m4a": ToneSpec("m4a", "aac", 392.0, 48000, 6),
    "m4a-22k-mono.m4a": ToneSpec("m4a", "aac", 494.0, 22050, 1),
    "webm-opus-stereo.webm": ToneSpec("webm", "libopus", 523.0),
    "webm-opus-mono.webm": ToneSpec("webm", "libopus", 587.0, channels=1),
    "ogg-opus-stereo.ogg": ToneSpec("ogg", "libopus", 698.0),
    "flac-96k-5.1-s32.flac": ToneSpec("flac", "flac", 784.0, 96000, 6, "s32"),
    "flac-44k-mono-s16.flac": ToneSpec("flac", "flac", 880.0, 44100, 1, "s16"),
    "wav-22k-mono-u8.wav": ToneSpec("wav", "pcm_u8", 300.0, 22050, 1),
    "wav-44k-stereo-s16.wav": ToneSpec("wav", "pcm_s16le", 350.0, 44100),
    "wav-96k-stereo-s32.wav": ToneSpec("wav", "pcm_s32le", 450.0, 96000),
    "wav-48k-stereo-s24.wav": ToneSpec("wav", "pcm_s24le", 415.0, 48000),
    "flac-48k-stereo-s24.flac": ToneSpec("flac", "flac", 370.0, 48000, 2, "s32"),
    "wav-48k-5.1-f32.wav": ToneSpec("wav", "pcm_f32le", 620.0, 48000, 6),
    "chirp-opus.webm": ToneSpec("webm", "libopus", 200.0, seconds=6.0, freq_end=2000.0),
    "chirp-mp3.mp3": ToneSpec("mp3", "libmp3lame", 200.0, 44100, seconds=6.0, freq_end=2000.0),
    "chirp-aac.m4a": ToneSpec("m4a", "aac", 200.0, 44100, seconds=6.0, freq_end=2000.0),
    "chirp-flac.flac": ToneSpec("flac", "flac", 200.0, 44100, seconds=6.0, freq_end=2000.0),
}


def write_video_only(path: Path) -> Path:
    """A short Matroska file whose only stream is video (no audio to play)."""
    with av.open(str(path), "w", format="matroska") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width = 64
        stream.height = 48
        stream.pix_fmt = "yuv420p"
        for i in range(5):
            image = np.full((48, 64, 3), i * 40, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def write_wav_header(
    path: Path, *, rate: int = 48000, channels: int = 2, tag: int = 1, data: bytes = bytes(4000)
) -> Path:
    """A 16-bit WAV whose header claims whatever it is told (``rate`` Hz, ``channels``, format
    ``tag``; 1 is PCM), followed by ``data``: for headers that lie (1 Hz, 255 channels...)."""
    block = channels * 2
    byte_rate = (rate * block) & 0xFFFFFFFF
    fmt = struct.pack("<HHIIHH", tag, channels, rate, byte_rate, block & 0xFFFF, 16)
    riff = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    riff += b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(riff)) + riff)
    return path


def write_unknown_codec_wav(path: Path) -> Path:
    """A WAV whose format tag (0x1234) names no codec FFmpeg knows: an unsupported codec."""
    return write_wav_header(path, tag=0x1234)


def make_catalog(directory: Path) -> None:
    """Write every ``CATALOG`` file, the truncated files and the unplayable ones."""
    for name, spec in CATALOG.items():
        spec.write(directory / name)
    for name in ("mp3-44k-stereo.mp3", "m4a-44k-stereo.m4a"):
        data = (directory / name).read_bytes()
        suffix = Path(name).suffix
        (directory / f"truncated{suffix}").write_bytes(data[: len(data) // 2])
    write_video_only(directory / "video-only.mkv")
    write_unknown_codec_wav(directory / "unknown-codec.wav")
