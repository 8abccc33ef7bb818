"""Open a stream with PyAV and turn it into 20 ms Opus frames, passing Opus through when it can.

Two sources implement :class:`legato.audio.source.FrameSource`:

- ``_OpusSource`` for Opus (mono or stereo, Ogg or WebM/Matroska): while the volume is 1.0 it
  returns the container's packets unchanged (*passthrough*, no decode, no encode). A volume
  other than 1.0 switches to decode (libopus) + scale + encode on the next frame boundary; a
  return to 1.0 switches back on a frame boundary. Both directions are gapless (one frame out per
  source packet) and click-free: see ``_OpusSource._start_decoding``.
- ``_TranscodeSource`` for everything else: PyAV decodes, ``av.AudioResampler`` makes 48 kHz
  stereo s16, the PCM is cut into 960-sample frames (the last one padded with silence), scaled
  and encoded with :class:`legato.audio.encode.OpusEncoder`.

Timeline: both sources drop the encoder's lookahead (312 samples at 48 kHz) from the start of
the PCM they encode, so a receiver's decoded frame *k* holds the source's audio at ``k * 20 ms``,
the same as the passthrough packets give; that is what makes the switch seamless.

Errors: opening failures (HTTP 404/403, not a media file, no audio stream, unsupported codec,
timeout) raise :class:`DecodeError` with a ``user_message``. Mid-stream, a stream that ends
early (a truncated file, a damaged tail) ends the track with the frames decoded so far, and a
warning is logged: a listener keeps what could be played. Isolated undecodable packets are
skipped, as FFmpeg's command line does; ``_MAX_BAD_PACKETS`` in a row, a network failure
(after the reader's own reopens with Range requests gave up: :mod:`legato.audio.fetch`) or a
stalled read raise :class:`DecodeError`; a refused or dropped connection, and a remote stream
that ends more than ``_SHORT_END`` before its known length (a refused reopen can look like the
end of the file), raise :class:`StreamLost`, which the player answers by resolving the track
again and reopening it there. ``read`` first returns the frames it got before such an error;
the error comes with the next call.

Channels: mono is copied to both sides at full level; 5.1 and other layouts are downmixed by
FFmpeg's resampler (which normalises its matrix, so they do not clip).

Stages of a decoded frame: decode -> resample (48 kHz stereo s16, 960-sample frames) -> PCM
stage (:class:`Gain` today: the volume, ramped) -> Opus encode. The PCM stage is where effects
and loudness normalisation belong: an FFmpeg filter graph (PyAV's ``av.filter.Graph``, e.g.
``volume``, ``loudnorm``, ``equalizer``) fed each 20 ms frame and drained of as many, behind the
same two calls as :class:`Gain` (``apply(pcm) -> pcm`` and ``neutral``). Passthrough holds only
while the whole stage is neutral: a source with an effect on decodes and re-encodes, as one
with a volume does.
"""

from __future__ import annotations

import errno
import io
import logging
import math
from collections import deque
from collections.abc import Iterator
from typing import Final

import av
import av.error
import av.filter
import numpy as np

from legato.audio.encode import (
    OpusDecoder,
    OpusEncoder,
    OpusSettings,
    decode_opus_packets,
    encoder_lookahead,
)
from legato.audio.fetch import (
    PROTOCOL_WHITELIST,
    VOUCHED,
    FragmentReader,
    HttpStatusError,
    IoOpener,
)
from legato.audio.source import (
    CHANNELS,
    FRAME_BYTES,
    FRAME_SAMPLES,
    SAMPLE_RATE,
    FrameSource,
    StreamLost,
)
from legato.audio.track import StreamInfo
from legato.errors import DecodeError, ResolveError

__all__ = ["DEFAULT_TIMEOUT", "decode_opus_packets", "open_source", "opus_packet_samples"]

_log = logging.getLogger(__name__)

#: Seconds PyAV may wait to open a stream, and for any one read, before it gives up.
DEFAULT_TIMEOUT: Final = 20.0

