"""The sans-I/O voice gateway core, driven by server payloads and a fake `now`.

Server payloads and the expected client payloads are the seed capture's
(`/work/shared/seed/`), compared as exact JSON text.
"""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

import pytest

from legato.errors import InvalidTransition, VoiceClosed
from legato.voice.close import CLOSE_TABLE, CloseAction, close_policy
from legato.voice.events import (
    BackendVersion,
    ClientDisconnected,
    ClientFlags,
    ClientPlatform,
    ClientsConnected,
    CloseRequested,
    DaveBinary,
    DaveMessage,
    Event,
    HeartbeatAck,
    HeartbeatTimeout,
    Hello,
    MediaSinkWants,
    ProtocolError,
    Ready,
    Resumed,
    SessionDescription,
    SessionUpdate,
    SpeakingSeen,
    StateChanged,
    StreamsSeen,
    Unknown,
)
from legato.voice.payloads import dumps, redact
from legato.voice.protocol import MAX_SSRC_USERS, VoiceGatewayCore
from legato.voice.state import TRANSITIONS, ConnState

T = TypeVar("T")

SERVER_ID = "934828556603764816"
USER_ID = "959467381011415120"
SESSION_ID = "bc2bdbdaebf0d131ae580b79e01197ab"
TOKEN = "04cfd23059d5dfcb"

# Seed capture, server side.
HELLO = '{"op":8,"d":{"v":6,"heartbeat_interval":13750}}'
READY = (
    '{"op":2,"d":{"streams":[{"type":"video","ssrc":713746,"rtx_ssrc":713747,"rid":"100",'
    '"quality":100,"active":false}],"ssrc":713745,"port":50001,"modes":["aead_aes256_gcm_rtpsize",'
    '"aead_aes256_gcm","xsalsa20_poly1305_lite_rtpsize","xsalsa20_poly1305_lite",'
    '"xsalsa20_poly1305_suffix","xsalsa20_poly1305"],"ip":"213.163.95.84","experiments":'
    '["bwe_conservative_link_estimate","bwe_remote_locus_client","fixed_keyframe_interval"]}}'
)
BACKEND = '{"op":16,"d":{"voice":"0.8.34","rtc_worker":"0.3.19"}}'
SINK_WANTS = '{"op":15,"d":{"any":100}}'
WEBRTC_SDP = (
    "m=audio 50001 ICE/SDP\na=fingerprint:sha-256 4A:79:94:16:44:3F:BD:05:41:5A:C7:20:F3:12:54:"
    "70:00:73:5D:33:00:2D:2C:80:9B:39:E1:9F:2D:A7:49:87\nc=IN IP4 213.163.95.84\na=rtcp:50001\n"
    "a=ice-ufrag:tK/L\na=ice-pwd:g40S9IK0OQ8GOTCorkDZDR\na=candidate:1 1 UDP 4261412862 "
    "213.163.95.84 50001 typ host\n"
)
SESSION_WEBRTC = json.dumps(
    {
        "op": 4,
        "d": {
            "video_codec": "H264",
            "sdp": WEBRTC_SDP,
            "media_session_id": "8e60b8396805ee8d0985a0c57ef59461",
            "audio_codec": "opus",
        },
    }
)
OFFER_FRAGMENT = (
    "a=ice-options:trickle\na=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\n"
    "a=ice-pwd:9473594540563294f62301e5dc183472\na=ice-ufrag:925273d0\na=rtpmap:109 opus/48000/2"
)
CODECS = [
    {
        "name": "opus",
        "type": "audio",
        "priority": 1000,
        "payload_type": 109,
        "rtx_payload_type": None,
    }
]
KEY = list(range(32))

# Seed capture, client side.
IDENTIFY_BROWSER = (
    '{"op":0,"d":{"server_id":"934828556603764816","user_id":"959467381011415120",'
    '"session_id":"bc2bdbdaebf0d131ae580b79e01197ab","token":"04cfd23059d5dfcb","video":true,'
    '"streams":[{"type":"video","rid":"100","quality":100}]}}'
)
OP16 = '{"op":16,"d":{}}'
OP12_BROWSER = (
    '{"op":12,"d":{"audio_ssrc":0,"video_ssrc":0,"rtx_ssrc":0,"streams":[{"type":"video",'
    '"rid":"100","ssrc":0,"active":false,"quality":100,"rtx_ssrc":0,"max_bitrate":2500000,'
    '"max_framerate":20,"max_resolution":{"type":"fixed","width":1280,"height":720}}]}}'
)


def state(core: VoiceGatewayCore) -> ConnState:
    """Read the state through a call, so mypy does not narrow it across transitions."""
    return core.state


