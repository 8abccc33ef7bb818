"""What the sandbox voice server heard from one user: Opus packets, speaking changes, statistics.

What is recorded is what a Discord user in the call would hear: a packet that arrived but could
not be played (plaintext from a member whose DAVE group is in force, a DAVE frame that does not
decrypt) is recorded as *lost* (:meth:`Recording.add_lost`): it counts among the gaps, the
RTCP figures and the decoded timeline's silence, never as audio.

A :class:`Recording` belongs to one ``(server_id, user_id)`` pair and outlives the connections
that feed it: a resumed session keeps appending to it, and so does a fresh identify (its new SSRC
starts a new *stream* inside the recording, so sequence statistics never compare numbers from
two different senders). Times are the event loop's monotonic clock, passed in by the server.

Tests wait on a recording instead of sleeping: :meth:`Recording.wait_frames`,
:meth:`Recording.wait_speaking`.
"""

from __future__ import annotations

import asyncio
import struct
import wave
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, overload

from legato.audio.encode import OpusDecoder
from legato.audio.source import CHANNELS, FRAME_BYTES, FRAME_SAMPLES, SAMPLE_RATE
from legato.sandbox.analysis import dominant_frequency, pcm_to_mono

#: RTP clock rate of Opus (RFC 7587): always 48 kHz whatever the audio bandwidth.
RTP_CLOCK: Final = 48_000
_SEQ_MOD: Final = 1 << 16


class Waiters:
    """Futures waiting for a condition on some state that a callback changes.

    The owner calls :meth:`notify` after each change; each waiter's predicate is checked then,
    so nobody polls or sleeps.
    """

    def __init__(self) -> None:
        self._waiting: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    def notify(self) -> None:
        """Wake every waiter whose predicate now holds."""
        if not self._waiting:
            return  # the common case: every packet of a load notifies, nobody waits
        for predicate, fut in list(self._waiting):
            if fut.done():
                continue
            try:
                ready = predicate()
            except Exception as exc:  # noqa: BLE001 - handed to the waiter, who re-raises it
                fut.set_exception(exc)
                continue
            if ready:
                fut.set_result(None)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:  # noqa: ASYNC109
        """Return once ``predicate()`` is true.

        Raises:
            TimeoutError: it did not become true within ``timeout`` seconds; the message names
                ``what`` was awaited.
        """
        if predicate():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, fut)
        self._waiting.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}") from None
        finally:
            self._waiting.remove(entry)


@dataclass(frozen=True, slots=True)
class ReceivedPacket:
    """One decrypted RTP packet as it arrived."""

    arrival: float
    ssrc: int
    sequence: int
    timestamp: int
    opus: bytes


