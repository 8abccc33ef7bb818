"""The Music cog against hostile input and lost connections, end to end in the sandbox.

Command spam meets the per-user rate (``[permissions] cooldown_*``); many users' /play at once
leave a consistent queue; a /play resolving while the bot is kicked is not lost; a kicked bot
keeps its queue when ``[playback] keep_queue_on_disconnect`` says so; odd numbers are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from typing import Any

import pytest

from legato.config import PermissionsConfig
from legato.sandbox.server import Sandbox
from legato.sandbox.users import Reply, ScriptedUser
from tests.e2e.test_music_cog import (
    A_HZ,
    GUARD,
    Tones,
    _search_page,
    answer,
    heard,
    make_config,
    recording,
    refused,
    running,
    start_playing,
    upcoming,
)

pytestmark = pytest.mark.e2e

_RETRY = re.compile(r"You're sending commands too fast; try again in (\d+) (?:seconds?|minutes)\.")


def current_url(bot: Any, sb: Sandbox) -> str | None:
    session = bot.music.session(sb.guild.id)
    assert session is not None
    current = session.queue.current
    return None if current is None else str(current.url)


# --- command spam -----------------------------------------------------------------------------


async def test_command_spam_is_refused_with_when_to_retry(sandbox: Sandbox, tones: Tones) -> None:
    sb = sandbox
    search = tones.server.add_route("find", handler=_search_page([tones.a, tones.b]))
    perms = PermissionsConfig(cooldown_commands=3, cooldown_seconds=300)
    config = make_config(tones, permissions=perms, search_provider=search + "?q={query}")
    async with running(sb, config) as bot:
        alice = sb.add_user("alice")
        bob = sb.add_user("bob")
        for user in (alice, bob):
            await user.join_voice(sb.general)
        await start_playing(sb, alice, tones.a)  # 1
        await start_playing(sb, alice, tones.b)  # 2
        shown = await alice.invoke("queue")  # 3
        assert "b880" in shown.text()

        # Over the rate: refused privately, with when to retry, and nothing changes.
        attempts: list[tuple[str, dict[str, Any]]] = [
            ("play", {"query": tones.short}),
            ("skip", {}),
            ("clear", {}),
            ("volume", {"percent": 5}),
        ]
        for command, options in attempts:
            reply = await alice.invoke(command, **options)
            text = await refused(reply, "too fast")
            match = _RETRY.fullmatch(text)
            assert match is not None, text
            assert text.endswith("5 minutes.")  # a 300 s window, just started
        assert upcoming(bot, sb) == [tones.b]
        assert current_url(bot, sb) == tones.a
        session = bot.music.session(sb.guild.id)
        assert session is not None
        assert session.volume_percent == 100

        # Autocomplete is not counted: bob types away, then still has his three commands.
        for _ in range(5):
            choices = await bob.autocomplete("play", "query", "tones")
            assert [c.value for c in choices] == [tones.a, tones.b]
        for _ in range(3):
            assert "b880" in (await bob.invoke("queue")).text()
        await refused(await bob.invoke("queue"), "too fast")
        # Alice, meanwhile, is still waiting: her refusals did not use up anything more.
        await refused(await alice.invoke("nowplaying"), "too fast")


# --- many users at once -----------------------------------------------------------------------


async def test_concurrent_play_from_many_users_queues_each_track_once(
    sandbox: Sandbox, tones: Tones
) -> None:
    sb = sandbox
    count = 8
    async with running(sb, make_config(tones)) as bot:
        users = [sb.add_user(f"user{i}") for i in range(count)]
        for user in users:
            await user.join_voice(sb.general)
        urls = {user.id: f"{tones.a}?from={i}" for i, user in enumerate(users)}

        async def play(user: ScriptedUser) -> tuple[ScriptedUser, str]:
            reply = await user.invoke("play", query=urls[user.id])
            return user, await answer(reply)

        # Nobody has started anything: all eight race to make the session too.
        results = await asyncio.gather(*(play(u) for u in users))

        session = bot.music.session(sb.guild.id)
        assert session is not None
        assert list(bot.music.sessions) == [sb.guild.id]
        await sb.wait_bot_voice(sb.general)
        current = session.queue.current
        assert current is not None
        queued = [current, *session.queue.upcoming]
        # Every track exactly once, nothing lost, each with its requester.
        assert sorted(t.url for t in queued) == sorted(urls.values())
        assert {t.requester_id: t.url for t in queued} == urls

        playing = [(u, text) for u, text in results if text.startswith("Playing")]
        assert len(playing) == 1, results
        assert playing[0][0].id == current.requester_id
        positions = set()
        for user, text in results:
            if text.startswith("Playing"):
                continue
            match = re.fullmatch(r"Queued \*\*a440\*\* at position (\d+)\.", text)
            assert match is not None, text
            position = int(match.group(1))
            positions.add(position)
            # The position told is where the track is.
            assert session.queue.upcoming[position - 1].requester_id == user.id
        assert positions == set(range(1, count))

        # The same again while playing, with /playnext mixed in: still each once.
        more = {u.id: f"{tones.b}?again={i}" for i, u in enumerate(users)}

        async def add(user: ScriptedUser, i: int) -> str:
            command = "playnext" if i % 2 else "play"
            return await answer(await user.invoke(command, query=more[user.id]))

        texts = await asyncio.gather(*(add(u, i) for i, u in enumerate(users)))
        assert all(t.startswith("Queued") for t in texts), texts
        queue = session.queue
        every = [t.url for t in (*queue.history, queue.current, *queue.upcoming) if t is not None]
        assert sorted(every) == sorted([*urls.values(), *more.values()])


async def test_play_resolving_while_the_bot_is_kicked_is_not_lost(
    sandbox: Sandbox, tones: Tones
) -> None:
    sb = sandbox
    arrived = threading.Event()
    gate = threading.Event()

    def slow(request: Any) -> None:
        # The first request waits until the test lets it go; then a redirect to the real file.
        arrived.set()
        gate.wait(GUARD)
        request.send_response(302)
        request.send_header("Location", tones.b)
        request.send_header("Content-Length", "0")
        request.end_headers()

    slow_url = tones.server.add_route("slow.ogg", handler=slow)
    async with running(sb, make_config(tones)) as bot:
        alice = sb.add_user("alice")
        bob = sb.add_user("bob")
        for user in (alice, bob):
            await user.join_voice(sb.general)
        await start_playing(sb, alice, tones.a)
        await recording(sb).wait_speaking(True, timeout=GUARD)

        pending = await bob.invoke("play", query=slow_url)
        assert pending.deferred
        assert await asyncio.to_thread(arrived.wait, GUARD)
        await sb.disconnect_member(sb.bot.id)
        await sb.wait_for_message(sb.music, lambda m: "disconnected" in m.content)
        assert bot.music.session(sb.guild.id) is None
        gate.set()

        # Bob's track is not added to the session that ended: the bot comes back for it.
        text = await answer(pending)
        assert text.startswith("Playing"), text
        await sb.wait_bot_voice(sb.general)
        session = bot.music.session(sb.guild.id)
        assert session is not None
        assert session.queue.current is not None
        assert session.queue.current.requester_id == bob.id
        assert upcoming(bot, sb) == []  # the cleared queue stayed cleared


# --- a lost connection keeps the queue ----------------------------------------------------------


async def test_kicked_bot_keeps_the_queue_for_the_next_join_or_play(
    sandbox: Sandbox, tones: Tones
) -> None:
    sb = sandbox
    config = make_config(tones, keep_queue_on_disconnect=True)
    extra = f"{tones.short}?n=extra"
    async with running(sb, config) as bot:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        await start_playing(sb, alice, tones.a)
        await start_playing(sb, alice, tones.b)
        await start_playing(sb, alice, tones.short)
        looped = await alice.invoke("loop", mode="queue")
        assert looped.text() == "Loop: queue."
        rec = recording(sb)
        await rec.wait_speaking(True, timeout=GUARD)

        # Kicked: the notice says the queue is kept; the session is gone.
        await sb.disconnect_member(sb.bot.id)
        notice = await sb.wait_for_message(sb.music, lambda m: "disconnected" in m.content)
        assert notice.content == (
            "I was disconnected from the voice channel; the queue (3 tracks) is kept: "
            "/join or /play to pick it up again."
        )
        assert bot.music.session(sb.guild.id) is None

        # /join puts it back, the track that was playing first (from its start), and plays.
        joined = await alice.invoke("join")
        assert await answer(joined) == (
            f"Joined <#{sb.general.id}>. The queue kept from before is back (3 tracks), "
            "starting again with **a440**."
        )
        await sb.wait_bot_voice(sb.general)
        assert current_url(bot, sb) == tones.a
        assert upcoming(bot, sb) == [tones.b, tones.short]
        session = bot.music.session(sb.guild.id)
        assert session is not None
        assert session.queue.loop.value == "queue"
        freq, _ = await heard(recording(sb), 30, skip=10)
        assert freq == pytest.approx(A_HZ, abs=15)

        # The channel deleted: kept again; /play puts it back and adds after it.
        temp = sb.add_channel("Temp", voice=True)
        await alice.join_voice(temp)
        assert "Joined" in await answer(await alice.invoke("join"))
        await sb.wait_bot_voice(temp)
        last = sb.messages(sb.music)[-1].id
        await sb.delete_channel(temp)
        notice = await sb.wait_for_message(
            sb.music, lambda m: "disconnected" in m.content, after=last
        )
        assert "the queue (3 tracks) is kept" in notice.content
        assert bot.music.session(sb.guild.id) is None

        await alice.join_voice(sb.general)
        played = await alice.invoke("play", query=extra)
        assert await answer(played) == (
            "Queued **short** at position 3. The queue kept from before is back (3 tracks), "
            "starting again with **a440**."
        )
        assert current_url(bot, sb) == tones.a
        assert upcoming(bot, sb) == [tones.b, tones.short, extra]

        # /leave is not a lost connection: nothing is kept after it.
        await alice.invoke("leave")
        await sb.wait_bot_voice(None)
        await start_playing(sb, alice, extra)
        assert upcoming(bot, sb) == []
        assert current_url(bot, sb) == extra


# --- an overloaded bot --------------------------------------------------------------------------


async def test_an_interaction_that_expired_is_logged_not_a_traceback(
    sandbox: Sandbox, tones: Tones, caplog: pytest.LogCaptureFixture
) -> None:
    sb = sandbox
    async with running(sb, make_config(tones)):
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        sb.rest.interaction_deadline = 0.0  # every answer is past Discord's 3 s
        with caplog.at_level("WARNING", logger="legato.cogs.music"):
            # /play defers first thing: that is the answer that comes too late.
            late = asyncio.create_task(alice.invoke("play", query=tones.a))
            await sb.wait_for(lambda: sb.rest.late_callbacks)
            sb.rest.interaction_deadline = 3.0
            # The next command is answered as usual; by then the first one's failure was handled.
            assert (await alice.invoke("queue")).callback_type is not None
        late.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await late
        records = [r for r in caplog.records if r.name == "legato.cogs.music"]
        assert [r.levelname for r in records] == ["WARNING"]
        assert "expired before it was answered" in records[0].getMessage()
        assert records[0].exc_info is None
        sb.rest.late_callbacks.clear()  # seen and handled; `running` checks for others


# --- odd numbers --------------------------------------------------------------------------------


async def test_out_of_range_numbers_are_refused_and_keep_the_queue(
    sandbox: Sandbox, tones: Tones
) -> None:
    sb = sandbox
    async with running(sb, make_config(tones, max_volume=120)) as bot:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        await start_playing(sb, alice, tones.a)
        await start_playing(sb, alice, tones.b)
        queue = upcoming(bot, sb)

        replies: list[Reply] = [
            await alice.invoke("seek", position="9" * 400),
            await alice.invoke("seek", position="1e308"),
            await alice.invoke("seek", position="nan"),
            await alice.invoke("remove", position=2),
            await alice.invoke("move", position=1, to=2),
            await alice.invoke("remove", position=-1),
            await alice.invoke("volume", percent=-5),
            await alice.invoke("volume", percent=10**12),
        ]
        for reply in replies:
            await refused(reply)
        assert "is not a position" in replies[0].text()
        assert len(replies[0].text()) < 400  # the input is not echoed whole
        assert "no track 2" in replies[3].text()
        assert "no track 2" in replies[4].text()
        # A step back past the start goes to the start.
        assert "Jumped to 0:00" in await answer(await alice.invoke("seek", position="-99:00"))
        assert upcoming(bot, sb) == queue
        assert current_url(bot, sb) == tones.a
        # Past the end is a skip, as /skip is (the requester may): a440 gives way to b880.
        assert await answer(await alice.invoke("seek", position="+99:59:59")) == "Skipped **a440**."
        assert current_url(bot, sb) == tones.b
