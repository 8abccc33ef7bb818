"""Every request a track makes goes through the URL guard: yt-dlp's, FFmpeg's, and each
playlist entry, HLS segment and key, DASH manifest and redirect hop.

The policy allows exactly the media server, as the sandbox does. Two internal listeners, on
127.0.0.1 and on ::1, stand for services inside the bot's network: each case resolves a link
and plays what it gives the way the player does (``Resolver.stream``, then ``open_source``
reading to the end), and the listeners must receive **nothing**. The same media served from the
allowed host plays.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import av
import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from legato.audio.decode import open_source
from legato.audio.fetch import request
from legato.audio.resolve import Resolver, ResolverSettings
from legato.audio.source import FrameSource
from legato.audio.urlguard import NOT_ALLOWED, TOO_MANY_REDIRECTS, UrlPolicy
from legato.errors import AudioError, ResolveError
from tests.integration.test_urlguard_redirects import Target
from tests.media import MediaServer, Route

pytestmark = pytest.mark.integration

TONE = "mp3-44k-stereo.mp3"
OPUS = "ogg-opus-stereo.ogg"


@pytest.fixture(scope="module", params=["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def inside(request: pytest.FixtureRequest) -> Iterator[Target]:
    listener = Target(request.param)
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def executor() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        yield pool


@pytest.fixture
def policy(media_server: MediaServer) -> UrlPolicy:
    return UrlPolicy(allowed_hosts=(f"127.0.0.1:{media_server.port}",), timeout=5.0)


@pytest.fixture
def resolver(policy: UrlPolicy, executor: concurrent.futures.ThreadPoolExecutor) -> Resolver:
    return Resolver(ResolverSettings(timeout=10.0, url_policy=policy), executor)


@pytest.fixture
def serve(media_server: MediaServer, request: pytest.FixtureRequest) -> Callable[..., str]:
    """``serve(name, body, content_type=None)``: a route unique to this test; its URL."""
    prefix = f"guard/{request.node.name}/".replace("[", "_").replace("]", "_").replace(":", "_")

    def add(name: str, body: bytes | Path, content_type: str | None = None) -> str:
        return media_server.add_route(prefix + name, body=body, content_type=content_type)

    return add


def _drain(source: FrameSource) -> int:
    frames = 0
    try:
        while batch := source.read(50):
            frames += len(batch)
    finally:
        source.close()
    return frames


async def play_all(resolver: Resolver, url: str) -> list[int | str]:
    """Resolve ``url`` and play every track it gives as the player would: the frames each
    gave, or the user message it failed with."""
    outcome: list[int | str] = []
    for track in await resolver.resolve(url):
        try:
            info = await resolver.stream(track)
            source = await asyncio.to_thread(open_source, info, timeout=5.0)
            outcome.append(await asyncio.to_thread(_drain, source))
        except AudioError as exc:
            outcome.append(exc.user_message)
    return outcome


def played(outcome: int | str, *, at_least: int = 100, at_most: int | None = None) -> bool:
    """Whether an outcome of :func:`play_all` is audio: ``at_least`` frames (at most ...)."""
    if not isinstance(outcome, int):
        return False
    return outcome >= at_least and (at_most is None or outcome <= at_most)


async def outcome_of(resolver: Resolver, url: str) -> list[int | str]:
    try:
        return await play_all(resolver, url)
    except AudioError as exc:
        return [exc.user_message]


# ---- plain playlists


def m3u(entries: list[str]) -> bytes:
    lines = ["#EXTM3U"]
    for i, entry in enumerate(entries):
        lines += [f"#EXTINF:3,Entry {i}", entry]
    return ("\n".join(lines) + "\n").encode()


def pls(entries: list[str]) -> bytes:
    lines = ["[playlist]"]
    for i, entry in enumerate(entries, 1):
        lines += [f"File{i}={entry}", f"Title{i}=Entry {i}", f"Length{i}=3"]
    lines += [f"NumberOfEntries={len(entries)}", "Version=2"]
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize(
    ("name", "make", "content_type"),
    [
        ("list.m3u", m3u, "audio/x-mpegurl"),
        ("list.m3u8", m3u, "application/vnd.apple.mpegurl"),
        ("list.pls", pls, "audio/x-scpls"),
    ],
)
async def test_playlist_entries_pointing_inward_reach_nobody(
    resolver: Resolver,
    serve: Callable[..., str],
    inside: Target,
    media_server: MediaServer,
    name: str,
    make: Callable[[list[str]], bytes],
    content_type: str,
) -> None:
    body = make([inside.url("e.mp3"), inside.url("f.mp3")])
    assert await outcome_of(resolver, serve(name, body, content_type)) == [NOT_ALLOWED]
    # Behind a name that resolves inside (the entry passes by its form, not when it connects).
    named = [f"http://inside.test:{inside.port}/e.mp3", media_server.url(TONE)]
    lookup = _lookup({"inside.test": inside.host})
    strict = Resolver(
        ResolverSettings(timeout=10.0, url_policy=_with_lookup(resolver, lookup)), None
    )
    outcome = await outcome_of(strict, serve("named-" + name, make(named), content_type))
    assert outcome[0] == NOT_ALLOWED
    assert played(outcome[1])  # the allowed entry still plays
    assert inside.hits == []


@pytest.mark.parametrize(
    ("name", "make"),
    [("ok.m3u", m3u), ("ok.m3u8", m3u), ("ok.pls", pls)],
    ids=["m3u", "m3u8", "pls"],
)
async def test_allowed_playlist_gives_each_entry_as_a_track(
    resolver: Resolver,
    serve: Callable[..., str],
    media_server: MediaServer,
    name: str,
    make: Callable[[list[str]], bytes],
) -> None:
    url = serve(name, make([media_server.url(TONE), media_server.url(OPUS)]))
    tracks = await resolver.resolve(url)
    assert [t.url for t in tracks] == [media_server.url(TONE), media_server.url(OPUS)]
    assert [t.title for t in tracks] == (
        ["Entry 0", "Entry 1"] if name != "ok.pls" else ["Entry 1", "Entry 2"]
    )
    assert all(t.duration == 3.0 for t in tracks)
    frames = await play_all(resolver, url)
    assert all(played(n) for n in frames), frames


async def test_playlist_is_capped_at_the_playlist_size(
    policy: UrlPolicy, serve: Callable[..., str], media_server: MediaServer
) -> None:
    small = Resolver(ResolverSettings(max_playlist=2, url_policy=policy))
    url = serve("long.m3u", m3u([media_server.url(f"{TONE}?n={i}") for i in range(5)]))
    assert len(await small.resolve(url)) == 2


# ---- HLS


def segmented(path: Path, format: str, options: dict[str, str], seconds: float = 3.0) -> None:
    """A tone written by FFmpeg's segmenting muxer ``format`` (``hls``, ``dash``) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=format, options=options) as out:
        stream = out.add_stream("aac", rate=48000)
        stream.layout = "stereo"
        samples = int(48000 * seconds)
        import numpy as np

        t = np.arange(samples) / 48000
        pcm = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
        for start in range(0, samples, 1024):
            chunk = np.repeat(pcm[start : start + 1024], 2).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="stereo")
            frame.rate = 48000
            frame.pts = start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def hls_stream(directory: Path) -> list[bytes]:
    """MPEG-TS segments of a tone (one second each), made by FFmpeg's HLS muxer."""
    segmented(directory / "index.m3u8", "hls", {"hls_time": "1", "hls_playlist_type": "vod"})
    names = sorted(p.name for p in directory.glob("index*.ts"))
    return [(directory / n).read_bytes() for n in names]


