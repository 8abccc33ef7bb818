"""Machine pauses: a process that only sleeps, at the highest priority it may take, noting the
times it woke late.

On a shared virtual machine the host may stop the guest's CPUs for tens of milliseconds: every
process then falls behind at once, and a bench counts that against whatever it measures. This
probe tells such a pause from a stall of the bot. It asks for ``SCHED_FIFO`` (root may, and
then no thread of the guest keeps it from its CPU), sleeps ``--every`` ms at a time and prints
each wake-up more than ``--limit`` ms late, on the monotonic clock that ``bench_load``'s
timelines use.

``bench_load`` runs it beside every load case, from before the first /play to the end of the
window, at a light cadence (`BENCH_EVERY_MS`, 100 wake-ups a second, listing those over
`BENCH_LIMIT_MS` late: a player re-anchors only on a frame 60 ms late, so no pause that matters
is missed), through :class:`PauseProbe`; :func:`machine_pause_figures` puts each window's
re-anchors down to the pauses that explain them. Run it by hand beside any other bench::

    python bench/pause_probe.py --seconds 120 > pauses.txt &
    python bench/bench_audio.py

At its defaults (500 wake-ups a second, each over 10 ms late listed) it sees shorter pauses and
takes a little more from what runs beside it. Without ``SCHED_FIFO`` (no permission), a late
wake-up may be the guest's own load too, and the first line says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final, TextIO

#: ``bench_load``'s cadence: a wake-up every 10 ms, each more than 30 ms late listed.
BENCH_EVERY_MS: Final = 10.0
BENCH_LIMIT_MS: Final = 30.0
#: A wake-up this late (ms) is a pause that explains a re-anchor: the pacer re-anchors on a
#: frame 60 ms late, and a pause shows on the probe up to one sleep (10 ms) shorter than it was.
ATTRIBUTED_MS: Final = 50.0
#: The probe's first line starts so; it names the scheduling policy it got.
HEADER: Final = "# pause probe"
#: The end of its last line when SIGTERM stopped it (not its ``--seconds`` running out).
STOPPED: Final = "; stopped by SIGTERM"


def take_the_cpu_first() -> str:
    """``SCHED_FIFO`` for this process if allowed: the policy it runs under."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (AttributeError, OSError):
        return "normal (SCHED_FIFO refused: late wake-ups include the guest's own load)"
    return "SCHED_FIFO"


def watch(
    seconds: float,
    every: float,
    limit: float,
    out: TextIO,
    header: str = "",
    stop: Callable[[], bool] = lambda: False,
) -> tuple[int, float]:
    """Sleep ``every`` s at a time for ``seconds``, or until ``stop()`` after a wake-up; print
    ``monotonic late_ms`` for each wake-up over ``limit`` s late. Returns how many there were
    and the longest lateness, in s.

    ``header`` is printed first, once the first sleep's start is read: whoever has read it knows
    that a pause from then on will be seen.
    """
    count, longest = 0, 0.0
    before = time.monotonic()
    end = before + seconds
    if header:
        print(header, file=out, flush=True)
    while before < end:
        time.sleep(every)
        late = time.monotonic() - before - every
        if late > limit:
            count += 1
            longest = max(longest, late)
            print(f"{before + every + late:.4f} {late * 1e3:.2f}", file=out, flush=True)
        if stop():
            break
        before = time.monotonic()
    return count, longest


def parse_pauses(lines: Iterable[str]) -> list[tuple[float, float]]:
    """The ``(monotonic s, ms late)`` of each wake-up the probe listed.

    Comment lines (``#``) and lines that do not read as two numbers (a line cut short when the
    probe was stopped) are left out.
    """
    pauses = []
    for line in lines:
        fields = line.split()
        if len(fields) != 2 or fields[0].startswith("#"):
            continue
        try:
            at, late = float(fields[0]), float(fields[1])
        except ValueError:
            continue
        if math.isfinite(at) and math.isfinite(late):
            pauses.append((at, late))
    return pauses


def pauses_in(lines: Iterable[str], window: tuple[float, float]) -> list[tuple[float, float]]:
    """`parse_pauses` of ``lines``, those whose wake-up lies in ``window`` (start, end)."""
    t0, t1 = window
    return [(at, ms) for at, ms in parse_pauses(lines) if t0 <= at <= t1]


def longest_pause_for(
    pauses: Iterable[tuple[float, float]],
    window: tuple[float, float],
    period: tuple[float, float],
    interval: float,
) -> float:
    """The longest pause (ms late) of ``ATTRIBUTED_MS`` or more that explains re-anchors the bot
    counted in the report period ``period`` (start, end], 0 when none does: its wake-up lies in
    ``window`` and from ``min(start, end - interval)`` to ``end``.

    One report ``interval`` back because a pause that ends just before a report may show only
    in the next report's counters (the bot's loop, woken from it, may report before it sends the
    late frames), and a window's last period, ended by the bench's own request, may be short.
    """
    start, end = period
    lo, hi = max(window[0], min(start, end - interval)), min(window[1], end)
    return max((ms for at, ms in pauses if lo <= at <= hi and ms >= ATTRIBUTED_MS), default=0.0)