def make(**kwargs: Any) -> VoiceGatewayCore:
    return VoiceGatewayCore(SERVER_ID, USER_ID, SESSION_ID, TOKEN, **kwargs)


def of_type(events: list[Event], kind: type[T]) -> list[T]:
    return [e for e in events if isinstance(e, kind)]


def udp_session(mode: str = "aead_xchacha20_poly1305_rtpsize", **extra: Any) -> str:
    return json.dumps({"op": 4, "d": {"mode": mode, "secret_key": KEY, **extra}})


def udp_ready(modes: list[str] | None = None) -> str:
    d = {
        "ssrc": 42,
        "ip": "127.0.0.1",
        "port": 50002,
        "modes": modes or ["aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize"],
    }
    return json.dumps({"op": 2, "d": d})


def to_ready_udp(core: VoiceGatewayCore, now: float = 0.0) -> None:
    core.connected(now)
    core.receive_text(HELLO, now)
    core.receive_text(udp_ready(), now)
    core.select_protocol(
        {
            "protocol": "udp",
            "data": {
                "address": "127.0.0.1",
                "port": 40000,
                "mode": "aead_xchacha20_poly1305_rtpsize",
            },
        }
    )
    core.receive_text(udp_session(), now)
    assert state(core) is ConnState.READY


# --- handshake -------------------------------------------------------------------------------


def test_webrtc_handshake_matches_capture() -> None:
    core = make(transport_name="webrtc")
    assert state(core) is ConnState.DISCONNECTED
    core.connected(0.0)
    assert core.outgoing() == []  # nothing before hello: the capture's order
    core.receive_text(HELLO, 0.0)
    assert core.outgoing_text() == [IDENTIFY_BROWSER]
    core.receive_text(READY, 0.1)
    assert state(core) is ConnState.SELECTING_PROTOCOL
    assert core.request_backend_version()
    assert core.announce_streams(0)
    assert core.select_protocol(
        {
            "protocol": "webrtc",
            "data": OFFER_FRAGMENT,
            "codecs": CODECS,
            "rtc_connection_id": "e621fc80-9998-4ace-b100-34383822e063",
        }
    )
    sent = core.outgoing_text()
    assert sent[:2] == [OP16, OP12_BROWSER]
    op1 = json.loads(sent[2])
    assert sent[2].startswith('{"op":1,"d":{"protocol":"webrtc","data":')
    assert op1["d"] == {
        "protocol": "webrtc",
        "data": OFFER_FRAGMENT,
        "sdp": OFFER_FRAGMENT,
        "codecs": CODECS,
        "rtc_connection_id": "e621fc80-9998-4ace-b100-34383822e063",
    }
    assert list(op1["d"]) == ["protocol", "data", "sdp", "codecs", "rtc_connection_id"]
    core.receive_text(BACKEND, 0.2)
    core.receive_text(SINK_WANTS, 0.2)
    core.receive_text(SESSION_WEBRTC, 0.3)
    assert state(core) is ConnState.READY
    events = core.events()
    assert [e.new for e in of_type(events, StateChanged)] == [
        ConnState.AWAITING_HELLO,
        ConnState.AWAITING_READY,
        ConnState.SELECTING_PROTOCOL,
        ConnState.AWAITING_SESSION,
        ConnState.READY,
    ]
    [ready] = of_type(events, Ready)
    assert (ready.ssrc, ready.ip, ready.port) == (713745, "213.163.95.84", 50001)
    assert ready.modes[0] == "aead_aes256_gcm_rtpsize"
    assert ready.streams[0]["ssrc"] == 713746
    assert of_type(events, BackendVersion) == [BackendVersion("0.8.34", "0.3.19")]
    assert of_type(events, MediaSinkWants) == [MediaSinkWants({"any": 100})]
    [session] = of_type(events, SessionDescription)
    assert session.sdp == WEBRTC_SDP
    assert session.mode is None
    assert (session.audio_codec, session.video_codec) == ("opus", "H264")
    assert session.media_session_id == "8e60b8396805ee8d0985a0c57ef59461"
    assert of_type(events, Hello) == [Hello(13.75, 6)]
    assert core.stats.malformed == core.stats.unknown_ops == core.stats.protocol_errors == 0


def test_webrtc_select_fills_sdp_codecs_and_connection_id() -> None:
    core = make(transport_name="webrtc")
    core.connected(0.0)
    core.receive_text(HELLO, 0.0)
    core.receive_text('{"op":2,"d":{"ssrc":5}}', 0.0)  # Spacebar-like: no udp fields
    assert core.ready is not None
    assert core.ready.ip == ""
    core.outgoing()
    core.select_protocol({"protocol": "webrtc", "sdp": OFFER_FRAGMENT})
    [op1] = core.outgoing()
    assert op1["d"]["data"] == op1["d"]["sdp"] == OFFER_FRAGMENT
    assert op1["d"]["codecs"][0]["name"] == "opus"
    assert len(op1["d"]["rtc_connection_id"]) == 36


