"""/music debug and /music privacy end to end: a real discord.py Bot against the sandbox.

``/music debug`` is for members with Manage Server; ``/music privacy`` shows DAVE's voice privacy
code, which must be the very code the sandbox's listener member computes from the same MLS group.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest

from legato.sandbox.relay import RelayOptions
from legato.sandbox.server import Sandbox
from legato.sandbox.users import Reply, ScriptedUser
from legato.sandbox.voice import SandboxVoiceServer
from tests.e2e.test_music_cog import (
    GUARD,
    Tones,
    answer,
    make_config,
    recording,
    refused,
    running,
    start_playing,
)

pytestmark = pytest.mark.e2e

#: Discord's MANAGE_GUILD permission bit ("Manage Server").
MANAGE_GUILD = 1 << 5


@pytest.fixture
async def dave_sandbox() -> AsyncIterator[Sandbox]:
    # The voice server plays Discord's part in DAVE, with a listener member in every channel.
    async with Sandbox(timeout=GUARD, voice_options={"dave_protocol_version": 1}) as sb:
        yield sb


@pytest.fixture
async def plain_sandbox() -> AsyncIterator[Sandbox]:
    # A voice server without DAVE: the self-hosted path (ws://, host:port), asked for; Discord's,
    # the default, requires DAVE.
    options = {"tls": False, "dave_protocol_version": 0}
    async with Sandbox(timeout=GUARD, voice_options=options) as sb:
        yield sb


@pytest.fixture
async def lossy_sandbox() -> AsyncIterator[Sandbox]:
    # A relay in front of the media port drops a tenth of the bot's RTP; the server's receiver
    # reports (every second) tell the bot how much it lost.
    relay = RelayOptions(loss=0.1, seed=11)
    async with Sandbox(timeout=GUARD, voice_options={"relay": relay, "rtcp_interval": 0.5}) as sb:
        yield sb


def fields(reply: Reply) -> dict[str, str]:
    """The first embed's fields by name."""
    assert reply.embeds, f"no embed in {reply.text()!r}"
    return {str(f["name"]): str(f["value"]) for f in reply.embeds[0].get("fields", [])}


def add_admin(sb: Sandbox, name: str) -> ScriptedUser:
    sb.world.add_role(sb.guild, "Admin", permissions=MANAGE_GUILD)
    return sb.add_user(name, roles=("Admin",))


async def test_debug_is_for_admins_and_shows_the_player(sandbox: Sandbox, tones: Tones) -> None:
    sb = sandbox
    async with running(sb, make_config(tones)) as bot:
        alice = sb.add_user("alice")
        ada = add_admin(sb, "ada")
        await alice.join_voice(sb.general)

        # Before anything plays: the admin is told there is nothing to show.
        await refused(await ada.invoke("music debug"), "not in a voice channel")

        await start_playing(sb, alice, tones.a)
        rec = recording(sb)
        await rec.wait_frames(50, timeout=GUARD)

        text = await refused(await alice.invoke("music debug"), "Manage Server")
        assert "Frames" not in text

        shown = await ada.invoke("music debug")
        await answer(shown)
        assert shown.ephemeral
        got = fields(shown)
        sent = int(got["Frames"].split("\n")[0].removeprefix("sent "))
        assert sent >= 50
        assert "transport udp" in got["Voice"]
        conn = bot.music.session(sb.guild.id).voice.connection
        assert "gateway v8\n" in got["Voice"]
        assert f"gateway v{conn.gateway_version}\n" in got["Voice"]
        assert f"mode {conn.mode}" in got["Voice"]
        assert "p99" in got["Pacing (lateness)"]
        assert "mean" in got["Encode per frame"]
        # The default sandbox requires DAVE, as Discord does: the frames counted went encrypted.
        assert got["DAVE"].startswith("protocol 1, encrypting\nheld for the group ")
        assert got["Reconnects"] == "0 (resumes 0)"
        assert got["Errors"].split("\n")[:2] == ["source 0", "reopens 0"]

        # The voice websocket drops: the bot resumes, and the stats count it.
        voice = sb.voice
        assert isinstance(voice, SandboxVoiceServer)
        await voice.inject_drop(sb.bot.id)
        await voice.wait_resumed(sb.bot.id, timeout=GUARD)
        session = bot.music.session(sb.guild.id)
        assert (session.stats.player.reconnects, session.stats.player.resumes) == (1, 1)
        again = await ada.invoke("music debug")
        await answer(again)
        assert fields(again)["Reconnects"] == "1 (resumes 1)"


