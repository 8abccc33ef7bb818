"""`make demo`: Legato end to end with no Discord and no internet.

It starts the sandbox Discord (gateway, REST, voice), the bot of `examples/bot.py` with
`examples/legato.toml` (the keys the sandbox needs set, see `demo_config`), and a media server
with tones it generates. A scripted listener joins a voice channel and runs `/join`, `/play`
(twice), `/queue`, `/nowplaying`, `/skip`, `/leave`. The conversation is printed as the listener
sees it, a progress line follows the music, and a report says what reached the voice channel:
per track the time heard, the dominant frequency, frames received against the RTP sequence
span, and the pacing. The recording goes to a WAV file.

The demo passes when every track is heard within `FREQ_TOLERANCE_HZ` of its tone and less than
`MAX_LOSS` of the frames are missing (`legato.sandbox.demo_report` measures and prints that;
`legato.sandbox.demo_transcript` prints the conversation).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import re
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

import discord
from discord.ext import commands

from legato.sandbox.demo_report import (
    FRAME_SECONDS,
    DemoReport,
    DemoTrack,
    analyse,
    format_report,
)
from legato.sandbox.demo_transcript import Transcript
from legato.sandbox.media import MediaServer, write_tone
from legato.sandbox.recording import Recording
from legato.sandbox.server import GuildHandle, Sandbox
from legato.sandbox.users import Reply, ScriptedUser

_log = logging.getLogger(__name__)


__all__ = [
    "EXAMPLES",
    "DemoOptions",
    "DemoStepFailed",
    "demo_config",
    "example_bot",
    "run_demo",
]


@dataclass(frozen=True)
class DemoOptions:
    """What `run_demo` does.

    Attributes:
        out_dir: Where the media, the demo's legato.toml (`demo-legato.toml`) and the WAV go.
        seconds: Length of each tone.
        tone_hz: The first tone; the second is a fifth above (x 1.5).
        transport: Legato's voice transport (`udp`, `webrtc`, `auto`).
        guild_name: The demo guild's name.
        listeners: Scripted users; the first one runs the commands.
        host: Loopback address every server binds.
        progress: Show the `\\r` progress line.
        timeout: Seconds any one step may take before the demo gives up (hang guard).
    """

    out_dir: Path = Path("out")
    seconds: float = 8.0
    tone_hz: float = 440.0
    transport: str = "udp"
    guild_name: str = "Legato Demo"
    listeners: tuple[str, ...] = ("alice", "bob")
    host: str = "127.0.0.1"
    progress: bool = True
    timeout: float = 60.0

    def tracks(self) -> tuple[DemoTrack, DemoTrack]:
        """The two tones: Opus in WebM (passed through) and MP3 (decoded and re-encoded)."""
        first = DemoTrack(
            file=f"tone-{self.tone_hz:g}hz.webm",
            title=f"tone-{self.tone_hz:g}hz",
            container="webm",
            codec="libopus",
            freq=self.tone_hz,
            seconds=self.seconds,
            path="Opus in WebM: passed through without re-encoding",
        )
        second_hz = round(self.tone_hz * 1.5, 1)
        second = DemoTrack(
            file=f"tone-{second_hz:g}hz.mp3",
            title=f"tone-{second_hz:g}hz",
            container="mp3",
            codec="libmp3lame",
            freq=second_hz,
            seconds=self.seconds,
            path="MP3: decoded, resampled and encoded to Opus",
        )
        return first, second


EXAMPLES: Final = Path(__file__).resolve().parents[2] / "examples"


def example_bot(config_path: Path, examples: Path = EXAMPLES) -> commands.Bot:
    """The bot of `examples/bot.py`, made as it makes it, reading `config_path`.

    Raises:
        FileNotFoundError: There is no `examples/bot.py` (Legato installed without its checkout).
    """
    path = examples / "bot.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the demo from a checkout of Legato")
    spec = importlib.util.spec_from_file_location("legato_example_bot", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the example starts its bot only as a script
    bot: commands.Bot = module.Bot(
        command_prefix=commands.when_mentioned,
        intents=discord.Intents.default(),
        chunk_guilds_at_startup=False,  # the sandbox needs no member chunks
        guild_ready_timeout=0.5,  # READY lists every guild at once; no need to wait 2 s
    )
    bot.legato_config_path = str(config_path)  # type: ignore[attr-defined]  # Legato's hook
    return bot


def demo_config(media: MediaServer, transport: str, examples: Path = EXAMPLES) -> str:
    """`examples/legato.toml`, with what the sandbox needs set: its media server allowed, no
    timers, no search (the demo's links are on 127.0.0.1).

    Every other key, and every comment, is the example's.

    Raises:
        FileNotFoundError: There is no `examples/legato.toml`.
    """
    text = (examples / "legato.toml").read_text(encoding="utf-8")
    overrides = {
        "voice": {"transport": f'"{transport}"'},
        "playback": {
            "announce_now_playing": "true",
            "idle_timeout": "0",
            "leave_when_alone_after": "0",
            "search_provider": '"none"',
            "allowed_hosts": f'["127.0.0.1:{media.port}"]',
        },
    }
    for section, keys in overrides.items():
        for key, value in keys.items():
            text = _set_key(text, section, key, value)
    header = (
        "# Written by `make demo` (legato.sandbox.demo): examples/legato.toml, with the keys\n"
        "# marked `(make demo)` set for the local sandbox.\n\n"
    )
    return header + text


def _set_key(text: str, section: str, key: str, value: str) -> str:
    """Set ``key = value`` in ``[section]`` of a TOML text, keeping the rest as it is."""
    line = f"{key} = {value}  # (make demo)"
    header = re.search(rf"^\[{re.escape(section)}\]\s*$", text, re.MULTILINE)
    if header is None:
        return f"{text.rstrip()}\n\n[{section}]\n{line}\n"
    following = re.search(r"^\[", text[header.end() :], re.MULTILINE)
    end = header.end() + following.start() if following else len(text)
    body = text[header.end() : end]
    body, found = re.subn(rf"^{re.escape(key)}\s*=.*$", line, body, count=1, flags=re.MULTILINE)
    if not found:
        body = f"\n{line}{body}"
    return text[: header.end()] + body + text[end:]


# --- the run ----------------------------------------------------------------------------------


class DemoStepFailed(Exception):
    """A step of the demo did not happen (the bot did not answer, or answered wrongly)."""


class _Run:
    def __init__(self, options: DemoOptions, out: TextIO) -> None:
        self.options = options
        self.out = out
        self.tracks = options.tracks()
        self.step = "starting"

    async def prepare_media(self) -> Path:
        media_dir = self.options.out_dir / "media"
        media_dir.mkdir(parents=True, exist_ok=True)

        def write() -> None:
            for track in self.tracks:
                write_tone(
                    media_dir / track.file,
                    freq=track.freq,
                    seconds=track.seconds,
                    container=track.container,
                    codec=track.codec,
                )

        await asyncio.to_thread(write)
        return media_dir

    async def run(self, report: DemoReport) -> None:
        options = self.options
        self.step = "generating the tones"
        media_dir = await self.prepare_media()
        with MediaServer(media_dir, host=options.host) as media:
            config_path = options.out_dir / "demo-legato.toml"
            config_path.write_text(demo_config(media, options.transport), encoding="utf-8")
            async with Sandbox(timeout=options.timeout) as sb:
                await self._with_sandbox(sb, media, config_path, report)

    async def _with_sandbox(
        self, sb: Sandbox, media: MediaServer, config_path: Path, report: DemoReport
    ) -> None:
        options = self.options
        home = sb.add_guild(
            options.guild_name, text_channels=("music",), voice_channels=("General",)
        )
        voice_channel = home.voice
        chat = Transcript(self.out, sb.world, progress=options.progress)
        chat.line(f"Legato demo: a sandbox Discord on {options.host}")
        chat.line(f"  gateway {sb.gateway_url}   REST {sb.api_base}")
        voice = sb.voice_server
        dave = "DAVE required" if voice.dave_protocol_version else "no DAVE"
        chat.line(f"  voice   {voice.url} ({dave})   media {media.base_url}/")
        for track in self.tracks:
            chat.line(
                f"  track   {track.file}: {track.freq:g} Hz, {track.seconds:g} s ({track.path})"
            )
        chat.line(f"  config  {config_path}")
        chat.line()

        self.step = "starting the bot"
        async with sb.running(example_bot(config_path), options.timeout) as bot:
            assert bot.user is not None
            bot_name = bot.user.name
            chat.line(f"{bot_name} is online in {len(bot.guilds)} servers; in {home.name}:")
            users = [sb.add_user(name, guilds=[home]) for name in options.listeners]
            speaker = users[0]
            for user in users:
                await user.join_voice(voice_channel)
                chat.event(f"{user.name} joined #{voice_channel.name}")
            chat.line(f"#{home.text.name}")
            await self._conversation(sb, home, speaker, bot_name, media, chat, report)

    async def _ask(
        self,
        sb: Sandbox,
        chat: Transcript,
        user: ScriptedUser,
        bot_name: str,
        home: GuildHandle,
        command: str,
        **options: Any,
    ) -> Reply:
        self._show_announcements(sb, chat, home, bot_name)
        self.step = f"/{command}"
        chat.command(user, command, options)
        reply = await user.invoke(command, channel=home.text, **options)
        if reply.deferred and not reply.text():
            await reply.wait_edit()
        chat.reply(reply, bot_name)
        return reply

    def _show_announcements(
        self, sb: Sandbox, chat: Transcript, home: GuildHandle, bot_name: str
    ) -> None:
        for message in sb.messages(home.text):
            if message.id not in chat.printed and message.author.id == sb.bot.id:
                chat.message(message, bot_name)

    @staticmethod
    def _note_voice_path(sb: Sandbox, home: GuildHandle, report: DemoReport) -> None:
        """Put the path the bot's voice connection took, and DAVE's privacy code, in `report`."""
        voice = sb.voice_server
        info = voice.session(sb.bot.id, home.id)
        scheme = "wss://" if voice.tls else "ws://"
        dave = f"DAVE {info.dave_protocol_version}" if info.dave_protocol_version else "no DAVE"
        report.voice_path = f"v{info.version} {scheme} {info.protocol} {info.mode}, {dave}"
        if info.dave_protocol_version:
            groups = [g for (sid, _), g in voice.dave_channels().items() if sid == home.id]
            code = groups[0].listener.client.privacy_code if len(groups) == 1 else None
            if code is not None:
                report.privacy_code = " ".join(code[i : i + 5] for i in range(0, len(code), 5))

    async def _conversation(
        self,
        sb: Sandbox,
        home: GuildHandle,
        user: ScriptedUser,
        bot_name: str,
        media: MediaServer,
        chat: Transcript,
        report: DemoReport,
    ) -> None:
        first, second = self.tracks
        timeout = self.options.timeout
        voice = sb.voice_server

        def announce() -> None:
            self._show_announcements(sb, chat, home, bot_name)

        joined = await self._ask(sb, chat, user, bot_name, home, "join")
        if not joined.text().startswith("Joined"):
            raise DemoStepFailed(f"/join answered {joined.text()!r}")
        self.step = "waiting for the bot in voice"
        await sb.wait_bot_voice(home.voice, timeout=timeout)
        await voice.wait_identified(sb.bot.id, timeout=timeout)
        await voice.wait_session_description(sb.bot.id, timeout=timeout)
        if voice.dave_protocol_version:
            self.step = "waiting for the bot's DAVE group"
            await voice.wait_event("dave_execute", sb.bot.id, timeout=timeout)
        self._note_voice_path(sb, home, report)
        chat.line(f"  voice path    {report.voice_path}")
        if report.privacy_code is not None:
            chat.line(f"  privacy code  {report.privacy_code}")
        rec = voice.recording(sb.bot.id, home.id)
        start = len(rec.packets)

        played = await self._ask(
            sb, chat, user, bot_name, home, "play", query=media.url(first.file)
        )
        if not played.text().startswith("Playing"):
            raise DemoStepFailed(f"/play answered {played.text()!r}")
        queued = await self._ask(
            sb, chat, user, bot_name, home, "play", query=media.url(second.file)
        )
        if not queued.text().startswith("Queued"):
            raise DemoStepFailed(f"/play of the second track answered {queued.text()!r}")
        await self._ask(sb, chat, user, bot_name, home, "queue")
        await self._ask(sb, chat, user, bot_name, home, "nowplaying")

        # Let half of the first track play, then skip to the second.
        self.step = f"playing {first.title}"
        skip_at = start + first.frames // 2
        async with self._progress(chat, rec, start, first, announce):
            await rec.wait_frames(skip_at, timeout=timeout)
        skipped = await self._ask(sb, chat, user, bot_name, home, "skip")
        if "Skipped" not in skipped.text():
            raise DemoStepFailed(f"/skip answered {skipped.text()!r}")
        boundary = len(rec.packets)

        self.step = f"playing {second.title}"
        async with self._progress(chat, rec, boundary, second, announce):
            # The second track is playing once a few of its frames arrived; it has ended when
            # the bot stops speaking.
            await rec.wait_frames(rec.frames + 25, timeout=timeout)
            await rec.wait_speaking(False, timeout=second.seconds + timeout)
        self._show_announcements(sb, chat, home, bot_name)

        left = await self._ask(sb, chat, user, bot_name, home, "leave")
        if not left.text().startswith("Left"):
            raise DemoStepFailed(f"/leave answered {left.text()!r}")
        self.step = "waiting for the bot to leave voice"
        await sb.wait_bot_voice(None, guild=home, timeout=timeout)
        chat.event(f"{bot_name} left #{home.voice.name}")
        chat.line()

        self.step = "analysing the recording"
        wav = self.options.out_dir / "demo.wav"
        analysed = await asyncio.to_thread(
            analyse, rec, [(first, start, True), (second, boundary, False)], wav
        )
        report.tracks = analysed.tracks
        report.speaking = analysed.speaking
        report.frames, report.span, report.lost = analysed.frames, analysed.span, analysed.lost
        report.duplicates, report.out_of_order = analysed.duplicates, analysed.out_of_order
        report.streams = analysed.streams
        report.wav, report.wav_seconds = analysed.wav, analysed.wav_seconds

    @contextlib.asynccontextmanager
    async def _progress(
        self,
        chat: Transcript,
        rec: Recording,
        start: int,
        track: DemoTrack,
        announce: Callable[[], None],
    ) -> AsyncIterator[None]:
        async def show() -> None:
            while True:
                announce()  # "Now playing" posts, printed as they arrive
                heard = max(0, len(rec.packets) - start) * FRAME_SECONDS
                done = min(1.0, heard / track.seconds)
                bar = "#" * round(done * 24)
                state = "speaking" if rec.speaking else "silent"
                chat.progress(
                    f"  ▶ {track.title}  {_clock(heard)} / {_clock(track.seconds)}  "
                    f"[{bar:<24}]  {rec.frames} frames, {state}"
                )
                await asyncio.sleep(0.2)  # a display refresh, not a wait for an event

        task = asyncio.create_task(show(), name="legato-demo-progress")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            chat.end_progress()


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


# --- the analysis -----------------------------------------------------------------------------


async def run_demo(options: DemoOptions | None = None, *, out: TextIO | None = None) -> DemoReport:
    """Run the demo, print the conversation and the report to `out`; return the report.

    A step that fails (the bot does not answer, or answers wrongly, or anything raises) is
    reported as the failure with its traceback; what was recorded until then is still analysed
    only when the conversation got that far.

    Args:
        options: What to run (default `DemoOptions()`).
        out: Where to print (default stdout).

    Returns:
        The report; `report.passed` says whether the audio checks passed.
    """
    options = options or DemoOptions()
    out = out or sys.stdout
    options.out_dir.mkdir(parents=True, exist_ok=True)
    report = DemoReport()
    run = _Run(options, out)
    started = time.monotonic()
    try:
        await run.run(report)
    except Exception as exc:  # noqa: BLE001 - the demo's outcome: reported with its traceback
        print(file=out)
        report.failure = f"the demo failed while {run.step}: {type(exc).__name__}: {exc}"
        print("".join(traceback.format_exception(exc)).rstrip(), file=out)
    report.elapsed = time.monotonic() - started
    print(format_report(report), file=out, flush=True)
    return report
