"""Issue #11, hostile input: what users type reaches the cog whole, and nothing breaks.

Malformed links, blank queries, text that would forge log lines, /seek used as a skip, two
/skip at once, the length limit at the edge, and lengths only the decoder learns.
"""

from __future__ import annotations

import asyncio
import io
import logging
import struct
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from legato.config import PermissionsConfig
from legato.sandbox.server import Sandbox
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


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("legato")]


# --- malformed links ----------------------------------------------------------------------------


@pytest.mark.parametrize("allowed_domains", [(), ("example.com",)])
async def test_malformed_bracketed_links_are_refused_plainly(
    sandbox: Sandbox,
    tones: Tones,
    caplog: pytest.LogCaptureFixture,
    allowed_domains: tuple[str, ...],
) -> None:
    sb = sandbox
    config = make_config(tones, allowed_domains=allowed_domains)
    async with running(sb, config) as bot:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        with caplog.at_level(logging.INFO, logger="legato"):
            for query in ("http://[::1", "http://[127.0.0.1]/", "https://]/", "http://x:abc/"):
                for command in ("play", "playnext"):
                    text = await refused(await alice.invoke(command, query=query))
                    assert text == "That is not a valid web address.", (query, text)
        assert bot.music.session(sb.guild.id) is None
        assert not [r for r in _records(caplog) if r.levelno >= logging.ERROR]


# --- log injection -----------------------------------------------------------------------------

_FORGED = "ERROR legato.cogs.music: FORGED LINE"


async def test_user_text_cannot_forge_log_lines(
    sandbox: Sandbox, tones: Tones, tmp_path: Path
) -> None:
    sb = sandbox
    search = tones.server.add_route("forge-find", body=b"<html></html>")
    config = make_config(tones, search_provider=search + "?q={query}", allow_local_files=True)
    evil = f"x\n{_FORGED}\x1b[31m\r\u2028\x85"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    legato_log = logging.getLogger("legato")
    legato_log.addHandler(handler)
    level = legato_log.level
    legato_log.setLevel(logging.DEBUG)
    try:
        async with running(sb, config):
            alice = sb.add_user("alice")
            await alice.join_voice(sb.general)
            for query in (
                evil,  # a search
                f"{tones.a}?q={evil}".replace(" ", "%20"),  # words after a link: a search
                f"http://{evil}".replace(" ", ""),  # a link
                f"/{evil}",  # a local path
            ):
                await refused(await alice.invoke("play", query=query))
            await start_playing(sb, alice, tones.a)
            for position in (evil, f"+{evil}"):
                await refused(await alice.invoke("seek", position=position))
            await alice.autocomplete("play", "query", evil)
    finally:
        legato_log.removeHandler(handler)
        legato_log.setLevel(level)
    output = stream.getvalue()
    assert "FORGED LINE" in output  # the text was logged...
    for line in output.splitlines():
        assert not line.startswith(_FORGED), line  # ...but never as a line of its own
    for raw in ("\x1b", "\r", "\u2028", "\x85"):
        assert raw not in output


# --- blank queries ------------------------------------------------------------------------------


async def test_blank_queries_are_answered_like_an_empty_one(sandbox: Sandbox, tones: Tones) -> None:
    sb = sandbox
    search = tones.server.add_route("blank-find", body=b"<html></html>")
    config = make_config(tones, search_provider=search + "?q={query}")
    async with running(sb, config) as bot:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        for query in ("\x00", "\x00\x01\x1b", " \t\u3000\u00a0\u2028", "\u200b\u200e\x7f", "\n"):
            text = await refused(await alice.invoke("play", query=query))
            assert text == "Tell me what to play.", (query, text)
        # Nor are they searched for suggestions.
        assert await alice.autocomplete("play", "query", "\x00\x00\x1b") == []
        assert tones.server.request_count("blank-find") == 0
        assert bot.music.session(sb.guild.id) is None


# --- the length limit ---------------------------------------------------------------------------


def _silent_wav(path: Path, seconds: float, rate: int = 2000) -> str:
    """A mono 8-bit WAV of ``seconds`` (to 1/``rate`` s), sparse on disk: its length is in the
    header, which is all the resolver reads."""
    frames = round(seconds * rate)
    header = b"WAVE" + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate, 1, 8)
    header += b"data" + struct.pack("<I", frames)
    with path.open("wb") as f:
        f.write(b"RIFF" + struct.pack("<I", len(header) + frames) + header)
        f.truncate(f.tell() + frames)
    return str(path)


async def test_the_length_limit_compares_the_seconds_it_shows(
    sandbox: Sandbox, tones: Tones, tmp_path: Path
) -> None:
    sb = sandbox
    config = make_config(tones, max_track_duration=3 * 3600, allow_local_files=True)
    just = _silent_wav(tmp_path / "just.wav", 10800.0065)
    over = _silent_wav(tmp_path / "over.wav", 10801)
    async with running(sb, config) as bot:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        # Shown as 3:00:00 and the limit is 3:00:00: it fits.
        await start_playing(sb, alice, just)
        session = bot.music.session(sb.guild.id)
        assert session is not None
        assert session.queue.current is not None
        assert session.queue.current.duration == pytest.approx(10800.0065)
        text = await refused(await alice.invoke("play", query=over))
        assert text == "That is 3:00:01 long; the limit is 3:00:00."


# --- lengths only the decoder knows -------------------------------------------------------------


