"""`legato.sandbox.media`: the demo's tones and its loopback HTTP server."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest

from legato.sandbox.analysis import dominant_frequency
from legato.sandbox.media import MediaServer, write_tone

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("name", "container", "codec", "freq"),
    [("a.webm", "webm", "libopus", 440.0), ("b.mp3", "mp3", "libmp3lame", 660.0)],
)
def test_tones_decode_to_their_frequency(
    tmp_path: Path, name: str, container: str, codec: str, freq: float
) -> None:
    path = write_tone(tmp_path / name, freq=freq, seconds=1.0, container=container, codec=codec)
    assert not (tmp_path / f"{name}.part").exists()
    with av.open(str(path)) as media:
        stream = media.streams.audio[0]
        decoders = {"libopus": {"opus", "libopus"}, "libmp3lame": {"mp3", "mp3float"}}[codec]
        assert stream.codec_context.name in decoders
        assert stream.channels == 2
        samples = np.concatenate(
            [f.to_ndarray()[0].astype(np.float64) for f in media.decode(stream)]
        )
    rate = stream.sample_rate
    assert samples.size / rate == pytest.approx(1.0, abs=0.1)
    assert dominant_frequency(samples[rate // 10 :], rate) == pytest.approx(freq, abs=2)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, dict(answer.headers.items()), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def test_server_serves_files_with_ranges_and_nothing_else(tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    body = bytes(range(256)) * 400
    (root / "x.mp3").write_bytes(body)
    (tmp_path / "secret.txt").write_text("outside the root")
    with MediaServer(root) as media:
        assert media.url("x.mp3") == f"http://127.0.0.1:{media.port}/x.mp3"
        status, headers, data = get(media.url("x.mp3"))
        assert (status, data) == (200, body)
        assert headers["Content-Type"] == "audio/mpeg"
        assert headers["Accept-Ranges"] == "bytes"

        status, headers, data = get(media.url("x.mp3"), {"Range": "bytes=100-199"})
        assert (status, data) == (206, body[100:200])
        assert headers["Content-Range"] == f"bytes 100-199/{len(body)}"
        status, _, data = get(media.url("x.mp3"), {"Range": "bytes=-10"})
        assert (status, data) == (206, body[-10:])
        status, headers, _ = get(media.url("x.mp3"), {"Range": f"bytes={len(body)}-"})
        assert status == 416
        assert headers["Content-Range"] == f"bytes */{len(body)}"

        assert get(media.url("missing.mp3"))[0] == 404
        assert get(f"{media.base_url}/../secret.txt")[0] == 404
        assert get(f"{media.base_url}/%2e%2e/secret.txt")[0] == 404
        assert media.request_count("x.mp3") == 4
    with pytest.raises(RuntimeError):
        _ = media.port
