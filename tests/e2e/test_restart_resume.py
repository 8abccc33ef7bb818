"""A bot killed mid-song comes back where it was: Legato's ready-made bot, SIGKILLed, restarted.

The sandbox runs in the test process; the bot is a child process (``tests/e2e/restart_bot.py``)
with ``[storage]`` on. In two guilds a listener plays a long chirp (its frequency tells the
position), queues two more tracks, sets a loop mode and a volume. After a few seconds of audio
the bot is SIGKILLed and started again. Each guild must be rejoined and its chirp heard again
on a new stream after the new session's READY, from its first audible frames at the saved
position (nothing from the start of the track), as loud as before, with queue, loop mode and
volume as they were. How fast that happens is measured by ``make bench``, not asserted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Final

import pytest

from legato.audio.encode import OpusDecoder
from legato.audio.queue import LoopMode
from legato.audio.sink import OPUS_SILENCE
from legato.sandbox.analysis import dominant_frequency, pcm_to_mono, rms
from legato.sandbox.recording import ReceivedPacket, Recording
from legato.sandbox.server import GuildHandle, Sandbox
from legato.sandbox.users import Reply, ScriptedUser
from legato.store import GuildSnapshot, GuildStore
from tests.e2e.restart_bot import READY_LINE
from tests.media import MediaServer, ToneSpec, write_tone

pytestmark = pytest.mark.e2e

ROOT: Final = Path(__file__).resolve().parents[2]
GUARD: Final = 60.0
#: Resumed within 2 s of the saved position (what a 0.5 s window of the chirp can tell).
POSITION_WITHIN: Final = 2.0
#: 200 Hz to 2000 Hz over 90 s: 20 Hz a second, so a 0.5 s window places it to a few tenths.
CHIRP: Final = ToneSpec("ogg", "libopus", 200.0, seconds=90.0, freq_end=2000.0)

SAVE_INTERVAL: Final = 1.0
#: Frames of audio heard before the kill (a few seconds, so that positions have been saved).
BEFORE_KILL: Final = 200
#: Frames analysed for a position (0.5 s), after skipping the decoder's first ones.
WINDOW: Final = 25
SKIP: Final = 5


@dataclasses.dataclass
class Setup:
    """What one guild is given before the kill, and how it is checked after."""

    handle: GuildHandle
    user: ScriptedUser
    chirp: str
    queued: tuple[str, ...]
    loop: LoopMode
    volume: int


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MediaServer]:
    root = tmp_path_factory.mktemp("restart")
    CHIRP.write(root / "chirp.ogg")
    for name, hz in (("second.ogg", 440.0), ("third.ogg", 660.0)):
        write_tone(root / name, container="ogg", codec="libopus", freq=hz, seconds=5)
    with MediaServer(root) as server:
        yield server


def write_config(path: Path, media: MediaServer, db: Path) -> Path:
    path.write_text(
        f"""
[voice]
transport = "udp"

[playback]
idle_timeout = 0
leave_when_alone_after = 0
allowed_hosts = ["127.0.0.1:{media.port}"]