async def test_privacy_without_dave_says_not_end_to_end_encrypted(
    plain_sandbox: Sandbox, tones: Tones
) -> None:
    sb = plain_sandbox
    async with running(sb, make_config(tones)):
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        await refused(await alice.invoke("music privacy"), "not in a voice channel")

        await start_playing(sb, alice, tones.a)
        shown = await alice.invoke("music privacy")
        assert shown.ephemeral
        assert "not end-to-end encrypted" in await answer(shown)
        now = await alice.invoke("nowplaying")
        assert "Voice privacy code" not in fields(now)


async def test_privacy_with_dave_is_the_listeners_code(dave_sandbox: Sandbox, tones: Tones) -> None:
    sb = dave_sandbox
    voice = sb.voice
    assert isinstance(voice, SandboxVoiceServer)
    async with running(sb, make_config(tones)) as bot:
        alice = sb.add_user("alice")
        ada = add_admin(sb, "ada")
        await alice.join_voice(sb.general)
        await start_playing(sb, alice, tones.a)
        # The listener founded the group and welcomed the bot; op22 made it the one in force.
        await voice.wait_event("dave_execute", sb.bot.id, timeout=GUARD)
        await recording(sb).wait_frames(25, timeout=GUARD)

        group = voice.dave_channel(sb.guild.id)
        # The bot played at once, yet nothing it sent was plaintext (issue #12): no frame heard
        # as plaintext, none dropped.
        assert group.listener.stats.plaintext == 0
        assert group.listener.stats.plaintext_dropped == 0
        assert recording(sb).stats().dropped == 0
        expected = group.listener.client.privacy_code
        assert expected is not None
        assert len(expected) == 30
        session = bot.music.session(sb.guild.id)
        assert session is not None
        assert session.voice.voice_privacy_code == expected
        # The player held the track for the group rather than have frames withheld as silence.
        assert session.voice.link_stats.dave_withheld_frames == 0

        shown = await alice.invoke("music privacy")
        text = await answer(shown)
        assert shown.ephemeral
        assert "not end-to-end" not in text
        assert expected in text.replace(" ", "")

        now = await alice.invoke("nowplaying")
        assert fields(now)["Voice privacy code"].strip("`").replace(" ", "") == expected

        debug = await ada.invoke("music debug")
        await answer(debug)
        # The track may have waited for the group (the bot played at once): it was held, never
        # withheld or sent as plaintext.
        state, held = fields(debug)["DAVE"].split("\n")
        assert state == "protocol 1, encrypting"
        assert re.fullmatch(r"held for the group [01] times \(\d+\.\d s\)", held)


async def test_debug_shows_the_loss_the_server_reports(
    lossy_sandbox: Sandbox, tones: Tones
) -> None:
    sb = lossy_sandbox
    voice = sb.voice
    assert isinstance(voice, SandboxVoiceServer)
    async with running(sb, make_config(tones)) as bot:
        alice = sb.add_user("alice")
        ada = add_admin(sb, "ada")
        await alice.join_voice(sb.general)
        await start_playing(sb, alice, tones.a)
        rec = recording(sb)
        await rec.wait_frames(100, timeout=GUARD)
        # Paused, the bot sends nothing more: the server's last report covers every packet.
        assert "Paused" in await answer(await alice.invoke("pause"))
        await rec.wait_speaking(False, timeout=GUARD)
        last = await voice.wait_reported(sb.bot.id, rec.frames, timeout=GUARD)
        reports = [r for r in voice.rtcp_reports if r.user_id == sb.bot.id]
        assert reports[-1] == last
        conn = bot.music.session(sb.guild.id).voice.connection
        async with asyncio.timeout(GUARD):
            await conn.transport.wait_loss_reports(len(reports))
        assert last.block.cumulative_lost == rec.stats().gaps > 0

        shown = await ada.invoke("music debug")
        await answer(shown)
        assert fields(shown)["Loss (server reports)"] == (
            f"{last.block.fraction_lost / 256 * 100:.1f} % last report\n"
            f"{last.block.cumulative_lost} packets in all\n{len(reports)} reports"
        )