@pytest.mark.parametrize("version", [6, 8])
def test_udp_handshake(version: int) -> None:
    core = make(version=version, browser_like=False)
    core.connected(0.0)
    core.receive_text(HELLO, 0.0)
    [identify] = core.outgoing()
    assert identify == {
        "op": 0,
        "d": {"server_id": SERVER_ID, "user_id": USER_ID, "session_id": SESSION_ID, "token": TOKEN},
    }
    core.receive_text(udp_ready(), 0.1)
    assert core.ssrc == 42
    select = {
        "protocol": "udp",
        "data": {"address": "203.0.113.5", "port": 40000, "mode": "aead_aes256_gcm_rtpsize"},
    }
    core.select_protocol(select)
    assert core.outgoing() == [{"op": 1, "d": select}]
    assert core.selected_mode == "aead_aes256_gcm_rtpsize"
    core.receive_text(udp_session("aead_aes256_gcm_rtpsize", dave_protocol_version=0), 0.2)
    assert state(core) is ConnState.READY
    [session] = of_type(core.events(), SessionDescription)
    assert session.secret_key == bytes(range(32))
    assert session.mode == "aead_aes256_gcm_rtpsize"
    assert "secret_key" not in repr(session)
    assert "0, 1, 2" not in repr(session)


def test_identify_with_dave() -> None:
    core = make(browser_like=False, max_dave_protocol_version=1)
    core.connected(0.0)
    core.receive_text(HELLO, 0.0)
    assert core.outgoing()[0]["d"]["max_dave_protocol_version"] == 1


def test_select_protocol_rejects_bad_input_and_wrong_state() -> None:
    core = make(browser_like=False)
    assert not core.select_protocol({"protocol": "udp"})  # not connected: nothing happens
    core.connected(0.0)
    core.receive_text(HELLO, 0.0)
    core.receive_text(udp_ready(["aead_xchacha20_poly1305_rtpsize"]), 0.0)
    with pytest.raises(ValueError, match="not offered"):
        core.select_protocol(
            {"protocol": "udp", "data": {"address": "a", "port": 1, "mode": "xsalsa20_poly1305"}}
        )
    with pytest.raises(ValueError, match="protocol"):
        core.select_protocol({"protocol": "webrtc", "data": "x"})
    with pytest.raises(ValueError, match="address, port and mode"):
        core.select_protocol({"protocol": "udp", "data": {}})
    assert state(core) is ConnState.SELECTING_PROTOCOL


def test_op4_with_unselected_mode_requests_close() -> None:
    core = make(browser_like=False)
    core.connected(0.0)
    core.receive_text(HELLO, 0.0)
    core.receive_text(udp_ready(), 0.0)
    core.select_protocol(
        {
            "protocol": "udp",
            "data": {"address": "a", "port": 1, "mode": "aead_xchacha20_poly1305_rtpsize"},
        }
    )
    core.events()
    core.receive_text(udp_session("aead_aes256_gcm_rtpsize"), 0.0)
    assert state(core) is ConnState.AWAITING_SESSION
    events = core.events()
    [error] = of_type(events, ProtocolError)
    assert "aead_aes256_gcm_rtpsize" in error.reason
    [request] = of_type(events, CloseRequested)
    assert request.code == 4016
    assert request.action is CloseAction.STOP
    assert core.close_request == request
    assert core.speaking(True) is False  # nothing more is sent on a socket being closed
    decision = core.closed(4016)
    assert decision.action is CloseAction.STOP
    assert "we selected" in decision.reason
    assert state(core) is ConnState.CLOSED


@pytest.mark.parametrize(
    "payload",
    [
        '{"op":4,"d":{"mode":"aead_xchacha20_poly1305_rtpsize","secret_key":[1,2,3]}}',
        '{"op":4,"d":{"mode":"aead_xchacha20_poly1305_rtpsize"}}',
        '{"op":4,"d":"x"}',
    ],
)
def test_invalid_op4_requests_close(payload: str) -> None:
    core = make(browser_like=False)
    core.connected(0.0)
    core.receive_text(HELLO, 0.0)
    core.receive_text(udp_ready(), 0.0)
    core.select_protocol(
        {
            "protocol": "udp",
            "data": {"address": "a", "port": 1, "mode": "aead_xchacha20_poly1305_rtpsize"},
        }
    )
    core.receive_text(payload, 0.0)
    assert core.stats.malformed == 1
    assert of_type(core.events(), CloseRequested)[0].action is CloseAction.STOP


