"""What the demo heard: the recording cut into its tracks, measured, and the report printed.

:func:`analyse` orders the listener's packets by RTP sequence, decodes them, assigns each frame
to the track whose tone it is nearer, and measures each track (time heard, dominant frequency,
level, pacing); :func:`format_report` prints the :class:`DemoReport`. The demo passes when every
track is heard within :data:`FREQ_TOLERANCE_HZ` of its tone and less than :data:`MAX_LOSS` of
the frames are missing.
"""

import itertools
import logging
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np

from legato.audio.encode import OpusDecoder
from legato.sandbox.analysis import dominant_frequency, pcm_to_mono, rms
from legato.sandbox.recording import ReceivedPacket, Recording

_log = logging.getLogger(__name__)

#: A track passes when its dominant frequency is this close to the tone's.
FREQ_TOLERANCE_HZ: Final = 2.0
#: The demo fails when this share of the frames (RTP sequence span) never arrived.
MAX_LOSS: Final = 0.02
FRAME_SECONDS: Final = 0.02
FRAME_SAMPLES: Final = 960
# Frames left out at each end of a track before measuring its frequency: the switch to the next
# track, the trailing silence and the decoder's start-up are not the tone.
_EDGE_FRAMES: Final = 10
# A frame this quiet (RMS, full scale 1.0) is silence, not the track.
_SILENCE_RMS: Final = 0.02


@dataclass(frozen=True)
class DemoTrack:
    """A tone the demo generates and plays."""

    file: str
    title: str
    container: str
    codec: str
    freq: float
    seconds: float
    path: str  # what Legato does with it, for the transcript

    @property
    def frames(self) -> int:
        """20 ms frames in the track (the last one padded)."""
        return math.ceil(round(self.seconds * 48_000) / FRAME_SAMPLES)


@dataclass(frozen=True)
class Pacing:
    """When consecutive frames arrived (in sequence order, only steps of one frame).

    Attributes:
        p50: Median inter-arrival time, seconds.
        p99: 99th percentile, seconds.
        max: Largest, seconds.
        late: Steps of more than 40 ms (two frames' time).
        jitter: RFC 3550 interarrival jitter at the end of the track, seconds.
        rate: Seconds of wall time per frame from first to last arrival (0.020 is real time).
    """

    p50: float
    p99: float
    max: float
    late: int
    jitter: float
    rate: float


@dataclass(frozen=True)
class TrackReport:
    """What reached the voice channel of one track."""

    track: DemoTrack
    skipped: bool
    frames: int
    span: int
    lost: int
    seconds_heard: float
    tone_seconds: float
    frequency: float
    level: float
    pacing: Pacing | None
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        """Whether the track's checks passed."""
        return not self.problems


@dataclass
class DemoReport:
    """The demo's outcome: the tracks heard, speaking changes, the WAV, what failed."""

    tracks: list[TrackReport] = field(default_factory=list)
    speaking: list[tuple[float, bool]] = field(default_factory=list)
    frames: int = 0
    span: int = 0
    lost: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    streams: int = 0
    wav: Path | None = None
    wav_seconds: float = 0.0
    failure: str | None = None
    elapsed: float = 0.0
    #: The voice path the bot took, as the voice server saw it (``v8 wss:// udp ... DAVE 1``).
    voice_path: str | None = None
    #: The DAVE group's voice privacy code, in groups of five digits as Discord shows it.
    privacy_code: str | None = None

    @property
    def loss(self) -> float:
        """Share of the RTP sequence span that never arrived."""
        return self.lost / self.span if self.span else 1.0

    @property
    def problems(self) -> list[str]:
        """Every reason the demo fails (empty when it passed)."""
        found = [] if self.failure is None else [self.failure]
        if not self.tracks and self.failure is None:
            found.append("nothing reached the voice channel")
        for track in self.tracks:
            found.extend(f"{track.track.title}: {p}" for p in track.problems)
        if self.span and self.loss >= MAX_LOSS:
            found.append(f"{self.loss:.1%} of the frames were lost (limit {MAX_LOSS:.0%})")
        return found

    @property
    def passed(self) -> bool:
        """Whether the demo passed: every check, and no step failed."""
        return not self.problems


# --- the transcript ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    stream: int
    sequence: int  # extended: no 16-bit wrap
    arrival: float
    timestamp: int
    opus: bytes
    index: int  # position in arrival order (first copy)


@dataclass
class _Analysis:
    tracks: list[TrackReport]
    speaking: list[tuple[float, bool]]
    frames: int
    span: int
    lost: int
    duplicates: int
    out_of_order: int
    streams: int
    wav: Path
    wav_seconds: float