#: Undecodable packets in a row after which the stream counts as broken.
_MAX_BAD_PACKETS: Final = 8

#: A remote stream that ends more than this many seconds before its known length broke off: FFmpeg
#: reports a reconnect that was refused (an expired URL's 403) as the end of the file.
_SHORT_END: Final = 1.0

#: Sample rates a stream may claim (Hz). Below, a header is lying or broken (a 1 Hz WAV would
#: come out as 48,000 samples per sample: hours of noise); above, so is it (nothing records at
#: more than 768 kHz).
_MIN_RATE: Final = 4_000
_MAX_RATE: Final = 768_000

#: Most channels FFmpeg's resampler downmixes (its SWR_CH_MAX).
_MAX_CHANNELS: Final = 64

#: Passthrough packets kept to warm the decoder when switching to the decode path (>= 4).
_WARM_PACKETS: Final = 6

#: Of those, how many frames also warm the encoder before its first real frame.
_WARM_ENCODER_FRAMES: Final = 3

#: Bytes of PyAV's buffer per file it reads through Python (FFmpeg's AVIOContext for each of our
#: readers). PyAV's default, 32 KiB, costs about 25 KiB more per player than this, for a read
#: callback every 8 KiB (a few a second at streaming bitrates).
_IO_BUFFER: Final = 8192

#: Containers whose Opus packets we send unchanged.
_PASSTHROUGH_FORMATS: Final = frozenset({"ogg", "matroska", "webm"})

_BYTES_PER_SAMPLE: Final = 2 * CHANNELS

# Opus TOC byte: frame length in 48 kHz samples per configuration (RFC 6716, section 3.1).
_SILK_SIZES: Final = (480, 960, 1920, 2880)
_HYBRID_SIZES: Final = (480, 960)
_CELT_SIZES: Final = (120, 240, 480, 960)


def opus_packet_samples(packet: bytes) -> int:
    """Samples per channel (at 48 kHz) that one Opus packet decodes to; 0 if it is malformed."""
    if not packet:
        return 0
    toc = packet[0]
    config = toc >> 3
    if config < 12:
        size = _SILK_SIZES[config % 4]
    elif config < 16:
        size = _HYBRID_SIZES[config % 2]
    else:
        size = _CELT_SIZES[config % 4]
    code = toc & 0x03
    if code == 0:
        count = 1
    elif code in (1, 2):
        count = 2
    elif len(packet) < 2:
        return 0
    else:
        count = packet[1] & 0x3F
    return size * count


def _open_error(exc: Exception, url: str) -> DecodeError:
    """Map an exception from opening a stream to a DecodeError with a safe sentence."""
    detail = f"could not open {url}: {type(exc).__name__}: {exc}"
    if isinstance(exc, ResolveError):  # the URL guard refused a request
        return DecodeError(detail, user_message=exc.user_message)
    status = exc.status if isinstance(exc, HttpStatusError) else None
    if status == 404 or isinstance(exc, av.error.HTTPNotFoundError):
        message = "That track was not found (the server answered 404)."
    elif status in (401, 403) or isinstance(
        exc, av.error.HTTPForbiddenError | av.error.HTTPUnauthorizedError
    ):
        message = "The server refused access to that track."
    elif status is not None or isinstance(exc, av.error.HTTPError):
        message = "The server hosting that track returned an error."
    elif isinstance(exc, ConnectionError):
        message = "I could not reach the server hosting that track."
    elif isinstance(exc, av.error.ExitError | av.error.TimeoutError | TimeoutError):
        message = "Opening that track took too long."
    elif isinstance(exc, av.error.InvalidDataError):
        message = "That is not a playable audio file, or it is damaged."
    elif isinstance(exc, av.error.DecoderNotFoundError):
        message = "That track's audio format is not supported."
    elif isinstance(exc, av.error.FileNotFoundError | FileNotFoundError):
        message = "That file does not exist."
    else:
        message = "That track's audio could not be opened."
    return DecodeError(detail, user_message=message)


