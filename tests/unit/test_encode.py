"""Opus settings, encoder and decoder (system libopus), and Opus packet framing."""

from __future__ import annotations

import numpy as np
import pytest

from legato.audio.decode import opus_packet_samples
from legato.audio.encode import (
    OpusDecoder,
    OpusEncoder,
    OpusSettings,
    decode_opus_packets,
    encoder_lookahead,
)
from legato.audio.source import FRAME_BYTES, FRAME_SAMPLES, SAMPLE_RATE
from legato.errors import DecodeError
from legato.sandbox.analysis import dominant_frequency, pcm_to_mono, rms


def sine_frames(freq: float, count: int, amplitude: float = 0.5) -> list[bytes]:
    n = np.arange(count * FRAME_SAMPLES)
    mono = (amplitude * 32767 * np.sin(2 * np.pi * freq * n / SAMPLE_RATE)).astype("<i2")
    pcm = np.repeat(mono, 2).tobytes()
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]


def test_defaults_are_plain_libopus_without_fec() -> None:
    settings = OpusSettings()
    assert settings == OpusSettings(
        bitrate=128_000, complexity=10, fec=False, expected_loss=0, application="audio"
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bitrate": 100}, "bitrate"),
        ({"bitrate": 1_000_000}, "bitrate"),
        ({"complexity": 11}, "complexity"),
        ({"complexity": -1}, "complexity"),
        ({"expected_loss": 101}, "expected_loss"),
        ({"application": "music"}, "application"),
    ],
)
def test_settings_reject_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        OpusSettings(**kwargs)  # type: ignore[arg-type]  # deliberately wrong values


def test_round_trip_keeps_the_tone() -> None:
    encoder = OpusEncoder()
    packets = [encoder.encode(frame) for frame in sine_frames(440.0, 50)]
    assert all(0 < len(p) < 1500 for p in packets)
    assert all(opus_packet_samples(p) == FRAME_SAMPLES for p in packets)
    pcm = decode_opus_packets(packets)
    assert len(pcm) == 50 * FRAME_BYTES
    mono = pcm_to_mono(pcm)[4800:]
    assert dominant_frequency(mono) == pytest.approx(440.0, abs=2.0)
    assert rms(mono) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


def test_lookahead_is_the_delay_of_decoded_audio() -> None:
    encoder = OpusEncoder()
    assert encoder.lookahead == 312  # 6.5 ms at 48 kHz for the "audio" application
    impulse = bytearray(10 * FRAME_BYTES)
    impulse[1000 * 4 : 1000 * 4 + 4] = (20000).to_bytes(2, "little", signed=True) * 2
    frames = [bytes(impulse[i : i + FRAME_BYTES]) for i in range(0, len(impulse), FRAME_BYTES)]
    mono = pcm_to_mono(decode_opus_packets(encoder.encode(f) for f in frames))
    assert int(np.argmax(np.abs(mono))) == pytest.approx(1000 + encoder.lookahead, abs=3)


@pytest.mark.parametrize("application", ["audio", "voip", "restricted_lowdelay"])
def test_encoder_lookahead_is_an_encoders(application: str) -> None:
    settings = OpusSettings(application=application)
    assert encoder_lookahead(settings) == OpusEncoder(settings).lookahead
    assert encoder_lookahead(None) == OpusEncoder().lookahead


def test_bitrate_setting_changes_packet_size() -> None:
    frames = sine_frames(1000.0, 50)
    low = OpusEncoder(OpusSettings(bitrate=24_000))
    high = OpusEncoder(OpusSettings(bitrate=256_000))
    small = sum(len(low.encode(f)) for f in frames)
    big = sum(len(high.encode(f)) for f in frames)
    assert small * 4 < big


def test_peer_settings_are_accepted() -> None:
    encoder = OpusEncoder(OpusSettings(bitrate=131_072, fec=True, expected_loss=15))
    packets = [encoder.encode(f) for f in sine_frames(440.0, 10)]
    assert len(decode_opus_packets(packets)) == 10 * FRAME_BYTES


def test_encode_wants_exactly_one_frame() -> None:
    with pytest.raises(ValueError, match="3840"):
        OpusEncoder().encode(b"\x00" * 100)


def test_reset_makes_the_encoder_repeat_itself() -> None:
    frames = sine_frames(300.0, 5)
    encoder = OpusEncoder()
    first = [encoder.encode(f) for f in frames]
    encoder.reset()
    assert [encoder.encode(f) for f in frames] == first


def test_decoder_rejects_garbage() -> None:
    decoder = OpusDecoder()
    with pytest.raises(DecodeError):
        decoder.decode(b"\xff\xff\xff\xff\xff")


def test_decoder_reset_forgets_state() -> None:
    encoder = OpusEncoder()
    packets = [encoder.encode(f) for f in sine_frames(500.0, 5)]
    decoder = OpusDecoder()
    first = [decoder.decode(p) for p in packets]
    decoder.reset()
    assert [decoder.decode(p) for p in packets] == first


@pytest.mark.parametrize(
    ("packet", "samples"),
    [
        (bytes([0xFC, 0x00]), 960),  # CELT fullband 20 ms, one frame
        (bytes([0xF8, 0xFF, 0xFE]), 960),  # the silence frame Discord clients send
        (bytes([0xE0]), 120),  # CELT 2.5 ms
        (bytes([0xFD, 0x00]), 1920),  # two 20 ms frames
        (bytes([0xFB, 0x03]), 2880),  # code 3: three 20 ms frames
        (bytes([0x08]), 960),  # SILK NB 20 ms
        (bytes([0x18]), 2880),  # SILK NB 60 ms
        (bytes([0x68]), 960),  # hybrid SWB 20 ms
        (b"", 0),
        (bytes([0xFB]), 0),  # code 3 without its count byte
    ],
)
def test_opus_packet_samples(packet: bytes, samples: int) -> None:
    assert opus_packet_samples(packet) == samples
