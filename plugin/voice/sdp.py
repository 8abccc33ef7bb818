"""SDP fragments of the voice gateway's ``webrtc`` transport, as plain text (no I/O, no aiortc).

Discord's browser client never sends a full SDP offer. op1 carries a *fragment* of it: the ICE
credentials, one sha-256 fingerprint, every ``a=extmap`` and the ``a=rtpmap`` of the offered
codecs (no ``m=``, ``c=`` or candidates), in both ``data`` and ``sdp``. op4 answers with another
fragment (``m=audio PORT ICE/SDP``, fingerprint, ``c=``, ``a=rtcp``, ICE credentials and one host
candidate) from which the client builds the full answer itself. See PROTOCOL.md, "Transport
webrtc", and the capture in ``seed/``.

The server side (the sandbox) does the reverse: :func:`legato.sandbox.sdp.build_remote_offer`
turns an op1 fragment into an offer a WebRTC stack accepts, and :meth:`ServerFragment.from_answer`
cuts the op4 fragment out of that stack's answer (each fragment type parses and renders itself,
for both sides).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypedDict

#: Payload type 96 is reserved for probes on Discord's servers; never offer Opus on it.
RESERVED_PAYLOAD_TYPE: Final = 96
#: Chrome's Opus payload type; the others seen are 109 (Firefox) and 120 (native clients).
DEFAULT_OPUS_PAYLOAD_TYPE: Final = 111
#: The answer echoes only the header extensions both ends of a voice call know.
ANSWER_EXTENSIONS: Final = frozenset(
    {
        "urn:ietf:params:rtp-hdrext:ssrc-audio-level",
        "urn:ietf:params:rtp-hdrext:sdes:mid",
        "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
    }
)
_REVERSE_DIRECTION: Final = {
    "sendrecv": "sendrecv",
    "sendonly": "recvonly",
    "recvonly": "sendonly",
    "inactive": "inactive",
}


class SdpError(ValueError):
    """An SDP text or fragment lacks something the ``webrtc`` transport needs."""


class CodecPayload(TypedDict):
    """One entry of op1's ``codecs`` list."""

    name: str
    type: str
    priority: int
    payload_type: int
    rtx_payload_type: int | None


def opus_codec(payload_type: int = DEFAULT_OPUS_PAYLOAD_TYPE) -> CodecPayload:
    """The ``codecs`` entry announcing Opus on ``payload_type``.

    Raises:
        SdpError: ``payload_type`` is 96 (reserved) or not a dynamic payload type.
    """
    if payload_type == RESERVED_PAYLOAD_TYPE or not 96 <= payload_type <= 127:
        raise SdpError(f"opus cannot use payload type {payload_type}")
    return {
        "name": "opus",
        "type": "audio",
        "priority": 1000,
        "payload_type": payload_type,
        "rtx_payload_type": None,
    }


def opus_payload_type(codecs: Iterable[Mapping[str, Any]]) -> int:
    """The Opus payload type announced in op1's ``codecs``.

    Raises:
        SdpError: no usable Opus entry.
    """
    for codec in codecs:
        if str(codec.get("name", "")).lower() == "opus" and codec.get("type", "audio") == "audio":
            pt = codec.get("payload_type")
            if isinstance(pt, int) and 0 <= pt <= 127 and pt != RESERVED_PAYLOAD_TYPE:
                return pt
            raise SdpError(f"opus payload type {pt!r} is not usable")
    raise SdpError("no opus codec offered")


def _lines(text: str) -> Iterator[str]:
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if line:
            yield line


def _attr(line: str) -> tuple[str, str]:
    """``a=name:value`` -> ``(name, value)``; ``a=flag`` -> ``(flag, "")``."""
    body = line[2:]
    name, _, value = body.partition(":")
    return name, value


@dataclass(frozen=True, slots=True)
class _Section:
    """One m-section of a full SDP: its ``m=`` line fields and its other lines."""

    kind: str
    port: int
    proto: str
    formats: tuple[str, ...]
    lines: tuple[str, ...]

    def attrs(self, name: str) -> list[str]:
        return [value for n, value in map(_attr, self._a_lines()) if n == name]

    def attr(self, name: str) -> str | None:
        found = self.attrs(name)
        return found[0] if found else None

    def has_flag(self, name: str) -> bool:
        return any(_attr(line)[0] == name for line in self._a_lines())

    def _a_lines(self) -> Iterator[str]:
        return (line for line in self.lines if line.startswith("a="))