@pytest.mark.parametrize(
    "payload",
    [
        '{"op":2,"d":{"ssrc":"713745","ip":"1.2.3.4","port":1,"modes":[]}}',
        '{"op":2,"d":{"ip":"1.2.3.4","port":1,"modes":[]}}',
        '{"op":2,"d":{"ssrc":1,"ip":"1.2.3.4","port":70000,"modes":[]}}',
        '{"op":2,"d":{"ssrc":1,"ip":"1.2.3.4","port":1,"modes":"aead"}}',
        '{"op":2,"d":"x"}',
        '{"op":2,"d":{"ssrc":true,"ip":"1.2.3.4","port":1,"modes":[]}}',
    ],
)
def test_invalid_ready_is_reported_and_closes(payload: str) -> None:
    core = make(browser_like=False)
    core.connected(0.0)
    core.receive_text(HELLO, 0.0)
    core.events()
    core.receive_text(payload, 0.0)
    assert state(core) is ConnState.AWAITING_READY
    assert core.ready is None
    assert core.stats.malformed == 1
    events = core.events()
    assert "op2" in of_type(events, ProtocolError)[0].reason
    assert of_type(events, CloseRequested)[0].code == 1002


# --- heartbeats ------------------------------------------------------------------------------


def test_v6_heartbeat_is_bare_nonce_and_ack_gives_rtt() -> None:
    core = make()
    core.connected(1000.0)
    assert core.next_deadline() is None
    core.receive_text(HELLO, 1000.0)
    assert core.next_deadline() == pytest.approx(1013.75)
    core.outgoing()
    core.tick(1013.0)  # not due yet
    assert core.outgoing() == []
    core.tick(1013.75)
    [beat] = core.outgoing_text()
    assert beat == '{"op":3,"d":1013750}'  # the capture's shape: a bare integer ms nonce
    assert core.next_deadline() == pytest.approx(1027.5)
    core.receive_text('{"op":6,"d":1013750}', 1013.8)
    [ack] = of_type(core.events(), HeartbeatAck)
    assert ack.rtt == pytest.approx(0.05)
    assert core.stats.last_rtt == pytest.approx(0.05)
    assert core.stats.heartbeat_acks == 1


def test_v8_heartbeat_carries_seq_ack() -> None:
    core = make(version=8, browser_like=False)
    core.connected(0.0)
    core.receive_text('{"op":8,"d":{"v":8,"heartbeat_interval":1000},"seq":null}', 0.0)
    assert core.seq_ack == -1
    core.receive_text('{"op":11,"d":{"user_ids":["1"]},"seq":3}', 0.5)
    assert core.seq_ack == 3
    core.outgoing()
    core.tick(1.0)
    assert core.outgoing_text() == ['{"op":3,"d":{"t":1000,"seq_ack":3}}']
    core.receive_text('{"op":6,"d":{"t":1000}}', 1.01)
    assert of_type(core.events(), HeartbeatAck)[0].rtt == pytest.approx(0.01)


def test_missed_ack_is_a_dead_link() -> None:
    core = make()
    to_ready_udp(core)
    core.events()
    core.tick(13.75)
    core.tick(27.5)  # the first heartbeat was never answered
    events = core.events()
    assert of_type(events, HeartbeatTimeout) == [HeartbeatTimeout(1, 13.75)]
    [request] = of_type(events, CloseRequested)
    assert request.action is CloseAction.RESUME
    assert request.code == 4000
    assert core.next_deadline() is None  # no heartbeats on a link being dropped
    assert core.stats.heartbeat_timeouts == 1
    assert core.outgoing()[-1]["op"] == 3  # only the first heartbeat went out
    decision = core.closed(4000)
    assert decision.action is CloseAction.RESUME
    assert state(core) is ConnState.DISCONNECTED


def test_max_missed_acks_tolerates_one_late_ack() -> None:
    core = make(max_missed_acks=2)
    to_ready_udp(core)
    core.outgoing()
    core.tick(13.75)
    core.tick(27.5)  # one unanswered: still alive, send another
    assert [m["op"] for m in core.outgoing()] == [3, 3]
    core.receive_text('{"op":6,"d":27500}', 27.6)  # answers both
    core.tick(41.25)
    assert not of_type(core.events(), HeartbeatTimeout)
    assert [m["op"] for m in core.outgoing()] == [3]


