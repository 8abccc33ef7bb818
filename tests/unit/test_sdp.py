"""SDP fragments of the ``webrtc`` transport against real aiortc offers and the seed capture."""

from __future__ import annotations

import pytest
from aiortc import RTCPeerConnection, RTCRtpSender
from aiortc.sdp import SessionDescription

from legato.sandbox.sdp import build_remote_offer
from legato.voice import sdp
from legato.voice.transport.webrtc import remap_opus_payload_type

# op1 and op4 exactly as the seed capture (seed/000_*.txt, "Voice Gateway") shows them.
SEED_OP1_FRAGMENT = (
    "a=ice-options:trickle\na=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\n"
    "a=extmap:2/recvonly urn:ietf:params:rtp-hdrext:csrc-audio-level\n"
    "a=extmap:3 urn:ietf:params:rtp-hdrext:sdes:mid\n"
    "a=ice-pwd:9473594540563294f62301e5dc183472\na=ice-ufrag:925273d0\n"
    "a=rtpmap:109 opus/48000/2\n"
    "a=extmap:4 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time\n"
    "a=extmap:5 urn:ietf:params:rtp-hdrext:toffset\n"
    "a=extmap:6/recvonly http://www.webrtc.org/experiments/rtp-hdrext/playout-delay\n"
    "a=extmap:7 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\n"
    "a=rtpmap:120 VP8/90000\na=rtpmap:124 rtx/90000"
)
SEED_OP1_CODECS = [
    {
        "name": "opus",
        "type": "audio",
        "priority": 1000,
        "payload_type": 109,
        "rtx_payload_type": None,
    },
    {
        "name": "H264",
        "type": "video",
        "priority": 1000,
        "payload_type": 126,
        "rtx_payload_type": 127,
    },
    {
        "name": "VP8",
        "type": "video",
        "priority": 2000,
        "payload_type": 120,
        "rtx_payload_type": 124,
    },
    {
        "name": "VP9",
        "type": "video",
        "priority": 3000,
        "payload_type": 121,
        "rtx_payload_type": 125,
    },
]
SEED_FINGERPRINT = (
    "4A:79:94:16:44:3F:BD:05:41:5A:C7:20:F3:12:54:70:"
    "00:73:5D:33:00:2D:2C:80:9B:39:E1:9F:2D:A7:49:87"
)
SEED_OP4_SDP = (
    "m=audio 50001 ICE/SDP\n"
    f"a=fingerprint:sha-256 {SEED_FINGERPRINT}\n"
    "c=IN IP4 213.163.95.84\na=rtcp:50001\na=ice-ufrag:tK/L\na=ice-pwd:g40S9IK0OQ8GOTCorkDZDR\n"
    f"a=fingerprint:sha-256 {SEED_FINGERPRINT}\n"
    "a=candidate:1 1 UDP 4261412862 213.163.95.84 50001 typ host\n"
)


async def aiortc_offer(payload_type: int = 111) -> tuple[str, RTCPeerConnection]:
    """A real aiortc offer for one sendonly Opus transceiver, remapped as the transport does."""
    pc = RTCPeerConnection()
    transceiver = pc.addTransceiver("audio", direction="sendonly")
    opus = [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.name == "opus"]
    transceiver.setCodecPreferences(opus)
    offer = await pc.createOffer()
    return remap_opus_payload_type(offer.sdp, payload_type), pc


def lines_of(text: str) -> list[str]:
    return [line for line in text.replace("\r\n", "\n").split("\n") if line]


async def test_fragment_of_a_real_aiortc_offer_has_exactly_the_protocol_lines() -> None:
    offer, pc = await aiortc_offer()
    try:
        fragment = sdp.OfferFragment.from_offer(offer, [111]).render()
    finally:
        await pc.close()
    offer_lines = lines_of(offer)
    lines = lines_of(fragment)
    extmaps = [line for line in offer_lines if line.startswith("a=extmap:")]
    fingerprint = next(line for line in offer_lines if line.startswith("a=fingerprint:sha-256 "))
    assert extmaps, "aiortc's offer should carry header extensions"
    expected = [
        next(line for line in offer_lines if line.startswith("a=ice-ufrag:")),
        next(line for line in offer_lines if line.startswith("a=ice-pwd:")),
        fingerprint,
        *extmaps,
        "a=rtpmap:111 opus/48000/2",
    ]
    assert lines == expected
    # aiortc offers sha-256, sha-384 and sha-512 fingerprints; op1 carries the sha-256 one only.
    assert sum(line.startswith("a=fingerprint:") for line in offer_lines) == 3
    assert not any(
        line.startswith(("m=", "c=", "a=candidate", "a=fingerprint:sha-5")) for line in lines
    )
    assert "96" not in fragment.replace(fingerprint, "")


async def test_remapped_offer_never_uses_payload_type_96() -> None:
    offer, pc = await aiortc_offer(120)
    await pc.close()
    audio = SessionDescription.parse(offer).media[0]
    assert audio.fmt == [120]
    assert [c.payloadType for c in audio.rtp.codecs] == [120]
    assert not [
        line
        for line in lines_of(offer)
        if line.startswith(("a=rtpmap:96 ", "a=fmtp:96 ", "a=rtcp-fb:96 "))
    ]
    assert "a=rtpmap:120 opus/48000/2" in lines_of(offer)


