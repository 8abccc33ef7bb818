"""The test media server itself: Range, HEAD, errors and the fault knobs other tests rely on."""

from __future__ import annotations

import asyncio
import http.client
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.media import MediaServer, Route

pytestmark = pytest.mark.integration

BODY = bytes(range(256)) * 40  # 10240 bytes


def fetch(
    server: MediaServer, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, "/" + path.lstrip("/"), headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        return response.status, dict(response.getheaders()), body
    finally:
        conn.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MediaServer]:
    (tmp_path / "data.bin").write_bytes(BODY)
    (tmp_path / "song.mp3").write_bytes(b"ID3fake")
    with MediaServer(tmp_path) as running:
        yield running


def test_whole_file_and_head(server: MediaServer) -> None:
    status, headers, body = fetch(server, "data.bin")
    assert (status, body) == (200, BODY)
    assert headers["Accept-Ranges"] == "bytes"
    status, headers, body = fetch(server, "data.bin", method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == str(len(BODY))
    assert fetch(server, "song.mp3")[1]["Content-Type"] == "audio/mpeg"


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [("bytes=100-199", 100, 199), ("bytes=10000-", 10000, 10239), ("bytes=-40", 10200, 10239)],
)
def test_ranges(server: MediaServer, header: str, start: int, end: int) -> None:
    status, headers, body = fetch(server, "data.bin", headers={"Range": header})
    assert status == 206
    assert body == BODY[start : end + 1]
    assert headers["Content-Range"] == f"bytes {start}-{end}/{len(BODY)}"


def test_unsatisfiable_range_and_missing_file(server: MediaServer) -> None:
    status, headers, _ = fetch(server, "data.bin", headers={"Range": "bytes=20000-"})
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(BODY)}"
    assert fetch(server, "nothing.mp3")[0] == 404
    assert fetch(server, "../etc/passwd")[0] == 404


def test_routes_and_fault_knobs(server: MediaServer) -> None:
    server.add_route("page.html", body=b"<html></html>")
    status, headers, body = fetch(server, "page.html")
    assert (status, body) == (200, b"<html></html>")
    assert headers["Content-Type"].startswith("text/html")
    server.add_route("gone", status=410, body=b"gone")
    assert fetch(server, "gone")[0] == 410
    server.add_route("twice.bin", body=BODY, fail_after=2, fail_status=403)
    assert [fetch(server, "twice.bin")[0] for _ in range(4)] == [200, 200, 403, 403]
    assert server.request_count("twice.bin") == 4
    server.add_route("cut.bin", body=BODY, truncate_at=1000)
    with pytest.raises(http.client.IncompleteRead) as caught:
        fetch(server, "cut.bin")
    assert len(caught.value.partial) == 1000


async def test_stall_holds_until_stop(tmp_path: Path) -> None:
    server = MediaServer(tmp_path).start()
    server.add_route("slow.bin", body=BODY, stall_after=100)
    got = bytearray()
    first_bytes = threading.Event()

    def read() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", "/slow.bin")
        response = conn.getresponse()
        got.extend(response.read(100))
        first_bytes.set()
        try:
            got.extend(response.read())
        except http.client.IncompleteRead as exc:
            got.extend(exc.partial)
        finally:
            conn.close()

    reader = asyncio.create_task(asyncio.to_thread(read))
    async with asyncio.timeout(30):
        await asyncio.to_thread(first_bytes.wait)
        assert bytes(got) == BODY[:100]
        assert not reader.done()
        await asyncio.to_thread(server.stop)
        await reader
    assert bytes(got) == BODY[:100]


def test_route_dataclass_defaults() -> None:
    route = Route()
    assert (route.status, route.fail_after, route.requests) == (200, None, 0)