def test_stale_and_nonceless_acks() -> None:
    core = make()
    to_ready_udp(core)
    core.tick(13.75)
    core.receive_text('{"op":6,"d":12345}', 13.8)  # a nonce we never sent
    assert core.stats.stale_acks == 1
    assert not of_type(core.events(), HeartbeatAck)
    core.receive_text('{"op":6,"d":null}', 13.9)  # no nonce: still proves liveness
    assert of_type(core.events(), HeartbeatAck) == [HeartbeatAck(None)]
    core.tick(27.5)
    assert not of_type(core.events(), HeartbeatTimeout)


def test_heartbeat_after_stall_does_not_burst() -> None:
    core = make()
    to_ready_udp(core)
    core.outgoing()
    core.tick(100.0)  # seven intervals late
    assert len(core.outgoing()) == 1
    assert core.next_deadline() == pytest.approx(113.75)


def test_nonces_strictly_increase() -> None:
    core = make(max_missed_acks=5)
    core.connected(0.0)
    core.receive_text('{"op":8,"d":{"heartbeat_interval":0.5}}', 0.0)
    for _ in range(3):
        deadline = core.next_deadline()
        assert deadline is not None
        core.tick(deadline)
    nonces = [m["d"] for m in core.outgoing() if m["op"] == 3]
    assert len(nonces) == 3
    assert nonces == sorted(set(nonces))


# --- resume and close codes ------------------------------------------------------------------


def test_resume_v8_with_seq_ack() -> None:
    core = make(version=8, browser_like=False)
    core.connected(0.0)
    core.receive_text('{"op":8,"d":{"heartbeat_interval":1000},"seq":1}', 0.0)
    core.receive_text(udp_ready(), 0.0)
    core.select_protocol(
        {
            "protocol": "udp",
            "data": {"address": "a", "port": 1, "mode": "aead_xchacha20_poly1305_rtpsize"},
        }
    )
    core.receive(json.loads(udp_session()) | {"seq": 7}, 0.0)
    assert state(core) is ConnState.READY
    decision = core.closed(None)
    assert decision.action is CloseAction.RESUME
    assert state(core) is ConnState.DISCONNECTED
    core.outgoing()
    core.connected(5.0, resume=True)
    core.receive_text('{"op":8,"d":{"heartbeat_interval":1000}}', 5.0)
    assert core.outgoing() == [
        {
            "op": 7,
            "d": {"server_id": SERVER_ID, "session_id": SESSION_ID, "token": TOKEN, "seq_ack": 7},
        }
    ]
    assert state(core) is ConnState.RESUMING
    core.receive_text('{"op":9,"d":null,"seq":8}', 5.1)
    assert state(core) is ConnState.READY
    assert of_type(core.events(), Resumed) == [Resumed()]
    assert core.session is not None  # the session description survives the resume
    assert core.seq_ack == 8


def test_resume_v6_has_no_seq_ack_and_v8_sends_minus_one() -> None:
    core6 = make()
    to_ready_udp(core6)
    core6.closed(4015)
    core6.outgoing()
    core6.connected(1.0, resume=True)
    core6.receive_text(HELLO, 1.0)
    assert "seq_ack" not in core6.outgoing()[0]["d"]

    core8 = make(version=8)
    to_ready_udp(core8)
    core8.closed(1006)
    core8.outgoing()
    core8.connected(1.0, resume=True)
    core8.receive_text(HELLO, 1.0)
    assert core8.outgoing()[0]["d"]["seq_ack"] == -1


def test_resume_without_session_identifies() -> None:
    core = make()
    core.connected(0.0)
    core.receive_text(HELLO, 0.0)
    decision = core.closed(None)  # dropped before READY: nothing to resume
    assert decision.action is CloseAction.NEW_SESSION
    core.outgoing()
    core.connected(1.0, resume=True)
    core.receive_text(HELLO, 1.0)
    assert core.outgoing()[0]["op"] == 0


def test_server_without_resume_starts_new_sessions() -> None:
    core = make(resume_supported=False)
    to_ready_udp(core)
    assert core.closed(4015).action is CloseAction.NEW_SESSION


def send_resume(core: VoiceGatewayCore, now: float) -> None:
    """From READY: the link drops, the core reconnects and sends op7."""
    assert core.closed(None).action is CloseAction.RESUME
    core.outgoing()
    core.connected(now, resume=True)
    core.receive_text(HELLO, now)
    assert [m["op"] for m in core.outgoing()] == [7]
    assert state(core) is ConnState.RESUMING


