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
import faulthandler
import gc
import json
import logging
import math
import os
import signal
import sys
import time
from collections import deque
from typing import Any, Final, TextIO

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


#: A collection or a loop tick this long is listed (with when it happened) in a report.
PAUSE_LISTED_S: Final = 0.050
#: The loop-lag monitor's period.
LAG_TICK_S: Final = 0.010
#: The long ones kept: the latest this many (a 60 s window holds at most 1,000 loop ticks of
#: 50 ms or more). The earliest would let a busy start-up fill the list and a window after it
#: read as free of stalls.
_LISTED_KEPT: Final = 2000
#: How often `LoopLag` re-arms its stack dump.
REARM_S: Final = 0.1


class GcPauses:
    """Every cyclic collection of this process, timed (``gc.callbacks``), from `install` on.

    A collection holds the GIL: every thread, the event loop's among them, waits it out.
    """

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.total = [0.0, 0.0, 0.0]
        self.most = [0.0, 0.0, 0.0]
        #: ``(time.monotonic() at its start, generation, seconds)`` of each long one.
        self.long: deque[tuple[float, int, float]] = deque(maxlen=_LISTED_KEPT)
        self._started = 0.0

    def install(self) -> None:
        """Start timing (idempotent: a second call changes nothing)."""
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def remove(self) -> None:
        """Stop timing."""
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        gen = info["generation"]
        self.count[gen] += 1
        self.total[gen] += took
        self.most[gen] = max(self.most[gen], took)
        if took >= PAUSE_LISTED_S:
            self.long.append((time.monotonic() - took, gen, took))

    def snapshot(self) -> dict[str, Any]:
        """Counts, total and longest seconds per generation, and the long ones."""
        return {
            "count": list(self.count),
            "total": list(self.total),
            "most": list(self.most),
            "long": list(self.long),
        }


class LoopLag:
    """How late the event loop wakes a `LAG_TICK_S` sleep: a stall of the loop, whatever holds
    it (a blocking call, a collection, another thread holding the GIL).

    With ``dump`` (a file), a stall of ``dump_after`` seconds or more writes every thread's
    Python stack there (``faulthandler``'s own thread: it needs no GIL), re-armed every
    `REARM_S` (each arming starts a thread: not at every tick).
    """

    def __init__(self, dump: TextIO | None = None, dump_after: float = 0.3) -> None:
        self.ticks = 0
        self.most = 0.0
        #: ``(time.monotonic() the tick was due, seconds late)`` of each long one.
        self.long: deque[tuple[float, float]] = deque(maxlen=_LISTED_KEPT)
        self._dump = dump
        self._dump_after = dump_after

    async def run(self) -> None:
        """Tick until cancelled."""
        armed = -math.inf
        try:
            while True:
                due = time.monotonic() + LAG_TICK_S
                if self._dump is not None and due - armed >= REARM_S:
                    armed = due
                    faulthandler.dump_traceback_later(
                        self._dump_after + REARM_S, repeat=False, file=self._dump
                    )
                await asyncio.sleep(LAG_TICK_S)  # a period: the lateness is the measure
                late = time.monotonic() - due
                self.ticks += 1
                self.most = max(self.most, late)
                if late >= PAUSE_LISTED_S:
                    self.long.append((due, late))
        finally:
            if self._dump is not None:
                faulthandler.cancel_dump_traceback_later()

    def snapshot(self) -> dict[str, Any]:
        """Ticks, the latest one's lateness at most, and the long ones."""
        return {"ticks": self.ticks, "most": self.most, "long": list(self.long)}


def loop_schedstat() -> tuple[float, float] | None:
    """Seconds this thread (the event loop's) has run on a CPU, and waited runnable for one
    (Linux's ``/proc/thread-self/schedstat``); None where the kernel does not say."""
    try:
        with open("/proc/thread-self/schedstat", encoding="ascii") as f:
            ran, waited, _slices = f.read().split()
    except (OSError, ValueError):
        return None
    return int(ran) / 1e9, int(waited) / 1e9


def tree_cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU seconds so far of ``proc`` and every process under it (a process that
    ends meanwhile is left out)."""
    times = proc.cpu_times()
    seconds: float = times.user + times.system
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = child.cpu_times()
            seconds += times.user + times.system
    return seconds


def report(
    bot: LegatoBot,
    proc: psutil.Process,
    *,
    requested: bool,
    pauses: GcPauses | None = None,
    lag: LoopLag | None = None,
) -> dict[str, Any]:
    """This process's figures now.

    Returns:
        ``t`` (``time.monotonic()``, the clock the parent's loop uses too), ``cpu`` (user + system
        seconds, every thread, child processes included), ``loop`` (:func:`loop_schedstat`, as
        a list or None), ``rss`` (bytes), ``requested``
        (answer to a ``report`` line),
        ``players`` (guild id -> the :data:`PLAYER_FIELDS` values of its session's player) and
        ``total`` (counters summed over the sessions, lateness as the largest of them),
        ``gc`` (`GcPauses.snapshot`) and ``lag`` (`LoopLag.snapshot`), None when not measured,
        and ``pool_sent``: the messages and requests sent to the decode workers so far (None
        without workers).
    """
    # Its decode worker processes (children of the forkserver, a child of this one) count too.
    cpu_s = tree_cpu_seconds(proc)
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
        "gc": pauses.snapshot() if pauses is not None else None,
        "lag": lag.snapshot() if lag is not None else None,
        "pool_sent": list(pool.sent) if (pool := getattr(cog, "decode_pool", None)) else None,
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


async def main(
    api_base: str, gateway_url: str, config_path: str, interval: float, *, dump_stalls: bool
) -> None:
    """Run the bot until SIGTERM, SIGINT or end of stdin; report as the module says."""
    point_discord_py_here(api_base=api_base, gateway_url=gateway_url)
    bot = LegatoBot(load_config(config_path), chunk_guilds_at_startup=False)
    proc = psutil.Process()
    pauses = GcPauses()
    pauses.install()
    lag = LoopLag(sys.stderr if dump_stalls else None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def on_ready() -> None:
        _emit(READY_LINE)

    def on_line(line: str) -> None:
        if line == REPORT_COMMAND:
            _emit(json.dumps(report(bot, proc, requested=True, pauses=pauses, lag=lag)))

    async def periodic() -> None:
        await bot.wait_until_ready()
        next_at = time.monotonic()
        while True:
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))  # a period, not an event
            _emit(json.dumps(report(bot, proc, requested=False, pauses=pauses, lag=lag)))

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
            asyncio.create_task(lag.run(), name="loop-lag"),
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
    ap.add_argument(
        "--dump-stalls",
        action="store_true",
        help="write every thread's stack to stderr when the loop stalls 0.3 s or more",
    )
    args = ap.parse_args()
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(
        main(
            args.api_base,
            args.gateway_url,
            args.config,
            args.report_interval,
            dump_stalls=args.dump_stalls,
        )
    )
