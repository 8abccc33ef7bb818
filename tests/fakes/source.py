"""Scripted FrameSources: numbered frames (``b"A:0"``, ``b"A:1"``, ...) a test can follow.

A frame read after ``set_volume(v)`` with ``v != 1`` carries the volume (``b"A:3@0.5"``), so a
test sees from which frame on a volume change took effect.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from legato.audio.source import FRAME_MS, Chunk, FrameReader, StreamLost
from legato.audio.track import Track
from legato.errors import AudioError, DecodeError, LegatoError

FRAME_S = FRAME_MS / 1000

T = TypeVar("T")


def make_frames(tag: str, count: int, start: int = 0) -> list[bytes]:
    """The frames a ``ScriptedSource(tag, count)`` produces, from frame ``start`` on."""
    return [f"{tag}:{i}".encode() for i in range(start, count)]


def frame_id(frame: bytes) -> tuple[str, int]:
    """``b"A:3@0.5"`` -> ``("A", 3)``."""
    tag, _, rest = frame.decode().partition(":")
    return tag, int(rest.split("@")[0])


class ScriptedSource:
    """A FrameSource over ``count`` numbered frames.

    Args:
        tag: Prefix of every frame.
        count: Frames in the track.
        fail_at: Frame index at which ``read`` raises ``DecodeError`` (once reached).
        lost: Raise ``StreamLost`` (the stream broke off) instead of a plain ``DecodeError``.
        gate: When set, ``read`` blocks on it (a ``threading.Event``) before producing frames,
            for tests with a real thread pool that need a slow source.
        passthrough: What ``passthrough`` reports while the volume is 1.0.
        seekable: When False, ``seek`` raises ``DecodeError`` (a live stream).
    """

    def __init__(
        self,
        tag: str,
        count: int,
        *,
        fail_at: int | None = None,
        gate: threading.Event | None = None,
        passthrough: bool = True,
        seekable: bool = True,
        lost: bool = False,
    ) -> None:
        self.tag = tag
        self.count = count
        self.fail_at = fail_at
        self.lost = lost
        self.gate = gate
        #: Told True before ``read`` blocks on a closed gate and False once it goes on (a
        #: SettlingPool's park/unpark).
        self.on_park: Callable[[bool], None] | None = None
        self.seekable = seekable
        self._passthrough = passthrough
        self.index = 0
        self.volume = 1.0
        self.closed = False
        self.reads: list[int] = []
        self.seeks: list[float] = []
        self._busy = threading.Lock()

    @property
    def passthrough(self) -> bool:
        return self._passthrough and self.volume == 1.0

    @property
    def position(self) -> float:
        return self.index * FRAME_S

    @property
    def duration(self) -> float | None:
        return self.count * FRAME_S

    def _enter(self) -> None:
        # The player promises never to call two methods at once; hold it to that.
        if not self._busy.acquire(blocking=False):
            raise AssertionError("two FrameSource calls at once")
        if self.closed:
            self._busy.release()
            raise AssertionError("FrameSource used after close")

    def read(self, max_frames: int) -> list[bytes]:
        self._enter()
        try:
            self.reads.append(max_frames)
            if self.gate is not None:
                if self.on_park is not None and not self.gate.is_set():
                    self.on_park(True)
                    try:
                        self.gate.wait()
                    finally:
                        self.on_park(False)
                self.gate.wait()
            end = min(self.count, self.index + max_frames)
            if self.fail_at is not None and end > self.fail_at:
                end = self.fail_at
                if end == self.index:
                    if self.lost:
                        raise StreamLost(f"{self.tag}: 403 at frame {self.fail_at}")
                    raise DecodeError(f"{self.tag}: corrupt packet at frame {self.fail_at}")
            suffix = "" if self.volume == 1.0 else f"@{self.volume:g}"
            out = [f"{self.tag}:{i}{suffix}".encode() for i in range(self.index, end)]
            self.index = end
            return out
        finally:
            self._busy.release()

    def seek(self, seconds: float) -> None:
        self._enter()
        try:
            self.seeks.append(seconds)
            if not self.seekable:
                raise DecodeError(
                    f"{self.tag}: not seekable", user_message="This stream cannot seek."
                )
            self.index = max(0, min(self.count, round(seconds / FRAME_S)))
        finally:
            self._busy.release()

    def set_volume(self, volume: float) -> None:
        self._enter()
        try:
            self.volume = volume
        finally:
            self._busy.release()

    def close(self) -> None:
        self.closed = True


class TrickleSource(ScriptedSource, FrameReader):
    """A ``ScriptedSource`` read as a ``FrameReader`` whose refills wait for the test, as reads
    of a slow server do.

    The first read (the first fill) answers at once; every later one waits until the test calls
    :meth:`deliver`, so a test on a ``FakeClock`` says exactly when, in fake time, each read
    comes back and with how much audio. Seeks and volume changes answer at once, unless
    ``hold_seeks`` is set: then a seek waits until the test calls :meth:`answer_seek`.
    """

    def __init__(self, tag: str, count: int, **kwargs: object) -> None:
        super().__init__(tag, count, **kwargs)  # type: ignore[arg-type]  # ScriptedSource's kwargs
        self.waiting: tuple[asyncio.Future[Chunk], int] | None = None
        self.hold_seeks = False
        self.seek_waiting: tuple[asyncio.Future[float], float] | None = None
        self._first = True

    @property
    def closed(self) -> bool:
        return self._closed

    @closed.setter
    def closed(self, value: bool) -> None:
        self._closed = value

    def read_chunk(self, max_frames: int) -> asyncio.Future[Chunk]:
        if self.waiting is not None:
            raise AssertionError("two FrameReader reads at once")
        future: asyncio.Future[Chunk] = asyncio.get_running_loop().create_future()
        self.waiting = (future, max_frames)
        if self._first:
            self._first = False
            self.deliver()
        return future

    def close(self) -> None:
        """Close; a read still waiting is given up (as a worker drops a closed source's)."""
        super().close()
        if self.waiting is not None:
            self.waiting[0].cancel()
            self.waiting = None

    def seek_to(self, seconds: float) -> asyncio.Future[float]:
        if self.hold_seeks:
            if self.seek_waiting is not None:
                raise AssertionError("two FrameReader seeks at once")
            future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            self.seek_waiting = (future, seconds)
            return future

        def seek_and_tell() -> float:
            self.seek(seconds)
            return self.position

        return _run_now(seek_and_tell)

    def answer_seek(self) -> bool:
        """Run the seek waiting (``hold_seeks``) and answer it; False if none waits."""
        if self.seek_waiting is None:
            return False
        future, seconds = self.seek_waiting
        self.seek_waiting = None
        try:
            self.seek(seconds)
        except Exception as exc:  # noqa: BLE001 - handed to the future, as a reader does
            future.set_exception(exc)
        else:
            future.set_result(self.position)
        return True

    def volume_to(self, volume: float) -> asyncio.Future[None]:
        return _run_now(lambda: self.set_volume(volume))

    def deliver(self, frames: int | None = None) -> bool:
        """Answer the read waiting (with at most ``frames`` frames); False if none waits."""
        if self.waiting is None:
            return False
        future, count = self.waiting
        self.waiting = None
        try:
            out = self.read(count if frames is None else min(count, frames))
        except Exception as exc:  # noqa: BLE001 - handed to the future, as a reader does
            future.set_exception(exc)
        else:
            future.set_result(Chunk(out, self.position, self.duration, 0.0))
        return True


def _run_now(call: Callable[[], T]) -> asyncio.Future[T]:
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    try:
        future.set_result(call())
    except Exception as exc:  # noqa: BLE001 - handed to the future, as a reader does
        future.set_exception(exc)
    return future


@dataclass
class _Script:
    count: int = 0
    fail_at: int | None = None
    error: LegatoError | None = None
    gate: asyncio.Event | None = None
    seekable: bool = True
    lost_at: tuple[int, ...] = ()
    opens: int = 0
    trickle: bool = False


@dataclass
class ScriptedOpener:
    """A SourceOpener: ``track.url`` names a script registered with :meth:`script`.

    Attributes:
        opened: ``(track title, start)`` of every open, in order.
        sources: Every source handed out.
    """

    scripts: dict[str, _Script] = field(default_factory=dict)
    opened: list[tuple[str, float]] = field(default_factory=list)
    sources: list[ScriptedSource] = field(default_factory=list)
    on_open: Callable[[ScriptedSource], None] | None = None

    def script(
        self,
        url: str,
        count: int = 0,
        *,
        fail_at: int | None = None,
        error: LegatoError | None = None,
        gate: asyncio.Event | None = None,
        seekable: bool = True,
        lost_at: tuple[int, ...] = (),
        trickle: bool = False,
    ) -> Track:
        """Register what opening ``url`` gives and return a ``Track`` for it.

        ``lost_at[i]``: the ``i``-th opening's stream breaks off (``StreamLost``) at that frame
        index; openings past the tuple's end do not. ``trickle``: the source is a
        :class:`TrickleSource` (its refills wait for the test).
        """
        self.scripts[url] = _Script(count, fail_at, error, gate, seekable, lost_at, trickle=trickle)
        return Track(url=url, title=url)

    async def __call__(self, track: Track, start: float) -> ScriptedSource:
        self.opened.append((track.title, start))
        spec = self.scripts.get(track.url)
        if spec is None:
            raise AudioError(f"no script for {track.url}")
        if spec.gate is not None:
            await spec.gate.wait()
        if spec.error is not None:
            raise spec.error
        opening, spec.opens = spec.opens, spec.opens + 1
        lost = opening < len(spec.lost_at)
        kind = TrickleSource if spec.trickle else ScriptedSource
        source = kind(
            track.title,
            spec.count,
            fail_at=spec.lost_at[opening] if lost else spec.fail_at,
            seekable=spec.seekable,
            lost=lost,
        )
        if start:
            source.seek(start)
        self.sources.append(source)
        if self.on_open is not None:
            self.on_open(source)
        return source

    def release(self) -> None:
        """Answer the waiting read of every :class:`TrickleSource` handed out, so that
        ``close()`` can close it (a read still waiting must end first)."""
        for source in self.sources:
            if isinstance(source, TrickleSource):
                source.deliver()


class ToneSource:
    """A FrameSource of real Opus: a sine of ``freq`` Hz for ``seconds``, encoded as it is read.

    For tests that need frames a decoder accepts (what the voice path or a recording checks).
    ``passthrough`` is False: the frames are encoded here, as the decode path would.
    """

    def __init__(self, freq: float = 440.0, seconds: float = 1.0, amplitude: float = 0.5) -> None:
        from legato.audio.encode import OpusEncoder

        self.freq = freq
        self.amplitude = amplitude
        self.total = round(seconds / FRAME_S)
        self.index = 0
        self.volume = 1.0
        self.closed = False
        self._encoder = OpusEncoder()

    passthrough = False

    @property
    def position(self) -> float:
        return self.index * FRAME_S

    @property
    def duration(self) -> float | None:
        return self.total * FRAME_S

    def read(self, max_frames: int) -> list[bytes]:
        import numpy as np

        from legato.audio.source import FRAME_SAMPLES, SAMPLE_RATE

        out = []
        for k in range(self.index, min(self.total, self.index + max_frames)):
            t = (np.arange(FRAME_SAMPLES) + k * FRAME_SAMPLES) / SAMPLE_RATE
            level = self.amplitude * self.volume * 32767
            mono = (level * np.sin(2 * np.pi * self.freq * t)).astype("<i2")
            out.append(self._encoder.encode(np.repeat(mono, 2).tobytes()))
        self.index += len(out)
        return out

    def seek(self, seconds: float) -> None:
        self.index = max(0, min(self.total, round(seconds / FRAME_S)))

    def set_volume(self, volume: float) -> None:
        self.volume = volume

    def close(self) -> None:
        self.closed = True
