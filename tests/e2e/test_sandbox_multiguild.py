"""Several guilds in one sandbox, seen by an unmodified discord.py 2.7.1 bot."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands

from legato.sandbox.events import Signal
from legato.sandbox.server import GuildHandle, Sandbox
from legato.sandbox.voice import SandboxVoiceServer

pytestmark = pytest.mark.e2e

GUARD = 30.0


class WhereCog(commands.Cog):
    @app_commands.command(name="where", description="Say where the command ran")
    async def where(self, interaction: discord.Interaction) -> None:
        guild = interaction.guild
        assert guild is not None
        await interaction.response.send_message(
            f"{interaction.guild_id} {guild.name} {interaction.channel_id}"
        )


class MultiBot(commands.Bot):
    def __init__(self) -> None:
        super().__init__(
            command_prefix="!",
            intents=discord.Intents.default(),
            chunk_guilds_at_startup=False,
            guild_ready_timeout=0.5,
            enable_debug_events=True,  # on_socket_raw_receive
        )
        self.ready = asyncio.Event()
        self.raw_events: list[dict[str, Any]] = []
        self.received = Signal()

    async def setup_hook(self) -> None:
        await self.add_cog(WhereCog())
        await self.tree.sync()  # global: every guild sees /where

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        return None

    async def on_ready(self) -> None:
        self.ready.set()

    async def on_socket_raw_receive(self, msg: str) -> None:
        self.raw_events.append(json.loads(msg))
        self.received.notify()

    def dispatched(self, event: str) -> list[dict[str, Any]]:
        return [m["d"] for m in self.raw_events if m.get("t") == event]


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(timeout=GUARD) as sb:
        yield sb


@contextlib.asynccontextmanager
async def running(sb: Sandbox) -> AsyncIterator[MultiBot]:
    async with sb.running(MultiBot(), GUARD) as bot:
        yield bot


def channel_names(guild: discord.Guild) -> tuple[list[str], list[str]]:
    return [c.name for c in guild.text_channels], [c.name for c in guild.voice_channels]


async def test_bot_sees_guilds_made_before_and_after_it_connected(sandbox: Sandbox) -> None:
    sb = sandbox
    second = sb.add_guild("Second", text_channels=("music", "chat"), voice_channels=("Hall",))
    assert [g.id for g in sb.guilds] == [sb.guild.id, second.id]
    assert sb.guilds[0].text_channels["music"] is sb.music
    assert second.text is second.text_channels["music"]
    assert second.voice is second.channel("Hall")
    async with running(sb) as bot:
        assert {g.id for g in bot.guilds} == {sb.guild.id, second.id}
        seen = bot.get_guild(second.id)
        assert seen is not None
        assert seen.name == "Second"
        assert channel_names(seen) == (["music", "chat"], ["Hall"])
        assert discord.utils.get(seen.roles, name="DJ") is not None
        assert seen.me is not None

        joined = bot.wait_for("guild_join", timeout=GUARD)
        third = sb.add_guild("Third")
        guild = await joined
        assert guild.id == third.id
        assert channel_names(guild) == (["music"], ["General", "Lounge"])
        assert {g.id for g in bot.guilds} == {sb.guild.id, second.id, third.id}
        # The first guild is still what the single-guild names point at.
        assert sb.guild_handle(sb.guild.id).text is sb.music
        assert sb.guild_handle(third.guild) is third


async def test_commands_in_each_guild_carry_that_guild(sandbox: Sandbox) -> None:
    sb = sandbox
    second = sb.add_guild("Second")
    async with running(sb) as bot:
        alice = sb.add_user("alice", roles=("DJ",), guilds=[sb.guilds[0], second])
        bob = sb.add_user("bob", guilds=[second])
        assert alice.guild is sb.guild
        assert bob.guild is second.guild

        here = await alice.invoke("where")
        there = await alice.invoke("where", channel=second.text)
        bobs = await bob.invoke("where")  # bob's home guild is the second one
        assert here.text() == f"{sb.guild.id} Legato Sandbox {sb.music.id}"
        assert there.text() == f"{second.id} Second {second.text.id}"
        assert bobs.text() == f"{second.id} Second {second.text.id}"
        creates = bot.dispatched("INTERACTION_CREATE")
        assert [c["guild_id"] for c in creates] == [
            str(sb.guild.id),
            str(second.id),
            str(second.id),
        ]
        # Alice has the DJ role in both guilds, each guild's own role.
        for handle in (sb.guilds[0], second):
            member = handle.guild.members[alice.id]
            assert member.role_ids == [handle.dj_role.id]
        # Bob is no member of the first guild.
        with pytest.raises(KeyError):
            await bob.invoke("where", channel=sb.music)


async def test_a_user_is_in_voice_in_one_guild_at_a_time(sandbox: Sandbox) -> None:
    sb = sandbox
    second = sb.add_guild("Second")
    async with running(sb) as bot:
        alice = sb.add_user("alice", guilds=[sb.guilds[0], second])
        first_join = bot.wait_for(
            "voice_state_update", check=lambda m, b, a: m.id == alice.id, timeout=GUARD
        )
        await alice.join_voice(sb.general)
        member, _, after = await first_join
        assert member.guild.id == sb.guild.id
        assert after.channel is not None
        assert after.channel.id == sb.general.id

        hall = second.voice_channels["Lounge"]
        left_first = bot.wait_for(
            "voice_state_update",
            check=lambda m, b, a: m.id == alice.id and m.guild.id == sb.guild.id,
            timeout=GUARD,
        )
        joined_second = bot.wait_for(
            "voice_state_update",
            check=lambda m, b, a: m.id == alice.id and m.guild.id == second.id,
            timeout=GUARD,
        )
        await alice.join_voice(hall)
        _, _, gone = await left_first
        _, _, moved = await joined_second
        assert gone.channel is None
        assert moved.channel is not None
        assert moved.channel.id == hall.id
        assert alice.voice_channel is hall
        assert sb.voice_state(alice.id) is None
        state = sb.voice_state(alice.id, guild=second)
        assert state is not None
        assert state.channel_id == hall.id

        await alice.leave_voice()
        await sb.wait_for(lambda: alice.voice_channel is None)
        assert sb.voice_state(alice.id, guild=second) is None


async def identify(
    stack: contextlib.AsyncExitStack, update: dict[str, Any], bot_id: int, session_id: str
) -> int:
    """Identify at the voice server with a VOICE_SERVER_UPDATE, keeping the socket open in
    ``stack``; return the READY ssrc."""
    payload = {
        "op": 0,
        "d": {
            "server_id": update["guild_id"],
            "user_id": str(bot_id),
            "session_id": session_id,
            "token": update["token"],
            "max_dave_protocol_version": 1,  # DAVE is required, as on Discord
        },
    }
    http = await stack.enter_async_context(aiohttp.ClientSession())
    ws = await stack.enter_async_context(http.ws_connect(f"wss://{update['endpoint']}/?v=8"))
    hello = await ws.receive_json()
    assert hello["op"] == 8
    await ws.send_json(payload)
    ready = await ws.receive_json()
    assert ready["op"] == 2
    return int(ready["d"]["ssrc"])


async def test_bot_in_voice_in_two_guilds_at_once(sandbox: Sandbox) -> None:
    sb = sandbox
    second = sb.add_guild("Second", voice_channels=("Hall",))
    async with running(sb) as bot:
        guilds: list[tuple[discord.Guild, GuildHandle]] = []
        for handle in sb.guilds:
            guild = bot.get_guild(handle.id)
            assert guild is not None
            guilds.append((guild, handle))
        await asyncio.gather(
            *(
                guild.change_voice_state(channel=guild.get_channel(handle.voice.id))
                for guild, handle in guilds
            )
        )
        await sb.wait_bot_voice(sb.general)
        await sb.wait_bot_voice(second.voice)

        def both() -> list[dict[str, Any]] | None:
            updates = bot.dispatched("VOICE_SERVER_UPDATE")
            return updates if len(updates) == 2 else None

        updates = await bot.received.wait_for(both, timeout=GUARD)
        assert sorted(u["guild_id"] for u in updates) == sorted([str(sb.guild.id), str(second.id)])
        assert updates[0]["token"] != updates[1]["token"]

        voice = sb.voice_server
        assert isinstance(voice, SandboxVoiceServer)
        session_id = bot.ws.session_id
        assert session_id is not None
        async with contextlib.AsyncExitStack() as stack, asyncio.timeout(GUARD):
            ssrcs = await asyncio.gather(
                *(identify(stack, u, sb.bot.id, session_id) for u in updates)
            )
            assert ssrcs[0] != ssrcs[1]
            for update, ssrc in zip(updates, ssrcs, strict=True):
                info = voice.session(sb.bot.id, int(update["guild_id"]))
                assert info.server_id == int(update["guild_id"])
                assert info.ssrc == ssrc
                assert info.connected
        # The bot's voice state in each guild is its own.
        first_state = sb.voice_state(sb.bot.id)
        second_state = sb.voice_state(sb.bot.id, guild=second)
        assert first_state is not None
        assert second_state is not None
        assert (first_state.channel_id, second_state.channel_id) == (
            sb.general.id,
            second.voice.id,
        )


async def test_a_hundred_guilds(sandbox: Sandbox) -> None:
    sb = sandbox
    made = [sb.add_guild(f"Guild {i:03}") for i in range(99)]
    async with running(sb) as bot:
        assert len(bot.guilds) == 100
        last = bot.get_guild(made[-1].id)
        assert last is not None
        assert last.name == "Guild 098"
        user = sb.add_user("alice", guilds=[made[-1]])
        reply = await user.invoke("where")
        assert reply.text().startswith(f"{made[-1].id} Guild 098 ")