def _ordered_frames(packets: Sequence[ReceivedPacket]) -> tuple[list[_Frame], int, int]:
    """Distinct frames in sequence order per stream; also duplicates and out-of-order counts."""
    streams: dict[int, int] = {}
    highest: dict[int, int] = {}
    seen: dict[tuple[int, int], _Frame] = {}
    duplicates = out_of_order = 0
    for index, packet in enumerate(packets):
        stream = streams.setdefault(packet.ssrc, len(streams))
        top = highest.get(stream)
        if top is None:
            ext = packet.sequence
        else:
            delta = (packet.sequence - top) % 65536
            ext = top + delta if delta < 32768 else top - (65536 - delta)
        key = (stream, ext)
        if key in seen:
            duplicates += 1
            continue
        if top is not None and ext < top:
            out_of_order += 1
        highest[stream] = ext if top is None else max(top, ext)
        seen[key] = _Frame(stream, ext, packet.arrival, packet.timestamp, packet.opus, index)
    return sorted(seen.values(), key=lambda f: (f.stream, f.sequence)), duplicates, out_of_order


def _span(frames: Sequence[_Frame]) -> int:
    by_stream: dict[int, list[int]] = {}
    for f in frames:
        by_stream.setdefault(f.stream, []).append(f.sequence)
    return sum(max(s) - min(s) + 1 for s in by_stream.values())


def _pacing(frames: Sequence[_Frame]) -> Pacing | None:
    steps = [
        b.arrival - a.arrival
        for a, b in itertools.pairwise(frames)
        if b.stream == a.stream and b.sequence == a.sequence + 1
    ]
    if len(steps) < 2:
        return None
    values = np.array(steps)
    jitter = 0.0
    previous: float | None = None
    for f in frames:
        # RFC 3550 6.4.1, in seconds: J += (|D| - J) / 16.
        transit = f.arrival - f.timestamp / 48_000
        if previous is not None:
            jitter += (abs(transit - previous) - jitter) / 16
        previous = transit
    wall = frames[-1].arrival - frames[0].arrival
    count = frames[-1].sequence - frames[0].sequence
    return Pacing(
        p50=float(np.percentile(values, 50)),
        p99=float(np.percentile(values, 99)),
        max=float(values.max()),
        late=int((values > 2 * FRAME_SECONDS).sum()),
        jitter=jitter,
        rate=wall / count if count > 0 else 0.0,
    )


def analyse(rec: Recording, plan: Sequence[tuple[DemoTrack, int, bool]], wav: Path) -> _Analysis:
    """Measure a recording track by track and write it to `wav` (blocking, CPU-bound).

    Args:
        rec: What the bot sent.
        plan: Per track: the track, the index in `rec.packets` where it began (roughly: the
            exact switch is found from the audio), and whether it was skipped.
        wav: Where to write the whole recording.

    Returns:
        The per-track reports, the speaking changes and totals.
    """
    frames, duplicates, out_of_order = _ordered_frames(rec.packets)
    decoder = OpusDecoder()
    pcm = [decoder.decode(f.opus) for f in frames]
    mono = [pcm_to_mono(p) for p in pcm]
    levels = [rms(m) for m in mono]

    # Where each track really begins: the first of five frames in a row whose pitch is nearer to
    # it than to the track before, looking around the rough start (a /skip's reply arrives a few
    # frames after the switch). One 20 ms frame tells two tones a fifth apart easily.
    pitch: dict[int, float] = {}

    def nearer(i: int, track: DemoTrack, previous: DemoTrack) -> bool:
        if levels[i] <= _SILENCE_RMS:
            return False
        if i not in pitch:
            pitch[i] = dominant_frequency(mono[i])
        return abs(pitch[i] - track.freq) < abs(pitch[i] - previous.freq)

    starts: list[int] = []
    for n, (track, rough, _) in enumerate(plan):
        first = next((i for i, f in enumerate(frames) if f.index >= rough), len(frames))
        if n > 0 and first < len(frames):
            previous = plan[n - 1][0]
            for i in range(max(starts[-1], first - 25), min(len(frames) - 5, first + 50)):
                if all(nearer(j, track, previous) for j in range(i, i + 5)):
                    first = i
                    break
        starts.append(first)
    ends = [*starts[1:], len(frames)]

    reports: list[TrackReport] = []
    for (track, _, skipped), begin, end in zip(plan, starts, ends, strict=True):
        part = frames[begin:end]
        problems: list[str] = []
        span = _span(part)
        loud = [i for i in range(begin, end) if levels[i] > _SILENCE_RMS]
        tone_seconds = len(loud) * FRAME_SECONDS
        measured = mono[begin + _EDGE_FRAMES : end - _EDGE_FRAMES] if end - begin > 50 else []
        signal = np.concatenate(measured) if measured else np.zeros(0)
        frequency = dominant_frequency(signal) if signal.size else 0.0
        level = rms(signal)
        if not part:
            problems.append("nothing heard")
        elif abs(frequency - track.freq) > FREQ_TOLERANCE_HZ:
            problems.append(
                f"heard {frequency:.1f} Hz, expected {track.freq:g} ± {FREQ_TOLERANCE_HZ:g} Hz"
            )
        if not skipped and part and tone_seconds < track.seconds - 0.5:
            problems.append(f"only {tone_seconds:.1f} s of its {track.seconds:g} s heard")
        reports.append(
            TrackReport(
                track=track,
                skipped=skipped,
                frames=len(part),
                span=span,
                lost=span - len(part),
                seconds_heard=len(part) * FRAME_SECONDS,
                tone_seconds=tone_seconds,
                frequency=frequency,
                level=level,
                pacing=_pacing(part),
                problems=tuple(problems),
            )
        )
    # Times from the first thing the bot sent: a packet, or the speaking op before it.
    t0 = min(
        [f.arrival for f in frames[:1]] + [c.arrival for c in rec.speaking_changes[:1]] or [0.0]
    )
    speaking = [(c.arrival - t0, c.on) for c in rec.speaking_changes]
    rec.write_wav(wav)
    span = _span(frames)
    return _Analysis(
        tracks=reports,
        speaking=speaking,
        frames=len(frames),
        span=span,
        lost=span - len(frames),
        duplicates=duplicates,
        out_of_order=out_of_order,
        streams=len({f.stream for f in frames}),
        wav=wav,
        wav_seconds=span * FRAME_SECONDS,
    )


