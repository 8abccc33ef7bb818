"""Machine pauses: a process that only sleeps, at the highest priority it may take, noting the
times it woke late.

On a shared virtual machine the host may stop the guest's CPUs for tens of milliseconds: every
process then falls behind at once, and a bench counts that against whatever it measures. This
probe tells such a pause from a stall of the bot. It asks for ``SCHED_FIFO`` (root may, and
then no thread of the guest keeps it from its CPU), sleeps ``--every`` ms at a time and prints
each wake-up more than ``--limit`` ms late, on the monotonic clock that ``bench_load``'s
timelines use::

    python bench/pause_probe.py --seconds 120 > pauses.txt &
    python bench/bench_load.py --cases mixed --seconds 30

Run beside a bench only to find out: its wake-ups (500 a second) take a little from what runs
beside it. Without ``SCHED_FIFO`` (no permission), a late wake-up may be the guest's own load
too, and the first line says so.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import TextIO


def take_the_cpu_first() -> str:
    """``SCHED_FIFO`` for this process if allowed: the policy it runs under."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (AttributeError, OSError):
        return "normal (SCHED_FIFO refused: late wake-ups include the guest's own load)"
    return "SCHED_FIFO"


def watch(seconds: float, every: float, limit: float, out: TextIO) -> tuple[int, float]:
    """Sleep ``every`` s at a time for ``seconds``; print ``monotonic late_ms`` for each wake-up
    over ``limit`` s late. Returns how many there were and the longest lateness, in s."""
    count, longest = 0, 0.0
    end = time.monotonic() + seconds
    while True:
        before = time.monotonic()
        if before >= end:
            return count, longest
        time.sleep(every)
        late = time.monotonic() - before - every
        if late > limit:
            count += 1
            longest = max(longest, late)
            print(f"{before + every + late:.4f} {late * 1e3:.2f}", file=out, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--every", type=float, default=2.0, help="ms between wake-ups")
    parser.add_argument("--limit", type=float, default=10.0, help="ms late that is reported")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"# pause probe, {take_the_cpu_first()}; monotonic s, ms late", flush=True)
    count, longest = watch(args.seconds, args.every / 1e3, args.limit / 1e3, sys.stdout)
    print(f"# {count} wake-ups over {args.limit:g} ms late, longest {longest * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