def _split(sdp: str) -> tuple[_Section, list[_Section]]:
    """Session-level lines (as a pseudo-section) and the m-sections of a full SDP."""
    session: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    for line in _lines(sdp):
        if line.startswith("m="):
            sections.append((line, []))
        elif sections:
            sections[-1][1].append(line)
        else:
            session.append(line)
    parsed = []
    for m_line, body in sections:
        fields = m_line[2:].split()
        if len(fields) < 3 or not fields[1].isdigit():
            raise SdpError(f"bad media line {m_line!r}")
        parsed.append(
            _Section(fields[0], int(fields[1]), fields[2], tuple(fields[3:]), tuple(body))
        )
    return _Section("session", 0, "", (), tuple(session)), parsed


def _sha256(fingerprints: Iterable[str]) -> str | None:
    for value in fingerprints:
        algorithm, _, digest = value.partition(" ")
        if algorithm.lower() == "sha-256" and digest:
            return digest.strip()
    return None


@dataclass(frozen=True, slots=True)
class OfferFragment:
    """op1's fragment: what the server needs from the client's offer.

    Attributes:
        ice_ufrag: The client's ICE username fragment.
        ice_pwd: The client's ICE password.
        fingerprint: The sha-256 digest of the client's DTLS certificate (``AB:CD:...``), or
            ``None``: the seed capture's Firefox op1 carried none (Firefox writes it at session
            level), so a parsed fragment may lack it.
        extmaps: ``a=extmap`` values, e.g. ``"1 urn:ietf:params:rtp-hdrext:ssrc-audio-level"``.
        rtpmaps: Payload type -> ``a=rtpmap`` encoding, e.g. ``{111: "opus/48000/2"}``.
    """

    ice_ufrag: str
    ice_pwd: str
    fingerprint: str | None
    extmaps: tuple[str, ...]
    rtpmaps: tuple[tuple[int, str], ...]

    @classmethod
    def from_offer(
        cls, offer_sdp: str, payload_types: Iterable[int] | None = None
    ) -> OfferFragment:
        """Cut the fragment out of a full offer.

        Only audio m-sections are read: the voice client offers nothing else. ICE credentials
        and the fingerprint may sit at session or media level (Firefox puts the fingerprint at
        session level, Chrome and aiortc at media level).

        Args:
            offer_sdp: The full offer, as ``createOffer()`` returned it.
            payload_types: The payload types announced in ``codecs``; every audio rtpmap when
                ``None``.

        Raises:
            SdpError: no audio section, or credentials or a sha-256 fingerprint missing.
        """
        session, sections = _split(offer_sdp)
        audio = [s for s in sections if s.kind == "audio"]
        if not audio:
            raise SdpError("the offer has no audio section")
        first = audio[0]
        ufrag = first.attr("ice-ufrag") or session.attr("ice-ufrag")
        pwd = first.attr("ice-pwd") or session.attr("ice-pwd")
        fingerprint = _sha256(first.attrs("fingerprint")) or _sha256(session.attrs("fingerprint"))
        if not ufrag or not pwd:
            raise SdpError("the offer has no ICE credentials")
        if not fingerprint:
            raise SdpError("the offer has no sha-256 fingerprint")
        wanted = None if payload_types is None else set(payload_types)
        extmaps: list[str] = []
        rtpmaps: list[tuple[int, str]] = []
        for section in audio:
            for value in section.attrs("extmap"):
                if value not in extmaps:
                    extmaps.append(value)
            for value in section.attrs("rtpmap"):
                pt_text, _, encoding = value.partition(" ")
                pt = int(pt_text)
                if (wanted is None or pt in wanted) and all(p != pt for p, _ in rtpmaps):
                    rtpmaps.append((pt, encoding))
        return cls(ufrag, pwd, fingerprint, tuple(extmaps), tuple(rtpmaps))

    @classmethod
    def parse(cls, fragment: str) -> OfferFragment:
        """Read a fragment as op1 carries it (``\\n``-separated attribute lines).

        Raises:
            SdpError: the ICE credentials are missing.
        """
        ufrag = pwd = fingerprint = None
        extmaps: list[str] = []
        rtpmaps: list[tuple[int, str]] = []
        for line in _lines(fragment):
            if not line.startswith("a="):
                continue
            name, value = _attr(line)
            if name == "ice-ufrag":
                ufrag = value
            elif name == "ice-pwd":
                pwd = value
            elif name == "fingerprint" and fingerprint is None:
                fingerprint = _sha256([value])
            elif name == "extmap":
                extmaps.append(value)
            elif name == "rtpmap":
                pt_text, _, encoding = value.partition(" ")
                if pt_text.isdigit():
                    rtpmaps.append((int(pt_text), encoding))
        if not ufrag or not pwd:
            raise SdpError("the fragment has no ICE credentials")
        return cls(ufrag, pwd, fingerprint, tuple(extmaps), tuple(rtpmaps))

    def render(self) -> str:
        """The fragment text for op1's ``data`` and ``sdp``."""
        lines = [f"a=ice-ufrag:{self.ice_ufrag}", f"a=ice-pwd:{self.ice_pwd}"]
        if self.fingerprint is not None:
            lines.append(f"a=fingerprint:sha-256 {self.fingerprint}")
        lines += [f"a=extmap:{value}" for value in self.extmaps]
        lines += [f"a=rtpmap:{pt} {encoding}" for pt, encoding in self.rtpmaps]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class ServerFragment:
    """op4's ``sdp``: where and how the client reaches the server.

    Attributes:
        port: The server's media port.
        address: The server's media address (``c=IN IP4 ...``).
        ice_ufrag: The server's ICE username fragment.
        ice_pwd: The server's ICE password.
        fingerprint: sha-256 digest of the server's DTLS certificate.
        candidates: ``a=candidate`` values (usually one host candidate).
    """

    port: int
    address: str
    ice_ufrag: str
    ice_pwd: str
    fingerprint: str
    candidates: tuple[str, ...]

    @classmethod
    def parse(cls, fragment: str) -> ServerFragment:
        """Read op4's ``sdp``.

        Raises:
            SdpError: the ``m=`` line, credentials, fingerprint or an address are missing.
        """
        port: int | None = None
        address = ufrag = pwd = fingerprint = None
        candidates: list[str] = []
        for line in _lines(fragment):
            if line.startswith("m="):
                fields = line[2:].split()
                if len(fields) >= 2 and fields[1].isdigit():
                    port = int(fields[1])
            elif line.startswith("c="):
                fields = line[2:].split()
                if len(fields) == 3:
                    address = fields[2]
            elif line.startswith("a="):
                name, value = _attr(line)
                if name == "ice-ufrag":
                    ufrag = value
                elif name == "ice-pwd":
                    pwd = value
                elif name == "fingerprint" and fingerprint is None:
                    fingerprint = _sha256([value])
                elif name == "candidate":
                    candidates.append(value)
        if port is None:
            raise SdpError("the server fragment has no m= line")
        if not ufrag or not pwd:
            raise SdpError("the server fragment has no ICE credentials")
        if not fingerprint:
            raise SdpError("the server fragment has no sha-256 fingerprint")
        if address is None and not candidates:
            raise SdpError("the server fragment has neither an address nor a candidate")
        return cls(port, address or "0.0.0.0", ufrag, pwd, fingerprint, tuple(candidates))

    @classmethod
    def from_answer(cls, answer_sdp: str) -> ServerFragment:
        """Cut op4's fragment out of a WebRTC stack's full answer (first audio section).

        The port and address are those of the first candidate, as the stack may leave the
        ``m=`` line on the discard port until it has gathered.

        Raises:
            SdpError: no audio section, credentials, fingerprint or candidate.
        """
        session, sections = _split(answer_sdp)
        audio = next((s for s in sections if s.kind == "audio"), None)
        if audio is None:
            raise SdpError("the answer has no audio section")
        ufrag = audio.attr("ice-ufrag") or session.attr("ice-ufrag")
        pwd = audio.attr("ice-pwd") or session.attr("ice-pwd")
        fingerprint = _sha256(audio.attrs("fingerprint")) or _sha256(session.attrs("fingerprint"))
        candidates = audio.attrs("candidate")
        if not ufrag or not pwd or not fingerprint:
            raise SdpError("the answer lacks ICE credentials or a sha-256 fingerprint")
        if not candidates:
            raise SdpError("the answer has no candidate")
        fields = candidates[0].split()
        return cls(int(fields[5]), fields[4], ufrag, pwd, fingerprint, (candidates[0],))

    def render(self) -> str:
        """The text of op4's ``sdp`` in the capture's layout.

        Discord's server wrote the fingerprint twice: after the ``m=`` line and again after the
        ICE password.
        """
        fingerprint = f"a=fingerprint:sha-256 {self.fingerprint}"
        lines = [
            f"m=audio {self.port} ICE/SDP",
            fingerprint,
            f"c=IN IP4 {self.address}",
            f"a=rtcp:{self.port}",
            f"a=ice-ufrag:{self.ice_ufrag}",
            f"a=ice-pwd:{self.ice_pwd}",
            fingerprint,
        ]
        lines += [f"a=candidate:{value}" for value in self.candidates]
        return "\n".join(lines) + "\n"


