"""The bench's "peer's encoder settings" are discord.py's own encoder's, read from libopus."""

from __future__ import annotations

import ctypes

import discord.opus

from bench.bench_audio import PEER_SETTINGS

_GET_BITRATE, _GET_COMPLEXITY, _GET_INBAND_FEC, _GET_PACKET_LOSS_PERC = 4003, 4011, 4013, 4015


def test_peer_settings_are_what_discord_py_sets_and_libopus_defaults() -> None:
    assert discord.opus._load_default()
    encoder = discord.opus.Encoder()  # as VoiceClient.play builds it
    lib = discord.opus._lib

    def get(request: int) -> int:
        value = ctypes.c_int32()
        lib.opus_encoder_ctl(encoder._state, request, ctypes.byref(value))
        return value.value

    assert get(_GET_BITRATE) == PEER_SETTINGS.bitrate
    assert (
        get(_GET_COMPLEXITY) == PEER_SETTINGS.complexity
    )  # libopus's default: discord.py sets none
    assert bool(get(_GET_INBAND_FEC)) == PEER_SETTINGS.fec
    assert get(_GET_PACKET_LOSS_PERC) == PEER_SETTINGS.expected_loss