def format_report(report: DemoReport) -> str:
    """The report as printed after the conversation."""
    lines = ["What reached the voice channel"]
    if report.voice_path is not None:
        lines.append(f"  voice path   {report.voice_path}")
    if report.privacy_code is not None:
        lines.append(f"  privacy code {report.privacy_code}")
    for t in report.tracks:
        how = "skipped halfway" if t.skipped else "played to the end"
        lines.append(f"  {t.track.title} ({t.track.container}, {how})")
        lines.append(
            f"    heard      {t.seconds_heard:.2f} s ({t.tone_seconds:.2f} s of tone), "
            f"level {t.level:.2f} RMS"
        )
        mark = "ok" if abs(t.frequency - t.track.freq) <= FREQ_TOLERANCE_HZ else "WRONG"
        lines.append(f"    frequency  {t.frequency:.2f} Hz (tone {t.track.freq:g} Hz)  {mark}")
        lines.append(
            f"    frames     {t.frames} received of {t.span} sent (RTP sequence span), "
            f"{t.lost} lost"
        )
        if t.pacing is not None:
            p = t.pacing
            lines.append(
                f"    pacing     inter-arrival p50 {p.p50 * 1000:.1f} ms, "
                f"p99 {p.p99 * 1000:.1f} ms, max {p.max * 1000:.1f} ms, {p.late} over 40 ms; "
                f"{p.rate * 1000:.2f} ms/frame; jitter {p.jitter * 1000:.2f} ms"
            )
    if report.span:
        lines.append(
            f"  total        {report.frames} frames of {report.span} ({report.loss:.2%} lost), "
            f"{report.streams} RTP stream(s)"
        )
        lines.append(
            f"  sequence     {report.duplicates} duplicates, {report.out_of_order} out of order"
        )
    if report.speaking:
        shown = ", ".join(f"{'on' if on else 'off'} at {t:.2f} s" for t, on in report.speaking)
        lines.append("  speaking     " + textwrap.shorten(shown, 200))
    if report.wav is not None:
        lines.append(f"  recording    {report.wav} ({report.wav_seconds:.1f} s, 48 kHz stereo)")
    lines.append("")
    if report.passed:
        lines.append(
            f"PASS: every track heard at its frequency (±{FREQ_TOLERANCE_HZ:g} Hz), "
            f"{report.loss:.2%} of frames lost (limit {MAX_LOSS:.0%}); {report.elapsed:.1f} s."
        )
    else:
        lines.append("FAIL:")
        lines.extend(f"  - {p}" for p in report.problems)
    return "\n".join(lines)
