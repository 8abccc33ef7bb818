"""The seam between the decoder/encoder and the player: a pull source of 20 ms Opus frames."""

from __future__ import annotations

import concurrent.futures
from typing import Final, Protocol, runtime_checkable

from legato.errors import DecodeError

SAMPLE_RATE: Final = 48_000
CHANNELS: Final = 2
FRAME_MS: Final = 20
FRAME_SAMPLES: Final = SAMPLE_RATE * FRAME_MS // 1000  # 960 per channel
FRAME_BYTES: Final = FRAME_SAMPLES * CHANNELS * 2  # s16 interleaved PCM, 3840 bytes


class StreamLost(DecodeError):
    """The stream broke off mid-track (refused, dropped, or ended short of its length).

    Stream URLs expire: a server that answered at first may refuse (403) or drop the connection
    later. Resolving the track again and reopening it where it stopped may continue it, so the
    player does that (a few times) before it gives up on the track.
    """

    default_user_message = "The connection to the track's server was lost."


class SourceTooSlow(DecodeError):
    """The track's source delivers audio much slower than real time (or none in time to start).

    Raised by the player's judge, not by a source: a slow server never fails a read, it only
    makes each one late (see :mod:`legato.audio.supply`). The player skips the track.
    """

    default_user_message = "The track's server is sending audio slower than real time."


class FrameSource(Protocol):
    """An opened track producing Opus frames.

    Every method but ``close`` may block (network, decode, encode) and is called off the event
    loop, from one worker at a time; the player never calls two methods concurrently.
    """

    @property
    def passthrough(self) -> bool:
        """True while the source's own Opus packets are sent unchanged."""

    @property
    def position(self) -> float:
        """Seconds of audio produced so far (of the next frame to be read)."""

    @property
    def duration(self) -> float | None:
        """Length in seconds when the container knows it."""

    def read(self, max_frames: int) -> list[bytes]:
        """Return up to ``max_frames`` Opus frames; an empty list means the track has ended.

        Raises:
            StreamLost: the stream broke off; the player reopens the track where it stopped.
            DecodeError: the stream failed; the player reports it and moves on.
        """

    def seek(self, seconds: float) -> None:
        """Move so that the next frame read starts at ``seconds``."""

    def set_volume(self, volume: float) -> None:
        """Scale the output; anything but 1.0 forces the decode-and-encode path."""

    def close(self) -> None:
        """Release the stream; safe to call twice."""


@runtime_checkable
class ReadsSoon(Protocol):
    """A source that can also start a read without blocking: a decode pool's proxy, whose
    reads are requests to another process. The player calls ``read_soon`` on the event loop,
    under the same one-call-at-a-time rule as the other methods, and holds no thread while the
    read runs.
    """

    def read_soon(self, max_frames: int) -> concurrent.futures.Future[list[bytes]]:
        """Start ``read(max_frames)``; the future (set in any thread) gets its result or error,
        with ``position`` and ``duration`` already updated. Never blocks, never raises."""
