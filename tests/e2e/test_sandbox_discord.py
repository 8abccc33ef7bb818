"""An unmodified discord.py 2.7.1 `commands.Bot` against the sandbox Discord, over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands

from legato.sandbox.events import Signal
from legato.sandbox.models import CallbackType
from legato.sandbox.server import Sandbox

pytestmark = pytest.mark.e2e

SONGS = ["Paranoid Android", "Paris", "Karma Police", "Pyramid Song"]


class PressView(discord.ui.View):
    def __init__(self, presses: list[int]) -> None:
        super().__init__(timeout=60)
        self.presses = presses

    @discord.ui.button(label="Bump", custom_id="bump", style=discord.ButtonStyle.primary)
    async def bump(self, interaction: discord.Interaction, button: discord.ui.Button[Any]) -> None:
        self.presses.append(interaction.user.id)
        await interaction.response.edit_message(content=f"pressed by {interaction.user.name}")


class TinyCog(commands.Cog):
    def __init__(self) -> None:
        self.presses: list[int] = []

    @app_commands.command(name="ping", description="Answer pong")
    async def ping(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message("pong")

    @app_commands.command(name="echo", description="Say it back")
    async def echo(self, interaction: discord.Interaction, text: str) -> None:
        await interaction.response.send_message(text)

    @app_commands.command(name="secret", description="Only you see this")
    async def secret(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message("psst", ephemeral=True)

    @app_commands.command(name="slow", description="Defer, then edit and follow up")
    async def slow(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        await interaction.edit_original_response(content="done")
        await interaction.followup.send("and one more thing", wait=True)

    @app_commands.command(name="buttons", description="A message with a button")
    async def buttons(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message("press it", view=PressView(self.presses))

    @app_commands.command(name="pick", description="Autocomplete a song")
    async def pick(self, interaction: discord.Interaction, song: str, times: int = 1) -> None:
        await interaction.response.send_message(f"{song} x{times}")

    @pick.autocomplete("song")
    async def pick_song(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return [
            app_commands.Choice(name=s, value=s)
            for s in SONGS
            if s.lower().startswith(current.lower())
        ]

    @app_commands.command(name="announce", description="Post in the channel")
    async def announce(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message("posting", ephemeral=True)
        assert isinstance(interaction.channel, discord.TextChannel)
        await interaction.channel.send(embed=discord.Embed(title="Now playing", description="x"))


class SandboxBot(commands.Bot):
    def __init__(self, guild_id: int) -> None:
        super().__init__(
            command_prefix="!",
            intents=discord.Intents.default(),
            chunk_guilds_at_startup=False,
            guild_ready_timeout=0.5,
            enable_debug_events=True,
        )
        self.guild_id = guild_id
        self.cog = TinyCog()
        self.ready = asyncio.Event()
        self.raw_events: list[dict[str, Any]] = []
        self.received = Signal()
        self.command_errors: list[app_commands.AppCommandError] = []

    async def setup_hook(self) -> None:
        await self.add_cog(self.cog)

        async def on_error(
            interaction: discord.Interaction, error: app_commands.AppCommandError
        ) -> None:
            self.command_errors.append(error)
            self.received.notify()

        self.tree.on_error = on_error  # type: ignore[method-assign]  # discord.py's documented hook
        guild = discord.Object(self.guild_id)
        self.tree.copy_global_to(guild=guild)
        await self.tree.sync(guild=guild)

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        # discord.py waits 5 s before a re-IDENTIFY to respect Discord's rate; not needed here.
        return None

    async def on_ready(self) -> None:
        self.ready.set()

    async def on_socket_raw_receive(self, msg: str) -> None:
        self.raw_events.append(json.loads(msg))
        self.received.notify()

    def dispatched(self, event: str) -> list[dict[str, Any]]:
        return [m["d"] for m in self.raw_events if m.get("t") == event]

    async def wait_dispatched(self, event: str) -> list[dict[str, Any]]:
        return await self.received.wait_for(lambda: self.dispatched(event), timeout=20)


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(timeout=20.0) as sb:
        yield sb


@contextlib.asynccontextmanager
async def running(sb: Sandbox) -> AsyncIterator[SandboxBot]:
    async with sb.running(SandboxBot(sb.guild.id), 30) as bot:
        yield bot


@pytest.fixture
async def bot(sandbox: Sandbox) -> AsyncIterator[SandboxBot]:
    async with running(sandbox) as b:
        yield b


async def test_bot_reaches_ready_and_sees_the_guild(sandbox: Sandbox, bot: SandboxBot) -> None:
    guild = bot.get_guild(sandbox.guild.id)
    assert guild is not None
    assert guild.name == "Legato Sandbox"
    assert bot.user is not None
    assert bot.user.id == sandbox.bot.id
    assert bot.application_id == sandbox.application_id
    assert guild.me is not None
    text = discord.utils.get(guild.text_channels, name="music")
    voice = {c.name: c for c in guild.voice_channels}
    assert text is not None
    assert sorted(voice) == ["General", "Lounge"]
    assert voice["General"].bitrate == 64_000
    assert voice["General"].user_limit == 0
    assert discord.utils.get(guild.roles, name="DJ") is not None
    # The command sync went through the REST API and is recorded with ids.
    names = sorted(c.name for c in sandbox.commands())
    assert names == ["announce", "buttons", "echo", "pick", "ping", "secret", "slow"]
    assert sandbox.rest.command_syncs == [(sandbox.guild.id, sandbox.rest.command_syncs[0][1])]
    assert sandbox.gateway.identifies == 1
    assert sandbox.rest.unknown_routes == []


async def test_slash_commands_get_replies(sandbox: Sandbox, bot: SandboxBot) -> None:
    alice = sandbox.add_user("alice")
    pong = await alice.invoke("ping")
    assert pong.callback_type is CallbackType.CHANNEL_MESSAGE
    assert pong.content == "pong"
    assert not pong.ephemeral
    echoed = await alice.invoke("echo", text="hello sandbox")
    assert echoed.content == "hello sandbox"
    assert [m.content for m in sandbox.messages(sandbox.music)] == ["pong", "hello sandbox"]

    secret = await alice.invoke("secret")
    assert secret.content == "psst"
    assert secret.ephemeral
    assert "psst" not in [m.content for m in sandbox.messages(sandbox.music)]

    with pytest.raises(KeyError):
        await alice.invoke("echo")  # `text` is required


async def test_an_answer_after_the_deadline_is_an_unknown_interaction(
    sandbox: Sandbox, bot: SandboxBot
) -> None:
    assert sandbox.rest.interaction_deadline == 3.0  # Discord's
    alice = sandbox.add_user("alice")
    sandbox.rest.interaction_deadline = 0.0  # every answer comes too late
    invoking = asyncio.create_task(alice.invoke("ping"))
    late = await sandbox.wait_for(lambda: sandbox.rest.late_callbacks)
    errors = await bot.received.wait_for(lambda: bot.command_errors, timeout=20)
    assert sandbox.world.interactions[late[0]].callback_type is None
    assert not invoking.done()
    invoking.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await invoking
    causes = [getattr(e, "original", e) for e in errors]
    assert [(type(c), getattr(c, "code", None)) for c in causes] == [(discord.NotFound, 10062)]

    sandbox.rest.interaction_deadline = 3.0
    assert (await alice.invoke("ping")).content == "pong"


async def test_deferred_reply_is_edited_then_followed_up(sandbox: Sandbox, bot: SandboxBot) -> None:
    bob = sandbox.add_user("bob")
    reply = await bob.invoke("slow")
    assert reply.deferred
    assert reply.callback_type is CallbackType.DEFERRED_CHANNEL_MESSAGE
    edited = await reply.wait_edit()
    assert edited.content == "done"
    assert reply.content == "done"
    followup = await reply.wait_followup()
    assert followup.content == "and one more thing"
    assert not followup.ephemeral


async def test_button_press_reaches_the_view(sandbox: Sandbox, bot: SandboxBot) -> None:
    alice = sandbox.add_user("alice")
    reply = await alice.invoke("buttons")
    assert reply.content == "press it"
    assert reply.custom_ids == ["bump"]
    pressed = await alice.press(reply, "bump")
    assert pressed.callback_type is CallbackType.UPDATE_MESSAGE
    assert reply.content == "pressed by alice"
    assert bot.cog.presses == [alice.id]
    with pytest.raises(KeyError):
        await alice.press(reply, "no-such-button")


async def test_autocomplete_returns_choices(sandbox: Sandbox, bot: SandboxBot) -> None:
    alice = sandbox.add_user("alice")
    choices = await alice.autocomplete("pick", "song", "pa")
    assert [c.name for c in choices] == ["Paranoid Android", "Paris"]
    assert [c.value for c in choices] == ["Paranoid Android", "Paris"]
    picked = await alice.invoke("pick", song="Paris", times=3)
    assert picked.content == "Paris x3"


async def test_channel_message_from_the_bot(sandbox: Sandbox, bot: SandboxBot) -> None:
    alice = sandbox.add_user("alice")
    reply = await alice.invoke("announce")
    assert reply.ephemeral
    message = await sandbox.wait_for_message(
        sandbox.music, lambda m: any(e.get("title") == "Now playing" for e in m.embeds)
    )
    assert message.author.id == sandbox.bot.id


async def test_voice_state_and_server_updates(sandbox: Sandbox, bot: SandboxBot) -> None:
    guild = bot.get_guild(sandbox.guild.id)
    assert guild is not None
    alice = sandbox.add_user("alice", roles=("DJ",))
    joined = bot.wait_for("voice_state_update", check=lambda m, b, a: m.id == alice.id, timeout=20)
    await alice.join_voice(sandbox.general)
    member, before, after = await joined
    assert before.channel is None
    assert after.channel is not None
    assert after.channel.id == sandbox.general.id
    assert [r.name for r in member.roles if r.name == "DJ"] == ["DJ"]

    general = guild.get_channel(sandbox.general.id)
    assert isinstance(general, discord.VoiceChannel)
    bot_joined = bot.wait_for("voice_state_update", check=lambda m, b, a: m == guild.me, timeout=20)
    await guild.change_voice_state(channel=general, self_deaf=True)
    _, _, bot_after = await bot_joined
    assert bot_after.channel == general
    assert bot_after.self_deaf
    await sandbox.wait_bot_voice(sandbox.general)
    server_updates = await bot.wait_dispatched("VOICE_SERVER_UPDATE")
    assert sandbox.voice is not None
    assert server_updates == [
        {
            "token": server_updates[0]["token"],
            "guild_id": str(sandbox.guild.id),
            "endpoint": sandbox.voice.endpoint,
        }
    ]
    assert len(server_updates[0]["token"]) >= 16
    assert {m.id for m in general.members} == {alice.id, sandbox.bot.id}

    bot_left = bot.wait_for(
        "voice_state_update", check=lambda m, b, a: m == guild.me and a.channel is None, timeout=20
    )
    await guild.change_voice_state(channel=None)
    await bot_left
    session = sandbox.gateway.bot_session()
    assert session is not None
    # Leaving sends VOICE_STATE_UPDATE only, no VOICE_SERVER_UPDATE.
    assert session.dispatched.count("VOICE_SERVER_UPDATE") == 1
    assert session.dispatched[-1] == "VOICE_STATE_UPDATE"

    kicked = bot.wait_for(
        "voice_state_update",
        check=lambda m, b, a: m.id == alice.id and a.channel is None,
        timeout=20,
    )
    await sandbox.disconnect_member(alice.id)
    await kicked
    assert alice.voice_channel is None


async def test_channel_delete_reaches_the_bot(sandbox: Sandbox, bot: SandboxBot) -> None:
    alice = sandbox.add_user("alice")
    await alice.join_voice(sandbox.lounge)
    deleted = bot.wait_for("guild_channel_delete", timeout=20)
    await sandbox.delete_channel(sandbox.lounge)
    channel = await deleted
    assert channel.id == sandbox.lounge.id
    assert bot.get_channel(sandbox.lounge.id) is None
    assert alice.voice_channel is None
    left = await bot.received.wait_for(
        lambda: [
            d
            for d in bot.dispatched("VOICE_STATE_UPDATE")
            if d["user_id"] == str(alice.id) and d["channel_id"] is None
        ],
        timeout=20,
    )
    assert len(left) == 1


async def test_resume_replays_missed_dispatches(sandbox: Sandbox, bot: SandboxBot) -> None:
    alice = sandbox.add_user("alice")
    resumed = bot.wait_for("resumed", timeout=30)
    seen = bot.wait_for("voice_state_update", check=lambda m, b, a: m.id == alice.id, timeout=30)
    async with sandbox.gateway.offline():
        assert sandbox.gateway.connected_sessions == []
        await alice.join_voice(sandbox.general)  # dispatched while the bot is away
    await resumed
    _member, _, after = await seen
    assert after.channel is not None
    assert after.channel.id == sandbox.general.id
    record = sandbox.gateway.resumes[-1]
    assert "VOICE_STATE_UPDATE" in record.replayed
    assert sandbox.gateway.identifies == 1
    # The resumed session carries on: commands still work.
    pong = await alice.invoke("ping")
    assert pong.content == "pong"


async def test_reconnect_opcode_makes_the_bot_resume(sandbox: Sandbox, bot: SandboxBot) -> None:
    resumed = bot.wait_for("resumed", timeout=30)
    sandbox.gateway.send_reconnect()
    await resumed
    await sandbox.wait_for(lambda: sandbox.gateway.connected_sessions)
    assert sandbox.gateway.identifies == 1
    assert len(sandbox.gateway.resumes) == 1
    alice = sandbox.add_user("alice")
    assert (await alice.invoke("echo", text="still here")).content == "still here"


async def test_invalid_session_makes_the_bot_identify_again(
    sandbox: Sandbox, bot: SandboxBot
) -> None:
    bot.ready.clear()
    sandbox.gateway.invalidate_session(resumable=False)
    await sandbox.wait_for(lambda: sandbox.gateway.identifies == 2)
    async with asyncio.timeout(20):
        await bot.ready.wait()
    alice = sandbox.add_user("alice")
    assert (await alice.invoke("ping")).content == "pong"


async def test_unknown_routes_get_a_discord_404(sandbox: Sandbox, bot: SandboxBot) -> None:
    with pytest.raises(discord.NotFound) as caught:
        await bot.http.request(discord.http.Route("GET", "/voice/regions/nowhere"))
    assert caught.value.code == 0
    assert sandbox.rest.unknown_routes == ["GET /api/v10/voice/regions/nowhere"]


async def test_bot_close_is_clean(sandbox: Sandbox) -> None:
    loop = asyncio.get_running_loop()
    problems: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: problems.append(context))
    try:
        async with running(sandbox) as bot:
            alice = sandbox.add_user("alice")
            assert (await alice.invoke("ping")).content == "pong"
        assert bot.is_closed()
        # discord.py's close races its own reader, which closes with 4000 (resumable), so the
        # session outlives the socket as it would on Discord; the socket itself is gone.
        await sandbox.wait_for(lambda: not sandbox.gateway.connected_sessions)
        leftovers = [
            t
            for t in asyncio.all_tasks()
            if "/discord/" in t.get_coro().cr_code.co_filename  # type: ignore[union-attr]
        ]
        assert leftovers == []
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert [c.get("message") for c in problems] == []


async def test_voice_server_update_lets_the_bot_identify_at_the_voice_server(
    sandbox: Sandbox, bot: SandboxBot
) -> None:
    guild = bot.get_guild(sandbox.guild.id)
    assert guild is not None
    lounge = guild.get_channel(sandbox.lounge.id)
    assert isinstance(lounge, discord.VoiceChannel)
    await guild.change_voice_state(channel=lounge)
    update = (await bot.wait_dispatched("VOICE_SERVER_UPDATE"))[0]
    own_state = next(
        d for d in bot.dispatched("VOICE_STATE_UPDATE") if d["user_id"] == str(sandbox.bot.id)
    )
    identify = {
        "op": 0,
        "d": {
            "server_id": update["guild_id"],
            "user_id": str(sandbox.bot.id),
            "session_id": own_state["session_id"],
            "token": update["token"],
            "max_dave_protocol_version": 1,  # DAVE is required, as on Discord
        },
    }
    # The endpoint is named as Discord names its voice servers, and served over TLS.
    assert update["endpoint"].split(":")[0].endswith(".discord.media")
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"wss://{update['endpoint']}/?v=8") as ws,
        asyncio.timeout(20),
    ):
        hello = await ws.receive_json()
        assert hello["op"] == 8
        await ws.send_json(identify)
        ready = await ws.receive_json()
        assert ready["op"] == 2
        assert ready["d"]["ssrc"] > 0

        # A moderator disconnects the bot: the gateway says so, the voice server closes 4014.
        kicked = bot.wait_for(
            "voice_state_update",
            check=lambda m, b, a: m == guild.me and a.channel is None,
            timeout=20,
        )
        await sandbox.disconnect_member(sandbox.bot.id)
        await kicked
        while (msg := await ws.receive()).type is not aiohttp.WSMsgType.CLOSE:
            assert msg.type is aiohttp.WSMsgType.TEXT
        assert msg.data == 4014