[storage]
enabled = true
path = "{db}"
save_interval = {SAVE_INTERVAL}
""",
        encoding="utf-8",
    )
    return path


class BotProcess:
    """``tests.e2e.restart_bot`` as a child process; its log goes to a file."""

    def __init__(self, sb: Sandbox, config: Path, log: Path) -> None:
        self.sb = sb
        self.config = config
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {**os.environ, **self.sb.child_environ(), "DISCORD_TOKEN": self.sb.bot_token}
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.e2e.restart_bot",
                self.sb.api_base,
                self.sb.gateway_url,
                str(self.config),
                cwd=ROOT,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )

    async def wait_ready(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        async with asyncio.timeout(GUARD):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    code = await self.proc.wait()
                    pytest.fail(f"the bot exited ({code}) before ready:\n{self.tail()}")
                if line.decode().strip() == READY_LINE:
                    return

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert await self.proc.wait() == -signal.SIGKILL
        self.proc = None

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self.kill()

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-60:])


@contextlib.asynccontextmanager
async def bot_process(sb: Sandbox, config: Path, log: Path) -> AsyncIterator[BotProcess]:
    bot = BotProcess(sb, config, log)
    try:
        yield bot
    finally:
        await bot.stop()


async def answer(reply: Reply) -> str:
    if reply.deferred and not reply.text():
        await reply.wait_edit(timeout=GUARD)
    return reply.text()


def recording(sb: Sandbox, guild: GuildHandle) -> Recording:
    return sb.voice_server.recording(sb.bot.id, server_id=guild.id)


def audible(packets: list[ReceivedPacket]) -> list[ReceivedPacket]:
    """``packets`` (of one stream, in arrival order: loopback does not reorder) from the first
    non-silent one."""
    first = next((i for i, p in enumerate(packets) if p.opus != OPUS_SILENCE), len(packets))
    return packets[first:]


async def resumed_audio(rec: Recording, old_ssrc: int, since: float) -> list[ReceivedPacket]:
    """Wait for ``SKIP + WINDOW`` audible frames of a new stream that arrived after ``since``."""
    while True:
        fresh = [p for p in rec.packets if p.ssrc != old_ssrc and p.arrival > since]
        heard = audible(fresh)
        if len(heard) >= SKIP + WINDOW:
            return heard
        await rec.wait_frames(rec.frames + 1, timeout=GUARD)


def analyse(frames: list[bytes], start: int) -> tuple[float, float]:
    """(chirp position at ``frames[0]``, RMS) from the window ``start .. start + WINDOW``."""
    decoder = OpusDecoder()
    pcm = [decoder.decode(f) for f in frames[: start + WINDOW]]
    mono = pcm_to_mono(b"".join(pcm[start:]))
    middle = (start + WINDOW / 2) * 0.02
    return CHIRP.time_of(dominant_frequency(mono)) - middle, rms(mono)


def analyse_tail(packets: list[ReceivedPacket]) -> tuple[float, float]:
    """(chirp position at the end of ``packets``' stream, RMS) from its last ``WINDOW`` frames."""
    frames = [p.opus for p in packets][-(SKIP + WINDOW) :]
    position, level = analyse(frames, SKIP)
    return position + (SKIP + WINDOW) * 0.02, level


def stream_packets(rec: Recording, ssrc: int) -> list[ReceivedPacket]:
    return [p for p in rec.packets if p.ssrc == ssrc]


async def load_saved(db: Path) -> dict[int, GuildSnapshot]:
    store = await GuildStore.open(db)
    try:
        return {s.guild_id: s for s in await store.load_all()}
    finally:
        await store.close()


async def test_killed_bot_resumes_every_guild_where_it_was(
    media: MediaServer, tmp_path: Path
) -> None:
    db = tmp_path / "state.db"
    config = write_config(tmp_path / "legato.toml", media, db)
    async with Sandbox(timeout=GUARD) as sb:
        second = sb.add_guild("Second")
        setups = [
            Setup(
                sb.guilds[0],
                sb.add_user("alice"),
                media.url("chirp.ogg"),
                (media.url("second.ogg"), media.url("third.ogg")),
                LoopMode.QUEUE,
                50,
            ),
            Setup(
                second,
                sb.add_user("bob", guilds=[second]),
                media.url("chirp.ogg?g=2"),
                (media.url("third.ogg?g=2"),),
                LoopMode.TRACK,
                80,
            ),
        ]
        for s in setups:
            await s.user.join_voice(s.handle.voice)
        async with bot_process(sb, config, tmp_path / "bot.log") as bot:
            await bot.start()
            await bot.wait_ready()
            for s in setups:
                text = await answer(await s.user.invoke("play", query=s.chirp))
                assert text.startswith("Playing"), text
                for url in s.queued:
                    text = await answer(await s.user.invoke("play", query=url))
                    assert text.startswith("Queued"), text
                assert "Loop" in await answer(await s.user.invoke("loop", mode=s.loop.value))
                text = await answer(await s.user.invoke("volume", percent=s.volume))
                assert text == f"Volume set to {s.volume}%.", text

            # A few seconds of audio in each guild, so that positions have been saved.
            recs = [recording(sb, s.handle) for s in setups]
            for rec in recs:
                await rec.wait_frames(rec.frames + BEFORE_KILL, timeout=GUARD)
            before = {
                s.handle.id: rec.packets[-1].ssrc for s, rec in zip(setups, recs, strict=True)
            }
            await bot.kill()
            killed_at = {
                s.handle.id: analyse_tail(stream_packets(rec, before[s.handle.id]))
                for s, rec in zip(setups, recs, strict=True)
            }

            saved = await load_saved(db)
            for s in setups:
                snap = saved[s.handle.id]
                assert snap.was_playing
                assert snap.voice_channel_id == s.handle.voice.id
                assert snap.loop == s.loop.value
                assert snap.volume == s.volume
                assert [t.url for t in snap.upcoming] == list(s.queued)
                # A position was saved as it played, and none past what was heard.
                heard, _ = killed_at[s.handle.id]
                assert 0 < snap.position <= heard + 0.5, (snap, heard)

            identifies = sb.gateway.identifies
            await bot.start()
            loop = asyncio.get_running_loop()
            ready_at = await sb.wait_for(
                lambda: loop.time() if sb.gateway.identifies > identifies else None
            )
            for s, rec in zip(setups, recs, strict=True):
                gid = s.handle.id
                await sb.wait_bot_voice(s.handle.voice)

                # A new stream, heard after READY, from the saved position on.
                packets = await resumed_audio(rec, before[gid], ready_at)
                position, level = await asyncio.to_thread(analyse, [p.opus for p in packets], SKIP)
                expected = saved[gid].position
                assert abs(position - expected) <= POSITION_WITHIN, (gid, position, expected)
                # The volume is back: as loud as before the kill (not the default 100 %).
                _, loud = killed_at[gid]
                assert 0.75 <= level / loud <= 1.33, (gid, level, loud)

            await bot.wait_ready()
            for s in setups:
                text = await answer(await s.user.invoke("volume"))
                assert text == f"Volume: {s.volume}%.", text
                text = await answer(await s.user.invoke("queue"))
                assert f"loop: {s.loop.value}" in text, text
                assert f"{len(s.queued)} queued" in text, text