class PacketLog(Sequence[ReceivedPacket]):
    """Packets in arrival order, held as columns: a :class:`ReceivedPacket` is made when read.

    A load of 100 streams records 5,000 packets a second. As objects, each a container the
    cyclic collector tracks, they made every full collection of the process that runs the
    sandbox scan all of them (0.76 s at 360,000, measured): a pause in which the media socket's
    receive buffer overflows and the listener loses what the sender sent. As columns (arrays
    of numbers, and the payloads, which the collector does not track) they cost it nothing.
    """

    __slots__ = ("_arrival", "_opus", "_sequence", "_ssrc", "_timestamp")

    def __init__(self) -> None:
        self._arrival = array("d")
        self._ssrc = array("I")
        self._sequence = array("H")
        self._timestamp = array("I")
        self._opus: list[bytes] = []

    def add(self, arrival: float, ssrc: int, sequence: int, timestamp: int, opus: bytes) -> None:
        """Add one packet at the end, from its fields (no :class:`ReceivedPacket` is made)."""
        self._arrival.append(arrival)
        self._ssrc.append(ssrc)
        self._sequence.append(sequence)
        self._timestamp.append(timestamp)
        self._opus.append(opus)

    def __len__(self) -> int:
        return len(self._opus)

    @overload
    def __getitem__(self, index: int) -> ReceivedPacket: ...

    @overload
    def __getitem__(self, index: slice) -> list[ReceivedPacket]: ...

    def __getitem__(self, index: int | slice) -> ReceivedPacket | list[ReceivedPacket]:
        if isinstance(index, slice):
            return [self._at(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("packet index out of range")
        return self._at(index)

    def __iter__(self) -> Iterator[ReceivedPacket]:
        return (self._at(i) for i in range(len(self)))

    def _at(self, i: int) -> ReceivedPacket:
        return ReceivedPacket(
            self._arrival[i], self._ssrc[i], self._sequence[i], self._timestamp[i], self._opus[i]
        )


@dataclass(frozen=True)
class SpeakingChange:
    """One op5 from the client: ``speaking`` is the bitmask (1 voice, 2 soundshare, 4 priority)."""

    arrival: float
    speaking: int
    ssrc: int | None

    @property
    def on(self) -> bool:
        """Whether any speaking flag is set."""
        return self.speaking != 0


@dataclass(frozen=True)
class RecordingStats:
    """Counters over every stream of a recording.

    Attributes:
        frames: Distinct packets heard (duplicates not counted).
        streams: SSRCs seen (a fresh identify brings a new one).
        gaps: Sequence numbers not heard between the first and the highest of each stream
            (never received, or received and dropped: see ``dropped``).
        dropped: Distinct packets that arrived but were not heard, as a Discord receiver
            drops them: plaintext where DAVE was in force, DAVE frames that did not decrypt.
        duplicates: Packets whose sequence number was already received.
        out_of_order: Packets that arrived after a higher sequence number of their stream.
        sequence_errors: ``duplicates + out_of_order``.
        timestamp_errors: In-order packets whose timestamp did not advance by 960 per sequence
            step (a 20 ms Opus frame).
        jitter: RFC 3550 interarrival jitter of the latest stream, in seconds.
    """

    frames: int
    streams: int
    gaps: int
    duplicates: int
    out_of_order: int
    sequence_errors: int
    timestamp_errors: int
    jitter: float
    dropped: int = 0


@dataclass(frozen=True)
class Reception:
    """What an RTCP reception report block says about one SSRC (RFC 3550 6.4.1, A.3).

    Attributes:
        ssrc: The sender's SSRC.
        received: Distinct packets received (heard or dropped: RTCP counts what arrived).
        expected: Sequence numbers from the first received to the highest.
        highest: Extended highest sequence number received (cycles in the upper 16 bits).
        jitter: Interarrival jitter in RTP timestamp units.
    """

    ssrc: int
    received: int
    expected: int
    highest: int
    jitter: float

    @property
    def lost(self) -> int:
        """Packets expected but not received (RFC 3550's cumulative number of packets lost)."""
        return self.expected - self.received


@dataclass
class _Stream:
    """Sequence bookkeeping for one SSRC (RFC 3550 appendix A.1, without probation)."""

    ssrc: int
    base: int = -1
    highest: int = -1
    packets: dict[int, bytes] = field(default_factory=dict)
    #: Sequence numbers that arrived but were not heard (see ``Recording.add_lost``).
    dropped: set[int] = field(default_factory=set)
    duplicates: int = 0
    out_of_order: int = 0
    late: list[int] = field(default_factory=list)
    timestamp_errors: int = 0
    last_timestamp: int = 0
    jitter: float = 0.0
    _transit: float | None = None

    def extend(self, sequence: int) -> int:
        """Map a 16-bit sequence number onto this stream's extended numbering."""
        if self.highest < 0:
            return sequence
        delta = (sequence - self.highest) % _SEQ_MOD
        if delta < _SEQ_MOD // 2:
            return self.highest + delta
        return self.highest - (_SEQ_MOD - delta)

    def add(self, arrival: float, sequence: int, timestamp: int, opus: bytes | None) -> None:
        """Take one packet: its Opus when heard, None when it arrived but was dropped."""
        ext = self.extend(sequence)
        if ext in self.packets or ext in self.dropped:
            self.duplicates += 1
            return
        if self.highest < 0:
            self.base = ext
            self.highest = ext
        elif ext > self.highest:
            step = ext - self.highest
            if (timestamp - self.last_timestamp) % (1 << 32) != (step * FRAME_SAMPLES) % (1 << 32):
                self.timestamp_errors += 1
            self.highest = ext
        else:
            self.out_of_order += 1
            self.late.append(ext)
            self.base = min(self.base, ext)
        if ext == self.highest:
            self.last_timestamp = timestamp
        if opus is None:
            self.dropped.add(ext)
            return
        self.packets[ext] = opus
        # RFC 3550 6.4.1: J += (|D| - J) / 16 with D the change in transit time, in RTP units.
        transit = arrival * RTP_CLOCK - timestamp
        if self._transit is not None:
            d = abs(transit - self._transit)
            self.jitter += (d - self.jitter) / 16
        self._transit = transit

    @property
    def gaps(self) -> int:
        if self.highest < 0:
            return 0
        return (self.highest - self.base + 1) - len(self.packets)

    def missing(self) -> Iterator[int]:
        """Extended sequence numbers never received between the first and the highest."""
        for ext in range(self.base, self.highest + 1):
            if ext not in self.packets:
                yield ext

    def frames_in_order(self) -> Iterator[bytes | None]:
        """Every sequence number from the first to the highest: its Opus, or None if missing."""
        for ext in range(self.base, self.highest + 1):
            yield self.packets.get(ext)


class Recording:
    """Everything one user sent to the sandbox in one voice server (guild)."""

    def __init__(self, server_id: int, user_id: int) -> None:
        self.server_id = server_id
        self.user_id = user_id
        #: Every decrypted packet in arrival order (duplicates included).
        self.packets = PacketLog()
        #: Every op5 in arrival order.
        self.speaking_changes: list[SpeakingChange] = []
        #: SSRCs announced for this user (op2's, plus op12 ``audio_ssrc`` and op5 ``ssrc``).
        self.ssrcs: list[int] = []
        self._streams: list[_Stream] = []
        self._waiters = Waiters()

    # -- feeding (the server) ------------------------------------------------------------------

    def add_packet(
        self, *, arrival: float, ssrc: int, sequence: int, timestamp: int, opus: bytes
    ) -> None:
        """Record one decrypted packet."""
        self.packets.add(arrival, ssrc, sequence, timestamp, opus)
        self._stream(ssrc).add(arrival, sequence, timestamp, opus)
        self._waiters.notify()

    def add_lost(self, *, arrival: float, ssrc: int, sequence: int, timestamp: int) -> None:
        """Record one packet that arrived but is not heard (a Discord receiver drops it)."""
        self._stream(ssrc).add(arrival, sequence, timestamp, None)
        self._waiters.notify()

    def _stream(self, ssrc: int) -> _Stream:
        """The stream of ``ssrc``, made the latest one."""
        if not self._streams or self._streams[-1].ssrc != ssrc:
            found = next((s for s in self._streams if s.ssrc == ssrc), None)
            if found is None:
                found = _Stream(ssrc)
            else:
                self._streams.remove(found)
            self._streams.append(found)
        return self._streams[-1]

    def add_speaking(self, *, arrival: float, speaking: int, ssrc: int | None) -> None:
        """Record one op5 from the client."""
        self.speaking_changes.append(SpeakingChange(arrival, speaking, ssrc))
        self.note_ssrc(ssrc)
        self._waiters.notify()

    def note_ssrc(self, ssrc: int | None) -> None:
        """Remember an SSRC this user announced."""
        if ssrc is not None and ssrc not in self.ssrcs:
            self.ssrcs.append(ssrc)

    # -- reading (tests, the demo) -------------------------------------------------------------

    @property
    def frames(self) -> int:
        """Distinct packets heard so far."""
        return sum(len(s.packets) for s in self._streams)

    @property
    def dropped(self) -> int:
        """Distinct packets that arrived but were not heard (see :meth:`add_lost`)."""
        return sum(len(s.dropped) for s in self._streams)

    @property
    def speaking(self) -> bool:
        """The latest speaking state (False before any op5)."""
        return bool(self.speaking_changes) and self.speaking_changes[-1].on

    @property
    def duration(self) -> float:
        """Seconds of audio covered, gaps included, at 20 ms a frame."""
        return sum(s.highest - s.base + 1 for s in self._streams if s.highest >= 0) * 0.02

    def stats(self) -> RecordingStats:
        """Counters over every stream so far."""
        duplicates = sum(s.duplicates for s in self._streams)
        out_of_order = sum(s.out_of_order for s in self._streams)
        return RecordingStats(
            frames=self.frames,
            streams=len(self._streams),
            gaps=sum(s.gaps for s in self._streams),
            duplicates=duplicates,
            out_of_order=out_of_order,
            sequence_errors=duplicates + out_of_order,
            timestamp_errors=sum(s.timestamp_errors for s in self._streams),
            jitter=self._streams[-1].jitter / RTP_CLOCK if self._streams else 0.0,
            dropped=self.dropped,
        )

    def missing_packets(self) -> list[tuple[int, int]]:
        """``(ssrc, sequence)`` of every gap, stream by stream in order (16-bit sequences)."""
        return [(s.ssrc, ext % _SEQ_MOD) for s in self._streams for ext in s.missing()]

    def out_of_order_packets(self) -> list[tuple[int, int]]:
        """``(ssrc, sequence)`` of every packet that arrived after a higher one of its stream."""
        return [(s.ssrc, ext % _SEQ_MOD) for s in self._streams for ext in s.late]

    def reception(self, ssrc: int) -> Reception | None:
        """Reception figures for one SSRC, as an RTCP receiver report carries them."""
        stream = next((s for s in self._streams if s.ssrc == ssrc), None)
        if stream is None or stream.highest < 0:
            return None
        return Reception(
            ssrc=ssrc,
            # RTP-level figures: a packet DAVE dropped above RTP was still received.
            received=len(stream.packets) + len(stream.dropped),
            expected=stream.highest - stream.base + 1,
            highest=stream.highest,
            jitter=stream.jitter,
        )

    def opus_frames(self) -> list[bytes]:
        """Distinct Opus payloads, stream by stream in sequence order (missing ones left out)."""
        return [p for s in self._streams for p in s.frames_in_order() if p is not None]

    def pcm(self) -> bytes:
        """Decode the recording to 48 kHz stereo s16 PCM, one decoder per stream.

        A missing sequence number becomes 20 ms of silence so the timeline stays true. CPU-bound:
        from a coroutine, run it in an executor (``await asyncio.to_thread(rec.pcm)``).
        """
        out = bytearray()
        for stream in self._streams:
            decoder = OpusDecoder()
            for packet in stream.frames_in_order():
                out += bytes(FRAME_BYTES) if packet is None else decoder.decode(packet)
        return bytes(out)

    def dominant_frequency(self) -> float:
        """The strongest frequency of the decoded recording, in Hz (CPU-bound like :meth:`pcm`)."""
        return dominant_frequency(pcm_to_mono(self.pcm()))

    def write_wav(self, path: str | Path) -> None:
        """Write the decoded recording as a 48 kHz stereo 16-bit WAV file."""
        pcm = self.pcm()
        with wave.open(str(path), "wb") as out:
            out.setnchannels(CHANNELS)
            out.setsampwidth(2)
            out.setframerate(SAMPLE_RATE)
            out.writeframes(pcm)

    def write_ogg_opus(self, path: str | Path) -> None:
        """Write the received Opus packets, undecoded, into an Ogg Opus file (RFC 7845)."""
        Path(path).write_bytes(ogg_opus_bytes(self.opus_frames()))

    # -- waiting ---------------------------------------------------------------------------------

    async def wait_frames(self, count: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Return once at least ``count`` distinct frames have arrived.

        Raises:
            TimeoutError: they did not arrive in time.
        """
        await self._waiters.wait_for(
            lambda: self.frames >= count, timeout, f"{count} frames from user {self.user_id}"
        )

    async def wait_arrivals(self, count: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Return once at least ``count`` distinct packets arrived, heard or dropped.

        Raises:
            TimeoutError: they did not arrive in time.
        """
        await self._waiters.wait_for(
            lambda: self.frames + self.dropped >= count,
            timeout,
            f"{count} packets from user {self.user_id}",
        )

    async def wait_speaking(self, on: bool, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Return once the latest speaking state is ``on`` (and at least one op5 arrived).

        Raises:
            TimeoutError: it did not happen in time.
        """
        await self._waiters.wait_for(
            lambda: bool(self.speaking_changes) and self.speaking == on,
            timeout,
            f"speaking={on} from user {self.user_id}",
        )


# -- Ogg Opus --------------------------------------------------------------------------------------

#: Opus decoders drop this many samples at the start (libopus' usual encoder lookahead).
_PRE_SKIP: Final = 312


def opus_packet_samples(packet: bytes) -> int:
    """Samples per channel at 48 kHz in one Opus packet, from its TOC byte (RFC 6716 3.1)."""
    if not packet:
        return 0
    toc = packet[0]
    config = toc >> 3
    if config < 12:  # SILK-only: 10, 20, 40, 60 ms
        frame = (480, 960, 1920, 2880)[config % 4]
    elif config < 16:  # hybrid: 10, 20 ms
        frame = (480, 960)[config % 2]
    else:  # CELT-only: 2.5, 5, 10, 20 ms
        frame = (120, 240, 480, 960)[config % 4]
    code = toc & 3
    if code == 0:
        count = 1
    elif code in (1, 2):
        count = 2
    else:
        count = packet[1] & 0x3F if len(packet) > 1 else 0
    return frame * count


def _make_crc_table() -> tuple[int, ...]:
    table = []
    for index in range(256):
        crc = index << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else (crc << 1)
        table.append(crc & 0xFFFFFFFF)
    return tuple(table)


_CRC_TABLE: Final = _make_crc_table()


def _ogg_crc(data: bytes) -> int:
    """Ogg's CRC-32: polynomial 0x04C11DB7, no reflection, zero initial value and final XOR."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC_TABLE[(crc >> 24) ^ byte]
    return crc


def _ogg_page(packet: bytes, *, granule: int, serial: int, sequence: int, flags: int) -> bytes:
    lacing = [255] * (len(packet) // 255) + [len(packet) % 255]
    if len(lacing) > 255:
        raise ValueError(f"an Opus packet of {len(packet)} bytes does not fit one Ogg page")
    header = struct.pack(
        "<4sBBqIIIB", b"OggS", 0, flags, granule, serial, sequence, 0, len(lacing)
    ) + bytes(lacing)
    page = header + packet
    crc = _ogg_crc(page)
    return page[:22] + struct.pack("<I", crc) + page[26:]


def ogg_opus_bytes(
    packets: list[bytes], *, channels: int = CHANNELS, serial: int = 0x1E6A70
) -> bytes:
    """Mux Opus packets into an Ogg Opus stream, one packet a page."""
    head = struct.pack("<8sBBHIhB", b"OpusHead", 1, channels, _PRE_SKIP, SAMPLE_RATE, 0, 0)
    vendor = b"legato sandbox"
    tags = b"OpusTags" + struct.pack("<I", len(vendor)) + vendor + struct.pack("<I", 0)
    pages = [
        _ogg_page(head, granule=0, serial=serial, sequence=0, flags=0x02),
        _ogg_page(tags, granule=0, serial=serial, sequence=1, flags=0),
    ]
    granule = 0
    for index, packet in enumerate(packets):
        granule += opus_packet_samples(packet)
        last = index == len(packets) - 1
        pages.append(
            _ogg_page(
                packet,
                granule=granule,
                serial=serial,
                sequence=index + 2,
                flags=0x04 if last else 0,
            )
        )
    return b"".join(pages)
