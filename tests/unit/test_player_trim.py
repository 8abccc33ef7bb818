"""A volume change on a passthrough track holding more than ``buffer_ms`` of frames: the buffer is
cut back to ``buffer_ms`` and the rest read again at the new volume, with no frame lost or sent
twice; a source that cannot seek keeps its buffer whole.

The player has ``buffer_ms=100`` (5 frames) and the default ``passthrough_buffer_ms`` (50), on a
fake clock with reads inline; frames are ``b"A:3"``, and ``b"A:3@0.5"`` once read at volume 0.5.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from legato.audio.player import PlayerState
from tests.fakes import (
    FakeClock,
    PlayerRig,
    RecordingSink,
    ScriptedOpener,
    TrickleSource,
    frame_id,
    inline_player,
    settle,
)

F = 0.020
#: ``buffer_ms=100``.
KEPT = 5


@pytest.fixture
async def rig() -> AsyncIterator[PlayerRig]:
    clock = FakeClock()
    sink = RecordingSink(clock)
    opener = ScriptedOpener()
    player = inline_player(sink, opener, clock)
    yield PlayerRig(clock, sink, opener, player)
    await player.close()


def audio(rig: PlayerRig) -> list[str]:
    return [f.decode() for f in rig.sink.audio]


def assert_every_frame_once(rig: PlayerRig, count: int) -> None:
    assert [frame_id(f) for f in rig.sink.audio] == [("A", i) for i in range(count)]


async def test_a_volume_change_cuts_a_large_passthrough_buffer_back_to_buffer_ms(
    rig: PlayerRig,
) -> None:
    rig.play(rig.opener.script("A", 200))
    await rig.clock.advance(10 * F)
    buffered = rig.player.stats.buffer_frames
    assert buffered > 2 * KEPT  # passthrough refills go past buffer_ms
    sent = len(rig.sink.audio)
    await rig.player.set_volume(0.5)  # no time passes meanwhile: no frame is sent
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.IDLE)
    assert_every_frame_once(rig, 200)
    out = audio(rig)
    # The frames buffered within buffer_ms of the change keep the old volume; from there on
    # every frame was read after the change.
    assert not any("@" in f for f in out[: sent + KEPT])
    assert all(f.endswith("@0.5") for f in out[sent + KEPT :])
    source = rig.opener.sources[0]
    assert source.seeks == [pytest.approx((sent + KEPT) * F)]
    assert rig.player.stats.underruns == 0


async def test_a_source_that_cannot_seek_keeps_its_buffer_whole(rig: PlayerRig) -> None:
    rig.play(rig.opener.script("A", 200, seekable=False))
    await rig.clock.advance(10 * F)
    buffered = rig.player.stats.buffer_frames
    assert buffered > KEPT
    sent = len(rig.sink.audio)
    await rig.player.set_volume(0.5)  # does not fail: the change comes after the buffer
    await rig.clock.run_until(lambda: rig.player.state is PlayerState.IDLE)
    assert_every_frame_once(rig, 200)
    out = audio(rig)
    assert not any("@" in f for f in out[: sent + buffered])
    assert all(f.endswith("@0.5") for f in out[sent + buffered :])
    assert rig.opener.sources[0].seeks == [pytest.approx((sent + KEPT) * F)]
    assert rig.player.stats.underruns == 0


async def test_a_trim_that_outlasts_the_kept_frames_puts_the_reader_back(rig: PlayerRig) -> None:
    """The seek comes back after more than the kept frames were sent: the frames sent meanwhile
    lie beyond where the reader went, so it goes back to where the buffer ends (nothing dropped)
    and the change is heard after the buffer."""
    rig.play(rig.opener.script("A", 200, trickle=True))
    await settle()
    source = rig.opener.sources[0]
    assert isinstance(source, TrickleSource)
    await rig.clock.advance(3 * F)
    assert source.deliver()  # the first refill, up to the passthrough buffer
    await settle()
    buffered = rig.player.stats.buffer_frames
    assert buffered > 2 * KEPT
    sent = len(rig.sink.audio)
    source.hold_seeks = True
    change = asyncio.ensure_future(rig.player.set_volume(0.5))
    await settle()
    assert source.seek_waiting is not None  # the trim's seek is out
    await rig.clock.advance((KEPT + 3) * F)  # three frames past the kept ones go out
    assert source.answer_seek()
    await settle()
    assert source.answer_seek()  # back to the buffer's end
    await change
    assert source.seeks == [
        pytest.approx((sent + KEPT) * F),
        pytest.approx((sent + buffered) * F),
    ]
    while rig.player.state is not PlayerState.IDLE:
        source.deliver()
        await rig.clock.advance(F)
    assert_every_frame_once(rig, 200)
    out = audio(rig)
    assert not any("@" in f for f in out[: sent + buffered])
    assert all(f.endswith("@0.5") for f in out[sent + buffered :])
    assert rig.player.stats.underruns == 0