def machine_pause_figures(
    lines: Sequence[str] | None,
    window: tuple[float, float],
    periods: Iterable[tuple[float, float, Mapping[str, int]]],
    interval: float,
) -> dict[str, float]:
    """A window's machine pauses, and the players whose re-anchor one of them explains.

    Args:
        lines: What the probe printed over the whole window (`PauseProbe.lines`); None when it
            did not run through it: every figure is then NaN (not measured), not 0.
        window: The window's start and end on ``time.monotonic``.
        periods: The bot's report periods in the window, each ``(start, end, moved)``, where
            ``moved`` is each player's re-anchors counted between the two reports.
        interval: The bot's report interval, s.

    Returns:
        ``machine_pauses`` (the probe's late wake-ups in the window), ``machine_pause_max_ms``
        (the longest of them, ms) and ``reanchored_in_pause``: players that re-anchored in a
        period that a pause explains (see `longest_pause_for`), each counted once.
    """
    if lines is None:
        return dict.fromkeys(
            ("machine_pauses", "machine_pause_max_ms", "reanchored_in_pause"), math.nan
        )
    pauses = pauses_in(lines, window)
    explained = {
        player
        for start, end, moved in periods
        if longest_pause_for(pauses, window, (start, end), interval)
        for player, n in moved.items()
        if n > 0
    }
    return {
        "machine_pauses": float(len(pauses)),
        "machine_pause_max_ms": max((ms for _, ms in pauses), default=0.0),
        "reanchored_in_pause": float(len(explained)),
    }


async def wait_or_kill(proc: asyncio.subprocess.Process, timeout: float) -> tuple[int, bool]:  # noqa: ASYNC109 - a guard
    """Wait up to ``timeout`` s for a child process to exit, then kill it (the probe here, the
    bot in ``bench_load``). Returns its exit code and whether it had to be killed."""
    try:
        async with asyncio.timeout(timeout):
            return await proc.wait(), False
    except TimeoutError:
        proc.kill()
        return await proc.wait(), True


class PauseProbe:
    """This module as a child process beside a bench, its output read as it comes.

    `start` waits for its first line (the policy it runs under); `stop` ends it (SIGTERM: it
    lists the wake-up it waits for, closes with `STOPPED` and exits) and reads the rest.
    Neither raises when the probe cannot run: `problem` says why, and `lines` is None, so that
    the bench runs on with its figures not measured. Use `pause_probe` to have it stopped
    whatever happens.

    Args:
        seconds: The longest it may run (it ends itself then, were nobody to stop it).
        every: ms between wake-ups.
        limit: ms late that is listed.
        python: The interpreter to run it with.
    """

    def __init__(
        self,
        seconds: float,
        *,
        every: float = BENCH_EVERY_MS,
        limit: float = BENCH_LIMIT_MS,
        python: str = sys.executable,
    ) -> None:
        self.argv = [
            python,
            str(Path(__file__).resolve()),
            *("--seconds", f"{seconds:g}", "--every", f"{every:g}", "--limit", f"{limit:g}"),
        ]
        self.policy: str | None = None
        self.problem: str | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self._lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._through = False

    @property
    def lines(self) -> list[str] | None:
        """After `stop`: every line after the first; None when it did not run from `start` to
        `stop` (it could not start, failed, or ended by itself first)."""
        return self._lines if self._through else None

    async def start(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a guard
        """Start it and wait for its first line."""
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
            )
        except OSError as exc:
            self.problem = f"not started: {exc}"
            return
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                first = (await self.proc.stdout.readline()).decode(errors="replace").strip()
        except TimeoutError:
            self.problem = f"no first line in {timeout:g} s"
            return
        if not first.startswith(HEADER):
            self.problem = f"exited before its first line ({first!r})"
            return
        self.policy = first.removeprefix(HEADER).strip(" ,").split(";")[0]
        self._reader = asyncio.create_task(self._read(self.proc.stdout), name="pause-probe")

    async def _read(self, stdout: asyncio.StreamReader) -> None:
        while line := await stdout.readline():
            self._lines.append(line.decode(errors="replace").rstrip("\n"))

    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a guard
        """End it (SIGKILL after `timeout`) and read what it printed; again, nothing."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        running = proc.returncode is None
        if running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        code, killed = await wait_or_kill(proc, timeout)
        if killed:
            self.problem = f"still running {timeout:g} s after SIGTERM"
        if self._reader is not None:
            await self._reader
        # Stopped by us, its last line says so; else its --seconds ran out first, or it failed.
        stopped = bool(self._lines) and self._lines[-1].endswith(STOPPED)
        if self.problem is None and not (running and code == 0 and stopped):
            self.problem = f"ended before it was stopped (exit code {code})"
        self._through = self.problem is None


@contextlib.asynccontextmanager
async def pause_probe(
    seconds: float, *, every: float = BENCH_EVERY_MS, limit: float = BENCH_LIMIT_MS
) -> AsyncIterator[PauseProbe]:
    """A started `PauseProbe` (see its arguments), stopped on the way out whatever happens."""
    probe = PauseProbe(seconds, every=every, limit=limit)
    try:
        await probe.start()
        yield probe
    finally:
        await probe.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--every", type=float, default=2.0, help="ms between wake-ups")
    parser.add_argument("--limit", type=float, default=10.0, help="ms late that is reported")
    args = parser.parse_args()
    # SIGTERM ends it after the wake-up it waits for, listed if late: a pause just before it
    # was sent is not lost.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    header = f"{HEADER}, {take_the_cpu_first()}; monotonic s, ms late"
    count, longest = watch(
        args.seconds, args.every / 1e3, args.limit / 1e3, sys.stdout, header, stop.is_set
    )
    print(
        f"# {count} wake-ups over {args.limit:g} ms late, longest {longest * 1e3:.1f} ms"
        + (STOPPED if stop.is_set() else "")
    )


if __name__ == "__main__":
    main()
