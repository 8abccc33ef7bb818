"""`make demo`: Legato end to end with no Discord and no internet.

It starts the sandbox Discord (gateway, REST, voice), the bot of `examples/bot.py` with
`examples/legato.toml` (the keys the sandbox needs set, see `demo_config`), and a media server
with tones it generates. A scripted listener joins a voice channel and runs `/join`, `/play`
(twice), `/queue`, `/nowplaying`, `/skip`, `/leave`. The conversation is printed as the listener
sees it, a progress line follows the music, and a report says what reached the voice channel:
per track the time heard, the dominant frequency, frames received against the RTP sequence
span, and the pacing. The recording goes to a WAV file.

The demo passes when every track is heard within `FREQ_TOLERANCE_HZ` of its tone and less than
`MAX_LOSS` of the frames are missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import logging
import math
import re
import sys
import textwrap
import time
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

import discord
import numpy as np
from discord.ext import commands

from legato.audio.encode import OpusDecoder
from legato.sandbox.analysis import dominant_frequency, pcm_to_mono, rms
from legato.sandbox.media import MediaServer, write_tone
from legato.sandbox.recording import ReceivedPacket, Recording
from legato.sandbox.server import GuildHandle, Sandbox
from legato.sandbox.users import Reply, ScriptedUser
from legato.sandbox.world import JSON, Message, World

_log = logging.getLogger(__name__)

#: A track passes when its dominant frequency is this close to the tone's.
FREQ_TOLERANCE_HZ: Final = 2.0
#: The demo fails when this share of the frames (RTP sequence span) never arrived.
MAX_LOSS: Final = 0.02
FRAME_SECONDS: Final = 0.02
FRAME_SAMPLES: Final = 960
# Frames left out at each end of a track before measuring its frequency: the switch to the next
# track, the trailing silence and the decoder's start-up are not the tone.
_EDGE_FRAMES: Final = 10
# A frame this quiet (RMS, full scale 1.0) is silence, not the track.
_SILENCE_RMS: Final = 0.02


@dataclass(frozen=True)
class DemoTrack:
    """A tone the demo generates and plays."""

    file: str
    title: str
    container: str
    codec: str
    freq: float
    seconds: float
    path: str  # what Legato does with it, for the transcript

    @property
    def frames(self) -> int:
        """20 ms frames in the track (the last one padded)."""
        return math.ceil(round(self.seconds * 48_000) / FRAME_SAMPLES)


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


@dataclass(frozen=True)
class Pacing:
    """When consecutive frames arrived (in sequence order, only steps of one frame).

    Attributes:
        p50: Median inter-arrival time, seconds.
        p99: 99th percentile, seconds.
        max: Largest, seconds.
        late: Steps of more than 40 ms (two frames' time).
        jitter: RFC 3550 interarrival jitter at the end of the track, seconds.
        rate: Seconds of wall time per frame from first to last arrival (0.020 is real time).
    """

    p50: float
    p99: float
    max: float
    late: int
    jitter: float
    rate: float


@dataclass(frozen=True)
class TrackReport:
    """What reached the voice channel of one track."""

    track: DemoTrack
    skipped: bool
    frames: int
    span: int
    lost: int
    seconds_heard: float
    tone_seconds: float
    frequency: float
    level: float
    pacing: Pacing | None
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        """Whether the track's checks passed."""
        return not self.problems


@dataclass
class DemoReport:
    """The demo's outcome: the tracks heard, speaking changes, the WAV, what failed."""

    tracks: list[TrackReport] = field(default_factory=list)
    speaking: list[tuple[float, bool]] = field(default_factory=list)
    frames: int = 0
    span: int = 0
    lost: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    streams: int = 0
    wav: Path | None = None
    wav_seconds: float = 0.0
    failure: str | None = None
    elapsed: float = 0.0
    #: The voice path the bot took, as the voice server saw it (``v8 wss:// udp ... DAVE 1``).
    voice_path: str | None = None
    #: The DAVE group's voice privacy code, in groups of five digits as Discord shows it.
    privacy_code: str | None = None

    @property
    def loss(self) -> float:
        """Share of the RTP sequence span that never arrived."""
        return self.lost / self.span if self.span else 1.0

    @property
    def problems(self) -> list[str]:
        """Every reason the demo fails (empty when it passed)."""
        found = [] if self.failure is None else [self.failure]
        if not self.tracks and self.failure is None:
            found.append("nothing reached the voice channel")
        for track in self.tracks:
            found.extend(f"{track.track.title}: {p}" for p in track.problems)
        if self.span and self.loss >= MAX_LOSS:
            found.append(f"{self.loss:.1%} of the frames were lost (limit {MAX_LOSS:.0%})")
        return found

    @property
    def passed(self) -> bool:
        """Whether the demo passed: every check, and no step failed."""
        return not self.problems


# --- the transcript ---------------------------------------------------------------------------


class Transcript:
    """Print the conversation like a chat client, and a progress line that updates in place."""

    def __init__(self, out: TextIO, world: World, *, progress: bool) -> None:
        self._out = out
        self._world = world
        self._progress = progress
        self._progress_shown = False
        # Not a terminal (a log, a pipe): a progress line now and then instead of `\r` updates.
        self._in_place = out.isatty()
        self._last_plain = 0.0
        self.printed: set[int] = set()

    def line(self, text: str = "") -> None:
        """Print a line (ending any progress line first)."""
        self.end_progress()
        print(text, file=self._out, flush=True)

    def event(self, text: str) -> None:
        """Something that happened, not said: `-> alice joined General`."""
        self.line(f"  · {text}")

    def command(self, user: ScriptedUser, command: str, options: dict[str, Any]) -> None:
        """What the user typed."""
        shown = " ".join(f"{k}: {v}" for k, v in options.items())
        self.line(f"{user.name} ▸ /{command}" + (f" {shown}" if shown else ""))

    def reply(self, reply: Reply, bot_name: str) -> None:
        """The bot's answer to a command (marked when only the user sees it)."""
        message = reply.message
        if message is not None:
            self.printed.add(message.id)
        who = f"{bot_name} (only you)" if reply.ephemeral else bot_name
        self._bubble(who, reply.content, reply.embeds, reply.components)

    def message(self, message: Message, bot_name: str) -> None:
        """A message the bot posted in the channel on its own (e.g. "Now playing")."""
        self.printed.add(message.id)
        self._bubble(bot_name, message.content, message.embeds, message.components)

    def _bubble(self, who: str, content: str, embeds: list[JSON], components: list[JSON]) -> None:
        lines = [self._plain(content)] if content else []
        for embed in embeds:
            lines.extend("│ " + text for text in self._embed_lines(embed))
        labels = [c.get("label") for c in _walk(components) if c.get("type") == 2]
        if labels:
            lines.append(" ".join(f"[{label}]" for label in labels if label))
        if not lines:
            lines = ["(no text)"]
        self.line(f"    {who}: {lines[0]}")
        pad = " " * (len(who) + 6)
        for text in lines[1:]:
            self.line(pad + text)

    def _embed_lines(self, embed: JSON) -> list[str]:
        out: list[str] = []
        author = embed.get("author")
        if isinstance(author, dict) and author.get("name"):
            out.append(str(author["name"]))
        for key in ("title", "description"):
            if embed.get(key):
                out.extend(str(embed[key]).splitlines())
        out.extend(f"{f.get('name', '')}: {f.get('value', '')}" for f in embed.get("fields") or [])
        footer = embed.get("footer")
        if isinstance(footer, dict) and footer.get("text"):
            out.append(str(footer["text"]))
        return [self._plain(x) for x in out]

    def _plain(self, text: str) -> str:
        """Markdown and mentions as a client shows them."""

        def channel(m: re.Match[str]) -> str:
            found = self._world.find_channel(int(m.group(1)))
            return f"#{found.name}" if found is not None else "#deleted-channel"

        def user(m: re.Match[str]) -> str:
            found = self._world.users.get(int(m.group(1)))
            return f"@{found.name}" if found is not None else "@unknown-user"

        text = re.sub(r"<#(\d+)>", channel, text)
        text = re.sub(r"<@!?(\d+)>", user, text)
        text = re.sub(r"\[([^\]]+)\]\(<?[^)>]+>?\)", r"\1", text)  # [title](url) -> title
        return text.replace("**", "").replace("`", "")

    def progress(self, text: str) -> None:
        """Replace the progress line with `text`."""
        if not self._progress:
            return
        if not self._in_place:
            now = time.monotonic()
            if now - self._last_plain >= 2.0:
                self._last_plain = now
                print(text, file=self._out, flush=True)
            return
        self._out.write("\r" + text.ljust(78))
        self._out.flush()
        self._progress_shown = True

    def end_progress(self) -> None:
        """Finish the progress line so the next line starts clean."""
        if self._progress_shown:
            self._out.write("\n")
            self._out.flush()
            self._progress_shown = False


def _walk(components: list[JSON]) -> list[JSON]:
    found: list[JSON] = []
    for component in components:
        found.append(component)
        found.extend(_walk(list(component.get("components") or [])))
    return found


# --- the bot ----------------------------------------------------------------------------------


#: The example an owner starts from: its bot class and its configuration file are what runs.
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


@dataclass(frozen=True)
class _Frame:
    stream: int
    sequence: int  # extended: no 16-bit wrap
    arrival: float
    timestamp: int
    opus: bytes
    index: int  # position in arrival order (first copy)


@dataclass
class _Analysis:
    tracks: list[TrackReport]
    speaking: list[tuple[float, bool]]
    frames: int
    span: int
    lost: int
    duplicates: int
    out_of_order: int
    streams: int
    wav: Path
    wav_seconds: float


def _ordered_frames(packets: Sequence[ReceivedPacket]) -> tuple[list[_Frame], int, int]:
    """Distinct frames in sequence order per stream; also duplicates and out-of-order counts."""
    streams: dict[int, int] = {}
    highest: dict[int, int] = {}
    seen: dict[tuple[int, int], _Frame] = {}
    duplicates = out_of_order = 0
    for index, packet in enumerate(packets):
        stream = streams.setdefault(packet.ssrc, len(streams))
        top = highest.get(stream)
        if top is None:
            ext = packet.sequence
        else:
            delta = (packet.sequence - top) % 65536
            ext = top + delta if delta < 32768 else top - (65536 - delta)
        key = (stream, ext)
        if key in seen:
            duplicates += 1
            continue
        if top is not None and ext < top:
            out_of_order += 1
        highest[stream] = ext if top is None else max(top, ext)
        seen[key] = _Frame(stream, ext, packet.arrival, packet.timestamp, packet.opus, index)
    return sorted(seen.values(), key=lambda f: (f.stream, f.sequence)), duplicates, out_of_order


def _span(frames: Sequence[_Frame]) -> int:
    by_stream: dict[int, list[int]] = {}
    for f in frames:
        by_stream.setdefault(f.stream, []).append(f.sequence)
    return sum(max(s) - min(s) + 1 for s in by_stream.values())


def _pacing(frames: Sequence[_Frame]) -> Pacing | None:
    steps = [
        b.arrival - a.arrival
        for a, b in itertools.pairwise(frames)
        if b.stream == a.stream and b.sequence == a.sequence + 1
    ]
    if len(steps) < 2:
        return None
    values = np.array(steps)
    jitter = 0.0
    previous: float | None = None
    for f in frames:
        # RFC 3550 6.4.1, in seconds: J += (|D| - J) / 16.
        transit = f.arrival - f.timestamp / 48_000
        if previous is not None:
            jitter += (abs(transit - previous) - jitter) / 16
        previous = transit
    wall = frames[-1].arrival - frames[0].arrival
    count = frames[-1].sequence - frames[0].sequence
    return Pacing(
        p50=float(np.percentile(values, 50)),
        p99=float(np.percentile(values, 99)),
        max=float(values.max()),
        late=int((values > 2 * FRAME_SECONDS).sum()),
        jitter=jitter,
        rate=wall / count if count > 0 else 0.0,
    )


def analyse(rec: Recording, plan: Sequence[tuple[DemoTrack, int, bool]], wav: Path) -> _Analysis:
    """Measure a recording track by track and write it to `wav` (blocking, CPU-bound).

    Args:
        rec: What the bot sent.
        plan: Per track: the track, the index in `rec.packets` where it began (roughly: the
            exact switch is found from the audio), and whether it was skipped.
        wav: Where to write the whole recording.

    Returns:
        The per-track reports, the speaking changes and totals.
    """
    frames, duplicates, out_of_order = _ordered_frames(rec.packets)
    decoder = OpusDecoder()
    pcm = [decoder.decode(f.opus) for f in frames]
    mono = [pcm_to_mono(p) for p in pcm]
    levels = [rms(m) for m in mono]

    # Where each track really begins: the first of five frames in a row whose pitch is nearer to
    # it than to the track before, looking around the rough start (a /skip's reply arrives a few
    # frames after the switch). One 20 ms frame tells two tones a fifth apart easily.
    pitch: dict[int, float] = {}

    def nearer(i: int, track: DemoTrack, previous: DemoTrack) -> bool:
        if levels[i] <= _SILENCE_RMS:
            return False
        if i not in pitch:
            pitch[i] = dominant_frequency(mono[i])
        return abs(pitch[i] - track.freq) < abs(pitch[i] - previous.freq)

    starts: list[int] = []
    for n, (track, rough, _) in enumerate(plan):
        first = next((i for i, f in enumerate(frames) if f.index >= rough), len(frames))
        if n > 0 and first < len(frames):
            previous = plan[n - 1][0]
            for i in range(max(starts[-1], first - 25), min(len(frames) - 5, first + 50)):
                if all(nearer(j, track, previous) for j in range(i, i + 5)):
                    first = i
                    break
        starts.append(first)
    ends = [*starts[1:], len(frames)]

    reports: list[TrackReport] = []
    for (track, _, skipped), begin, end in zip(plan, starts, ends, strict=True):
        part = frames[begin:end]
        problems: list[str] = []
        span = _span(part)
        loud = [i for i in range(begin, end) if levels[i] > _SILENCE_RMS]
        tone_seconds = len(loud) * FRAME_SECONDS
        measured = mono[begin + _EDGE_FRAMES : end - _EDGE_FRAMES] if end - begin > 50 else []
        signal = np.concatenate(measured) if measured else np.zeros(0)
        frequency = dominant_frequency(signal) if signal.size else 0.0
        level = rms(signal)
        if not part:
            problems.append("nothing heard")
        elif abs(frequency - track.freq) > FREQ_TOLERANCE_HZ:
            problems.append(
                f"heard {frequency:.1f} Hz, expected {track.freq:g} ± {FREQ_TOLERANCE_HZ:g} Hz"
            )
        if not skipped and part and tone_seconds < track.seconds - 0.5:
            problems.append(f"only {tone_seconds:.1f} s of its {track.seconds:g} s heard")
        reports.append(
            TrackReport(
                track=track,
                skipped=skipped,
                frames=len(part),
                span=span,
                lost=span - len(part),
                seconds_heard=len(part) * FRAME_SECONDS,
                tone_seconds=tone_seconds,
                frequency=frequency,
                level=level,
                pacing=_pacing(part),
                problems=tuple(problems),
            )
        )
    # Times from the first thing the bot sent: a packet, or the speaking op before it.
    t0 = min(
        [f.arrival for f in frames[:1]] + [c.arrival for c in rec.speaking_changes[:1]] or [0.0]
    )
    speaking = [(c.arrival - t0, c.on) for c in rec.speaking_changes]
    rec.write_wav(wav)
    span = _span(frames)
    return _Analysis(
        tracks=reports,
        speaking=speaking,
        frames=len(frames),
        span=span,
        lost=span - len(frames),
        duplicates=duplicates,
        out_of_order=out_of_order,
        streams=len({f.stream for f in frames}),
        wav=wav,
        wav_seconds=span * FRAME_SECONDS,
    )


def format_report(report: DemoReport) -> str:
    """The report as printed after the conversation."""
    lines = ["What reached the voice channel"]
    if report.voice_path is not None:
        lines.append(f"  voice path   {report.voice_path}")
    if report.privacy_code is not None:
        lines.append(f"  privacy code {report.privacy_code}")
    for t in report.tracks:
        how = "skipped halfway" if t.skipped else "played to the end"
        lines.append(f"  {t.track.title} ({t.track.container}, {how})")
        lines.append(
            f"    heard      {t.seconds_heard:.2f} s ({t.tone_seconds:.2f} s of tone), "
            f"level {t.level:.2f} RMS"
        )
        mark = "ok" if abs(t.frequency - t.track.freq) <= FREQ_TOLERANCE_HZ else "WRONG"
        lines.append(f"    frequency  {t.frequency:.2f} Hz (tone {t.track.freq:g} Hz)  {mark}")
        lines.append(
            f"    frames     {t.frames} received of {t.span} sent (RTP sequence span), "
            f"{t.lost} lost"
        )
        if t.pacing is not None:
            p = t.pacing
            lines.append(
                f"    pacing     inter-arrival p50 {p.p50 * 1000:.1f} ms, "
                f"p99 {p.p99 * 1000:.1f} ms, max {p.max * 1000:.1f} ms, {p.late} over 40 ms; "
                f"{p.rate * 1000:.2f} ms/frame; jitter {p.jitter * 1000:.2f} ms"
            )
    if report.span:
        lines.append(
            f"  total        {report.frames} frames of {report.span} ({report.loss:.2%} lost), "
            f"{report.streams} RTP stream(s)"
        )
        lines.append(
            f"  sequence     {report.duplicates} duplicates, {report.out_of_order} out of order"
        )
    if report.speaking:
        shown = ", ".join(f"{'on' if on else 'off'} at {t:.2f} s" for t, on in report.speaking)
        lines.append("  speaking     " + textwrap.shorten(shown, 200))
    if report.wav is not None:
        lines.append(f"  recording    {report.wav} ({report.wav_seconds:.1f} s, 48 kHz stereo)")
    lines.append("")
    if report.passed:
        lines.append(
            f"PASS: every track heard at its frequency (±{FREQ_TOLERANCE_HZ:g} Hz), "
            f"{report.loss:.2%} of frames lost (limit {MAX_LOSS:.0%}); {report.elapsed:.1f} s."
        )
    else:
        lines.append("FAIL:")
        lines.extend(f"  - {p}" for p in report.problems)
    return "\n".join(lines)


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
