"""The sandbox's arrival clock: a kernel receive stamp (realtime) put on the loop's (monotonic)
clock must land where the datagram arrived, even when the process is held up between its clock
reads (an overloaded machine preempts it there for many milliseconds)."""

from __future__ import annotations

import pytest

from legato.sandbox.voice_media import CLOCK_READ_TOLERANCE, ArrivalClock

#: Where each clock stands when the machine's true time is 0.
MONOTONIC_AT_0 = 5_000.0
REALTIME_AT_0 = 1_800_000_000.0
#: What one clock read costs, in true time.
READ = 1e-6


class Machine:
    """Two clocks on one true time that moves only as they are read, or as the process is
    held up (``hold_after_next_read``: the next monotonic read returns, then the process waits
    that long before it reads anything else)."""

    def __init__(self) -> None:
        self.t = 0.0
        self._hold = 0.0
        #: How far the wall clock was stepped (or slewed) since true time 0.
        self.wall_step = 0.0

    def monotonic(self) -> float:
        value = MONOTONIC_AT_0 + self.t
        self.t += READ + self._hold
        self._hold = 0.0
        return value

    def realtime(self) -> float:
        value = REALTIME_AT_0 + self.wall_step + self.t
        self.t += READ
        return value

    def hold_after_next_read(self, seconds: float) -> None:
        self._hold = seconds

    def stamp(self, at: float) -> float:
        """The kernel's receive stamp of a datagram that arrived at true time ``at``."""
        return REALTIME_AT_0 + at


def test_a_stamp_lands_on_the_monotonic_clock_where_the_datagram_arrived() -> None:
    machine = Machine()
    clock = ArrivalClock(machine.monotonic, machine.realtime)
    machine.t = 1.0
    assert clock.arrival(machine.stamp(0.999)) == pytest.approx(MONOTONIC_AT_0 + 0.999, abs=1e-5)
    assert clock.held == 0


def test_a_hold_between_the_clock_reads_does_not_move_the_arrival() -> None:
    """Two datagrams 20 ms apart on the wire, both read 1 ms after they arrived; reading the
    second, the process is preempted for 16 ms between its monotonic and its realtime read. An
    offset taken from those two reads would be 16 ms too large and put that datagram 4 ms after
    the first: a burst that never was."""
    machine = Machine()
    clock = ArrivalClock(machine.monotonic, machine.realtime)
    machine.t = 1.001
    first = clock.arrival(machine.stamp(1.000))
    machine.t = 1.021
    machine.hold_after_next_read(0.016)
    second = clock.arrival(machine.stamp(1.020))
    assert second - first == pytest.approx(0.020, abs=1e-5)
    assert clock.held == 1
    assert clock.longest_hold >= 0.016


def test_the_offset_follows_the_wall_clock_when_the_reads_are_tight() -> None:
    """A step of the wall clock (or NTP slew) moves the offset: held reads leave it as it was,
    the next tight ones take the new one."""
    machine = Machine()
    clock = ArrivalClock(machine.monotonic, machine.realtime)
    before = clock.offset
    assert before == pytest.approx(REALTIME_AT_0 - MONOTONIC_AT_0, abs=CLOCK_READ_TOLERANCE)
    machine.wall_step = 0.25
    machine.hold_after_next_read(0.050)
    clock.arrival(None)
    assert clock.offset == before
    clock.arrival(None)
    assert clock.offset == pytest.approx(before + 0.25, abs=CLOCK_READ_TOLERANCE)


def test_never_later_than_it_was_read() -> None:
    machine = Machine()
    clock = ArrivalClock(machine.monotonic, machine.realtime)
    machine.t = 3.0
    # A stamp from the future (a wall clock stepped back meanwhile): the read's time stands.
    assert clock.arrival(machine.stamp(3.5)) == pytest.approx(MONOTONIC_AT_0 + 3.0, abs=1e-5)
    # No stamp (the kernel did not stamp): the read's time.
    assert clock.arrival(None) == pytest.approx(MONOTONIC_AT_0 + 3.0, abs=1e-5)
