"""Queue commands at a steady rate across guilds, and the ledger that checks none was lost.

Shared by ``tests/e2e/test_queue_storm.py`` and ``bench/bench_load.py``. Scripted users run
``/play``, ``/remove``, ``/move``, ``/shuffle``, ``/skip`` and ``/clear`` through the sandbox,
the bot's gateway connection and the cog's handlers, issued on a fixed schedule (absolute
deadlines, not one after the other), so several are in flight at once.

Every track has its own title (its own file name on the media server), so the replies say which
track each command touched. Afterwards, per guild: the tracks added (``Playing``/``Queued``
replies) must equal those still queued or current, plus those named by ``Removed`` and
``Skipped`` replies, plus the count of ``Cleared N tracks``; none may appear twice, and none may
appear that was not added. A shuffle only reorders, so the ledger needs no model of the order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import discord
from discord.ext import commands

from legato.sandbox.media import MediaServer, write_tone
from legato.sandbox.server import GuildHandle, Sandbox
from legato.sandbox.users import ScriptedUser

#: Relative weights of the commands in the storm.
WEIGHTS: Final = {"play": 5, "remove": 20, "move": 25, "shuffle": 15, "skip": 10, "clear": 2}
#: Answers to commands the storm makes invalid on purpose (a position past the end ...).
REFUSALS: Final = (
    "There is no track",
    "There is nothing to shuffle",
    "The queue is already empty",
    "Nothing is playing",
    "That track was already skipped",  # two /skip of the same track at once
)
PREFILL: Final = 3
GUARD: Final = 60.0

_TITLE = re.compile(r"\*\*(p\d+ \(\d+\))\*\*")
_CLEARED = re.compile(r"^Cleared (\d+) tracks")
_FAILED = re.compile(r"^Skipped \*\*[^*]+\*\*: ")


def storm_config(media: MediaServer, *, resolve_processes: int = 0) -> str:
    """Legato's configuration for many guilds at once: `media` allowed, no timers, no
    announcements, the per-user cooldown off and the queue open to every listener; yt-dlp in
    `resolve_processes` worker processes (0: in threads)."""
    return "\n".join(
        [
            "[voice]",
            'transport = "udp"',
            "[playback]",
            "announce_now_playing = false",
            "idle_timeout = 0",
            "leave_when_alone_after = 0",
            'search_provider = "none"',
            f'allowed_hosts = ["127.0.0.1:{media.port}"]',
            f"resolve_processes = {resolve_processes}",
            "[permissions]",
            "cooldown_commands = 0",
            'clear = "everyone"',
            'stop = "everyone"',
            "",
        ]
    )


class StormBot(commands.Bot):
    """A plain discord.py bot that loads Legato with the configuration file at `config_path`."""

    def __init__(self, config_path: Path) -> None:
        super().__init__(
            command_prefix="!",
            intents=discord.Intents.default(),
            chunk_guilds_at_startup=False,  # the sandbox needs no member chunks
            guild_ready_timeout=0.5,  # READY lists every guild at once
        )
        self.legato_config_path = str(config_path)

    async def setup_hook(self) -> None:
        await self.load_extension("legato")
        await self.tree.sync()

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        return None  # no 5 s IDENTIFY spacing against the sandbox


@contextlib.asynccontextmanager
async def running_bot(sb: Sandbox, config_path: Path, guard: float = GUARD) -> AsyncIterator[Any]:
    """Start a `StormBot` (Legato loaded from `config_path`) against `sb` until it is ready."""
    async with sb.running(StormBot(config_path), guard) as bot:
        yield bot


class TrackFiles:
    """Playlists of one long Opus tone: a page per /play, its entries titled by the page.

    yt-dlp's generic extractor lists every ``<audio src>`` of a page, titled "<page title> (n)";
    one resolve then queues `per_list` tracks (resolving each link alone is far slower).
    """

    def __init__(self, root: Path, seconds: float = 120.0, per_list: int = 8) -> None:
        self.root = root
        self.per_list = per_list
        self._source = write_tone(
            root / "storm-source.ogg", freq=440.0, seconds=seconds, container="ogg", codec="libopus"
        )
        self._next = 0

    def new(self, media: MediaServer) -> tuple[list[str], str]:
        """A fresh playlist: its tracks' titles and its URL."""
        self._next += 1
        name = f"p{self._next:05}"
        sources = []
        for i in range(self.per_list):
            os.link(self._source, self.root / f"{name}-{i}.ogg")
            sources.append(f"<audio controls src='/{name}-{i}.ogg'></audio>")
        page = f"<html><head><title>{name}</title></head><body>{''.join(sources)}</body></html>"
        (self.root / f"{name}.html").write_text(page, encoding="utf-8")
        return [f"{name} ({i + 1})" for i in range(self.per_list)], media.url(f"{name}.html")


