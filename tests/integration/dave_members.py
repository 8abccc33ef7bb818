"""Members of one DAVE channel for the role scenarios: discord.py's stock voice clients (each its
own user, through ``davey``) beside Legato's voice connection, all on one sandbox voice server.

discord.py's ``VoiceClient`` only speaks ``wss://`` (so the server runs TLS) and reaches through
a guild, a channel and a connection state: :class:`DpyMember` stands those in with
``tests/integration/dpy_voice.py``, per user. Everything on the voice path is
discord.py's own: its websocket, its DAVE handling (``voice_state.py``/``gateway.py``), its
``davey.DaveSession``. It never receives audio (discord.py has no voice receive), so
:meth:`DpyMember.hears` decrypts what the server received from a sender with that member's own
DAVE session, as a Discord client would on receiving it.

Legato connects through :meth:`SandboxVoiceServer.plain_endpoint` (``ws://``): it has no way to
trust the sandbox's self-signed certificate, and TLS is not what these scenarios are about.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import davey
import discord
import discord.http

from legato.audio.sink import SILENCE_FRAMES
from legato.sandbox.dave_listener import DaveChannel
from legato.sandbox.voice import SandboxVoiceServer
from legato.voice.dave import OPUS_SILENCE
from legato.voice.gateway import VoiceConnection, VoiceOptions
from tests.integration.dpy_voice import FakeGuild, stock_voice_client
from tests.integration.voice_support import Player

GUILD: Final = 7001
CHANNEL: Final = 7002
LEGATO: Final = 7100
GUARD: Final = 30.0


class DpyMember:
    """One discord.py user in the channel, with its own stock ``VoiceClient`` and DAVE session.

    Args:
        server: the sandbox voice server (TLS).
        http: a discord.py HTTP client whose session trusts the server's certificate.
        user_id: the member's user id.
    """

    def __init__(
        self, server: SandboxVoiceServer, http: discord.http.HTTPClient, user_id: int
    ) -> None:
        self.user_id = user_id
        self.server = server
        self._guild = FakeGuild(
            server,
            guild_id=GUILD,
            channel_id=CHANNEL,
            user_id=user_id,
            session_id=f"dpy-{user_id}",
            dave_group=True,
        )
        self.vc, _ = stock_voice_client(self._guild, http)

    async def connect(self) -> None:
        """Join the channel (returns once discord.py's voice handshake is done)."""
        await self.vc.connect(reconnect=False, timeout=GUARD)

    async def disconnect(self) -> None:
        """Leave the channel; returns once the server has seen it go."""
        await self._guild.leave()

    @property
    def session(self) -> davey.DaveSession:
        """discord.py's DAVE session for this connection."""
        session = self.vc._connection.dave_session
        assert session is not None
        return session

    @property
    def privacy_code(self) -> str | None:
        """What discord.py shows as the voice privacy code."""
        return self.vc.voice_privacy_code

    def hears(self, sender_id: int, frames: Sequence[bytes]) -> list[bytes | None]:
        """Decrypt what the server received from ``sender_id`` with this member's session.

        Returns:
            Per frame, the Opus frame, or None where davey refused it.
        """
        out: list[bytes | None] = []
        for frame in frames:
            try:
                out.append(self.session.decrypt(sender_id, davey.MediaType.audio, frame))
            except ValueError:
                out.append(None)
        return out


@asynccontextmanager
async def legato_member(
    server: SandboxVoiceServer, user_id: int = LEGATO
) -> AsyncIterator[VoiceConnection]:
    """Legato's voice connection (udp, v8, DAVE offered) in the channel."""
    session_id = f"legato-{user_id}"
    token = server.register_session(
        server_id=GUILD, user_id=user_id, session_id=session_id, channel_id=CHANNEL
    )
    conn = VoiceConnection(
        endpoint=await server.plain_endpoint(),
        token=token,
        session_id=session_id,
        user_id=user_id,
        server_id=GUILD,
        channel_id=CHANNEL,
        options=VoiceOptions(transport="udp", gateway_version=8),
    )
    await conn.connect()
    try:
        yield conn
    finally:
        await conn.close()


async def settled(
    server: SandboxVoiceServer, members: set[int], *, epoch: int | None = None
) -> DaveChannel:
    """Wait until the group is exactly ``members`` with no transition open (and at ``epoch``)."""

    def done(channel: DaveChannel) -> bool:
        group = channel.server
        return (
            set(group.group_members) == members
            and not group.open_transitions
            and group.epoch is not None
            and (epoch is None or group.epoch == epoch)
        )

    return await server.wait_dave_group(GUILD, CHANNEL, done, timeout=GUARD)


async def legato_in_epoch(conn: VoiceConnection, epoch: int) -> None:
    """Wait until Legato's client has executed every transition up to ``epoch``."""

    def done(dave: Any) -> bool:
        session = dave.session
        return (
            session is not None
            and session.epoch == epoch
            and dave.encrypting
            and not dave.pending_transitions
        )

    await conn.wait_dave(done, GUARD)


async def legato_plays(
    server: SandboxVoiceServer, conn: VoiceConnection, frames: list[bytes]
) -> list[bytes]:
    """Legato plays ``frames`` (and its trailing silence); returns what the server received of
    them, silence dropped: DAVE frames, or plaintext where the protocol is 0."""
    recording = server.recording(conn.dave.user_id, GUILD)
    before = recording.frames + recording.dropped
    sent = len(frames) + SILENCE_FRAMES
    await Player(conn, frames).play()
    await recording.wait_arrivals(before + sent, timeout=GUARD)
    wire = server.dave_wire_frames(conn.dave.user_id, GUILD)[-sent:]
    return [f for f in wire if f != OPUS_SILENCE]
