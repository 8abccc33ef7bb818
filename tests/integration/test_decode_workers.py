"""The decode worker-process pool (``legato.audio.workers``) on real media over local HTTP.

Each test compares what comes through the pool with what ``open_source`` gives in this process
(frames, packets, errors), or plays through a real ``GuildPlayer`` whose opener uses the pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from legato.audio.decode import DEFAULT_TIMEOUT, open_source
from legato.audio.encode import OpusSettings
from legato.audio.player import GuildPlayer, PlayerState, TrackFailed, make_opener
from legato.audio.resolve import Resolver, ResolverSettings
from legato.audio.sink import OPUS_SILENCE
from legato.audio.source import FRAME_SAMPLES, SAMPLE_RATE, ShutDown, ThreadedReader
from legato.audio.track import StreamInfo, Track
from legato.audio.workers import STOPPED, DecodePool, WorkerSource
from legato.errors import DecodeError
from legato.sandbox.analysis import dominant_frequency
from tests.fakes import RecordingSink
from tests.integration.test_decode import check_seek_lands, mono_of, read_all, read_reader
from tests.integration.test_player_real import Recorder, play_queue, tone_of
from tests.media import (
    CATALOG,
    MediaServer,
    expected_frames,
    expiring_stream,
    write_steps,
    write_tone,
)

pytestmark = pytest.mark.integration

FRAME_S = FRAME_SAMPLES / SAMPLE_RATE
TIMEOUT = DEFAULT_TIMEOUT


@pytest.fixture
def pool() -> Iterator[DecodePool]:
    pool = DecodePool(1)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
async def threads() -> AsyncIterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4, thread_name_prefix="test-workers") as executor:
        yield executor


async def _in_pool(pool: DecodePool, info: StreamInfo) -> list[bytes]:
    source = await asyncio.to_thread(pool.open, info, opus=OpusSettings(), timeout=TIMEOUT)
    try:
        return await read_reader(source)
    finally:
        source.close()


def _in_thread(info: StreamInfo) -> list[bytes]:
    source = open_source(info, opus=OpusSettings(), timeout=TIMEOUT)
    try:
        return read_all(source)
    finally:
        source.close()


@pytest.mark.parametrize("name", ["mp3-44k-stereo.mp3", "webm-opus-stereo.webm"])
async def test_the_pool_decodes_as_this_process_does(
    name: str, pool: DecodePool, media_url: Callable[[str], str]
) -> None:
    spec = CATALOG[name]
    info = StreamInfo(url=media_url(name))
    pooled = await _in_pool(pool, info)
    local = await asyncio.to_thread(_in_thread, info)
    assert len(pooled) == len(local)
    assert abs(len(pooled) * FRAME_S - spec.seconds) <= FRAME_S + 1e-9
    body = mono_of(pooled)[SAMPLE_RATE // 10 : -SAMPLE_RATE // 10]
    assert dominant_frequency(body) == pytest.approx(spec.freq, abs=2.0)
    if name.endswith(".webm"):
        assert pooled == local  # passthrough: the container's packets, unchanged


async def test_metadata_follows_each_reply(
    pool: DecodePool, media_url: Callable[[str], str]
) -> None:
    info = StreamInfo(url=media_url("webm-opus-stereo.webm"))
    source = await asyncio.to_thread(pool.open, info, timeout=TIMEOUT)
    try:
        assert source.passthrough
        assert source.position == 0.0
        assert source.duration == pytest.approx(CATALOG["webm-opus-stereo.webm"].seconds, abs=0.1)
        chunk = await source.read_chunk(10)
        assert len(chunk.frames) == 10
        assert source.position == chunk.position == pytest.approx(10 * FRAME_S)
        await source.volume_to(0.5)
        assert not source.passthrough
        await source.volume_to(1.0)
        await source.read_chunk(1)
        assert source.passthrough
    finally:
        source.close()
    assert (await source.read_chunk(5)).frames == []  # closed: nothing more


async def test_a_worker_read_gives_what_a_thread_read_gives(
    pool: DecodePool, media_url: Callable[[str], str]
) -> None:
    """The same stream read through a worker and through this process's threads: the same
    frames and the same position, through the same awaitable read."""
    info = StreamInfo(url=media_url("mp3-44k-stereo.mp3"))
    local = ThreadedReader(
        await asyncio.to_thread(open_source, info, opus=OpusSettings(), timeout=TIMEOUT)
    )
    pooled = await asyncio.to_thread(pool.open, info, opus=OpusSettings(), timeout=TIMEOUT)
    try:
        for _ in range(3):
            pending = pooled.read_chunk(7)  # on the loop: it returns before the worker answers
            expected = await local.read_chunk(7)
            got = await pending
            assert got.frames == expected.frames
            assert got.position == expected.position == pooled.position
            assert got.duration == expected.duration
        assert pooled.position == pytest.approx(21 * FRAME_S)
    finally:
        local.close()
        pooled.close()


async def test_reads_queued_in_one_loop_turn_go_as_one_message(
    pool: DecodePool, media_url: Callable[[str], str]
) -> None:
    """Reads only queue on the loop; what it queued before its next flush (here, in one turn)
    reaches the worker as one message, and the worker answers each request of it."""
    info = StreamInfo(url=media_url("mp3-44k-stereo.mp3"))
    sources = [
        await asyncio.to_thread(pool.open, info, opus=OpusSettings(), timeout=TIMEOUT)
        for _ in range(5)
    ]
    assert len({s.worker_pid for s in sources}) == 1  # a pool of one
    messages, requests = pool.sent
    try:
        reads = []
        for source in sources:  # in one turn of the loop, busy between the reads
            reads.append(source.read_chunk(3))
            # The loop kept busy on purpose: nothing may go out before its turn ends.
            time.sleep(0.02)  # noqa: ASYNC251
        results = [(await r).frames for r in reads]
        sent_messages, sent_requests = pool.sent
    finally:
        for source in sources:
            source.close()
    assert all(len(r) == 3 for r in results)
    assert all(r == results[0] for r in results)  # each from its own source's start
    assert (sent_messages - messages, sent_requests - requests) == (1, len(sources))


async def test_a_reply_larger_than_one_read_of_the_pipe_arrives_whole(
    pool: DecodePool, media_server: MediaServer, tmp_path: Path
) -> None:
    """The loop reads a worker's pipe as bytes arrive: 40 s of Opus in one reply (about 700
    KiB, several reads, the worker writing while the loop reads) comes out frame for frame as
    the same stream read in this process."""
    path = write_tone(tmp_path / "long.webm", container="webm", codec="libopus", seconds=40.0)
    info = StreamInfo(url=media_server.add_file("workers/long.webm", path))
    source = await asyncio.to_thread(pool.open, info, timeout=TIMEOUT)
    try:
        chunk = await source.read_chunk(5000)
    finally:
        source.close()
    local = await asyncio.to_thread(_in_thread, info)
    assert sum(map(len, chunk.frames)) > 512 * 1024
    assert chunk.frames == local


async def test_the_bots_process_runs_no_thread_per_worker(
    media_url: Callable[[str], str],
) -> None:
    """Requests and replies cross on the loop: a pool of two, opening and reading, adds no
    thread to this process (the opens wait in the caller's own executor thread)."""
    info = StreamInfo(url=media_url("mp3-44k-stereo.mp3"))
    pool = DecodePool(2)
    with ThreadPoolExecutor(1, thread_name_prefix="test-opener") as opener:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(opener, lambda: None)  # its one thread, started
        before = set(threading.enumerate())
        try:
            await loop.run_in_executor(opener, pool.start)
            sources = [
                await loop.run_in_executor(
                    opener, lambda: pool.open(info, opus=OpusSettings(), timeout=TIMEOUT)
                )
                for _ in range(4)
            ]
            assert len({s.worker_pid for s in sources}) == 2
            chunks = await asyncio.gather(*(s.read_chunk(10) for s in sources))
            during = set(threading.enumerate())
            for s in sources:
                s.close()
        finally:
            await loop.run_in_executor(opener, pool.close)
    assert all(len(c.frames) == 10 for c in chunks)
    assert during - before == set()


def test_two_loops_reading_from_one_worker_each_get_their_own_replies(
    pool: DecodePool, media_url: Callable[[str], str]
) -> None:
    """A worker serves sources read from two event loops (two threads) at once: each loop's
    reads are sent and answered, in order per source."""
    info = StreamInfo(url=media_url("mp3-44k-stereo.mp3"))
    expected = _in_thread(info)[:40]

    async def read_through(source: WorkerSource) -> list[bytes]:
        frames: list[bytes] = []
        for _ in range(8):
            frames += (await source.read_chunk(5)).frames
        return frames

    def on_a_loop(sources: list[WorkerSource]) -> list[list[bytes]]:
        async def main() -> list[list[bytes]]:
            return list(await asyncio.gather(*(read_through(s) for s in sources)))

        return asyncio.run(main())

    sources = [pool.open(info, opus=OpusSettings(), timeout=TIMEOUT) for _ in range(4)]
    assert len({s.worker_pid for s in sources}) == 1  # a pool of one
    try:
        with ThreadPoolExecutor(2) as loops:
            halves = [loops.submit(on_a_loop, sources[:2]), loops.submit(on_a_loop, sources[2:])]
            results = [frames for half in halves for frames in half.result(60)]
    finally:
        for source in sources:
            source.close()
    assert results == [expected] * 4


async def test_a_read_fails_through_its_awaitable_after_the_pool_closes(
    media_url: Callable[[str], str],
) -> None:
    pool = DecodePool(1)
    info = StreamInfo(url=media_url("mp3-44k-stereo.mp3"))
    source = await asyncio.to_thread(pool.open, info, timeout=TIMEOUT)
    await asyncio.to_thread(pool.close)
    read = source.read_chunk(5)  # does not raise: the error is the awaitable's
    with pytest.raises(ShutDown, match="after shutdown"):
        await read


async def test_a_hung_worker_fails_reads_after_the_reply_deadline(
    media_url: Callable[[str], str],
) -> None:
    """A worker that stops answering (SIGSTOP: alive, silent) fails a read with a
    ``DecodeError`` once the stream timeout and the margin are over, instead of leaving the
    player's read out for good."""
    pool = DecodePool(1, reply_margin=0.5)
    info = StreamInfo(url=media_url("mp3-44k-stereo.mp3"))
    try:
        source = await asyncio.to_thread(pool.open, info, timeout=1.0)  # replies due in 1.5 s
        [pid] = pool.pids
        os.kill(pid, signal.SIGSTOP)
        try:
            queued = source.read_chunk(5)
            # The writer's sweep runs once a second: due at 1.5 s, failed by 2.5 s.
            async with asyncio.timeout(5):
                with pytest.raises(DecodeError, match="gave no answer") as late:
                    await queued
            assert late.value.user_message == STOPPED
            assert pool.pending == 0  # it is not kept waiting
        finally:
            os.kill(pid, signal.SIGCONT)
        # Awake again: it still serves.
        async with asyncio.timeout(10):
            assert len((await source.read_chunk(3)).frames) == 3
        source.close()
    finally:
        await asyncio.to_thread(pool.close)


async def _tone_track(
    server: MediaServer,
    resolver: Resolver,
    path: Path,
    *,
    freq: float = 440.0,
    seconds: float = 3.0,
    codec: str = "libmp3lame",
) -> Track:
    """A tone written to ``path`` (its suffix is the container), served and resolved."""
    write_tone(path, container=path.suffix[1:], codec=codec, freq=freq, seconds=seconds)
    url = server.add_file(f"workers/{path.name}", path)
    [found] = await resolver.resolve(url)
    return Track(url=found.url, title=path.name, duration=found.duration)


def _player(
    resolver: Resolver, executor: ThreadPoolExecutor, pool: DecodePool | None
) -> tuple[GuildPlayer, RecordingSink, Recorder]:
    """A player opening through ``pool`` (None: in this process), its sink and its events."""
    sink = RecordingSink()
    recorder = Recorder(sink)
    opener = make_opener(resolver, opus=OpusSettings(), executor=executor, pool=pool)
    player = GuildPlayer(sink, opener, executor=executor, on_event=recorder, guild_id=1)
    return player, sink, recorder


class CountingExecutor(ThreadPoolExecutor):
    """A real thread pool that counts the jobs given to it."""

    def __init__(self) -> None:
        super().__init__(4, thread_name_prefix="test-counting")
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


@pytest.mark.parametrize("pooled", [True, False])
async def test_refills_of_a_pooled_track_take_no_executor_job(
    pooled: bool, pool: DecodePool, media_server: MediaServer, tmp_path: Path
) -> None:
    """Through the pool, the player's reads after the first fill go to the worker from the loop:
    a 4 s track takes a few executor jobs (open, first fill), not one per refill as a track
    decoded in this process does (the measure's other side)."""
    with CountingExecutor() as executor:
        resolver = Resolver(ResolverSettings(timeout=20.0), executor)
        track = await _tone_track(media_server, resolver, tmp_path / "t.mp3", seconds=4.0)
        player, sink, recorder = _player(resolver, executor, pool if pooled else None)
        before = executor.submitted
        await play_queue(player, sink, [track])
        jobs = executor.submitted - before
    audio = [f for f in recorder.frames_of("t.mp3") if f != OPUS_SILENCE]
    assert abs(len(audio) - expected_frames(4.0)) <= 3
    assert tone_of(audio) == pytest.approx(440.0, abs=2.0)
    refills = len(audio) // 10  # the buffer is refilled in chunks of at most 10 frames
    if pooled:
        assert jobs <= 5, jobs
    else:
        assert jobs >= refills, (jobs, refills)


@pytest.mark.parametrize("target", [1.3, 4.05])
async def test_seek_lands_within_100_ms(
    target: float, pool: DecodePool, media_url: Callable[[str], str]
) -> None:
    source = await asyncio.to_thread(
        pool.open, StreamInfo(url=media_url("chirp-mp3.mp3")), timeout=TIMEOUT
    )
    await check_seek_lands(source, CATALOG["chirp-mp3.mp3"], target)


@pytest.mark.parametrize("name", ["missing.mp3", "pages/nomedia.html", "video-only.mkv"])
async def test_errors_cross_as_the_same_class_and_message(
    name: str, pool: DecodePool, media_url: Callable[[str], str]
) -> None:
    info = StreamInfo(url=media_url(name))
    with pytest.raises(DecodeError) as local:
        await asyncio.to_thread(open_source, info, timeout=TIMEOUT)
    with pytest.raises(DecodeError) as pooled:
        await asyncio.to_thread(pool.open, info, timeout=TIMEOUT)
    assert type(pooled.value) is type(local.value)
    assert pooled.value.user_message == local.value.user_message
    if name == "missing.mp3":
        assert "404" in pooled.value.user_message


async def test_a_bad_volume_is_a_value_error(
    pool: DecodePool, media_url: Callable[[str], str]
) -> None:
    source = await asyncio.to_thread(
        pool.open, StreamInfo(url=media_url("mp3-44k-stereo.mp3")), timeout=TIMEOUT
    )
    try:
        with pytest.raises(ValueError, match="volume"):
            await source.volume_to(11.0)
        assert len((await source.read_chunk(5)).frames) == 5  # the source is still usable
    finally:
        source.close()


async def test_a_stream_lost_in_a_worker_is_reopened_by_the_player(
    pool: DecodePool, threads: ThreadPoolExecutor, media_server: MediaServer, tmp_path: Path
) -> None:
    steps = ((440.0, 1.0), (660.0, 1.0), (880.0, 1.0))
    body = write_steps(
        tmp_path / "steps.mp3", steps, container="mp3", codec="libmp3lame", rate=44100
    )
    urls = expiring_stream(media_server, "workers-expiring", body, renewed=True)
    resolver = Resolver(ResolverSettings(timeout=20.0), threads)
    [found] = await resolver.resolve(urls.page)
    track = Track(url=found.url, title="steps", duration=found.duration)
    player, sink, recorder = _player(resolver, threads, pool)
    await play_queue(player, sink, [track])
    kinds = [type(e).__name__ for e in recorder.events]
    assert kinds == ["TrackStarted", "TrackEnded", "QueueEnded"]
    assert media_server.request_count(urls.second) >= 1  # reopened after the StreamLost
    audio = [f for f in recorder.frames_of("steps") if f != OPUS_SILENCE]
    assert abs(len(audio) - expected_frames(3.0)) <= 3


async def test_a_killed_worker_fails_its_track_and_the_next_one_plays(
    pool: DecodePool, threads: ThreadPoolExecutor, media_server: MediaServer, tmp_path: Path
) -> None:
    resolver = Resolver(ResolverSettings(timeout=20.0), threads)
    long = await _tone_track(media_server, resolver, tmp_path / "long.mp3", seconds=20.0)
    after = await _tone_track(
        media_server, resolver, tmp_path / "after.mp3", freq=660.0, seconds=1.5
    )
    player, sink, recorder = _player(resolver, threads, pool)
    player.queue.add([long, after])
    try:
        async with asyncio.timeout(90):
            assert player.start()
            await player.wait_for(PlayerState.PLAYING)
            await sink.wait_for(lambda s: len(s.frames) > 25)
            [victim] = pool.pids
            os.kill(victim, signal.SIGKILL)
            await player.wait_for(PlayerState.IDLE)
            await sink.wait_for(lambda s: not s.speaking)
    finally:
        await player.close()
    kinds = [type(e).__name__ for e in recorder.events]
    assert kinds == ["TrackStarted", "TrackFailed", "TrackStarted", "TrackEnded", "QueueEnded"]
    failed = recorder.events[1]
    assert isinstance(failed, TrackFailed)
    assert type(failed.error) is DecodeError
    assert failed.error.user_message == STOPPED
    assert len(recorder.frames_of(long.title)) < expected_frames(20.0)
    after_frames = recorder.frames_of(after.title)
    assert abs(len(after_frames) - expected_frames(1.5)) <= 1
    assert tone_of(after_frames) == pytest.approx(660.0, abs=2.0)
    assert victim not in pool.pids  # a replacement serves the next track
    assert len(pool.pids) == 1


async def test_threads_first_keeps_a_few_decodes_and_all_opus_here_and_sends_the_rest_to_the_pool(
    pool: DecodePool, threads: ThreadPoolExecutor, media_server: MediaServer, tmp_path: Path
) -> None:
    """``make_opener(threads_first=2)``: two MP3 tracks decode in this process, the third goes
    to the pool (which starts then); an Opus track stays here however many decode; once a local
    decode ends, the next MP3 is local again."""
    resolver = Resolver(ResolverSettings(timeout=20.0), threads)
    mp3 = await _tone_track(media_server, resolver, tmp_path / "t.mp3")
    opus = await _tone_track(media_server, resolver, tmp_path / "t.webm", codec="libopus")
    opener = make_opener(
        resolver, opus=OpusSettings(), executor=threads, pool=pool, threads_first=2
    )
    opened = []
    try:
        first, second = await opener(mp3, 0.0), await opener(mp3, 0.0)
        opened += [first, second]
        assert pool.pids == []  # no worker needed yet
        third = await opener(mp3, 0.0)
        opened.append(third)
        assert isinstance(third, WorkerSource)
        assert len(pool.pids) == 1
        passed = await opener(opus, 0.0)
        opened.append(passed)
        assert not isinstance(passed, WorkerSource)
        assert passed.passthrough
        assert not any(isinstance(s, WorkerSource) for s in (first, second))
        # What each gives is audio: the local ones and the worker's alike.
        for source in (first, third, passed):
            assert (await source.read_chunk(5)).frames
        first.close()
        fourth = await opener(mp3, 0.0)
        opened.append(fourth)
        assert not isinstance(fourth, WorkerSource)
    finally:
        for source in opened:
            source.close()


def test_start_starts_every_worker_before_any_track_and_not_after_close() -> None:
    pool = DecodePool(2)
    try:
        assert pool.pids == []
        pool.start()
        pids = pool.pids
        assert len(pids) == 2
        assert all(psutil.pid_exists(pid) for pid in pids)
        pool.start()  # nothing more to start
        assert pool.pids == pids
    finally:
        pool.close()
    with pytest.raises(RuntimeError):
        pool.start()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_workers_run_as_batch_work_so_their_wakeups_do_not_preempt_the_loop(
    pool: DecodePool, media_url: Callable[[str], str]
) -> None:
    source = pool.open(StreamInfo(url=media_url("mp3-44k-stereo.mp3")), timeout=TIMEOUT)
    source.close()  # the worker answered: it runs as it serves
    assert [os.sched_getscheduler(pid) for pid in pool.pids] == [os.SCHED_BATCH]


async def test_close_ends_every_worker_and_refuses_later_calls(
    media_url: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    pool = DecodePool(2)
    info = StreamInfo(url=media_url("mp3-44k-stereo.mp3"))
    source = await asyncio.to_thread(pool.open, info, timeout=TIMEOUT)
    pids = pool.pids
    assert len(pids) == 2
    assert all(psutil.pid_exists(pid) for pid in pids)
    with caplog.at_level(logging.WARNING, logger="legato.audio.workers"):
        await asyncio.to_thread(pool.close)
    assert not any(psutil.pid_exists(pid) for pid in pids)
    assert caplog.records == []  # a stop, not workers that died
    with pytest.raises(ShutDown, match="after shutdown"):
        await source.read_chunk(5)
    with pytest.raises(ShutDown, match="after shutdown"):
        await asyncio.to_thread(pool.open, info, timeout=TIMEOUT)
    source.close()
    pool.close()  # twice is fine


def test_a_worker_killed_while_loops_submit_reads_fails_every_read_and_none_hangs(
    pool: DecodePool, media_url: Callable[[str], str]
) -> None:
    """Two event loops keep reads in flight to one worker, submitting without a pause, and the
    worker is killed among them: every read submitted, before, during or after its death,
    completes (with frames, or with the worker's ``DecodeError``); none is left waiting."""
    info = StreamInfo(url=media_url("mp3-44k-stereo.mp3"))
    sources = [pool.open(info, opus=OpusSettings(), timeout=TIMEOUT) for _ in range(4)]
    [pid] = pool.pids
    killed = threading.Event()

    def on_a_loop(mine: list[WorkerSource]) -> tuple[int, int]:
        async def main() -> tuple[int, int]:
            outstanding: deque[Any] = deque()
            read = failed = after = 0
            messages: set[str] = set()
            async with asyncio.timeout(20):  # a read left waiting hangs here
                while after < 2000:
                    for source in mine:
                        outstanding.append(source.read_chunk(1))
                        if killed.is_set():
                            after += 1
                    await asyncio.sleep(0)  # the loop's turn ends: what it queued goes on
                    while len(outstanding) > 64 or (after >= 2000 and outstanding):
                        try:
                            await outstanding.popleft()
                            read += 1
                        except DecodeError as exc:
                            messages.add(exc.user_message)
                            failed += 1
            assert messages <= {STOPPED}
            return read, failed

        return asyncio.run(main())

    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave as finely as they can
    try:
        with ThreadPoolExecutor(2) as loops:
            runs = [loops.submit(on_a_loop, sources[:2]), loops.submit(on_a_loop, sources[2:])]
            time.sleep(0.5)
            os.kill(pid, signal.SIGKILL)
            killed.set()
            results = [run.result(60) for run in runs]
    finally:
        sys.setswitchinterval(before)
        for source in sources:
            source.close()
    assert all(read > 0 and failed >= 2000 for read, failed in results)
    assert pool.pending == 0