@dataclass
class GuildLedger:
    """What the replies said happened to one guild's tracks."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    cleared: int = 0


@dataclass
class StormResult:
    """The storm's outcome.

    Attributes:
        sent: Commands issued in the storm.
        answered: Commands answered (all of them, unless a problem says otherwise).
        refused: Commands answered with an expected refusal (bad position, empty queue).
        elapsed: Seconds from the first command sent to the last answer.
        latencies: Seconds from sending each command to its final answer.
        answered_at: Per answer: the command and its time from the first command sent.
        counts: Commands issued, by name.
        problems: Everything inconsistent: unexpected answers, lost or duplicated tracks.
        ledgers: Per guild id.
    """

    sent: int = 0
    answered: int = 0
    refused: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    answered_at: list[tuple[str, float]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    ledgers: dict[int, GuildLedger] = field(default_factory=dict)


async def _ask(user: ScriptedUser, handle: GuildHandle, command: str, **options: Any) -> str:
    reply = await user.invoke(command, channel=handle.text, timeout=GUARD, **options)
    if reply.deferred and not reply.text():
        await reply.wait_edit(timeout=GUARD)
    return reply.text()


def _note(
    ledger: GuildLedger,
    command: str,
    text: str,
    result: StormResult,
    where: str,
    titles: list[str] | None = None,
) -> None:
    named = _TITLE.search(text)
    if command == "play" and text.startswith(f"Queued {len(titles or ())} tracks") and titles:
        ledger.added.extend(titles)
    elif command == "remove" and text.startswith("Removed") and named:
        ledger.removed.append(named.group(1))
    elif command == "skip" and text.startswith("Skipped") and named:
        ledger.skipped.append(named.group(1))
    elif command == "clear" and (cleared := _CLEARED.match(text)):
        ledger.cleared += int(cleared.group(1))
    elif (command == "move" and text.startswith("Moved")) or (
        command == "shuffle" and text.startswith("Shuffled")
    ):
        pass
    elif text.startswith(REFUSALS):
        result.refused += 1
    else:
        result.problems.append(f"{where}: /{command} answered {text!r}")


async def queue_storm(
    sb: Sandbox,
    bot: Any,
    media: MediaServer,
    files: TrackFiles,
    *,
    guilds: int = 10,
    rate: float = 500.0,
    seconds: float = 2.0,
    seed: int = 5,
) -> StormResult:
    """Run the storm in the first `guilds` guilds of `sb` (made if missing) and check the ledger.

    Args:
        sb: The sandbox the bot is connected to.
        bot: The running bot (Legato loaded with `storm_config`).
        media: Serves `files`.
        files: Makes a track per /play.
        guilds: Guilds to spread the commands over.
        rate: Commands a second, over all guilds.
        seconds: How long commands are issued.
        seed: Seeds the choice of commands and positions.

    Returns:
        The counts, latencies and every inconsistency found.
    """
    rng = random.Random(seed)
    result = StormResult()
    while len(sb.guilds) < guilds:
        sb.add_guild(f"Storm {len(sb.guilds):03}")
    handles = sb.guilds[:guilds]
    users = [sb.add_user(f"stormer{i:03}", guilds=[h]) for i, h in enumerate(handles)]
    ledgers = [GuildLedger() for _ in handles]

    async def prefill(user: ScriptedUser, handle: GuildHandle, ledger: GuildLedger) -> None:
        await user.join_voice(handle.voice)
        for _ in range(PREFILL):
            titles, url = files.new(media)
            text = await _ask(user, handle, "play", query=url)
            _note(ledger, "play", text, result, handle.name, titles)

    await asyncio.gather(*(prefill(*z) for z in zip(users, handles, ledgers, strict=True)))

    names = list(WEIGHTS)
    weights = list(WEIGHTS.values())
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []

    async def one(n: int, command: str, options: dict[str, Any], titles: list[str]) -> None:
        sent = loop.time()
        text = await _ask(users[n], handles[n], command, **options)
        result.latencies.append(loop.time() - sent)
        result.answered_at.append((command, loop.time() - t0))
        result.answered += 1
        _note(ledgers[n], command, text, result, handles[n].name, titles)

    total = round(rate * seconds)
    t0 = loop.time()
    started = time.monotonic()
    for k in range(total):
        # Absolute deadlines: a late wake-up sends the overdue commands at once, keeping the rate.
        delay = t0 + k / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        n = k % guilds
        command = rng.choices(names, weights)[0]
        options: dict[str, Any] = {}
        titles: list[str] = []
        if command == "play":
            titles, options["query"] = files.new(media)
        elif command == "remove":
            options["position"] = rng.randint(1, 5)
        elif command == "move":
            options["position"], options["to"] = rng.randint(1, 5), rng.randint(1, 5)
        result.counts[command] += 1
        tasks.append(asyncio.create_task(one(n, command, options, titles)))
    result.sent = total
    async with asyncio.timeout(GUARD):
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    result.elapsed = time.monotonic() - started
    result.problems += [
        f"a command failed: {o!r}" for o in outcomes if isinstance(o, BaseException)
    ]

    cog = bot.get_cog("Music")
    for handle, ledger in zip(handles, ledgers, strict=True):
        result.ledgers[handle.id] = ledger
        session = cog.session(handle.id)
        queue = session.queue if session is not None else None
        held = [t.title for t in queue.upcoming] if queue is not None else []
        if queue is not None and queue.current is not None:
            held.append(queue.current.title)
        _check(handle.name, ledger, held, result)
        # A track that failed to play is posted as "Skipped **title**: why" (not a /skip reply).
        failed = [m.content for m in sb.messages(handle.text) if _FAILED.match(m.content)]
        result.problems += [f"{handle.name}: {c}" for c in failed]
    return result


def _check(where: str, ledger: GuildLedger, held: list[str], result: StormResult) -> None:
    accounted = held + ledger.removed + ledger.skipped
    twice = sorted(t for t, c in Counter(ledger.added + accounted).items() if c > 2)
    twice += sorted(t for t, c in Counter(accounted).items() if c > 1)
    if twice:
        result.problems.append(f"{where}: tracks counted twice: {sorted(set(twice))}")
    unknown = sorted(set(accounted) - set(ledger.added))
    if unknown:
        result.problems.append(f"{where}: tracks never added: {unknown}")
    if len(ledger.added) != len(accounted) + ledger.cleared:
        result.problems.append(
            f"{where}: {len(ledger.added)} added, but {len(held)} held + {len(ledger.removed)} "
            f"removed + {len(ledger.skipped)} skipped + {ledger.cleared} cleared"
        )
