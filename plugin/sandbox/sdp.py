"""The voice server's half of the ``webrtc`` transport's SDP: a full offer from op1's fragment.

The fragments and the client's side are :mod:`legato.voice.sdp`'s; the sandbox's WebRTC peer
(:mod:`legato.sandbox.webrtc`) hands its stack the offer built here. Plain text, no I/O.
"""

from __future__ import annotations

from legato.voice.sdp import OfferFragment, SdpError

__all__ = ["build_remote_offer"]


def build_remote_offer(fragment: OfferFragment, *, opus_payload_type: int, mid: str = "0") -> str:
    """A full offer built from op1's fragment, for the server's WebRTC stack.

    The client sends audio (``a=sendonly``) and is the DTLS client (``a=setup:active``), so the
    stack answering it becomes the DTLS server. There are no candidates: the client's checks
    reveal its address (peer-reflexive candidates, RFC 8445 section 7.3.1.3).

    Raises:
        SdpError: the fragment has no fingerprint (DTLS could not authenticate the client) or
            maps something else than Opus on ``opus_payload_type``.
    """
    if fragment.fingerprint is None:
        raise SdpError("the fragment has no sha-256 fingerprint")
    encodings = dict(fragment.rtpmaps)
    encoding = encodings.get(opus_payload_type, "opus/48000/2")
    if not encoding.lower().startswith("opus/"):
        raise SdpError(f"payload type {opus_payload_type} is {encoding}, not opus")
    lines = [
        "v=0",
        "o=- 0 0 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        f"a=group:BUNDLE {mid}",
        f"m=audio 9 UDP/TLS/RTP/SAVPF {opus_payload_type}",
        "c=IN IP4 0.0.0.0",
        "a=rtcp:9 IN IP4 0.0.0.0",
        f"a=ice-ufrag:{fragment.ice_ufrag}",
        f"a=ice-pwd:{fragment.ice_pwd}",
        f"a=fingerprint:sha-256 {fragment.fingerprint}",
        "a=setup:active",
        f"a=mid:{mid}",
    ]
    lines += [f"a=extmap:{value}" for value in fragment.extmaps]
    lines += [
        "a=sendonly",
        "a=rtcp-mux",
        f"a=rtpmap:{opus_payload_type} {encoding}",
        f"a=fmtp:{opus_payload_type} minptime=10;useinbandfec=1",
    ]
    return "\r\n".join(lines) + "\r\n"
