"""What kind of voice server the sandbox plays: Discord's (the default) or a self-hosted Spacebar.

A :class:`VoiceProfile` lists, as data, where a server differs from Discord's voice servers;
:class:`~legato.sandbox.voice.SandboxVoiceServer` reads it (``profile="spacebar"``) and enforces
each difference. The Spacebar profile follows spacebarchat/server ``src/webrtc/`` and what
PROTOCOL.md records from running it ("Spacebar quirks", "Facts from running real peers"); where
Spacebar is lenient the sandbox may be stricter, never kinder (it still closes 4001 on an
unknown op and 4002 on bad JSON or a binary frame, which Spacebar logs and ignores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["DISCORD", "PROFILES", "SPACEBAR", "ProfileName", "VoiceProfile", "voice_profile"]

ProfileName = Literal["discord", "spacebar"]


@dataclass(frozen=True, slots=True)
class VoiceProfile:
    """Where a voice server departs from Discord's.

    Attributes:
        name: ``"discord"`` or ``"spacebar"``.
        version: Every connection is spoken to in this gateway version, whatever ``?v=`` says
            (no ``seq``, and a heartbeat object closes 4002 below 8); None honours ``?v=``.
        hello_version: op8 Hello carries ``v`` (Spacebar's has ``heartbeat_interval`` only).
        resume: op7 Resume is known. Without it, as in every server that checks
            authentication first, op7 is closed with 4003 like any op before identify.
        identify_first: Any op but op0 before identify is closed with 4003 before the op is
            even looked up (Spacebar's ``onMessage``); heartbeats included.
        udp: The ``udp`` transport is offered; without it op1 ``udp`` is closed with
            :attr:`udp_close_code`.
        udp_close_code: The close for op1 ``udp`` when :attr:`udp` is False (Spacebar: 4000,
            "only webrtc protocol supported currently").
        op1_reads_sdp_only: op1 ``webrtc`` is read from the top-level ``sdp`` field only; an op1
            without it gets no op4 (Spacebar's schema check throws, is logged, and nothing is
            answered), counted in ``ServerStats.ignored_payloads``.
        streams_after_dtls: op12 is answered (op15, relayed to the others, and the SSRC's media
            published to the recording) only once DTLS is connected; an op12 that DTLS does not
            follow within this many seconds is dropped. None: op12 is taken at once and op15
            goes with op4, as Discord does.
        dtls_key_type: The key of the DTLS certificate: ``"ecdsa"`` (aiortc's default, one per
            peer) or ``"rsa"`` (medooze's: one RSA 2048 certificate for the whole server, so
            only clients offering ECDHE-RSA suites connect).
        tls: ``wss://`` is served, by default (Discord's servers are TLS whatever their port).
            Spacebar hands out ``host:port`` and speaks ``ws://``.
        dave: DAVE is run and required, by default (Discord closes voice without it with
            4017). Spacebar has none.
        clients_connect_object: op11 is ``{"user_ids": {}}`` (an object, not a list of ids),
            sent to every user after op2, as Spacebar does.
        session_description_dave: op4 carries ``dave_protocol_version``.
    """

    name: ProfileName
    version: int | None = None
    hello_version: bool = True
    resume: bool = True
    identify_first: bool = False
    udp: bool = True
    udp_close_code: int = 4000
    op1_reads_sdp_only: bool = False
    streams_after_dtls: float | None = None
    dtls_key_type: Literal["ecdsa", "rsa"] = "ecdsa"
    tls: bool = True
    dave: bool = True
    clients_connect_object: bool = False
    session_description_dave: bool = True


DISCORD: Final = VoiceProfile("discord")

#: PROTOCOL.md: "it drops an op12 that arrives more than about 3 s before [DTLS is connected]".
SPACEBAR_STREAMS_WINDOW: Final = 3.0

SPACEBAR: Final = VoiceProfile(
    "spacebar",
    version=6,
    hello_version=False,
    resume=False,
    identify_first=True,
    udp=False,
    op1_reads_sdp_only=True,
    streams_after_dtls=SPACEBAR_STREAMS_WINDOW,
    dtls_key_type="rsa",
    tls=False,
    dave=False,
    clients_connect_object=True,
    session_description_dave=False,
)

PROFILES: Final[dict[str, VoiceProfile]] = {p.name: p for p in (DISCORD, SPACEBAR)}


def voice_profile(profile: str | VoiceProfile) -> VoiceProfile:
    """The profile named ``profile`` (or ``profile`` itself).

    Raises:
        ValueError: no profile has that name.
    """
    if isinstance(profile, VoiceProfile):
        return profile
    found = PROFILES.get(profile)
    if found is None:
        raise ValueError(f"unknown sandbox profile {profile!r} (known: {', '.join(PROFILES)})")
    return found