def open_source(
    stream: StreamInfo,
    *,
    start: float = 0.0,
    volume: float = 1.0,
    opus: OpusSettings | None = None,
    allow_passthrough: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> FrameSource:
    """Open a resolved stream as a source of 20 ms Opus frames. Blocks: call it in an executor.

    Args:
        stream: Where to read from (``Resolver.stream`` gives it).
        start: Seconds into the track to begin at.
        volume: Initial gain (1.0 unchanged; 0 to 10).
        opus: Encoder settings for the decode path; ``OpusSettings()`` when ``None``.
        allow_passthrough: Send a 48 kHz Opus stream's packets unchanged while the volume is 1.0.
        timeout: Seconds to wait for the stream to open, and for each read.

    Returns:
        An open ``FrameSource``; the caller closes it.

    Raises:
        DecodeError: the stream could not be opened or has no decodable audio.
        ValueError: ``volume`` is outside 0..10.
    """
    _check_volume(volume)
    reader: io.RawIOBase | None = None
    open_io = IoOpener(stream.url_policy or VOUCHED, stream.http_headers, timeout)
    try:
        if stream.fragments:
            reader = FragmentReader(
                open_io.policy,
                stream.fragments,
                open_io.headers,
                timeout=timeout,
                on_failure=open_io.failures.append,
            )
        container = _open_container(stream, reader, open_io, timeout)
    except (av.error.FFmpegError, OSError, ResolveError) as exc:
        if reader is not None:
            reader.close()
        raise _open_error(exc, stream.url) from exc
    try:
        if not container.streams.audio:
            raise DecodeError(
                f"{stream.url} has no audio stream",
                user_message="That link has no audio to play.",
            )
        audio = container.streams.audio[0]
        if audio.codec_context is None or audio.codec_context.codec is None:
            raise DecodeError(
                f"{stream.url}: no decoder for its audio",
                user_message="That track's audio format is not supported.",
            )
        _check_shape(audio, stream.url)
        source: _BaseSource
        if _opus_direct(container, audio):
            source = _OpusSource(container, audio, stream, opus, allow_passthrough, volume)
        else:
            source = _TranscodeSource(container, audio, stream, opus, volume)
        source._input = reader
        source._failures = open_io.failures
        if start > 0:
            source.seek(start)
    except DecodeError:
        container.close()
        if reader is not None:
            reader.close()
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        container.close()
        if reader is not None:
            reader.close()
        raise _open_error(exc, stream.url) from exc
    return source


def _open_container(
    stream: StreamInfo, fragments: io.RawIOBase | None, open_io: IoOpener, timeout: float
) -> av.container.InputContainer:
    """Open ``stream`` with every byte FFmpeg reads fetched by :mod:`legato.audio.fetch`.

    A local file is opened by FFmpeg itself, with only its ``file`` protocol allowed, so that a
    local playlist cannot reach the network either. A DASH stream is read from ``fragments``.
    """
    if stream.is_local:
        return av.open(
            stream.url, options={"protocol_whitelist": "file"}, timeout=(timeout, timeout)
        )
    if fragments is not None:
        return av.open(
            fragments,
            "r",
            options={"protocol_whitelist": PROTOCOL_WHITELIST},
            timeout=(timeout, timeout),
            io_open=open_io,
            buffer_size=_IO_BUFFER,
        )
    return av.open(
        stream.url,
        # HLS's persistent connections reuse FFmpeg's own http protocol, which is not used here.
        options={"protocol_whitelist": PROTOCOL_WHITELIST, "http_persistent": "0"},
        timeout=(timeout, timeout),
        io_open=open_io,
        buffer_size=_IO_BUFFER,
    )


def _opus_direct(container: av.container.InputContainer, audio: av.AudioStream) -> bool:
    """True for Opus (mapping family 0: mono/stereo) in a container whose packets we can send."""
    formats = set(container.format.name.split(","))
    return (
        audio.codec_context.name == "opus"
        and audio.codec_context.channels <= 2
        and bool(formats & _PASSTHROUGH_FORMATS)
    )


def _check_shape(audio: av.AudioStream, url: str) -> None:
    """Refuse a stream whose header claims an absurd sample rate or channel count (0: unknown
    until decoded, left to the decoder)."""
    rate = audio.codec_context.sample_rate or 0
    channels = audio.codec_context.channels or 0
    if (rate and not _MIN_RATE <= rate <= _MAX_RATE) or channels > _MAX_CHANNELS:
        raise DecodeError(
            f"{url}: unusable audio shape ({rate} Hz, {channels} channels)",
            user_message="That track's audio has an impossible sample rate or channel count.",
        )


def _check_volume(volume: float) -> None:
    if not (math.isfinite(volume) and 0.0 <= volume <= 10.0):
        raise ValueError(f"volume must be between 0 and 10, got {volume!r}")


class Gain:
    """The decoder's PCM stage: the volume, ramped over one frame when it changes.

    Args:
        volume: The gain to start at (1.0 unchanged).
    """

    def __init__(self, volume: float) -> None:
        self.gain = volume  # the gain applied at the end of the last frame
        self.target = volume  # the gain asked for

    @property
    def neutral(self) -> bool:
        """True when the stage leaves audio as it is (Opus may then pass through)."""
        return self.gain == self.target == 1.0

    def set(self, volume: float) -> None:
        """Ramp to ``volume`` over the next frame."""
        self.target = volume

    def jump(self) -> None:
        """Take the target at once (after a seek there is nothing to be continuous with)."""
        self.gain = self.target

    def apply(self, pcm: bytes) -> bytes:
        """One 20 ms frame of s16 stereo PCM, scaled."""
        if self.neutral:
            return pcm
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32).reshape(-1, CHANNELS)
        if self.gain == self.target:
            samples *= self.gain
        else:
            # A step in gain is a click; a 20 ms linear ramp is not.
            ramp = np.linspace(self.gain, self.target, FRAME_SAMPLES + 1, dtype=np.float32)[1:]
            samples *= ramp[:, np.newaxis]
            self.gain = self.target
        np.clip(samples, -32768.0, 32767.0, out=samples)
        return np.rint(samples).astype("<i2").tobytes()


