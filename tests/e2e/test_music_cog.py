"""The Music cog end to end: a real discord.py Bot loads ``legato`` and plays into the sandbox.

Scripted users run the slash commands; the sandbox's voice server records what the bot sends,
and the recording is decoded to check what was heard (frequency, level, silence).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import re
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import discord
import psutil
import pytest
from discord.ext import commands

import legato
from legato.audio.encode import OpusDecoder
from legato.audio.sources import PRIVATE, SIGN_IN
from legato.cogs.music import MusicCog
from legato.config import Config, PermissionsConfig, PlaybackConfig, SourcesConfig, VoiceConfig
from legato.errors import ConfigError
from legato.sandbox.analysis import dominant_frequency, pcm_to_mono, rms
from legato.sandbox.models import ChannelType
from legato.sandbox.recording import Recording
from legato.sandbox.server import Sandbox
from legato.sandbox.users import Reply, ScriptedUser
from legato.sandbox.voice import SandboxVoiceServer
from tests.media import MediaServer, audio_list_page, send_html, serve_page, write_tone

pytestmark = pytest.mark.e2e

PLUGINS = str(Path(__file__).resolve().parents[1] / "ytdlp_plugins")

GUARD = 30.0
A_HZ = 440.0
B_HZ = 880.0

#: The voice paths the playback and fault tests run on (issue #12 §1), as sandbox voice options.
#: Legato's voice settings stay on ``auto`` and choose from the endpoint by themselves: the
#: sandbox's default, Discord's (a ``*.discord.media`` name over TLS, DAVE required), gets v8,
#: ``udp`` and DAVE; a self-hosted server's (``127.0.0.1:PORT``, ``ws://``, no DAVE) gets v6 and
#: ``webrtc``. Every other e2e test runs on the default alone.
VOICE_PATHS: dict[str, dict[str, Any]] = {
    "v8-udp-dave": {},
    "v6-webrtc-plain": {"tls": False, "dave_protocol_version": 0},
}
#: What the voice server sees of each path: (gateway version, transport, DAVE protocol).
EXPECTED_PATH: dict[str, tuple[int, str, int]] = {
    "v8-udp-dave": (8, "udp", 1),
    "v6-webrtc-plain": (6, "webrtc", 0),
}


class MusicBot(commands.Bot):
    def __init__(self, config: Config, guild_id: int) -> None:
        super().__init__(
            command_prefix="!",
            intents=discord.Intents.default(),
            chunk_guilds_at_startup=False,
            guild_ready_timeout=0.5,
        )
        self.legato_config = config
        self.guild_id = guild_id

    async def setup_hook(self) -> None:
        await self.load_extension("legato")
        await self.tree.sync()  # global: every guild of the sandbox sees the commands

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        return None  # no 5 s IDENTIFY spacing against the sandbox

    @property
    def music(self) -> Any:
        # Not isinstance(MusicCog): unloading an extension drops every legato.* module, so each
        # load makes new classes (see legato.resolve_config).
        cog = self.get_cog("Music")
        assert cog is not None
        assert type(cog).__name__ == "MusicCog"
        return cog


@dataclasses.dataclass
class Tones:
    server: MediaServer
    root: Path
    a: str  # 440 Hz, 20 s
    b: str  # 880 Hz, 20 s
    short: str  # 440 Hz, 1 s
    playlist: str  # 23 entries
    missing: str


@pytest.fixture(scope="module")
def tones(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("music-cog")
    write_tone(root / "a440.ogg", container="ogg", codec="libopus", freq=A_HZ, seconds=20)
    write_tone(root / "b880.ogg", container="ogg", codec="libopus", freq=B_HZ, seconds=20)
    write_tone(root / "short.ogg", container="ogg", codec="libopus", freq=A_HZ, seconds=1)
    server = MediaServer(root).start()

    entries = [f"/short.ogg?n={i}" for i in range(23)]
    server.add_route("list.html", body=audio_list_page("Twenty-three", entries))
    try:
        yield Tones(
            server=server,
            root=root,
            a=server.url("a440.ogg"),
            b=server.url("b880.ogg"),
            short=server.url("short.ogg"),
            playlist=server.url("list.html"),
            missing=server.url("nothing-here.ogg"),
        )
    finally:
        server.stop()


def make_config(tones: Tones, **playback: Any) -> Config:
    base = PlaybackConfig(
        idle_timeout=0,
        leave_when_alone_after=0,
        # The media server is on loopback: the one address the URL guard lets through.
        allowed_hosts=(f"127.0.0.1:{tones.server.port}",),
        search_provider=tones.server.url("search?q={query}"),
        resolve_timeout=20,
    )
    # These tests run commands faster than a person would: no per-user rate unless one is given.
    permissions = playback.pop("permissions", PermissionsConfig(cooldown_commands=0))
    return Config(
        voice=VoiceConfig(transport="auto", gateway_version="auto"),
        playback=dataclasses.replace(base, **playback),
        permissions=permissions,
    )


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(timeout=GUARD) as sb:
        yield sb


@pytest.fixture(params=list(VOICE_PATHS))
async def path_sandbox(request: pytest.FixtureRequest) -> AsyncIterator[Sandbox]:
    """A sandbox for each voice path of :data:`VOICE_PATHS` (the playback and fault matrix).

    On the way out it checks that every voice session the bot made took the path's version,
    transport and DAVE protocol, chosen by Legato from the endpoint alone.
    """
    name: str = request.param
    async with Sandbox(timeout=GUARD, voice_options=VOICE_PATHS[name]) as sb:
        yield sb
        taken = {
            (info.version, info.protocol, info.dave_protocol_version)
            for info in sb.voice_server.selections
            if info.user_id == sb.bot.id
        }
        assert taken <= {EXPECTED_PATH[name]}, (name, taken)


@contextlib.asynccontextmanager
async def running(
    sb: Sandbox, config: Config, bot: commands.Bot | None = None
) -> AsyncIterator[Any]:
    """Start ``bot`` (default: a MusicBot with ``config``) against the sandbox until ready."""
    async with sb.running(bot or MusicBot(config, sb.guild.id), GUARD) as started:
        yield started
        # Every interaction was answered within Discord's 3 s (a late one is 'Unknown').
        assert sb.rest.late_callbacks == []


def recording(sb: Sandbox) -> Recording:
    voice = sb.voice
    assert isinstance(voice, SandboxVoiceServer)
    return voice.recording(sb.bot.id)


async def answer(reply: Reply) -> str:
    """The text of a reply; after a deferral, wait for the message that replaces 'thinking'."""
    if reply.deferred and not reply.text():
        await reply.wait_edit(timeout=GUARD)
    return reply.text()


async def heard(rec: Recording, frames: int, *, skip: int = 0) -> tuple[float, float]:
    """Wait for ``skip + frames`` new frames; return (dominant Hz, RMS) of the last ``frames``."""
    base = rec.frames
    await rec.wait_frames(base + skip + frames, timeout=GUARD)
    packets = rec.opus_frames()[base + skip : base + skip + frames]

    def analyse() -> tuple[float, float]:
        decoder = OpusDecoder()
        mono = pcm_to_mono(b"".join(decoder.decode(p) for p in packets))
        return dominant_frequency(mono[4800:]), rms(mono[4800:])

    return await asyncio.to_thread(analyse)


async def refused(reply: Reply, *needles: str) -> str:
    text = await answer(reply)
    assert reply.ephemeral, f"not ephemeral: {text!r}"
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    assert "Traceback" not in text
    return text


async def start_playing(sb: Sandbox, user: ScriptedUser, url: str) -> Reply:
    reply = await user.invoke("play", query=url)
    text = await answer(reply)
    assert text.startswith(("Playing", "Queued")), text
    return reply


def upcoming(bot: MusicBot, sb: Sandbox) -> list[str]:
    session = bot.music.session(sb.guild.id)
    assert session is not None
    return [t.url for t in session.queue.upcoming]


# --- playback ---------------------------------------------------------------------------------


async def test_play_pause_volume_seek_skip_loop(sandbox: Sandbox, tones: Tones) -> None:
    sb = sandbox
    async with running(sb, make_config(tones)) as bot:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)

        joined = await alice.invoke("join")
        assert joined.ephemeral
        assert "Joined" in await answer(joined)
        await sb.wait_bot_voice(sb.general)

        await start_playing(sb, alice, tones.a)
        rec = recording(sb)
        await rec.wait_speaking(True, timeout=GUARD)
        freq, level_full = await heard(rec, 50, skip=10)
        assert freq == pytest.approx(A_HZ, abs=15)
        assert level_full > 0.1

        queued = await alice.invoke("play", query=tones.b)
        assert "Queued" in await answer(queued)
        assert "position 1" in queued.text()

        # Pause: speaking goes off and no frame follows.
        paused = await alice.invoke("pause")
        assert paused.text() == "Paused."
        assert not paused.ephemeral
        await rec.wait_speaking(False, timeout=GUARD)
        shown = await alice.invoke("nowplaying")
        assert "Paused" in shown.text()
        assert "a440" in shown.text()
        # Counted after a round trip, so the trailing silence frames are all in; then nothing.
        frames_at_pause = rec.frames
        await alice.invoke("queue")
        await alice.invoke("nowplaying")
        assert rec.frames == frames_at_pause
        assert not rec.speaking
        resumed = await alice.invoke("resume")
        assert resumed.text() == "Resumed."
        await rec.wait_speaking(True, timeout=GUARD)

        # Volume: half the level (frames buffered before the change keep the old one).
        vol = await alice.invoke("volume", percent=50)
        assert "Volume set to 50%" in await answer(vol)
        freq, level_half = await heard(rec, 40, skip=25)
        assert freq == pytest.approx(A_HZ, abs=15)
        assert level_half == pytest.approx(level_full / 2, rel=0.2)

        # Seek forward: /nowplaying shows the new position.
        sought = await alice.invoke("seek", position="0:15")
        assert "Jumped to 0:15" in await answer(sought)
        shown = await alice.invoke("nowplaying")
        description = str(shown.embeds[0]["description"])
        match = re.search(r"(\d+):(\d\d)", description)
        assert match is not None, description
        assert int(match.group(1)) * 60 + int(match.group(2)) >= 13  # was about 0:02

        # Loop and queue views.
        looped = await alice.invoke("loop", mode="queue")
        assert looped.text() == "Loop: queue."
        q = await alice.invoke("queue")
        assert "b880" in q.text()
        assert "loop: queue" in q.text()

        # Skip: the next track is heard.
        skipped = await alice.invoke("skip")
        assert "Skipped **a440**" in skipped.text()
        freq, _ = await heard(rec, 40, skip=25)
        assert freq == pytest.approx(B_HZ, abs=20)

        # Announcements went to the channel where /play ran.
        posts = [m for m in sb.messages(sb.music) if m.embeds]
        assert any("Now playing" in str(m.embeds[0].get("description")) for m in posts)

        left = await alice.invoke("leave")
        assert "Left" in left.text()
        await sb.wait_bot_voice(None)
        assert bot.music.session(sb.guild.id) is None


async def test_autocomplete_suggests_search_results(sandbox: Sandbox, tones: Tones) -> None:
    sb = sandbox
    search = tones.server.add_route(
        "find",
        handler=_search_page([tones.a, tones.b]),
    )
    config = make_config(tones, search_provider=search + "?q={query}")
    async with running(sb, config):
        alice = sb.add_user("alice")
        choices = await alice.autocomplete("play", "query", "tones")
        assert [c.value for c in choices] == [tones.a, tones.b]
        assert all(len(c.name) <= 100 for c in choices)
        # A second keystroke with the same text is answered from the cache.
        requests = tones.server.request_count("find")
        again = await alice.autocomplete("play", "query", "tones")
        assert [c.value for c in again] == [tones.a, tones.b]
        assert tones.server.request_count("find") == requests
        assert await alice.autocomplete("play", "query", "https://x.test/a") == []


async def test_autocomplete_answers_within_budget_while_search_hangs(
    sandbox: Sandbox, tones: Tones
) -> None:
    sb = sandbox
    stalled = tones.server.add_route("hang", body=b"<html>", stall_after=0)
    async with running(sb, make_config(tones, search_provider=stalled + "?q={query}")):
        alice = sb.add_user("alice")
        # The search never answers; the bot still answers (with what is ready: nothing).
        assert await alice.autocomplete("play", "query", "never") == []
        assert tones.server.request_count("hang") >= 1


async def test_unexpected_error_is_logged_and_answered_generically(
    sandbox: Sandbox, tones: Tones, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(RuntimeError):
        pass

    class ExplodingResolver:
        """Fault injection: a bug below the cog."""

        async def resolve(self, query: str, *, requester_id: int = 0) -> list[Any]:
            raise Broken("secret internal detail")

        def close(self) -> None:
            pass

    class InjectedBot(MusicBot):
        async def setup_hook(self) -> None:
            resolver: Any = ExplodingResolver()
            await self.add_cog(MusicCog(self, self.legato_config, resolver=resolver))
            await self.tree.sync()

    sb = sandbox
    config = make_config(tones)
    async with running(sb, config, InjectedBot(config, sb.guild.id)) as bot:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        with caplog.at_level("ERROR", logger="legato.cogs.music"):
            text = await refused(await alice.invoke("play", query=tones.a), "went wrong")
        assert "secret" not in text
        failures = [r for r in caplog.records if r.exc_info and r.exc_info[0] is Broken]
        assert failures, "the unexpected error was not logged with its traceback"
        assert bot.music.session(sb.guild.id) is None


def _search_page(urls: list[str]) -> Callable[[Any], None]:
    body = audio_list_page("Results", urls)
    return serve_page(lambda: body)


async def test_playnext_previous_and_unload_leaves(sandbox: Sandbox, tones: Tones) -> None:
    sb = sandbox
    async with running(sb, make_config(tones)) as bot:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        await start_playing(sb, alice, tones.a)
        await start_playing(sb, alice, tones.short)
        nxt = await alice.invoke("playnext", query=tones.b)
        assert "at position 1" in await answer(nxt)
        assert upcoming(bot, sb) == [tones.b, tones.short]

        rec = recording(sb)
        await alice.invoke("skip")
        freq, _ = await heard(rec, 30, skip=25)
        assert freq == pytest.approx(B_HZ, abs=20)
        back = await alice.invoke("previous")
        assert back.text() == "Back to **a440**."
        freq, _ = await heard(rec, 30, skip=25)
        assert freq == pytest.approx(A_HZ, abs=15)
        assert upcoming(bot, sb) == [tones.b, tones.short]

        # Unloading the extension leaves voice and stops the music.
        await bot.unload_extension("legato")
        await sb.wait_bot_voice(None)
        assert bot.get_cog("Music") is None


async def test_join_moves_the_bot_and_the_music_goes_on(sandbox: Sandbox, tones: Tones) -> None:
    sb = sandbox
    async with running(sb, make_config(tones)) as bot:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        await start_playing(sb, alice, tones.a)
        await sb.wait_bot_voice(sb.general)
        again = await alice.invoke("join")
        assert "already in" in await refused(again)

        await alice.join_voice(sb.lounge)
        moved = await alice.invoke("join")
        assert "Joined" in await answer(moved)
        await sb.wait_bot_voice(sb.lounge)
        session = bot.music.session(sb.guild.id)
        assert session is not None
        assert session.channel.id == sb.lounge.id
        # Commands now need the new channel.
        bob = sb.add_user("bob")
        await bob.join_voice(sb.general)
        await refused(await bob.invoke("pause"), "You need to be in")
        shown = await alice.invoke("nowplaying")
        assert "a440" in shown.text()


async def test_two_guilds_play_different_tracks_at_once(sandbox: Sandbox, tones: Tones) -> None:
    sb = sandbox
    world = sb.world
    second = world.add_guild("Second", owner=sb.owner)
    world.add_member(second, sb.bot)
    text2 = world.add_channel(second, "music", ChannelType.TEXT)
    voice2 = world.add_channel(second, "Hall", ChannelType.VOICE)
    zed_user = world.add_user("zed")
    world.add_member(second, zed_user)
    zed = ScriptedUser(sb, zed_user, second)
    async with running(sb, make_config(tones)) as bot:
        assert bot.get_guild(second.id) is not None
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        await zed.join_voice(voice2)
        await start_playing(sb, alice, tones.a)
        reply = await zed.invoke("play", query=tones.b, channel=text2)
        assert (await answer(reply)).startswith("Playing")

        voice = sb.voice
        assert isinstance(voice, SandboxVoiceServer)
        first_rec = voice.recording(sb.bot.id, sb.guild.id)
        second_rec = voice.recording(sb.bot.id, second.id)
        (f1, _), (f2, _) = await asyncio.gather(
            heard(first_rec, 40, skip=10), heard(second_rec, 40, skip=10)
        )
        assert f1 == pytest.approx(A_HZ, abs=15)
        assert f2 == pytest.approx(B_HZ, abs=20)
        assert {s for s in bot.music.sessions} == {sb.guild.id, second.id}
        # Each announcement went to the channel where its /play ran.
        await sb.wait_for_message(text2, lambda m: "b880" in str(m.embeds))
        await sb.wait_for_message(sb.music, lambda m: "a440" in str(m.embeds))
        assert not any("a440" in str(m.embeds) for m in sb.messages(text2))

        # Each guild's commands act on its own session only.
        await zed.invoke("pause", channel=text2)
        await second_rec.wait_speaking(False, timeout=GUARD)
        assert first_rec.speaking


# --- the queue --------------------------------------------------------------------------------


async def test_queue_pages_only_for_the_caller(sandbox: Sandbox, tones: Tones) -> None:
    sb = sandbox
    async with running(sb, make_config(tones)) as bot:
        alice = sb.add_user("alice")
        bob = sb.add_user("bob")
        await alice.join_voice(sb.general)
        await bob.join_voice(sb.general)
        await start_playing(sb, alice, tones.a)
        added = await alice.invoke("play", query=tones.playlist)
        assert "Queued 23 tracks" in await answer(added)
        assert len(upcoming(bot, sb)) == 23

        page = await alice.invoke("queue")
        assert not page.ephemeral
        footer = page.embeds[0]["footer"]["text"]
        assert footer.startswith("Page 1/3 · 23 queued")
        prev_id, next_id = page.custom_ids
        assert "`1.`" in page.text()

        denied = await bob.press(page, next_id)
        assert denied.ephemeral
        assert "Only" in denied.text()
        assert page.embeds[0]["footer"]["text"].startswith("Page 1/3")

        turned = await alice.press(page, next_id)
        assert turned.message is not None
        assert page.embeds[0]["footer"]["text"].startswith("Page 2/3")
        assert "`11.`" in page.text()
        assert "`1.`" not in page.text()
        back = await alice.press(page, prev_id)
        assert back.message is not None
        assert page.embeds[0]["footer"]["text"].startswith("Page 1/3")

        # Editing the queue: move, remove, shuffle, clear.
        before = upcoming(bot, sb)
        moved = await alice.invoke("move", position=3, to=1)
        assert "to position 1" in moved.text()
        after = upcoming(bot, sb)
        assert after[0] == before[2]
        assert sorted(after) == sorted(before)
        removed = await alice.invoke("remove", position=1)
        assert "Removed" in removed.text()
        assert len(upcoming(bot, sb)) == 22
        shuffled = await alice.invoke("shuffle")
        assert "Shuffled 22 tracks" in shuffled.text()
        cleared = await alice.invoke("clear")
        assert "Cleared 22 tracks" in cleared.text()
        assert upcoming(bot, sb) == []


# --- refusals ---------------------------------------------------------------------------------


async def test_bad_inputs_are_ephemeral_and_keep_the_queue(sandbox: Sandbox, tones: Tones) -> None:
    sb = sandbox
    config = make_config(
        tones, max_volume=120, max_queue_length=3, max_track_duration=10, allow_local_files=True
    )
    async with running(sb, config) as bot:
        alice = sb.add_user("alice")
        bob = sb.add_user("bob")

        await refused(await alice.invoke("play", query=tones.a), "Join a voice channel first")
        await refused(await alice.invoke("pause"), "not in a voice channel")
        await refused(await alice.invoke("queue"), "not in a voice channel")

        await alice.join_voice(sb.general)
        # Over the length limit (20 s > 10 s; a local file's length is known before playing).
        local = str(tones.root / "a440.ogg")
        await refused(await alice.invoke("play", query=local), "0:20 long; the limit is 0:10")
        assert bot.music.session(sb.guild.id) is None  # refused before joining
        await start_playing(sb, alice, tones.short)
        for _ in range(3):
            await start_playing(sb, alice, tones.short)
        queue = upcoming(bot, sb)
        assert len(queue) == 3

        await refused(await alice.invoke("play", query=tones.short), "The queue is full")
        await refused(await alice.invoke("play", query=tones.playlist), "The queue is full")
        await refused(await alice.invoke("seek", position="soon"), "is not a position")
        await refused(await alice.invoke("volume", percent=150), "The maximum is 120%")
        await refused(await alice.invoke("remove", position=9), "no track 9")
        await refused(await alice.invoke("move", position=1, to=7), "no track 7")
        await refused(await alice.invoke("resume"), "not paused")
        await refused(await bob.invoke("skip"), "You need to be in")
        assert upcoming(bot, sb) == queue

        await alice.invoke("clear")
        await refused(await alice.invoke("play", query=tones.missing), "not found")
        await refused(await alice.invoke("play", query="ftp://x.test/a.ogg"), "web links")
        # Internal addresses are refused (the URL guard), whatever port.
        await refused(await alice.invoke("play", query="http://127.0.0.1:1/x.ogg"), "not allowed")
        await refused(await alice.invoke("play", query="http://169.254.169.254/"), "not allowed")
        assert upcoming(bot, sb) == []

        # A link whose length only the decoder learns is skipped when it starts, with a notice.
        await start_playing(sb, alice, tones.a)
        notice = await sb.wait_for_message(sb.music, lambda m: "0:20 long" in m.content)
        assert notice.content == "Skipped **a440**: it is 0:20 long; the limit is 0:10."


async def test_allowed_domains(sandbox: Sandbox, tones: Tones) -> None:
    sb = sandbox
    async with running(sb, make_config(tones, allowed_domains=("example.com",))):
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        await refused(await alice.invoke("play", query=tones.a), "not allowed", "example.com")


async def test_dj_rules_and_vote_skip(sandbox: Sandbox, tones: Tones) -> None:
    sb = sandbox
    perms = PermissionsConfig(dj_role="DJ", skip="requester", stop="dj", vote_skip_ratio=0.6)
    async with running(sb, make_config(tones, permissions=perms)) as bot:
        alice = sb.add_user("alice")
        bob = sb.add_user("bob")
        carol = sb.add_user("carol")
        dj = sb.add_user("dora", roles=("DJ",))
        for user in (alice, bob, carol, dj):
            await user.join_voice(sb.general)
        await start_playing(sb, alice, tones.a)
        await start_playing(sb, alice, tones.b)

        await refused(await bob.invoke("stop"), "You need the DJ role")
        await refused(await bob.invoke("clear"), "You need the DJ role")
        await refused(await bob.invoke("remove", position=1), "You need the DJ role")
        assert upcoming(bot, sb) == [tones.b]

        # Four listeners, ratio 0.6: three votes skip.
        vote = await bob.invoke("skip")
        assert vote.text() == "Vote to skip recorded: 1/3."
        again = await bob.invoke("skip")
        assert again.text() == "Vote to skip recorded: 1/3."
        vote = await carol.invoke("skip")
        assert vote.text() == "Vote to skip recorded: 2/3."
        # The requester may skip outright.
        skipped = await alice.invoke("skip")
        assert "Skipped **a440**" in skipped.text()

        stopped = await dj.invoke("stop")
        assert stopped.text() == "Stopped and cleared the queue."
        assert upcoming(bot, sb) == []


async def test_dj_role_by_id_and_a_listener_alone_counts_as_dj(
    sandbox: Sandbox, tones: Tones
) -> None:
    sb = sandbox
    perms = PermissionsConfig(dj_role=sb.dj_role.id, stop="dj", clear="dj", vote_skip_ratio=0)
    async with running(sb, make_config(tones, permissions=perms)) as bot:
        alice = sb.add_user("alice")
        bob = sb.add_user("bob")
        dj = sb.add_user("dora", roles=("DJ",))
        for user in (alice, bob):
            await user.join_voice(sb.general)
        await start_playing(sb, alice, tones.a)
        await start_playing(sb, alice, tones.b)
        await refused(await alice.invoke("clear"), "You need the DJ role")
        await dj.join_voice(sb.general)
        cleared = await dj.invoke("clear")
        assert cleared.text() == "Cleared 1 tracks from the queue."
        await dj.leave_voice()

        await start_playing(sb, alice, tones.b)
        await bob.leave_voice()
        # Alone with the bot, alice counts as DJ.
        await sb.wait_for(lambda: sb.voice_state(bob.id) is None)
        cleared = await alice.invoke("clear")
        assert cleared.text() == "Cleared 1 tracks from the queue."
        assert upcoming(bot, sb) == []


# --- leaving ----------------------------------------------------------------------------------


async def test_kick_and_channel_delete_clean_up(sandbox: Sandbox, tones: Tones) -> None:
    sb = sandbox
    async with running(sb, make_config(tones)) as bot:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        await start_playing(sb, alice, tones.a)
        await recording(sb).wait_speaking(True, timeout=GUARD)

        await sb.disconnect_member(sb.bot.id)
        await sb.wait_for_message(sb.music, lambda m: "disconnected" in m.content)
        assert bot.music.session(sb.guild.id) is None
        assert sb.guild.id not in bot.music.sessions

        lounge = sb.add_channel("Temp", voice=True)
        await alice.join_voice(lounge)
        await start_playing(sb, alice, tones.a)
        await sb.wait_bot_voice(lounge)
        last = sb.messages(sb.music)[-1].id
        await sb.delete_channel(lounge)
        await sb.wait_for_message(sb.music, lambda m: "disconnected" in m.content, after=last)
        assert bot.music.session(sb.guild.id) is None


async def test_idle_and_alone_timeouts_leave(sandbox: Sandbox, tones: Tones) -> None:
    sb = sandbox
    config = make_config(tones, idle_timeout=0.5, leave_when_alone_after=0.5)
    async with running(sb, config) as bot:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        joined = await alice.invoke("join")
        await answer(joined)
        await sb.wait_for_message(sb.music, lambda m: "Nothing played" in m.content)
        await sb.wait_bot_voice(None)
        assert bot.music.session(sb.guild.id) is None

        await start_playing(sb, alice, tones.a)
        await sb.wait_bot_voice(sb.general)
        await alice.leave_voice()
        await sb.wait_for_message(sb.music, lambda m: "Everyone left" in m.content)
        await sb.wait_bot_voice(None)
        assert bot.music.session(sb.guild.id) is None


async def test_ready_made_bot_of_legato_run_plays(
    sandbox: Sandbox, tones: Tones, caplog: pytest.LogCaptureFixture
) -> None:
    from legato.__main__ import LegatoBot

    sb = sandbox
    config = make_config(tones)
    bot = LegatoBot(config, chunk_guilds_at_startup=False)
    gc.unfreeze()
    with caplog.at_level(logging.INFO, logger="legato.doctor"):
        async with running(sb, config, bot):
            # The doctor's summary is logged at start, before the extension loads.
            assert "doctor: 10 checks: 0 blocker(s)" in caplog.text
            # What start-up made is frozen at READY, out of the collector's full scans.
            assert gc.get_freeze_count() > 0
            gc.unfreeze()  # the rest of this test process collects as usual
            assert {c.name for c in sb.commands(guild=False)} >= {"play", "queue", "nowplaying"}
            alice = sb.add_user("alice")
            await alice.join_voice(sb.general)
            await start_playing(sb, alice, tones.a)
            freq, _ = await heard(recording(sb), 30, skip=10)
            assert freq == pytest.approx(A_HZ, abs=15)


async def test_decoding_in_worker_processes(sandbox: Sandbox, tones: Tones) -> None:
    sb = sandbox
    async with running(sb, make_config(tones, decode_processes=1, decode_threads_first=0)) as bot:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        await start_playing(sb, alice, tones.a)
        rec = recording(sb)
        freq, level_full = await heard(rec, 50, skip=10)
        assert freq == pytest.approx(A_HZ, abs=15)
        # A volume change takes the track off passthrough: decoded and encoded in the worker.
        vol = await alice.invoke("volume", percent=50)
        assert "Volume set to 50%" in await answer(vol)
        freq, level_half = await heard(rec, 40, skip=25)
        assert freq == pytest.approx(A_HZ, abs=15)
        assert level_half == pytest.approx(level_full / 2, rel=0.2)
        pool = bot.music.decode_pool
        assert pool is not None
        workers = pool.pids
        assert len(workers) == 1
        assert psutil.pid_exists(workers[0])
    # Unloading the cog (closing the bot) ends its worker processes.
    assert not any(psutil.pid_exists(pid) for pid in workers)


async def test_youtube_refusals_reach_the_user_as_one_sentence(
    sandbox: Sandbox, tones: Tones, caplog: pytest.LogCaptureFixture
) -> None:
    sb = sandbox
    # tests/ytdlp_plugins fails as yt-dlp's YouTube extractor does (see its docstring); loaded
    # through [sources] plugin_dirs, as a PO-token provider's plugin would be.
    config = dataclasses.replace(make_config(tones), sources=SourcesConfig(plugin_dirs=(PLUGINS,)))
    async with running(sb, config):
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        base = tones.server.url("legato-refuse")
        with caplog.at_level(logging.INFO, logger="legato"):
            text = await refused(await alice.invoke("play", query=f"{base}/bot"), SIGN_IN)
            assert "yt-dlp" not in text
            assert "Sign in to confirm" not in text
            await refused(await alice.invoke("play", query=f"{base}/private"), PRIVATE)
        remedies = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(
            m.startswith("YouTube asked this bot to sign in: set `[sources] cookies_file`")
            for m in remedies
        ), remedies


# --- loading ----------------------------------------------------------------------------------


async def test_bad_config_file_is_refused_with_its_message(tmp_path: Path) -> None:
    path = tmp_path / "legato.toml"
    path.write_text("[playback]\nmax_volum = 100\n", encoding="utf-8")
    bot = commands.Bot(command_prefix="!", intents=discord.Intents.default())
    bot.legato_config_path = str(path)  # type: ignore[attr-defined]  # the documented hook
    with pytest.raises(commands.ExtensionFailed) as info:
        await bot.load_extension("legato")
    original = info.value.original
    assert type(original).__name__ == ConfigError.__name__
    assert str(path) in str(original)
    assert "did you mean 'playback.max_volume'?" in str(original)
    assert bot.get_cog("Music") is None
    await bot.close()


async def test_configure_names_the_file_and_teardown_removes_the_cog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LEGATO_CONFIG", raising=False)  # restored after the test
    path = tmp_path / "custom.toml"
    path.write_text(
        "[playback]\nmax_volume = 111\nthread_switch_interval_ms = 2.5\n", encoding="utf-8"
    )
    legato.configure(path)
    before = sys.getswitchinterval()
    assert before != pytest.approx(0.0025)
    try:
        bot = commands.Bot(command_prefix="!", intents=discord.Intents.default())
        await bot.load_extension("legato")
        assert sys.getswitchinterval() == pytest.approx(0.0025)
        cog: Any = bot.get_cog("Music")
        assert type(cog).__name__ == MusicCog.__name__
        assert cog.config.playback.max_volume == 111
        assert cog.config.source == str(path)
        names = {c.name for c in bot.tree.get_commands()}
        assert {"join", "play", "playnext", "leave", "pause", "resume", "skip"} <= names
        assert {"previous", "stop", "queue", "nowplaying", "volume", "seek", "loop"} <= names
        assert {"shuffle", "remove", "move", "clear"} <= names
        await bot.unload_extension("legato")
        assert bot.get_cog("Music") is None
        assert bot.tree.get_commands() == []
        assert sys.getswitchinterval() == pytest.approx(before)
        await bot.close()
    finally:
        legato.configure(None)
        sys.setswitchinterval(before)


def _legato_tasks() -> list[str]:
    """Tasks running Legato's code (not the sandbox's), by name and coroutine."""
    package = Path(legato.__file__).parent
    sandbox = package / "sandbox"
    found = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if code is None:
            continue
        where = Path(code.co_filename)
        if where.is_relative_to(package) and not where.is_relative_to(sandbox):
            found.append(f"{task.get_name()}: {code.co_qualname}")
    return found


async def test_unload_while_play_resolves_leaves_no_session_and_no_error(
    sandbox: Sandbox, tones: Tones, caplog: pytest.LogCaptureFixture
) -> None:
    """The extension is unloaded while a /play's yt-dlp call is reading its page in a worker.
    That call finishes after the cog has ended its sessions and shut its executor down: the
    /play must not make a session then (its player would outlive the cog); it is answered that
    the player is shutting down, and nothing is logged as an error."""
    sb = sandbox
    entered, release = threading.Event(), threading.Event()
    body = audio_list_page("Held", ["/a440.ogg?held=1", "/b880.ogg?held=2"])

    def held(request: Any) -> None:
        if request.command == "GET":  # the URL guard's HEAD passes; yt-dlp's GET waits
            entered.set()
            release.wait(GUARD)
        send_html(request, body)

    url = tones.server.add_route("held/list.html", handler=held)
    with caplog.at_level(logging.INFO):
        async with running(sb, make_config(tones)) as bot:
            alice = sb.add_user("alice")
            await alice.join_voice(sb.general)
            await start_playing(sb, alice, tones.a)
            assert _legato_tasks()  # the session's player is feeding
            reply = await alice.invoke("play", query=url)
            try:
                assert await asyncio.to_thread(entered.wait, GUARD)
                await bot.unload_extension("legato")
            finally:
                release.set()  # the worker's yt-dlp call now returns its two tracks
            text = await refused(reply, "shutting down")
            await sb.wait_bot_voice(None)
            assert bot.get_cog("Music") is None
            assert _legato_tasks() == []
    assert text == "The music player is shutting down; try again in a moment."
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert "/play refused: the music cog is unloading" in caplog.text
