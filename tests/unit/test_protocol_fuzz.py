"""Hypothesis fuzzing of the gateway core: nothing a server sends makes it raise."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legato.voice.close import CloseAction
from legato.voice.events import ProtocolError, Unknown
from legato.voice.protocol import VoiceGatewayCore
from legato.voice.state import ConnState

KNOWN_OPS = [2, 4, 5, 6, 8, 9, 11, 12, 13, 14, 15, 16, 18, 20, 21, 22, 23, 24, 31]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "ssrc",
                    "ip",
                    "port",
                    "modes",
                    "mode",
                    "secret_key",
                    "sdp",
                    "heartbeat_interval",
                    "v",
                    "t",
                    "user_id",
                    "user_ids",
                    "speaking",
                    "streams",
                    "audio_ssrc",
                    "voice",
                    "any",
                ]
            )
            | st.text(max_size=8),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)

messages = st.fixed_dictionaries(
    {"op": st.sampled_from(KNOWN_OPS) | st.integers(-5, 40) | json_values, "d": json_values},
    optional={"seq": json_values},
)


def drive_to(core: VoiceGatewayCore, stage: int) -> None:
    """Walk a real handshake to one of its stages so the fuzz reaches every state."""
    if stage >= 1:
        core.connected(0.0)
    if stage >= 2:
        core.receive_text('{"op":8,"d":{"heartbeat_interval":1000}}', 0.0)
    if stage >= 3:
        core.receive_text(
            '{"op":2,"d":{"ssrc":1,"ip":"127.0.0.1","port":1,'
            '"modes":["aead_xchacha20_poly1305_rtpsize"]}}',
            0.0,
        )
    if stage >= 4:
        core.select_protocol(
            {
                "protocol": "udp",
                "data": {"address": "a", "port": 1, "mode": "aead_xchacha20_poly1305_rtpsize"},
            }
        )
    if stage >= 5:
        core.receive_text(
            json.dumps(
                {"op": 4, "d": {"mode": "aead_xchacha20_poly1305_rtpsize", "secret_key": [0] * 32}}
            ),
            0.0,
        )


def valid_envelope(payload: Any) -> bool:
    return (
        isinstance(payload, dict)
        and isinstance(payload.get("op"), int)
        and not isinstance(payload.get("op"), bool)
    )


@settings(max_examples=300, deadline=None)
@given(
    stage=st.integers(0, 5),
    version=st.sampled_from([6, 8]),
    payloads=st.lists(messages | json_values, max_size=8),
)
def test_receive_never_raises(stage: int, version: int, payloads: list[Any]) -> None:
    core = VoiceGatewayCore("1", "2", "s", "t", version=version)
    drive_to(core, stage)
    core.events()
    # DEBUG on, so redacting and serializing hostile payloads for the log is fuzzed too.
    logger = logging.getLogger("legato.voice.protocol")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        feed(core, payloads)
    finally:
        logger.setLevel(level)
    # Whatever happened, the shell can still close and get a decision.
    decision = core.closed(None)
    assert decision.action in set(CloseAction)
    assert core.state in (ConnState.DISCONNECTED, ConnState.CLOSED)


def feed(core: VoiceGatewayCore, payloads: list[Any]) -> None:
    for i, payload in enumerate(payloads):
        before = (core.stats.malformed, core.stats.unknown_ops, core.stats.protocol_errors)
        received = core.stats.messages_received
        core.receive(payload, float(i))
        assert core.stats.messages_received == received + 1
        after = (core.stats.malformed, core.stats.unknown_ops, core.stats.protocol_errors)
        if not valid_envelope(payload):
            assert core.stats.malformed == before[0] + 1
        events = core.events()
        # Every bad input is counted and surfaced as an event.
        if after != before:
            assert any(isinstance(e, ProtocolError | Unknown) for e in events)
        core.tick(float(i) + 0.5)


@settings(max_examples=300, deadline=None)
@given(stage=st.integers(0, 5), text=st.text(max_size=200))
def test_receive_text_arbitrary_text(stage: int, text: str) -> None:
    core = VoiceGatewayCore("1", "2", "s", "t", version=8, transport_name="udp")
    drive_to(core, stage)
    core.receive_text(text, 1.0)
    assert core.stats.messages_received >= 1


@settings(max_examples=300, deadline=None)
@given(stage=st.integers(0, 5), payload=messages)
def test_receive_text_json_roundtrip(stage: int, payload: dict[str, Any]) -> None:
    core = VoiceGatewayCore("1", "2", "s", "t", version=8, transport_name="webrtc")
    drive_to(core, min(stage, 3))
    received = core.stats.messages_received
    core.receive_text(json.dumps(payload), 1.0)
    assert core.stats.messages_received == received + 1
    core.events()
    core.outgoing()


@settings(max_examples=200, deadline=None)
@given(stage=st.integers(0, 5), data=st.binary(max_size=40))
def test_receive_binary_never_raises(stage: int, data: bytes) -> None:
    core = VoiceGatewayCore("1", "2", "s", "t", version=8)
    drive_to(core, stage)
    core.receive_binary(data, 1.0)
    if len(data) < 3:
        assert core.stats.malformed == 1
    else:
        assert core.seq_ack == int.from_bytes(data[:2], "big")


def test_deeply_nested_json_is_malformed_or_handled(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="legato.voice")  # logging must not recurse either
    core = VoiceGatewayCore("1", "2", "s", "t")
    drive_to(core, 5)
    core.events()
    base = core.stats.messages_received
    core.receive_text('{"op":14,"d":' + "[" * 100_000 + "]" * 100_000 + "}", 1.0)
    core.receive_text('{"op":14,"d":{"a":' + "[" * 500 + "]" * 500 + "}}", 1.0)
    assert core.stats.messages_received == base + 2
    assert core.stats.malformed == 1  # the first is too deep for the JSON parser
    assert [type(e).__name__ for e in core.events()] == ["ProtocolError", "SessionUpdate"]