class _Resampler:
    """``av.AudioResampler`` to 48 kHz s16 in ``layout``, in a filter graph of one thread.

    ``av.AudioResampler`` leaves its graph's thread count to FFmpeg, which starts a pool of one
    thread per core for every resampler (none of whose filters run in slices): two idle threads
    and about 17 KiB per transcoding player on a 2-core machine. The graph is the same
    (``abuffer`` -> ``aformat`` -> ``abuffersink``, FFmpeg inserting ``aresample``), so is the
    audio.
    """

    def __init__(self, layout: str) -> None:
        self._layout = layout
        self._graph: av.filter.Graph | None = None

    def resample(self, frame: av.AudioFrame | None) -> list[av.AudioFrame]:
        """The frames ``frame`` completes; ``None`` flushes what is held."""
        if self._graph is None:
            if frame is None:
                return []
            if (frame.format.name, frame.layout.name, frame.sample_rate) == (
                "s16",
                self._layout,
                SAMPLE_RATE,
            ):
                return [frame]  # already in shape (as av.AudioResampler, no graph)
            self._graph = self._build(frame)
        self._graph.push(frame)
        out: list[av.AudioFrame] = []
        while True:
            try:
                pulled = self._graph.pull()
            except (EOFError, av.error.BlockingIOError):
                return out
            assert isinstance(pulled, av.AudioFrame)
            out.append(pulled)

    def _build(self, frame: av.AudioFrame) -> av.filter.Graph:
        graph = av.filter.Graph()
        graph.threads = 1
        extra = {} if frame.time_base is None else {"time_base": str(frame.time_base)}
        source = graph.add(
            "abuffer",
            sample_rate=str(frame.sample_rate),
            sample_fmt=frame.format.name,
            channel_layout=frame.layout.name,
            **extra,
        )
        shape = graph.add(
            "aformat",
            sample_rates=str(SAMPLE_RATE),
            sample_fmts="s16",
            channel_layouts=self._layout,
        )
        sink = graph.add("abuffersink")
        source.link_to(shape)
        shape.link_to(sink)
        graph.configure()
        return graph


