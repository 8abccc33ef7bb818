"""The pause probe sees a pause: its process stopped for 200 ms (SIGSTOP, as a host stops a
guest's CPUs) wakes that late, and it says so on the monotonic clock of the pause."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.pause_probe import parse_pauses

PROBE = Path(__file__).resolve().parents[2] / "bench" / "pause_probe.py"


def test_a_stopped_probe_reports_the_pause_when_it_happened() -> None:
    probe = subprocess.Popen(
        [sys.executable, str(PROBE), "--seconds", "3", "--limit", "50"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert probe.stdout is not None
    header = probe.stdout.readline()
    assert header.startswith("# pause probe")
    stopped = time.monotonic()
    os.kill(probe.pid, signal.SIGSTOP)
    deadline = stopped + 0.2
    while time.monotonic() < deadline:  # the pause itself: the probe must not run in it
        time.sleep(deadline - time.monotonic())
    os.kill(probe.pid, signal.SIGCONT)
    out, _ = probe.communicate(timeout=10)
    late = parse_pauses(out.splitlines())
    assert any(ms >= 150 for _t, ms in late), out
    woke, _ms = max(late, key=lambda e: e[1])
    assert stopped < woke < stopped + 1.0
    assert out.splitlines()[-1].startswith(f"# {len(late)} wake-ups over 50 ms late")
