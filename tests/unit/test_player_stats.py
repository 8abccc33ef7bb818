"""GuildPlayer observability: guild id on every log record, encode time and link counters."""

from __future__ import annotations

import logging

import pytest

from legato.audio.player import GuildPlayer, PlayerState
from legato.audio.sink import LinkCounters
from legato.audio.source import FrameSource
from legato.audio.track import Track
from legato.voice.gateway import VoiceConnection
from tests.fakes import FakeClock, InlineExecutor, RecordingSink, ScriptedOpener, ToneSource


class CountingSink(RecordingSink):
    """A sink whose link was re-established: what the voice client reports."""

    def __init__(self, clock: FakeClock, reconnects: int, resumes: int) -> None:
        super().__init__(clock)
        self.reconnects = reconnects
        self.resumes = resumes


async def test_every_player_record_carries_the_guild_id(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    opener = ScriptedOpener()
    player = GuildPlayer(
        RecordingSink(clock), opener, clock=clock, executor=InlineExecutor(), guild_id=4242
    )
    # A track that fails after two frames logs a warning; every transition logs at DEBUG.
    player.queue.add([opener.script("broken", 5, fail_at=2), opener.script("fine", 3)])
    with caplog.at_level(logging.DEBUG, logger="legato.audio.player"):
        assert player.start()
        await clock.run_until(lambda: player.state is PlayerState.IDLE)
        await player.close()
    records = [r for r in caplog.records if r.name == "legato.audio.player"]
    assert any(r.levelno == logging.WARNING and "broken" in r.getMessage() for r in records)
    assert any(r.levelno == logging.DEBUG for r in records)
    assert all(getattr(r, "guild_id", None) == 4242 for r in records), [
        (r.getMessage(), getattr(r, "guild_id", None)) for r in records
    ]


async def test_voice_records_carry_the_same_field(caplog: pytest.LogCaptureFixture) -> None:
    conn = VoiceConnection(
        endpoint="127.0.0.1:1", token="t", session_id="s", user_id=1, server_id=4242
    )
    with caplog.at_level(logging.INFO, logger="legato.voice.gateway"):
        conn.log.info("a voice line")
    (record,) = [r for r in caplog.records if r.name == "legato.voice.gateway"]
    assert record.guild_id == 4242  # type: ignore[attr-defined]  # set through extra


async def test_encode_time_is_measured_per_frame_and_zero_before_any_read() -> None:
    clock = FakeClock()
    sources: list[ToneSource] = []

    async def open_tone(track: Track, start: float) -> FrameSource:
        sources.append(ToneSource(seconds=0.5))
        return sources[-1]

    player = GuildPlayer(RecordingSink(clock), open_tone, clock=clock, executor=InlineExecutor())
    before = player.stats
    assert (before.encode_ms_mean, before.encode_ms_p99) == (0.0, 0.0)
    player.queue.add([Track(url="tone", title="tone")])
    assert player.start()
    await clock.run_until(lambda: player.state is PlayerState.IDLE)
    stats = player.stats
    await player.close()
    assert stats.frames_sent == 25
    # Real Opus encodes took time; the p99 is one of the measured figures, so at least the least.
    assert stats.encode_ms_mean > 0.0
    assert stats.encode_ms_p99 > 0.0


async def test_reconnects_come_from_a_sink_that_counts_them() -> None:
    clock = FakeClock()
    counting = CountingSink(clock, reconnects=3, resumes=2)
    assert isinstance(counting, LinkCounters)
    assert not isinstance(RecordingSink(clock), LinkCounters)
    player = GuildPlayer(counting, ScriptedOpener(), clock=clock, executor=InlineExecutor())
    assert (player.stats.reconnects, player.stats.resumes) == (3, 2)
    counting.reconnects = 4
    assert player.stats.reconnects == 4
    plain = GuildPlayer(RecordingSink(clock), ScriptedOpener(), clock=clock)
    assert (plain.stats.reconnects, plain.stats.resumes) == (0, 0)
    await player.close()
    await plain.close()