async def test_answer_built_from_the_seed_op4_is_a_valid_sdp_with_the_offered_pt() -> None:
    offer, pc = await aiortc_offer(111)
    await pc.close()
    offer_mid = SessionDescription.parse(offer).media[0].rtp.muxId
    server = sdp.ServerFragment.parse(SEED_OP4_SDP)
    answer = sdp.build_answer(offer, server, opus_payload_type=111)

    parsed = SessionDescription.parse(answer)
    assert parsed.version == 0
    assert parsed.name == "-"
    assert parsed.time == "0 0"
    assert [(g.semantic, g.items) for g in parsed.group] == [("BUNDLE", [offer_mid])]
    (media,) = parsed.media
    assert media.ice is not None
    assert media.dtls is not None
    assert (media.kind, media.port, media.profile, media.fmt) == (
        "audio",
        50001,
        "UDP/TLS/RTP/SAVPF",
        [111],
    )
    assert media.rtp.muxId == offer_mid
    assert media.host == "213.163.95.84"
    assert media.rtcp_mux
    assert media.direction == "recvonly"
    assert [(c.mimeType, c.payloadType, c.clockRate, c.channels) for c in media.rtp.codecs] == [
        ("audio/opus", 111, 48000, 2)
    ]
    assert (media.ice.usernameFragment, media.ice.password) == ("tK/L", "g40S9IK0OQ8GOTCorkDZDR")
    assert media.dtls.role == "server"  # a=setup:passive: the voice server is the DTLS server
    assert [(f.algorithm, f.value) for f in media.dtls.fingerprints] == [
        ("sha-256", SEED_FINGERPRINT)
    ]
    (candidate,) = media.ice_candidates
    assert (candidate.ip, candidate.port, candidate.type, candidate.priority) == (
        "213.163.95.84",
        50001,
        "host",
        4261412862,
    )
    assert media.ice_candidates_complete
    assert " 96" not in answer


def test_seed_op1_fragment_parses_and_becomes_an_offer_aiortc_reads() -> None:
    seed = sdp.OfferFragment.parse(SEED_OP1_FRAGMENT)
    # Firefox wrote its fingerprint at session level, so the capture's fragment has none. An
    # offer for a WebRTC stack needs one: the sandbox's peer puts a placeholder in and leaves the
    # client's certificate unchecked, as Discord did (legato.sandbox.webrtc).
    assert seed.fingerprint is None
    with pytest.raises(sdp.SdpError, match="fingerprint"):
        build_remote_offer(seed, opus_payload_type=109)
    fragment = sdp.OfferFragment.parse(
        f"{SEED_OP1_FRAGMENT}\na=fingerprint:sha-256 {SEED_FINGERPRINT}"
    )
    assert (fragment.ice_ufrag, fragment.ice_pwd) == (
        "925273d0",
        "9473594540563294f62301e5dc183472",
    )
    assert len(fragment.extmaps) == 7
    pt = sdp.opus_payload_type(SEED_OP1_CODECS)
    assert pt == 109

    offer = SessionDescription.parse(build_remote_offer(fragment, opus_payload_type=pt))
    (media,) = offer.media
    assert media.ice is not None
    assert media.dtls is not None
    assert media.fmt == [109]
    assert media.direction == "sendonly"
    assert media.dtls.role == "client"  # a=setup:active: the voice client is the DTLS client
    assert media.ice_candidates == []
    assert not media.ice_candidates_complete  # peer-reflexive candidates may still come
    assert (media.ice.usernameFragment, media.ice.password) == (
        fragment.ice_ufrag,
        fragment.ice_pwd,
    )
    assert [(f.algorithm, f.value) for f in media.dtls.fingerprints] == [
        ("sha-256", SEED_FINGERPRINT)
    ]
    assert media.rtp.headerExtensions[1].uri == "urn:ietf:params:rtp-hdrext:csrc-audio-level"


def test_server_fragment_round_trips_in_the_capture_layout() -> None:
    server = sdp.ServerFragment.parse(SEED_OP4_SDP)
    assert server.port == 50001
    assert server.fingerprint == SEED_FINGERPRINT
    text = server.render()
    assert text == SEED_OP4_SDP  # byte for byte: both fingerprint lines, the trailing newline
    assert sdp.ServerFragment.parse(text) == server


def test_payload_type_96_is_refused() -> None:
    with pytest.raises(sdp.SdpError):
        sdp.opus_codec(96)
    with pytest.raises(sdp.SdpError):
        sdp.opus_payload_type([{"name": "opus", "type": "audio", "payload_type": 96}])
    assert sdp.opus_codec()["payload_type"] == 111


async def test_answer_refuses_a_payload_type_the_offer_did_not_map_to_opus() -> None:
    offer, pc = await aiortc_offer(111)
    await pc.close()
    with pytest.raises(sdp.SdpError, match="payload type 109"):
        sdp.build_answer(offer, sdp.ServerFragment.parse(SEED_OP4_SDP), opus_payload_type=109)


@pytest.mark.parametrize(
    "fragment",
    ["a=ice-pwd:x\na=fingerprint:sha-256 AA", "a=ice-ufrag:u\na=fingerprint:sha-256 AA"],
)
def test_incomplete_offer_fragments_are_refused(fragment: str) -> None:
    with pytest.raises(sdp.SdpError):
        sdp.OfferFragment.parse(fragment)