def test_resume_answered_with_4003_identifies_afresh_and_never_resumes_again() -> None:
    # Spacebar has no op7: anything before identify, a resume included, is closed with 4003.
    core = make()
    to_ready_udp(core)
    send_resume(core, 1.0)
    decision = core.closed(4003)
    assert decision.action is CloseAction.NEW_SESSION  # not STOP: it is the server's answer
    assert decision.resume_refused
    assert "4003" in decision.reason
    assert core.resume_supported is False
    assert state(core) is ConnState.DISCONNECTED
    assert core.ready is None  # the old session is forgotten
    core.connected(1.1, resume=True)  # the shell's request to resume is overridden
    core.receive_text(HELLO, 1.1)
    assert [m["op"] for m in core.outgoing()] == [0]
    assert state(core) is ConnState.AWAITING_READY
    # The next drop goes straight to a fresh identify: op7 is never sent again.
    core.closed(None)
    to_ready_udp(core, 2.0)
    assert core.closed(None).action is CloseAction.NEW_SESSION
    core.outgoing()
    core.connected(3.0, resume=True)
    core.receive_text(HELLO, 3.0)
    assert [m["op"] for m in core.outgoing()] == [0]
    assert core.stats.resumes == 1


def test_resume_answered_with_4006_identifies_afresh_and_may_resume_later() -> None:
    # Discord's answer to a resume of an expired session: identify now, but the server resumes.
    core = make()
    to_ready_udp(core)
    send_resume(core, 1.0)
    decision = core.closed(4006)
    assert decision.action is CloseAction.NEW_SESSION
    assert not decision.resume_refused
    assert core.resume_supported is True
    to_ready_udp(core, 2.0)
    send_resume(core, 3.0)
    assert core.stats.resumes == 2


def test_4003_outside_a_resume_is_still_our_bug() -> None:
    core = make()
    to_ready_udp(core)
    decision = core.closed(4003)
    assert decision.action is CloseAction.STOP
    assert not decision.resume_refused
    assert core.resume_supported is True
    assert close_policy(4003, resuming=True).action is CloseAction.NEW_SESSION
    assert close_policy(4003).action is CloseAction.STOP


def test_new_session_after_4006_identifies_and_resets_seq() -> None:
    core = make(version=8)
    to_ready_udp(core)
    core.receive_text('{"op":5,"d":{"user_id":"1","ssrc":9,"speaking":1},"seq":4}', 1.0)
    decision = core.closed(4006)
    assert decision.action is CloseAction.NEW_SESSION
    assert core.seq_ack == -1
    assert core.ready is None
    core.outgoing()
    core.connected(2.0, resume=True)  # a stale request to resume is overridden
    core.receive_text(HELLO, 2.0)
    assert core.outgoing()[0]["op"] == 0


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (None, CloseAction.RESUME),
        (1006, CloseAction.RESUME),
        (1001, CloseAction.RESUME),
        (1009, CloseAction.STOP),  # a message over our size limit: a resume would replay it
        (4015, CloseAction.RESUME),
        (4006, CloseAction.NEW_SESSION),
        (4009, CloseAction.NEW_SESSION),
        (4014, CloseAction.AWAIT_MOVE),
        (1000, CloseAction.STOP),
        (4001, CloseAction.STOP),
        (4002, CloseAction.STOP),
        (4003, CloseAction.STOP),
        (4004, CloseAction.STOP),
        (4005, CloseAction.STOP),
        (4011, CloseAction.STOP),
        (4012, CloseAction.STOP),
        (4016, CloseAction.STOP),
        (4017, CloseAction.STOP),
        (4020, CloseAction.STOP),
        (4021, CloseAction.STOP),
        (4022, CloseAction.STOP),
        (4999, CloseAction.STOP),
    ],
)
def test_close_table(code: int | None, action: CloseAction) -> None:
    decision = close_policy(code)
    assert decision.action is action
    assert decision.reason
    if action is CloseAction.STOP and code != 1000:
        assert decision.user_message
        error = decision.error()
        assert isinstance(error, VoiceClosed)
        assert error.code == code
        assert decision.reason in str(error)


def test_close_table_covers_every_documented_code() -> None:
    documented = {4001, 4002, 4003, 4004, 4005, 4006, 4009, 4011, 4012, 4014, 4015}
    documented |= {4016, 4017, 4020, 4021, 4022, 1000, 1009}
    assert documented == set(CLOSE_TABLE)


def test_closed_moves_state() -> None:
    core = make()
    to_ready_udp(core)
    assert core.closed(4014).action is CloseAction.AWAIT_MOVE
    assert core.last_decision is not None
    assert core.last_decision.code == 4014
    assert state(core) is ConnState.DISCONNECTED
    core.new_server("newtoken", session_id="s2")
    core.outgoing()
    core.connected(1.0, resume=True)
    core.receive_text(HELLO, 1.0)
    [identify] = core.outgoing()
    assert identify["op"] == 0
    assert identify["d"]["token"] == "newtoken"
    assert identify["d"]["session_id"] == "s2"
    assert core.closed(4004).action is CloseAction.STOP
    assert state(core) is ConnState.CLOSED
    with pytest.raises(InvalidTransition):
        core.connected(2.0)


