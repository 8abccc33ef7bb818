"""Media for the sandbox: tones written with PyAV, and a small HTTP server on loopback.

The demo (and anyone trying Legato offline) plays these instead of anything from the internet:

```python
root = Path("out/media")
write_tone(root / "a440.webm", freq=440.0, seconds=8, container="webm", codec="libopus")
with MediaServer(root) as media:
    url = media.url("a440.webm")      # http://127.0.0.1:PORT/a440.webm
```

Both are blocking: from a coroutine, write tones in a worker thread.
"""

from __future__ import annotations

import logging
import re
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import av
import numpy as np

_log = logging.getLogger(__name__)

#: Container name -> FFmpeg muxer.
MUXERS: Final = {
    "webm": "webm",
    "ogg": "ogg",
    "mp3": "mp3",
    "m4a": "ipod",
    "flac": "flac",
    "wav": "wav",
}

CONTENT_TYPES: Final = {
    ".webm": "audio/webm",
    ".ogg": "audio/ogg",
    ".opus": "audio/ogg",
    ".mp3": "audio/mpeg",
    ".m4a": "audio/mp4",
    ".flac": "audio/flac",
    ".wav": "audio/wav",
    ".html": "text/html; charset=utf-8",
}

_RANGE: Final = re.compile(r"bytes=(\d*)-(\d*)$")
_CHUNK: Final = 64 * 1024


def write_tone(
    path: Path | str,
    *,
    freq: float,
    seconds: float,
    container: str,
    codec: str,
    rate: int = 48_000,
    amplitude: float = 0.5,
    bitrate: int = 128_000,
) -> Path:
    """Write a stereo sine of `freq` Hz with PyAV (blocking, CPU-bound).

    Args:
        path: Where to write; the parent must exist. The file appears complete or not at all.
        freq: Frequency in Hz.
        seconds: Length.
        container: A key of `MUXERS` (`webm`, `ogg`, `mp3`, `m4a`, `flac`, `wav`).
        codec: An FFmpeg encoder (`libopus`, `libmp3lame`, `aac`, `flac`, `pcm_s16le`).
        rate: Sample rate of the file.
        amplitude: Peak level, full scale 1.0.
        bitrate: Bits per second for lossy codecs.

    Returns:
        `path` as a `Path`.

    Raises:
        KeyError: Unknown container.
        ValueError: `codec` is not an audio encoder.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    total = round(rate * seconds)
    with av.open(str(tmp), "w", format=MUXERS[container]) as out:
        # 20 ms Opus frames: what Legato passes through to Discord without re-encoding.
        options = {"frame_duration": "20", "application": "audio"} if codec == "libopus" else {}
        stream = out.add_stream(codec, rate=rate, options=options)
        if not isinstance(stream, av.AudioStream):
            raise ValueError(f"{codec} is not an audio encoder")
        stream.layout = "stereo"
        if codec in {"libopus", "libmp3lame", "aac"}:
            stream.bit_rate = bitrate
        step = 1024
        for start in range(0, total, step):
            n = min(step, total - start)
            t = np.arange(start, start + n, dtype=np.float64) / rate
            mono = (amplitude * np.sin(2.0 * np.pi * freq * t)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(
                np.repeat(mono[np.newaxis, :], 2, axis=0), format="fltp", layout="stereo"
            )
            frame.sample_rate = rate
            frame.pts = start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    tmp.replace(path)
    return path


class MediaServer:
    """Serve the files of a directory over HTTP on loopback, in a background thread.

    GET and HEAD with byte ranges (PyAV seeks with them); every answer closes its connection.

    Args:
        root: The directory served.
        host: A loopback address.
        port: 0 picks a free port.
    """

    def __init__(self, root: Path | str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = Path(root).resolve()
        self._host = host
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._requests: dict[str, int] = {}

    def start(self) -> Self:
        """Bind and serve in a daemon thread; return self."""
        server = ThreadingHTTPServer((self._host, self._port), _make_handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="legato-media-server", daemon=True
        )
        self._thread.start()
        _log.info("media server on %s serving %s", self.base_url, self.root)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (blocks until the serving thread ends)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port.

        Raises:
            RuntimeError: Not started.
        """
        if self._server is None:
            raise RuntimeError("the media server is not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """`http://HOST:PORT`."""
        return f"http://{self._host}:{self.port}"

    def url(self, name: str) -> str:
        """The URL of a file under `root`."""
        return f"{self.base_url}/{urllib.parse.quote(name)}"

    def request_count(self, name: str) -> int:
        """How many GET/HEAD requests asked for `name` so far."""
        with self._lock:
            return self._requests.get("/" + name.lstrip("/"), 0)

    def _count(self, path: str) -> None:
        with self._lock:
            self._requests[path] = self._requests.get(path, 0) + 1


def _make_handler(server: MediaServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            _log.debug("media: " + format, *args)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def end_headers(self) -> None:
            # FFmpeg would otherwise try to reuse the connection for its next Range request.
            self.send_header("Connection", "close")
            self.close_connection = True
            super().end_headers()

        def _serve(self, *, head: bool) -> None:
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            server._count(path)
            file = (server.root / path.lstrip("/")).resolve()
            if not file.is_file() or server.root not in file.parents:
                self._simple(HTTPStatus.NOT_FOUND, b"not found", head=head)
                return
            body = file.read_bytes()
            size = len(body)
            start, end, status = 0, size - 1, HTTPStatus.OK
            header = self.headers.get("Range")
            match = _RANGE.match(header.strip()) if header else None
            if match and (match.group(1) or match.group(2)):
                if match.group(1):
                    start = int(match.group(1))
                    end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
                else:  # a suffix range: the last N bytes
                    start = max(0, size - int(match.group(2)))
                if start >= size or start > end:
                    self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = HTTPStatus.PARTIAL_CONTENT
            self.send_response(status)
            self.send_header(
                "Content-Type", CONTENT_TYPES.get(file.suffix.lower(), "application/octet-stream")
            )
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            if status == HTTPStatus.PARTIAL_CONTENT:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if head:
                return
            try:
                for pos in range(start, end + 1, _CHUNK):
                    self.wfile.write(body[pos : min(end + 1, pos + _CHUNK)])
            except (BrokenPipeError, ConnectionResetError):
                _log.debug("media: client closed %s early", path)

        def _simple(self, status: HTTPStatus, body: bytes, *, head: bool) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

    return Handler