@pytest.fixture(scope="module")
def segments(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    return hls_stream(tmp_path_factory.mktemp("hls"))


def media_playlist(urls: list[str], key: str | None = None, iv: str = "0" * 32) -> bytes:
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:2", "#EXT-X-MEDIA-SEQUENCE:0"]
    lines += ["#EXT-X-PLAYLIST-TYPE:VOD"]
    if key is not None:
        lines.append(f'#EXT-X-KEY:METHOD=AES-128,URI="{key}",IV=0x{iv}')
    for url in urls:
        lines += ["#EXTINF:1.0,", url]
    lines.append("#EXT-X-ENDLIST")
    return ("\n".join(lines) + "\n").encode()


def encrypt(data: bytes, key: bytes, iv: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    body = padder.update(data) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return encryptor.update(body) + encryptor.finalize()


async def test_allowed_hls_plays(
    resolver: Resolver, serve: Callable[..., str], segments: list[bytes]
) -> None:
    urls = [serve(f"seg{i}.ts", data, "video/mp2t") for i, data in enumerate(segments)]
    playlist = serve("index.m3u8", media_playlist(urls), "application/vnd.apple.mpegurl")
    (frames,) = await play_all(resolver, playlist)
    assert played(frames, at_least=140)  # 3 s of 20 ms frames


async def test_allowed_encrypted_hls_plays(
    resolver: Resolver, serve: Callable[..., str], segments: list[bytes]
) -> None:
    key, iv = bytes(range(16)), bytes(range(16, 32))
    key_url = serve("key.bin", key, "application/octet-stream")
    urls = [serve(f"seg{i}.ts", encrypt(d, key, iv), "video/mp2t") for i, d in enumerate(segments)]
    body = media_playlist(urls, key=key_url, iv=iv.hex())
    (frames,) = await play_all(resolver, serve("index.m3u8", body, "application/x-mpegurl"))
    assert played(frames, at_least=140)


async def test_hls_segments_pointing_inward_reach_nobody(
    resolver: Resolver, serve: Callable[..., str], segments: list[bytes], inside: Target
) -> None:
    urls = [serve("seg0.ts", segments[0], "video/mp2t"), inside.url("seg1.ts")]
    urls += [inside.url("seg2.ts")]
    playlist = serve("index.m3u8", media_playlist(urls), "application/vnd.apple.mpegurl")
    outcome = await outcome_of(resolver, playlist)
    # The allowed first segment may play before the refusal ends the track.
    assert len(outcome) == 1
    assert outcome[0] == NOT_ALLOWED or played(outcome[0], at_most=60)
    assert inside.hits == []


async def test_hls_key_pointing_inward_reaches_nobody(
    resolver: Resolver, serve: Callable[..., str], segments: list[bytes], inside: Target
) -> None:
    key, iv = bytes(range(16)), bytes(16)
    urls = [serve(f"seg{i}.ts", encrypt(d, key, iv), "video/mp2t") for i, d in enumerate(segments)]
    body = media_playlist(urls, key=inside.url("key.bin"), iv=iv.hex())
    outcome = await outcome_of(resolver, serve("index.m3u8", body, "application/x-mpegurl"))
    assert len(outcome) == 1
    assert not played(outcome[0])
    assert inside.hits == []


async def test_hls_master_variant_pointing_inward_reaches_nobody(
    resolver: Resolver, serve: Callable[..., str], inside: Target
) -> None:
    master = (
        '#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=128000,CODECS="mp4a.40.2"\n'
        f"{inside.url('variant.m3u8')}\n"
    ).encode()
    outcome = await outcome_of(resolver, serve("master.m3u8", master, "application/x-mpegurl"))
    assert outcome == [NOT_ALLOWED]
    assert inside.hits == []


# ---- DASH


@pytest.fixture(scope="module")
def dash_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A DASH manifest and its fragments (FFmpeg's DASH muxer), by file name."""
    directory = tmp_path_factory.mktemp("dash")
    segmented(directory / "manifest.mpd", "dash", {"seg_duration": "1"})
    return {p.name: p.read_bytes() for p in directory.iterdir()}


async def test_allowed_dash_plays(
    resolver: Resolver, serve: Callable[..., str], dash_files: dict[str, bytes]
) -> None:
    urls = {name: serve(name, body) for name, body in dash_files.items()}
    (frames,) = await play_all(resolver, urls["manifest.mpd"])
    assert played(frames, at_least=140)


async def test_dash_manifest_pointing_inward_reaches_nobody(
    resolver: Resolver, serve: Callable[..., str], inside: Target
) -> None:
    base = inside.url("dash/")
    mpd = f"""<?xml version="1.0" encoding="utf-8"?>
<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static" mediaPresentationDuration="PT3.0S"
     profiles="urn:mpeg:dash:profile:isoff-live:2011" minBufferTime="PT2.0S">
  <BaseURL>{base}</BaseURL>
  <Period id="0" start="PT0.0S">
    <AdaptationSet contentType="audio" mimeType="audio/mp4">
      <Representation id="a" codecs="mp4a.40.2" bandwidth="128000" audioSamplingRate="48000">
        <SegmentTemplate timescale="48000" initialization="init.m4s" media="chunk-$Number$.m4s"
                         startNumber="1" duration="48000"/>
      </Representation>
    </AdaptationSet>
  </Period>
</MPD>
""".encode()
    outcome = await outcome_of(resolver, serve("manifest.mpd", mpd, "application/dash+xml"))
    assert len(outcome) == 1
    assert not played(outcome[0])
    assert inside.hits == []


# ---- redirects


def redirect_route(location: str, *, get_only: bool = False) -> Route:
    """302 to ``location``; with ``get_only``, HEAD answers 200 as if it were the media."""

    def handler(request: BaseHTTPRequestHandler) -> None:
        if get_only and request.command == "HEAD":
            request.send_response(200)
            request.send_header("Content-Type", "audio/mpeg")
            request.send_header("Content-Length", "1000")
            request.end_headers()
            return
        request.send_response(302)
        request.send_header("Location", location)
        request.send_header("Content-Length", "0")
        request.end_headers()

    return Route(handler=handler)


async def test_get_only_redirect_inward_reaches_nobody(
    resolver: Resolver, media_server: MediaServer, inside: Target, request: pytest.FixtureRequest
) -> None:
    url = media_server.add_route(
        f"guard/get-only-{request.node.callspec.id}.mp3",
        redirect_route(inside.url("secret.mp3"), get_only=True),
    )
    assert await outcome_of(resolver, url) == [NOT_ALLOWED]
    assert inside.hits == []


async def test_five_hop_chain_ending_inward_reaches_nobody(
    resolver: Resolver, media_server: MediaServer, inside: Target, request: pytest.FixtureRequest
) -> None:
    url = inside.url("secret.mp3")
    for hop in range(5):
        url = media_server.add_route(
            f"guard/chain-{request.node.callspec.id}-{hop}", redirect_route(url)
        )
    assert await outcome_of(resolver, url) == [NOT_ALLOWED]
    assert inside.hits == []


async def test_redirect_loop_says_it_redirects_too_often(
    resolver: Resolver, media_server: MediaServer
) -> None:
    loop = media_server.url("guard/loop-a")
    media_server.add_route("guard/loop-b", redirect_route(loop))
    media_server.add_route("guard/loop-a", redirect_route(media_server.url("guard/loop-b")))
    assert await outcome_of(resolver, loop) == [TOO_MANY_REDIRECTS]
    with pytest.raises(ResolveError) as info:
        await asyncio.to_thread(request, resolver.settings.url_policy or UrlPolicy(), loop)
    assert info.value.user_message == TOO_MANY_REDIRECTS


# ---- DNS


def _lookup(names: dict[str, str]) -> Callable[[str, int], list[tuple[object, ...]]]:
    def lookup(host: str, port: int) -> list[tuple[object, ...]]:
        if host not in names:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        address = names[host]
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sockaddr = (address, port, 0, 0) if ":" in address else (address, port)
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)]

    return lookup


def _with_lookup(resolver: Resolver, lookup: Callable[..., object]) -> UrlPolicy:
    import dataclasses

    assert resolver.settings.url_policy is not None
    return dataclasses.replace(resolver.settings.url_policy, lookup=lookup)  # type: ignore[arg-type]


async def test_name_rebinding_between_lookups_reaches_nobody(
    resolver: Resolver, inside: Target
) -> None:
    """First lookup: a public address (unroutable from here); every later one: inside. The
    connection goes where the checked answer said, so the second answer is never used."""
    answers: list[str] = []
    inside_address = inside.host

    def flip(host: str, port: int) -> list[tuple[object, ...]]:
        address = "2001:4860:4860::8888" if not answers else inside_address
        answers.append(address)
        return _lookup({host: address})(host, port)

    strict = Resolver(ResolverSettings(timeout=10.0, url_policy=_with_lookup(resolver, flip)))
    outcome = await outcome_of(strict, f"http://rebind.test:{inside.port}/a.mp3")
    assert len(outcome) == 1
    assert not played(outcome[0])
    assert answers[0] == "2001:4860:4860::8888"  # the first answer was used, and passed
    assert inside.hits == []


def test_connect_uses_the_one_lookup_it_checked(media_server: MediaServer) -> None:
    calls: list[str] = []

    def counting(host: str, port: int) -> list[tuple[object, ...]]:
        calls.append(host)
        return _lookup({"media.test": "127.0.0.1"})(host, port)

    allowing = UrlPolicy(allow_private=True, lookup=counting)
    sock = allowing.connect(("media.test", media_server.port), 5.0)
    with sock:
        assert sock.getpeername() == ("127.0.0.1", media_server.port)
    assert calls == ["media.test"]
    with pytest.raises(ResolveError) as info:
        UrlPolicy(lookup=counting).connect(("media.test", media_server.port), 5.0)
    assert info.value.user_message == NOT_ALLOWED