def test_leaving_is_closed_and_final() -> None:
    core = make()
    to_ready_udp(core)
    core.close()
    assert state(core) is ConnState.CLOSED
    assert core.next_deadline() is None
    assert core.closed(1000).action is CloseAction.STOP
    assert state(core) is ConnState.CLOSED


# --- speaking, op12, events from other clients ------------------------------------------------


def test_speaking_payloads_match_capture() -> None:
    core = make(transport_name="webrtc")
    core.connected(0.0)
    core.receive_text(HELLO, 0.0)
    core.receive_text(READY, 0.0)
    core.outgoing()
    assert core.speaking(True, 1331704490)
    assert not core.speaking(True, 1331704490)  # no change, nothing sent
    assert core.speaking(False, 1331704490)
    assert core.outgoing_text() == [
        '{"op":5,"d":{"speaking":1,"delay":5,"ssrc":1331704490}}',
        '{"op":5,"d":{"speaking":0,"delay":5,"ssrc":1331704490}}',
    ]


def test_speaking_bot_style_defaults_to_ready_ssrc() -> None:
    core = make(browser_like=False)
    assert not core.speaking(True)  # not connected
    to_ready_udp(core)
    core.outgoing()
    assert core.speaking(True, flags=5)
    assert core.outgoing() == [{"op": 5, "d": {"speaking": 5, "delay": 0, "ssrc": 42}}]
    core.closed(None)
    core.connected(1.0, resume=True)
    core.receive_text(HELLO, 1.0)
    core.receive_text('{"op":9,"d":null}', 1.0)
    core.outgoing()
    assert core.speaking(True)  # re-sent after a reconnect
    assert core.announce_streams(42)
    assert core.outgoing()[1] == {
        "op": 12,
        "d": {"audio_ssrc": 42, "video_ssrc": 0, "rtx_ssrc": 0, "streams": []},
    }


def test_other_clients_events() -> None:
    core = make()
    to_ready_udp(core)
    core.events()
    for text in [
        '{"op":11,"d":{"user_ids":["7","8"]}}',
        '{"op":5,"d":{"user_id":"7","ssrc":77,"speaking":1}}',
        '{"op":12,"d":{"user_id":"8","audio_ssrc":88,"video_ssrc":0,"rtx_ssrc":0}}',
        '{"op":13,"d":{"user_id":"7"}}',
        '{"op":18,"d":{"user_id":"8","flags":2}}',
        '{"op":20,"d":{"user_id":"8","platform":0}}',
        '{"op":14,"d":{"audio_codec":"opus"}}',
        '{"op":21,"d":{"transition_id":1,"protocol_version":0}}',
        '{"op":99,"d":{}}',
    ]:
        core.receive_text(text, 1.0)
    events = core.events()
    assert events[0] == ClientsConnected(("7", "8"))
    assert events[1] == SpeakingSeen("7", 77, 1)
    assert isinstance(events[2], StreamsSeen)
    assert (events[2].user_id, events[2].audio_ssrc) == ("8", 88)
    assert events[3] == ClientDisconnected("7")
    assert events[4] == ClientFlags("8", 2)
    assert events[5] == ClientPlatform("8", 0)
    assert events[6] == SessionUpdate({"audio_codec": "opus"})
    assert events[7] == DaveMessage(21, {"transition_id": 1, "protocol_version": 0})
    assert events[8] == Unknown(99, {})
    assert core.ssrc_users == {88: "8"}
    assert core.stats.unknown_ops == 1