def build_answer(offer_sdp: str, server: ServerFragment, *, opus_payload_type: int) -> str:
    """The full answer the client applies as its remote description.

    One ``UDP/TLS/RTP/SAVPF`` section per offered one, same mid, all bundled on the server's
    single candidate. The server is the DTLS server (``a=setup:passive``); its ICE credentials
    and candidate come from op4. Audio sections accept Opus only, on the offered payload type;
    other kinds are rejected (port 0) since the voice server takes no video from us.

    Raises:
        SdpError: the offer has no audio section, a section has no mid, or Opus is not offered
            on ``opus_payload_type``.
    """
    _, sections = _split(offer_sdp)
    if not any(s.kind == "audio" for s in sections):
        raise SdpError("the offer has no audio section")
    accepted: list[str] = []
    body: list[str] = []
    for section in sections:
        mid = section.attr("mid")
        if mid is None:
            raise SdpError("an offered section has no mid")
        if section.kind != "audio":
            body += [
                f"m={section.kind} 0 UDP/TLS/RTP/SAVPF {' '.join(section.formats)}",
                "c=IN IP4 0.0.0.0",
                f"a=mid:{mid}",
                "a=inactive",
            ]
            continue
        rtpmaps = {
            int(pt): enc for pt, _, enc in (v.partition(" ") for v in section.attrs("rtpmap"))
        }
        encoding = rtpmaps.get(opus_payload_type, "")
        if not encoding.lower().startswith("opus/"):
            raise SdpError(f"opus is not offered on payload type {opus_payload_type}")
        offered = next((d for d in _REVERSE_DIRECTION if section.has_flag(d)), "sendrecv")
        accepted.append(mid)
        body += [
            f"m=audio {server.port} UDP/TLS/RTP/SAVPF {opus_payload_type}",
            f"c=IN IP4 {server.address}",
            f"a=rtcp:{server.port}",
            f"a=ice-ufrag:{server.ice_ufrag}",
            f"a=ice-pwd:{server.ice_pwd}",
            f"a=fingerprint:sha-256 {server.fingerprint}",
            "a=setup:passive",
            f"a=mid:{mid}",
        ]
        body += [
            f"a=extmap:{value}"
            for value in section.attrs("extmap")
            if value.split()[-1] in ANSWER_EXTENSIONS
        ]
        body += [
            f"a={_REVERSE_DIRECTION[offered]}",
            "a=rtcp-mux",
            f"a=rtpmap:{opus_payload_type} {encoding}",
            f"a=fmtp:{opus_payload_type} minptime=10;useinbandfec=1",
        ]
        body += [f"a=candidate:{value}" for value in server.candidates]
        body.append("a=end-of-candidates")
    head = [
        "v=0",
        "o=- 1420070400000 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        f"a=group:BUNDLE {' '.join(accepted)}",
        "a=msid-semantic: WMS",
    ]
    return "\r\n".join(head + body) + "\r\n"
