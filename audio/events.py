"""What a player tells its owner: events as tracks start, end and fail, and its counters.

The player (:mod:`legato.audio.player`) emits these on the loop (``on_event``) and gives
``stats``; the cog turns them into messages. Imported from ``legato.audio.player`` as well.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from legato.audio.track import Track
from legato.errors import LegatoError

__all__ = [
    "EndReason",
    "PlayerEvent",
    "PlayerStats",
    "QueueEnded",
    "TrackEnded",
    "TrackFailed",
    "TrackStarted",
]


class EndReason(enum.Enum):
    """Why a track stopped playing."""

    FINISHED = "finished"
    SKIPPED = "skipped"
    STOPPED = "stopped"
    REPLACED = "replaced"
    """``previous()`` put another track in its place."""
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class TrackStarted:
    """The track's first frame went out."""

    track: Track


@dataclass(frozen=True, slots=True)
class TrackEnded:
    """The track stopped playing (its last frame went out, or it was skipped/stopped).

    Only for tracks that sent a frame (``TrackStarted``); a track that fails after starting gets
    ``TrackFailed`` instead.
    """

    track: Track
    reason: EndReason


@dataclass(frozen=True, slots=True)
class TrackFailed:
    """The track could not be opened or read; the player went on with the next one."""

    track: Track
    error: LegatoError


@dataclass(frozen=True, slots=True)
class QueueEnded:
    """The queue ran out; the player is idle."""


PlayerEvent = TrackStarted | TrackEnded | TrackFailed | QueueEnded


@dataclass(frozen=True, slots=True)
class PlayerStats:
    """Counters since the player was made.

    Attributes:
        frames_sent: Audio frames sent.
        silence_sent: Silence frames sent (trailing silence, and standing in for audio a source
            is late with).
        late_frames: Frames sent more than ``player.LATE_THRESHOLD`` after their deadline.
        max_lateness_ms: Largest lateness of a frame against its deadline (re-anchors excluded).
        p99_lateness_ms: 99th percentile of that lateness (0.1 ms bins; 20 ms means "20 or more").
        reanchors: Times the grid was moved because a frame was more than a frame late.
        underruns: Times a frame was due mid-track and none was buffered (source too slow).
        buffer_frames: Frames buffered now for the current track.
        source_errors: Tracks that failed to open or to read.
        reopens: Times a stream that broke off mid-track was opened again (each try counts,
            whether it opened or not).
        sink_errors: Frames whose ``send_frame`` raised (the frame is lost, playing goes on).
        encode_ms_mean: Worker time to produce one frame (read, decode and encode; demux only
            for passthrough), mean over the last reads (each read's time over its frames).
        encode_ms_p99: 99th percentile of that per-read figure (0.0 before any read).
        reconnects: Times the sink's link was re-established (voice websocket reconnects,
            resumes included); 0 for a sink that does not count them.
        resumes: Of those, how many resumed the session.
        holds: Times a track was held because the sink could not send it yet (a voice link
            whose DAVE group is not in force): nothing was sent and no frame consumed meanwhile.
        held_ms: Time spent holding, in all (a hold under way included).
    """

    frames_sent: int
    silence_sent: int
    late_frames: int
    max_lateness_ms: float
    p99_lateness_ms: float
    reanchors: int
    underruns: int
    buffer_frames: int
    source_errors: int
    reopens: int
    sink_errors: int
    encode_ms_mean: float
    encode_ms_p99: float
    reconnects: int
    resumes: int
    holds: int = 0
    held_ms: float = 0.0
