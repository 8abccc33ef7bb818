"""The bot process of ``bench/bench_load.py``: Legato's ready-made bot at a sandbox, reporting.

``python bench/load_bot.py API_BASE GATEWAY_URL CONFIG [--report-interval S]`` with the
sandbox's token in ``DISCORD_TOKEN``. The bot is :class:`legato.__main__.LegatoBot` as
``python -m legato run`` makes it (only guild chunking is off, as for every bot against the
sandbox), in its own process as a real deployment runs it, so that the sandbox, the media server
and the scripted listeners (in the parent) do not share its event loop or its GIL.

On stdout, one line each:

- ``ready`` when discord.py is ready;
- every ``--report-interval`` seconds, and whenever a ``report`` line arrives on stdin, one JSON
  object (see :func:`report`): this process's CPU times and RSS, and the player counters of
  every session of the Music cog, per guild and summed.

Exits cleanly (the bot closed, every session ended) on SIGTERM, SIGINT or when stdin closes.
Logs go to stderr (WARNING and above unless ``--log-level`` says otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Final

import psutil

from legato.__main__ import LegatoBot
from legato.config import load_config
from legato.sandbox.server import point_discord_py_here

#: What the parent waits for on stdout.
READY_LINE: Final = "ready"
#: A line on stdin asking for a report now.
REPORT_COMMAND: Final = "report"
#: Per guild in a report: these :class:`~legato.audio.player.PlayerStats` fields, in this order.
PLAYER_FIELDS: Final = (
    "frames_sent",
    "silence_sent",
    "underruns",
    "late_frames",
    "p99_lateness_ms",
    "max_lateness_ms",
    "reconnects",
    "reanchors",
)


def loop_schedstat() -> tuple[float, float] | None:
    """Seconds this thread (the event loop's) has run on a CPU, and waited runnable for one
    (Linux's ``/proc/thread-self/schedstat``); None where the kernel does not say."""
    try:
        with open("/proc/thread-self/schedstat", encoding="ascii") as f:
            ran, waited, _slices = f.read().split()
    except (OSError, ValueError):
        return None
    return int(ran) / 1e9, int(waited) / 1e9


def report(bot: LegatoBot, proc: psutil.Process, *, requested: bool) -> dict[str, Any]:
    """This process's figures now.

    Returns:
        ``t`` (``time.monotonic()``, the clock the parent's loop uses too), ``cpu`` (user + system
        seconds, every thread, child processes included), ``loop`` (:func:`loop_schedstat`, as
        a list or None), ``rss`` (bytes), ``requested``
        (answer to a ``report`` line),
        ``players`` (guild id -> the :data:`PLAYER_FIELDS` values of its session's player) and
        ``total`` (counters summed over the sessions, lateness as the largest of them).
    """
    cpu = proc.cpu_times()
    cpu_s = cpu.user + cpu.system
    # Its decode worker processes (children of the forkserver, a child of this one) count too.
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = child.cpu_times()
            cpu_s += times.user + times.system
    cog: Any = bot.get_cog("Music")
    sessions = dict(cog.sessions) if cog is not None else {}
    # One stats snapshot per player (the property computes percentiles each time it is read).
    snapshots = {gid: s.player.stats for gid, s in sessions.items()}
    players = {str(gid): [getattr(st, f) for f in PLAYER_FIELDS] for gid, st in snapshots.items()}
    total: dict[str, float] = {f: 0 for f in PLAYER_FIELDS}
    for values in players.values():
        for f, v in zip(PLAYER_FIELDS, values, strict=True):
            total[f] = max(total[f], v) if f.endswith("_ms") else total[f] + v
    return {
        "t": time.monotonic(),
        "cpu": cpu_s,
        "loop": loop_schedstat(),
        "rss": proc.memory_info().rss,
        "requested": requested,
        "sessions": len(sessions),
        "players": players,
        "total": total,
    }


def _emit(line: str) -> None:
    print(line, flush=True)


async def _stdin_lines(on_line: Any) -> None:
    """Call ``on_line`` with each stdin line; return at end of file."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        on_line(line.decode().strip())


async def main(api_base: str, gateway_url: str, config_path: str, interval: float) -> None:
    """Run the bot until SIGTERM, SIGINT or end of stdin; report as the module says."""
    point_discord_py_here(api_base=api_base, gateway_url=gateway_url)
    bot = LegatoBot(load_config(config_path), chunk_guilds_at_startup=False)
    proc = psutil.Process()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def on_ready() -> None:
        _emit(READY_LINE)

    def on_line(line: str) -> None:
        if line == REPORT_COMMAND:
            _emit(json.dumps(report(bot, proc, requested=True)))

    async def periodic() -> None:
        await bot.wait_until_ready()
        next_at = time.monotonic()
        while True:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))  # a period, not an event
            _emit(json.dumps(report(bot, proc, requested=False)))

    async def watch_stdin() -> None:
        await _stdin_lines(on_line)
        stop.set()

    bot.add_listener(on_ready, "on_ready")
    async with bot:
        tasks: list[asyncio.Task[Any]] = [
            asyncio.create_task(bot.start(os.environ["DISCORD_TOKEN"]), name="bot"),
            asyncio.create_task(stop.wait(), name="stop"),
        ]
        helpers = [
            asyncio.create_task(periodic(), name="report"),
            asyncio.create_task(watch_stdin(), name="stdin"),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in helpers:
            task.cancel()
        await bot.close()
        for task in [*tasks, *helpers]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # the bot's own failure, if it ended first, is raised here


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("api_base")
    ap.add_argument("gateway_url")
    ap.add_argument("config")
    ap.add_argument("--report-interval", type=float, default=1.0)
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args()
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(main(args.api_base, args.gateway_url, args.config, args.report_interval))