class _BaseSource:
    """What both sources share: the encoder, volume ramps, reading and closing."""

    def __init__(
        self,
        container: av.container.InputContainer,
        audio: av.AudioStream,
        info: StreamInfo,
        opus: OpusSettings | None,
        volume: float,
    ) -> None:
        self._container = container
        self._audio = audio
        self._url = info.url
        self._remote = not info.is_local
        self._opus = opus
        self._encoder_made: OpusEncoder | None = None
        self._lookahead = encoder_lookahead(opus)
        #: The PCM stage between resampling and encoding (see the module docstring).
        self._stage = Gain(volume)
        self._closed = False
        self._pending_error: DecodeError | None = None
        self._emitted = 0
        self._origin = 0.0
        self._frames: Iterator[bytes] = iter(())
        self._start_time = 0.0
        if audio.start_time is not None and audio.time_base is not None:
            self._start_time = float(audio.start_time * audio.time_base)
        self._duration: float | None = None
        if container.duration is not None and container.duration > 0:
            self._duration = container.duration / av.time_base
        elif audio.duration is not None and audio.time_base is not None:
            self._duration = float(audio.duration * audio.time_base)
        self._got_audio = False
        #: What the container reads from, when it is a file object that is ours to close.
        self._input: io.RawIOBase | None = None
        #: Why the remote reads ended early, if they did (legato.audio.fetch's readers say).
        self._failures: list[str] = []

    # ---- FrameSource

    @property
    def passthrough(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
        return self._closed

    @property
    def position(self) -> float:
        return self._origin + self._emitted * FRAME_SAMPLES / SAMPLE_RATE

    @property
    def duration(self) -> float | None:
        return self._duration

    def read(self, max_frames: int) -> list[bytes]:
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error
        out: list[bytes] = []
        if self._closed:
            return out
        try:
            for _ in range(max_frames):
                frame = next(self._frames, None)
                if frame is None:
                    short = self._ended_short()
                    if short is None:
                        break
                    raise short
                out.append(frame)
                self._emitted += 1
        except DecodeError as exc:
            error = exc
        except (av.error.FFmpegError, OSError) as exc:
            error = self._stream_error(exc)
        else:
            return out
        self._frames = iter(())
        if out:
            self._pending_error = error
            return out
        raise error

    def set_volume(self, volume: float) -> None:
        _check_volume(volume)
        self._stage.set(volume)

    def seek(self, seconds: float) -> None:
        if self._closed:
            raise DecodeError("seek on a closed source")
        self._pending_error = None
        target = max(0.0, seconds)
        if self._duration is not None:
            target = min(target, self._duration)
        time_base = self._audio.time_base
        try:
            if time_base is None:
                self._container.seek(int((target + self._start_time) * av.time_base))
            else:
                self._container.seek(
                    int((target + self._start_time) / time_base),
                    stream=self._audio,
                    backward=True,
                    any_frame=False,
                )
        except (av.error.FFmpegError, OSError) as exc:
            raise DecodeError(
                f"seek to {target:.3f}s in {self._url} failed: {exc}",
                user_message="I could not seek in that track.",
            ) from exc
        self._emitted = 0
        self._stage.jump()  # a jump needs no ramp: there is nothing to be continuous with
        try:
            self._restart(target)
        except (av.error.FFmpegError, OSError) as exc:
            self._frames = iter(())
            raise self._stream_error(exc) from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._frames = iter(())
        self._container.close()
        if self._input is not None:
            self._input.close()

    # ---- shared helpers

    def _restart(self, target: float) -> None:
        raise NotImplementedError

    def _ended_short(self) -> StreamLost | None:
        """A ``StreamLost`` when a remote read ended for good (its reader says why), or a
        remote stream ended well before its known length.

        The latter only once this opening produced audio: a reopened stream that has nothing
        more really ends there (a length in the header can be wrong).
        """
        if self._failures:
            why = self._failures[-1]
            self._failures.clear()
            self._remote = False
            return StreamLost(f"{self._url}: {why}")
        duration = self._duration
        if not self._remote or duration is None or self._emitted == 0:
            return None
        position = self.position
        if position >= duration - _SHORT_END:
            return None
        self._remote = False  # said once; a later read finds the plain end
        return StreamLost(
            f"{self._url} ended at {position:.2f}s of {duration:.2f}s (a refused or dropped"
            " connection)"
        )

    def _stream_error(self, exc: Exception) -> DecodeError:
        if isinstance(exc, av.error.ExitError | av.error.TimeoutError | TimeoutError):
            message = "The track's server stopped sending audio."
        elif isinstance(exc, OSError) and exc.errno == errno.EIO:
            # What FFmpeg reports once its reconnects to a dropped download have all failed.
            return StreamLost(f"reading {self._url} failed: {type(exc).__name__}: {exc}")
        elif isinstance(exc, av.error.HTTPError):
            return StreamLost(
                f"reading {self._url} failed: {type(exc).__name__}: {exc}",
                user_message="The server hosting that track returned an error.",
            )
        else:
            message = "The track's audio could not be read."
        return DecodeError(
            f"reading {self._url} failed: {type(exc).__name__}: {exc}", user_message=message
        )

    def _demux(self) -> Iterator[av.Packet[av.AudioStream]]:
        """The audio stream's packets, with a truncated or damaged tail taken as the end."""
        packets = self._container.demux(self._audio)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except (av.error.InvalidDataError, av.error.EOFError) as exc:
                _log.warning("%s ends early (%s); ending the track there", self._url, exc)
                return
            if packet.size == 0:
                continue  # the demuxer's flush packet
            yield packet

    @property
    def _encoder(self) -> OpusEncoder:
        """The Opus encoder, made on first use: a passthrough stream may never need its
        ~50 KiB of libopus state."""
        if self._encoder_made is None:
            self._encoder_made = OpusEncoder(self._opus)
        return self._encoder_made

    def _scale_and_encode(self, pcm: bytes) -> bytes:
        """Run one frame through the PCM stage and encode it."""
        return self._encoder.encode(self._stage.apply(pcm))


class _TranscodeSource(_BaseSource):
    """Decode anything PyAV reads, resample to 48 kHz stereo s16 and encode."""

    def __init__(
        self,
        container: av.container.InputContainer,
        audio: av.AudioStream,
        info: StreamInfo,
        opus: OpusSettings | None,
        volume: float,
    ) -> None:
        super().__init__(container, audio, info, opus, volume)
        self._frames = self._generate(0.0)

    def _restart(self, target: float) -> None:
        self._audio.codec_context.flush_buffers()
        self._encoder.reset()
        self._origin = target
        self._frames = self._generate(target)

    def _decoded(self) -> Iterator[av.AudioFrame]:
        codec = self._audio.codec_context
        bad = 0
        for packet in self._demux():
            try:
                frames = codec.decode(packet)
            except (av.error.InvalidDataError, av.error.UndefinedError) as exc:
                bad += 1
                if bad >= _MAX_BAD_PACKETS:
                    raise DecodeError(
                        f"{self._url}: {bad} undecodable packets in a row: {exc}",
                        user_message="That track's audio is damaged.",
                    ) from exc
                _log.debug("%s: skipping an undecodable packet (%s)", self._url, exc)
                continue
            bad = 0
            yield from frames
        try:
            yield from codec.decode(None)
        except av.error.FFmpegError as exc:
            _log.debug("%s: decoder flush failed (%s)", self._url, exc)

    def _generate(self, target: float) -> Iterator[bytes]:
        """Frames from ``target`` seconds (where the container was just seeked to) onward."""
        pcm = bytearray()
        # Drop the encoder's lookahead (see the module docstring), and after a seek whatever
        # decodes before the target.
        skip = self._lookahead
        resampler: _Resampler | None = None
        shape: tuple[str, str, int] | None = None
        first = True
        for frame in self._decoded():
            if first:
                first = False
                if frame.time is not None and target > 0:
                    lead = target - (frame.time - self._start_time)
                    skip += max(0, round(lead * SAMPLE_RATE))
            this_shape = (frame.format.name, frame.layout.name, frame.sample_rate)
            if resampler is None or this_shape != shape:
                if resampler is not None:
                    for out in resampler.resample(None):
                        pcm += _stereo_bytes(out)
                # Mono is resampled as mono and copied to both sides at full level: FFmpeg's
                # mono-to-stereo matrix would put it 3 dB down.
                mono = frame.layout.nb_channels == 1
                resampler = _Resampler("mono" if mono else "stereo")
                shape = this_shape
            for out in resampler.resample(frame):
                pcm += _stereo_bytes(out)
            if skip:
                dropped = min(skip, len(pcm) // _BYTES_PER_SAMPLE)
                del pcm[: dropped * _BYTES_PER_SAMPLE]
                skip -= dropped
            while len(pcm) >= FRAME_BYTES:
                chunk = bytes(pcm[:FRAME_BYTES])
                del pcm[:FRAME_BYTES]
                self._got_audio = True
                yield self._scale_and_encode(chunk)
        if resampler is not None:
            for out in resampler.resample(None):
                pcm += _stereo_bytes(out)
            if skip:
                del pcm[: min(skip, len(pcm) // _BYTES_PER_SAMPLE) * _BYTES_PER_SAMPLE]
        while pcm:
            chunk = bytes(pcm[:FRAME_BYTES]).ljust(FRAME_BYTES, b"\x00")
            del pcm[:FRAME_BYTES]
            self._got_audio = True
            yield self._scale_and_encode(chunk)
        if not self._got_audio and target == 0:
            raise DecodeError(
                f"{self._url}: no audio could be decoded",
                user_message="That track's audio could not be decoded.",
            )


class _OpusSource(_BaseSource):
    """Opus in Ogg/WebM: pass packets through at volume 1.0, else decode, scale and re-encode."""

    def __init__(
        self,
        container: av.container.InputContainer,
        audio: av.AudioStream,
        info: StreamInfo,
        opus: OpusSettings | None,
        allow_passthrough: bool,
        volume: float,
    ) -> None:
        super().__init__(container, audio, info, opus, volume)
        self._allow = allow_passthrough
        self._packets_ok = True  # every packet so far was 20 ms (passthrough needs that)
        self._decoder_made: OpusDecoder | None = None
        self._decoding = False
        self._history: deque[bytes] = deque(maxlen=_WARM_PACKETS)
        self._ahead: deque[bytes] = deque()  # read from the container, not yet emitted
        self._pcm = bytearray()
        self._packets: Iterator[av.Packet[av.AudioStream]] = self._demux()
        self._frames = self._generate()

    @property
    def passthrough(self) -> bool:
        return self._want_passthrough() and not self._decoding

    @property
    def _decoder(self) -> OpusDecoder:
        """The libopus decoder, made when the stream is first decoded (not in passthrough)."""
        if self._decoder_made is None:
            self._decoder_made = OpusDecoder()
        return self._decoder_made

    def _want_passthrough(self) -> bool:
        return self._allow and self._packets_ok and self._stage.neutral

    def _packet_time(self, packet: av.Packet[av.AudioStream]) -> float | None:
        if packet.pts is None or packet.time_base is None:
            return None
        # Decoded Opus starts with the pre-skip samples, so a packet's audio is its timestamp
        # (which the container already shifted back by the pre-skip), not one pre-skip later.
        return float(packet.pts * packet.time_base) - self._start_time

    def _restart(self, target: float) -> None:
        self._history.clear()
        self._ahead.clear()
        self._pcm.clear()
        self._decoding = False
        self._origin = target
        self._packets = self._demux()
        # Land on the packet that holds the target; what comes before warms the decoder.
        for packet in self._packets:
            start = self._packet_time(packet)
            data = bytes(packet)
            if start is None or start + opus_packet_samples(data) / SAMPLE_RATE > target:
                self._origin = max(0.0, start) if start is not None else target
                self._ahead.append(data)
                break
            self._history.append(data)
        self._frames = self._generate()

    def _next_packet(self) -> bytes | None:
        for packet in self._packets:
            return bytes(packet)
        return None

    def _generate(self) -> Iterator[bytes]:
        while True:
            if self._want_passthrough():
                if self._decoding:
                    # Back to passthrough on this frame boundary: the first packet in _ahead
                    # is this frame's.
                    self._decoding = False
                    self._pcm.clear()
                packet = self._ahead.popleft() if self._ahead else self._next_packet()
                if packet is None:
                    return
                if opus_packet_samples(packet) != FRAME_SAMPLES:
                    _log.debug("%s: Opus packets are not 20 ms; decoding instead", self._url)
                    self._packets_ok = False
                    self._ahead.appendleft(packet)
                    continue
                self._history.append(packet)
                self._got_audio = True
                yield packet
                continue
            if not self._decoding and not self._start_decoding():
                return
            while len(self._pcm) < FRAME_BYTES:
                packet = self._next_packet()
                if packet is None:
                    break
                if self._packets_ok:
                    self._ahead.append(packet)
                self._pcm += self._decoder.decode(packet)
            if not self._pcm:
                return
            chunk = bytes(self._pcm[:FRAME_BYTES]).ljust(FRAME_BYTES, b"\x00")
            del self._pcm[:FRAME_BYTES]
            if self._ahead:
                self._history.append(self._ahead.popleft())
            self._got_audio = True
            yield self._scale_and_encode(chunk)

    def _start_decoding(self) -> bool:
        """Switch to decoding at the next frame boundary; False when the stream has ended.

        The receiver's decoder has been fed the source's packets up to the previous frame. For
        its output to continue without a click or a gap, the first re-encoded frame must carry
        exactly the audio that the next source packet would have: so the libopus decoder is
        warmed with the last passthrough packets (their output discarded), the encoder is warmed
        with the PCM of the last frames (its packets discarded), and the PCM fed to the encoder
        runs ``lookahead`` samples ahead of the frame being emitted, cancelling its delay.
        """
        self._decoder.reset()
        self._encoder.reset()
        history = list(self._history)
        warm = b"".join(self._decoder.decode(p) for p in history)
        if not self._ahead:
            packet = self._next_packet()
            if packet is None:
                return False
            self._ahead.append(packet)
        pcm = warm + b"".join(self._decoder.decode(p) for p in self._ahead)
        base = len(warm) // _BYTES_PER_SAMPLE  # sample index of the next frame in `pcm`
        lead = self._lookahead
        if history:
            for j in range(max(0, len(history) - _WARM_ENCODER_FRAMES), len(history)):
                lo = (j * FRAME_SAMPLES + lead) * _BYTES_PER_SAMPLE
                hi = lo + FRAME_BYTES
                if hi <= len(pcm):
                    self._encoder.encode(pcm[lo:hi])
        self._pcm = bytearray(pcm[(base + lead) * _BYTES_PER_SAMPLE :])
        self._decoding = True
        return True


def _stereo_bytes(frame: av.AudioFrame) -> bytes:
    """Interleaved stereo s16 bytes of a resampled (s16, mono or stereo) frame."""
    channels = frame.layout.nb_channels
    data = bytes(frame.planes[0])[: frame.samples * 2 * channels]
    if channels == 2:
        return data
    return np.repeat(np.frombuffer(data, dtype="<i2"), 2).tobytes()
