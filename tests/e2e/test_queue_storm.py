"""Queue commands at about 500 a second across ten guilds stay consistent (no track lost or
duplicated), through the sandbox, a real discord.py bot and the cog's handlers."""

from __future__ import annotations

from pathlib import Path

import pytest

from legato.sandbox.media import MediaServer
from legato.sandbox.server import Sandbox
from tests.e2e.queue_storm import TrackFiles, queue_storm, running_bot, storm_config

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("processes", [0, 2], ids=["yt-dlp-in-threads", "yt-dlp-in-processes"])
async def test_queue_commands_across_guilds_lose_and_duplicate_nothing(
    tmp_path: Path, processes: int
) -> None:
    files = TrackFiles(tmp_path, seconds=60.0, per_list=8)
    with MediaServer(tmp_path) as media:
        config = tmp_path / "legato.toml"
        config.write_text(storm_config(media, resolve_processes=processes), encoding="utf-8")
        # No 3 s answer deadline: answers to 500 commands a second queue up for seconds, and the
        # ledger needs every one of them (the deadline has its own tests).
        sandbox = Sandbox(timeout=60.0, interaction_deadline=None)
        async with sandbox as sb, running_bot(sb, config) as bot:
            result = await queue_storm(sb, bot, media, files, guilds=10, rate=500.0, seconds=2.0)
    assert result.problems == []
    assert result.answered == result.sent == 1000
    # Every kind of command ran, and not only as a refusal (a position past the end ...).
    assert set(result.counts) == {"play", "remove", "move", "shuffle", "skip", "clear"}
    assert result.refused < result.sent
    ledgers = result.ledgers.values()
    assert sum(len(g.added) for g in ledgers) > 10 * 3 * 8
    assert all(g.removed for g in ledgers)
    assert sum(len(g.skipped) for g in ledgers) > 0