def test_ssrc_users_are_bounded_least_recent_first() -> None:
    # A hostile server announcing ever new SSRCs (op5 and op12) must not grow memory forever.
    core = make()
    to_ready_udp(core)
    core.receive_text('{"op":5,"d":{"user_id":"1","ssrc":1,"speaking":1}}', 1.0)
    for n in range(2, MAX_SSRC_USERS + 1):
        core.receive_text(
            f'{{"op":12,"d":{{"user_id":"{n}","audio_ssrc":{n},"video_ssrc":0}}}}', 1.0
        )
    core.receive_text('{"op":5,"d":{"user_id":"1","ssrc":1,"speaking":0}}', 1.0)  # seen again
    assert len(core.ssrc_users) == MAX_SSRC_USERS
    assert core.stats.ssrc_users_evicted == 0
    for n in range(MAX_SSRC_USERS + 1, MAX_SSRC_USERS + 11):
        core.receive_text(f'{{"op":5,"d":{{"user_id":"{n}","ssrc":{n},"speaking":1}}}}', 1.0)
    assert len(core.ssrc_users) == MAX_SSRC_USERS
    assert core.stats.ssrc_users_evicted == 10
    assert core.ssrc_users[1] == "1"  # refreshed by its second op5, so it outlived 2..11
    assert all(n not in core.ssrc_users for n in range(2, 12))
    assert core.ssrc_users[12] == "12"
    assert core.ssrc_users[MAX_SSRC_USERS + 10] == str(MAX_SSRC_USERS + 10)
    assert core.stats.malformed == 0


def test_binary_messages() -> None:
    core = make(version=8)
    to_ready_udp(core)
    core.events()
    core.receive_binary(b"\x00\x09\x19external-sender", 1.0)
    core.receive_binary(b"\x00\x0a\x63", 1.0)
    core.receive_binary(b"\x00", 1.0)
    assert core.seq_ack == 10
    events = core.events()
    assert events[0] == DaveBinary(25, b"external-sender")
    assert events[1] == Unknown(0x63, b"")
    assert isinstance(events[2], ProtocolError)
    assert core.send_binary(26, b"keypackage")
    assert core.outgoing_binary() == [b"\x1akeypackage"]
    assert core.send(23, {"transition_id": 1})
    assert core.outgoing()[-1] == {"op": 23, "d": {"transition_id": 1}}


def test_unexpected_ops_are_counted_not_fatal() -> None:
    core = make()
    to_ready_udp(core)
    core.receive_text(udp_ready(), 1.0)  # a second Ready
    core.receive_text('{"op":9,"d":null}', 1.0)  # Resumed without a resume
    assert core.stats.protocol_errors == 2
    assert state(core) is ConnState.READY


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1,2]",
        '"op"',
        '{"d":{}}',
        '{"op":"8","d":{}}',
        '{"op":true,"d":{}}',
        '{"op":8,"d":"x"}',
        '{"op":8,"d":{"heartbeat_interval":-1}}',
        '{"op":8,"d":{"heartbeat_interval":1e400}}',
        '{"op":8,"d":{"heartbeat_interval":NaN}}',
        '{"op":5,"d":{"ssrc":"1","speaking":1}}',
        '{"op":6,"d":"nonce"}',
        '{"op":11,"d":{"user_ids":"1"}}',
        '{"op":13,"d":{}}',
        '{"op":15,"d":{"any":"high"}}',
        '{"op":16,"d":{"voice":3}}',
    ],
)
def test_malformed_is_counted(text: str) -> None:
    core = make()
    core.connected(0.0)
    core.receive_text(text, 0.0)
    assert core.stats.malformed == 1
    assert core.stats.messages_received == 1
    assert of_type(core.events(), ProtocolError)


# --- redaction, state table ------------------------------------------------------------------


def test_redact_hides_secrets() -> None:
    message: dict[str, Any] = {
        "op": 0,
        "d": {
            "token": TOKEN,
            "session_id": SESSION_ID,
            "secret_key": KEY,
            "sdp": "a=ice-ufrag:x\na=ice-pwd:hunter2\n",
            "user_id": USER_ID,
        },
    }
    text = dumps(redact(message))
    assert TOKEN not in text
    assert SESSION_ID not in text
    assert "hunter2" not in text
    assert "[0,1,2" not in text
    assert USER_ID in text
    assert message["d"]["token"] == TOKEN  # the original is untouched


def test_debug_logs_never_carry_secrets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="legato.voice")
    core = make()
    to_ready_udp(core)
    core.closed(4004)
    assert "send" in caplog.text
    assert "recv" in caplog.text
    assert TOKEN not in caplog.text
    assert SESSION_ID not in caplog.text
    assert "0, 1, 2, 3" not in caplog.text
    assert "[0,1,2,3" not in caplog.text


def test_state_table_shape() -> None:
    assert set(TRANSITIONS) == set(ConnState)
    assert TRANSITIONS[ConnState.CLOSED] == frozenset()
    for state in ConnState:
        if state is not ConnState.CLOSED:
            assert ConnState.CLOSED in TRANSITIONS[state]
    assert ConnState.READY not in TRANSITIONS[ConnState.DISCONNECTED]


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="transport"):
        make(transport_name="tcp")
    with pytest.raises(ValueError, match="below 4"):
        make(version=3)
    with pytest.raises(ValueError, match="max_missed_acks"):
        make(max_missed_acks=0)
