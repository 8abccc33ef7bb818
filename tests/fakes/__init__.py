"""Test doubles with real behaviour: a manual clock, a recording sink and scripted sources."""

from __future__ import annotations

from tests.fakes.clock import FakeClock, FakeTimer, settle
from tests.fakes.executor import InlineExecutor, SettlingPool
from tests.fakes.player import PlayerRig, inline_player
from tests.fakes.sink import GatedSink, RecordingSink, SinkEvent
from tests.fakes.source import (
    ScriptedOpener,
    ScriptedSource,
    ToneSource,
    TrickleSource,
    frame_id,
    make_frames,
)

__all__ = [
    "FakeClock",
    "FakeTimer",
    "GatedSink",
    "InlineExecutor",
    "PlayerRig",
    "RecordingSink",
    "ScriptedOpener",
    "ScriptedSource",
    "SettlingPool",
    "SinkEvent",
    "ToneSource",
    "TrickleSource",
    "frame_id",
    "inline_player",
    "make_frames",
    "settle",
]