async def test_a_length_learned_when_the_track_opens_is_shown(
    sandbox: Sandbox, tones: Tones
) -> None:
    sb = sandbox
    async with running(sb, make_config(tones)) as bot:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        # yt-dlp reports no length for a direct link: the decoder learns 0:20 once it opens it.
        await start_playing(sb, alice, tones.a)
        await start_playing(sb, alice, tones.b)
        session = bot.music.session(sb.guild.id)
        assert session is not None
        assert session.queue.current is not None
        assert session.queue.current.duration is None
        await recording(sb).wait_speaking(True, timeout=GUARD)

        announced = await sb.wait_for_message(sb.music, lambda m: bool(m.embeds))
        assert "a440" in str(announced.embeds[0]["description"])
        assert "0:20" in str(announced.embeds[0]["description"])

        shown = (await alice.invoke("queue")).embeds[0]
        now = str(shown["description"]).split("\n")[0]
        assert now.startswith("**Now:**")
        assert "0:20" in now, now
        assert "?:??" not in now, now
        playing = (await alice.invoke("nowplaying")).embeds[0]
        assert "/ 0:20" in str(playing["description"]), playing

        # Looped back into the queue, it keeps its length.
        await alice.invoke("loop", mode="queue")
        skipped = await alice.invoke("skip")
        assert "Skipped **a440**" in await answer(skipped)
        shown = (await alice.invoke("queue")).embeds[0]
        lines = str(shown["description"]).split("\n")
        assert lines[-1].startswith("`1.` [a440]"), lines
        assert "0:20" in lines[-1], lines


# --- skipping ----------------------------------------------------------------------------------


async def test_two_skips_at_once_skip_one_track(sandbox: Sandbox, tones: Tones) -> None:
    sb = sandbox
    first, second, third = tones.a, tones.b, f"{tones.a}?n=third"
    async with running(sb, make_config(tones)) as bot:
        alice = sb.add_user("alice")
        bob = sb.add_user("bob")
        for user in (alice, bob):
            await user.join_voice(sb.general)
        for url in (first, second, third):
            await start_playing(sb, alice, url)
        await recording(sb).wait_speaking(True, timeout=GUARD)
        session = bot.music.session(sb.guild.id)
        assert session is not None

        # Both saw a440 playing and pressed /skip at the same instant: a440 is skipped, once.
        replies = await asyncio.gather(alice.invoke("skip"), bob.invoke("skip"))
        texts = [await answer(r) for r in replies]
        assert texts[0] == "Skipped **a440**.", texts
        assert not replies[0].ephemeral
        assert await refused(replies[1]) == "That track was already skipped."
        current = session.queue.current
        assert current is not None
        assert current.url == second
        assert [t.url for t in session.queue.upcoming] == [third]
        # b880 is what plays next.
        announced = await sb.wait_for_message(
            sb.music, lambda m: bool(m.embeds) and "b880" in str(m.embeds[0]["description"])
        )
        assert announced.embeds
        assert session.queue.current is current

        # A later /skip is of the track playing then.
        assert await answer(await bob.invoke("skip")) == "Skipped **b880**."


async def test_seeking_to_the_end_is_a_skip_with_its_votes(sandbox: Sandbox, tones: Tones) -> None:
    sb = sandbox
    perms = PermissionsConfig(
        dj_role="DJ", skip="requester", vote_skip_ratio=0.6, cooldown_commands=0
    )
    async with running(sb, make_config(tones, permissions=perms)) as bot:
        alice = sb.add_user("alice")
        bob = sb.add_user("bob")
        carol = sb.add_user("carol")
        for user in (alice, bob, carol):
            await user.join_voice(sb.general)
        await start_playing(sb, alice, tones.a)
        await start_playing(sb, alice, tones.b)
        await recording(sb).wait_speaking(True, timeout=GUARD)
        session = bot.music.session(sb.guild.id)
        assert session is not None
        playing = session.queue.current

        # Bob only votes: past the end (or into the last second) is a vote, as /skip would be.
        for position in ("999", "0:19.5", "+99:00"):
            vote = await bob.invoke("seek", position=position)
            assert await answer(vote) == "Vote to skip recorded: 1/2.", position
        assert session.queue.current is playing
        # Carol's is the second vote: a440 is skipped.
        assert await answer(await carol.invoke("seek", position="+10:00")) == "Skipped **a440**."
        assert session.queue.current is not None
        assert session.queue.current.url == tones.b
        # A seek within the track is still anyone's.
        assert await answer(await bob.invoke("seek", position="0:05")) == "Jumped to 0:05."
        # A whole second left is not the end.
        assert await answer(await bob.invoke("seek", position="0:19")) == "Jumped to 0:19."


async def test_a_stream_without_a_length_is_not_seeked(sandbox: Sandbox, tones: Tones) -> None:
    sb = sandbox
    body = (tones.root / "a440.ogg").read_bytes()

    def endless(request: BaseHTTPRequestHandler) -> None:
        # No length and no ranges: what a live radio stream looks like to the decoder.
        request.send_response(200)
        request.send_header("Content-Type", "audio/ogg")
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(body)

    radio = tones.server.add_route("radio.ogg", handler=endless)
    async with running(sb, make_config(tones)) as bot:
        alice = sb.add_user("alice")
        await alice.join_voice(sb.general)
        await start_playing(sb, alice, radio)
        await recording(sb).wait_speaking(True, timeout=GUARD)
        session = bot.music.session(sb.guild.id)
        assert session is not None
        assert session.duration is None
        for position in ("+60", "0:05", "-5"):
            text = await refused(await alice.invoke("seek", position=position))
            assert text == "This stream is live; it cannot be seeked.", position
        assert session.player.state.value == "playing"
