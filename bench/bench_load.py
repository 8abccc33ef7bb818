"""Load: one bot process, many guilds playing at once in the sandbox.

The bot runs in its own process, as a deployment runs it: `bench/load_bot.py`, Legato's
ready-made bot (`legato.__main__.LegatoBot`) pointed at the sandbox, reporting its CPU times, RSS
and every session's player counters on request and every `--rss-interval` s. This process runs
the sandbox (gateway, REST, voice server), a local HTTP server with generated tones and the
scripted listeners: each guild gets one, who joins voice and runs `/play` with a link; half the
guilds (by default) get Opus in WebM (passed through), the other half MP3 (decoded, resampled
and encoded to Opus). Once every guild is heard and `--settle` seconds more have passed (the
last guilds' start-up settles; `SETTLE_S`), a window of `--seconds` is measured between two
reports of the bot:

- stalled: players that, by the bot's own counters, had an underrun or re-anchored (sent a
  frame so late that the pacer moved its grid rather than burst) in the window, or whose
  stream holds fewer than `MIN_DELIVERED` of the frames the window should, or whose arrivals
  at the listener have a gap over `STALL_GAP_S` (each cause counted too). The arrivals are the
  kernel's receive stamps at the sandbox's socket (see `legato.sandbox.voice_media`), so a pause of
  this process, which runs the sandbox, does not pass for one of the bot;
- frames lost: RTP sequence numbers the voice server never received in the window; frames sent
  is the bot's own count (audio and silence) over the same window;
- pacing: `bench_common.pacing_stats` over the recorded arrival times (dev = lateness against
  each stream's ideal 20 ms grid, gap = |interval - 20 ms|), the listener's view: what the
  bot's pacing and the loopback path make of it. The players' own lateness (p99 and max of each
  player since it started, the worst player's) is the bot's view of its sends;
- CPU per stream: the bot process's CPU time (user + system, every thread, its child processes
  included: decode workers, yt-dlp workers) over stream-seconds;
- the bot's event loop thread (Linux schedstat): the share of the window it ran on a CPU, and
  the share it waited runnable for one (the other processes, its own decode workers among them,
  had both CPUs). Every wait is a frame sent late by as much;
- the decode workers: messages a second the bot sent them in the window, and the requests
  (reads, mostly) they carried: each message is a wake-up of a worker;
- memory: the bot process's RSS at each report in the window; growth is the mean of the last
  third of the samples minus the mean of the first third;
- the instrument itself: datagrams the kernel dropped at the sandbox's media socket in the
  window (this process did not read in time: lost to the listener however the bot sent them),
  the longest lag of this process's loop and of the bot's (`load_bot.LoopLag`, listed from
  50 ms) and their longest cyclic collections (`load_bot.GcPauses`). A case measures like a
  first case only when the first four stay at zero. Beside them, how often this process was
  held up between the clock reads that put a receive stamp on its loop's clock, and the longest
  hold (`legato.sandbox.voice_media.ArrivalClock`: such a datagram takes the last good offset;
  taken from the held reads, its arrival would have moved earlier by the hold), and the CPU
  the machine spent outside the case (every process but this one and those under it: the bot,
  its workers, the hog), in % of one core: on a shared machine, someone else's build or test
  run in the window starves the bot's loop as the hog does, and no figure of the case says so
  otherwise (a `mypy` beside one run took a core for the last 8 s of its window, the bot's loop
  waited for a CPU 60-90 % of each 0.25 s where it had waited 25-40 %, and every player
  re-anchored). This process
  collects and freezes before each window's clock starts and collects between cases; the
  recordings hold their packets as columns (`legato.sandbox.recording.PacketLog`), which the
  collector does not scan (as objects, an earlier case's 360,000 packets made the collection at
  the next window's start take 0.76 s, and the listener lost what arrived meanwhile).
- machine pauses: on a virtual machine the host may stop the guest's CPUs for ~100 ms, and then
  every player re-anchors at once, which is the host's doing, not the bot's. `pause_probe.py`
  runs beside each case, from before the first /play to the window's end (``SCHED_FIFO`` when
  allowed, a 10 ms sleep at a time, each wake-up over 30 ms late listed, on the monotonic clock
  of the bot's reports): the window's late wake-ups, the longest, and the players whose
  re-anchor the bot counted in a report period that holds a pause of 50 ms or more, looking
  one report interval back from the period's end (`pause_probe.machine_pause_figures`). They
  are still counted in stalled and re-anchored (#14's goals count every re-anchor); this says
  how many of them a pause of the machine explains. When the probe could not run through the
  window, the three are NaN ("not measured"), never 0.

Beside a CPU-bound process (``--hog``, `HOG_CODE` at normal priority from before the first
/play to the end of the window) the machine is shared as a busy host shares it: at 50 guilds no
player may re-anchor; at 100 it is overloaded, and the figures per kind (players re-anchored,
underruns, packets heard less than `BURST_S` apart and the smallest gap) show how it degrades:
the passthrough guilds should keep their grid, the transcoding ones fall behind as underruns
(silence), never as bursts.

The sandbox's voice server decrypts and records every packet; that is cheap beside the rest of
its work (at 20 guilds, 6.0 % of a core when it decrypted one packet in 50, 6.9 % decrypting
all), so `sandbox cpu %` is mostly receiving datagrams and serving the listeners.

A second section measures the queue path: scripted users run `/remove`, `/move`, `/shuffle`,
`/clear`, `/skip` and `/playnext` (a playlist of cached tracks) through the sandbox and the
cog's handlers at a target rate, and reports the rate sustained and each command's round trip,
for all commands and for the queue path alone (all but /play, which waits for yt-dlp). It runs
twice: yt-dlp in the bot's threads (the default) and in `QUEUE_PROCESSES` worker processes.
That bot runs in this process (`tests.e2e.queue_storm.StormBot`, as in the e2e test): the storm
needs the bot object to read the queues for its ledger.

    python bench/bench_load.py --guilds 10 --seconds 10
    python bench/bench_load.py --guilds 50 --hog --no-queue
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
PEER_DIR = Path(os.environ.get("LEGATO_PEER_BENCH", HERE.parent.parent / "shared" / "bench"))
sys.path.insert(0, str(PEER_DIR))
import bench_common as bc  # type: ignore[import-not-found]  # noqa: E402  shared stats, 1:1 figures

from legato.sandbox.media import MediaServer, write_tone  # noqa: E402
from legato.sandbox.recording import ReceivedPacket, Recording  # noqa: E402
from legato.sandbox.server import GuildHandle, Sandbox  # noqa: E402
from legato.sandbox.voice_media import ArrivalClock  # noqa: E402

sys.path.insert(0, str(HERE.parent))
from bench.load_bot import (  # noqa: E402  the child's
    PLAYER_FIELDS,
    READY_LINE,
    REPORT_COMMAND,
    GcPauses,
    LoopLag,
    tree_cpu_seconds,
)
from bench.pause_probe import (  # noqa: E402
    ATTRIBUTED_MS,
    BENCH_EVERY_MS,
    BENCH_LIMIT_MS,
    PauseProbe,
    longest_pause_for,
    machine_pause_figures,
    pause_probe,
    pauses_in,
    wait_or_kill,
)
from tests.e2e.queue_storm import (  # noqa: E402  the storm and its ledger, shared with the test
    StormResult,
    TrackFiles,
    queue_storm,
    running_bot,
    storm_config,
)

FIGURES: dict[str, float] = {}

FRAME_S = 0.020
#: An arrival gap this long in the recording counts as a stall (five frames of silence heard).
STALL_GAP_S = 0.100
#: Seconds from the last guild heard to the window. 100 /play at once keep the bot busy for a
#: few seconds after the last one is heard (in two runs of eight, enough to make every player
#: re-anchor about 4 s after it); the window measures 100 guilds playing, not starting. What
#: start-up costs is reported beside it (re-anchors before the window).
SETTLE_S = 10.0
#: A player delivering less than this share of the window's frames stalled.
MIN_DELIVERED = 0.95
#: Guilds set up at once (join voice, /play): keeps start-up from queueing 100 yt-dlp probes.
SETUP_PARALLEL = 10
GUARD = 120.0
#: The queue storm runs twice: yt-dlp in the bot's threads (the default), and in this many
#: worker processes (``[playback] resolve_processes``).
QUEUE_PROCESSES = 2
#: Decode worker processes of the second load run (the machine has two cores).
LOAD_DECODE_PROCESSES = 2
#: Two arrivals closer than this at the listener are a burst (the pacer keeps 10 ms at least).
BURST_S = 0.005
#: The guilds' two kinds: Opus passed through, MP3 transcoded.
KINDS = ("passthrough", "transcode")
#: A CPU-bound neighbour at normal priority (the "hog" cases): one core's worth of pure Python.
HOG_CODE = "while True: pass"


@dataclass(frozen=True)
class _Guild:
    handle: GuildHandle
    kind: str  # "passthrough" or "transcode"
    rec: Recording


async def _setup_guild(
    sb: Sandbox, handle: GuildHandle, n: int, url: str, gate: asyncio.Semaphore
) -> str | None:
    """Join and /play in one guild; None when it plays, else the bot's answer (counted)."""
    async with gate:
        user = sb.add_user(f"listener{n:03}", guilds=[handle])
        await user.join_voice(handle.voice)
        reply = await user.invoke("play", channel=handle.text, query=url, timeout=GUARD)
        if reply.deferred and not reply.text():
            await reply.wait_edit(timeout=GUARD)
        return None if reply.text().startswith("Playing") else reply.text()


def _streams(packets: Sequence[ReceivedPacket]) -> dict[int, list[tuple[int, float]]]:
    """Per SSRC: (extended sequence, arrival) of each distinct packet, in sequence order."""
    out: dict[int, dict[int, float]] = {}
    top: dict[int, int] = {}
    for p in packets:
        high = top.get(p.ssrc)
        if high is None:
            ext = p.sequence
        else:
            delta = (p.sequence - high) % 65536
            ext = high + delta if delta < 32768 else high - (65536 - delta)
        top[p.ssrc] = ext if high is None else max(high, ext)
        out.setdefault(p.ssrc, {}).setdefault(ext, p.arrival)
    return {ssrc: sorted(seqs.items()) for ssrc, seqs in out.items()}


def _window(packets: Sequence[ReceivedPacket]) -> dict[str, float]:
    """Frames, losses, the largest and smallest gap, and the arrivals less than `BURST_S` after
    the one before (a burst) of one guild's packets in the window."""
    frames = lost = bursts = 0
    max_gap, min_gap = 0.0, math.inf
    for seqs in _streams(packets).values():
        frames += len(seqs)
        lost += seqs[-1][0] - seqs[0][0] + 1 - len(seqs)
        arrivals = sorted(a for _, a in seqs)
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        max_gap = max([max_gap, *gaps])
        min_gap = min([min_gap, *gaps])
        bursts += sum(g < BURST_S for g in gaps)
    return {"frames": frames, "lost": lost, "max_gap": max_gap, "min_gap": min_gap,
            "bursts": bursts}  # fmt: skip


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds so far of this process and every process under it (the bot, its workers, the
    hog), and of the whole machine (busy time over every CPU)."""
    ours = tree_cpu_seconds(psutil.Process())
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system
    busy += sum(getattr(t, f, 0.0) for f in ("irq", "softirq", "steal"))
    return ours, busy


def socket_drops(port: int) -> int | None:
    """Datagrams the kernel dropped at this process's UDP socket bound to ``port`` (its receive
    buffer was full: this process did not read in time), from ``/proc/net/udp``; None where the
    kernel does not say."""
    try:
        lines = Path("/proc/net/udp").read_text(encoding="ascii").splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 13 and int(fields[1].rsplit(":", 1)[1], 16) == port:
            return int(fields[12])
    return None


def _during(events: Sequence[Sequence[float]], t0: float, t1: float) -> list[Sequence[float]]:
    """The listed pauses (start time first) that began between ``t0`` and ``t1``."""
    return [e for e in events if t0 <= e[0] <= t1]


class BotProcess:
    """`bench/load_bot.py` as a child process: Legato's bot, alone in its process.

    Its stdout is read as it comes: ``ready``, then JSON reports (`load_bot.report`), kept in
    :attr:`reports` in order. Its log goes to `log`.
    """

    def __init__(
        self, sb: Sandbox, config: Path, log: Path, interval: float, *, dump_stalls: bool = False
    ) -> None:
        self.sb = sb
        self.dump_stalls = dump_stalls
        self.config = config
        self.log = log
        self.interval = interval
        self.reports: list[dict[str, Any]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout: float) -> None:  # noqa: ASYNC109 - a guard passed down
        """Start the child and wait for ``ready`` (RuntimeError if it exits first)."""
        env = {**os.environ, **self.sb.child_environ(), "DISCORD_TOKEN": self.sb.bot_token}
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(HERE / "load_bot.py"),
                self.sb.api_base,
                self.sb.gateway_url,
                str(self.config),
                "--report-interval",
                str(self.interval),
                *(["--dump-stalls"] if self.dump_stalls else []),
                cwd=HERE.parent,
                env=env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                limit=2**22,  # a report line holds every guild
            )
        self._reader = asyncio.create_task(self._read(self.proc), name="load-bot-stdout")
        async with asyncio.timeout(timeout):
            await self._wait(lambda: self._ready.is_set())
        if not self._ready.is_set():
            raise RuntimeError(f"the bot process exited before it was ready:\n{self.log_tail()}")

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode().strip()
            if text == READY_LINE:
                self._ready.set()
            elif text.startswith("{"):
                self.reports.append(json.loads(text))
            self._changed.set()
        self._changed.set()  # end of output: the child is gone

    async def _wait(self, done: Any) -> None:
        while not done():
            if self._reader is None or self._reader.done():
                return
            self._changed.clear()
            await self._changed.wait()

    async def request(self, timeout: float = GUARD) -> dict[str, Any]:  # noqa: ASYNC109
        """Ask for a report now and return it."""
        assert self.proc is not None
        assert self.proc.stdin is not None
        seen = len(self.reports)
        self.proc.stdin.write(f"{REPORT_COMMAND}\n".encode())
        await self.proc.stdin.drain()

        def answered() -> bool:
            return any(r["requested"] for r in self.reports[seen:])

        async with asyncio.timeout(timeout):
            await self._wait(answered)
        if not answered():
            raise RuntimeError(f"the bot process exited:\n{self.log_tail()}")
        return next(r for r in self.reports[seen:] if r["requested"])

    async def stop(self, timeout: float = 30.0) -> int | None:  # noqa: ASYNC109
        """Close its stdin (it leaves every guild and exits); SIGKILL after `timeout`."""
        proc = self.proc
        if proc is None:
            return None
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
        code, _killed = await wait_or_kill(proc, timeout)
        if self._reader is not None:
            await self._reader
        return code

    def log_tail(self, lines: int = 20) -> str:
        """The last `lines` lines of the child's log."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def log_problems(self) -> list[str]:
        """Lines of the child's log at WARNING or above."""
        return [
            line
            for line in self.log.read_text(errors="replace").splitlines()
            if any(f" {level} " in line for level in ("WARNING", "ERROR", "CRITICAL"))
        ]


@contextlib.asynccontextmanager
async def bot_process(
    sb: Sandbox, config: Path, log: Path, interval: float, out: Any, *, dump_stalls: bool = False
) -> AsyncIterator[BotProcess]:
    """A ready `BotProcess` against `sb`, stopped (and its log's problems told) on exit."""
    bot = BotProcess(sb, config, log, interval, dump_stalls=dump_stalls)
    try:
        await bot.start(GUARD)
        yield bot
    finally:
        code = await bot.stop()
        problems = bot.log_problems()
        print(
            f"  bot process exited with {code}; {len(problems)} log lines at WARNING or above",
            file=out,
            flush=True,
        )
        for line in problems[:5]:
            print(f"    {line[:200]}", file=out, flush=True)


async def load(
    guilds: int = 100,
    seconds: float = 60.0,
    *,
    passthrough_share: float = 0.5,
    rss_interval: float = 10.0,
    decode_processes: int = 2,
    decode_threads_first: int = 0,
    settle: float = SETTLE_S,
    hog: bool = False,
    out: Any = None,
    dump_stalls: bool = False,
    keep_log: Path | None = None,
    switch_interval_ms: float | None = None,
) -> dict[str, float]:
    """Run `guilds` guilds playing at once for a window of `seconds`; return the figures.

    Args:
        guilds: Guilds playing (each with one listener and one player).
        seconds: Length of the measured window, after every guild is heard.
        passthrough_share: Share of the guilds playing Opus in WebM; the rest play MP3.
        rss_interval: Seconds between the bot process's reports (its RSS samples).
        decode_processes: ``[playback] decode_processes`` (0: decode in the bot's threads).
        decode_threads_first: ``[playback] decode_threads_first`` (0: every decode in the
            worker processes).
        settle: Seconds between the last guild heard and the window (see `SETTLE_S`).
        hog: Run a CPU-bound process (`HOG_CODE`, normal priority) beside the bot from before
            the first /play to the end of the window.
        out: Where to print progress (default stderr).
        dump_stalls: The bot writes every thread's stack to its log when its loop stalls
            0.3 s or more (`load_bot.LoopLag`).
        keep_log: Copy the bot's log here at the end.
        switch_interval_ms: ``[playback] thread_switch_interval_ms`` (None: the default).

    Returns:
        Figures, keyed as in the table (see the module docstring).
    """
    out = out or sys.stderr
    alive = len(gc.get_objects())
    recorded = sum(len(o.packets) for o in gc.get_objects() if type(o) is Recording)
    print(
        f"  this process at the start: {alive} objects the collector tracks,"
        f" {recorded} packets in recordings alive",
        file=out,
        flush=True,
    )
    pauses = GcPauses()
    pauses.install()
    lag = LoopLag()
    lag_task = asyncio.create_task(lag.run(), name="sandbox-loop-lag")
    try:
        figures = await _load(
            guilds,
            seconds,
            passthrough_share=passthrough_share,
            rss_interval=rss_interval,
            decode_processes=decode_processes,
            decode_threads_first=decode_threads_first,
            settle=settle,
            hog=hog,
            out=out,
            dump_stalls=dump_stalls,
            keep_log=keep_log,
            probes=(pauses, lag),
            switch_interval_ms=switch_interval_ms,
        )
    finally:
        lag_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lag_task
        pauses.remove()
    figures["objects_at_start"] = float(alive)
    figures["recorded_at_start"] = float(recorded)
    return figures


async def _load(
    guilds: int,
    seconds: float,
    *,
    passthrough_share: float,
    rss_interval: float,
    decode_processes: int,
    decode_threads_first: int,
    settle: float,
    hog: bool,
    out: Any,
    dump_stalls: bool,
    keep_log: Path | None,
    probes: tuple[GcPauses, LoopLag],
    switch_interval_ms: float | None,
) -> dict[str, float]:
    track_s = seconds + 30.0 + guilds * 0.3  # longer than set-up plus the window
    with tempfile.TemporaryDirectory(prefix="legato-load-") as tmp:
        root = Path(tmp)
        await asyncio.gather(
            asyncio.to_thread(
                write_tone,
                root / "load.webm",
                freq=440.0,
                seconds=track_s,
                container="webm",
                codec="libopus",
            ),
            asyncio.to_thread(
                write_tone,
                root / "load.mp3",
                freq=660.0,
                seconds=track_s,
                container="mp3",
                codec="libmp3lame",
            ),
        )
        with MediaServer(root) as media:
            config_path = root / "legato.toml"
            config = storm_config(media).replace(
                "[playback]\n",
                f"[playback]\ndecode_processes = {decode_processes}\n"
                f"decode_threads_first = {decode_threads_first}\n"
                + (
                    f"thread_switch_interval_ms = {switch_interval_ms}\n"
                    if switch_interval_ms is not None
                    else ""
                ),
            )
            config_path.write_text(config, encoding="utf-8")
            # No 3 s answer deadline: at 100 /play at once an answer may take longer, and the
            # bench measures playback, not how a slow answer is refused.
            async with Sandbox(timeout=GUARD, interaction_deadline=None) as sb:
                handles = list(sb.guilds)
                handles += [sb.add_guild(f"Load {i:03}") for i in range(len(handles), guilds)]
                kinds = [
                    "passthrough" if i < round(guilds * passthrough_share) else "transcode"
                    for i in range(guilds)
                ]
                log = root / "bot.log"
                async with contextlib.AsyncExitStack() as stack:
                    if keep_log is not None:
                        stack.callback(lambda: keep_log.write_bytes(log.read_bytes()))
                    bot = await stack.enter_async_context(
                        bot_process(
                            sb, config_path, log, rss_interval, out, dump_stalls=dump_stalls
                        )
                    )
                    # From before the first /play (its start-up is not in the window) to the
                    # window's end; it ends itself after the longest the case may take.
                    machine = await stack.enter_async_context(
                        pause_probe(4 * GUARD + guilds + settle + seconds)
                    )
                    with cpu_hog(hog):
                        t_setup = time.monotonic()
                        gate = asyncio.Semaphore(SETUP_PARALLEL)
                        async with asyncio.timeout(GUARD + guilds):
                            answers = await asyncio.gather(
                                *(
                                    _setup_guild(
                                        sb,
                                        h,
                                        i,
                                        media.url(
                                            "load.webm" if k == "passthrough" else "load.mp3"
                                        ),
                                        gate,
                                    )
                                    for i, (h, k) in enumerate(zip(handles, kinds, strict=True))
                                )
                            )
                            failed = [a for a in answers if a is not None]
                            for answer in sorted(set(failed)):
                                print(f"  /play failed: {answer!r}", file=out, flush=True)
                            voice = sb.voice_server
                            await voice.wait_identified(
                                sb.bot.id, count=guilds - len(failed), timeout=GUARD
                            )
                            playing = [
                                _Guild(h, k, voice.recording(sb.bot.id, h.id))
                                for h, k, a in zip(handles, kinds, answers, strict=True)
                                if a is None
                            ]
                            for g in playing:
                                await g.rec.wait_frames(25, timeout=GUARD)
                        setup_s = time.monotonic() - t_setup
                        print(
                            f"  {guilds} guilds playing after {setup_s:.1f} s;"
                            f" settling {settle:g} s, measuring {seconds:g} s",
                            file=out,
                            flush=True,
                        )
                        # The last guilds' start-up (their interactions' follow-ups and posts, the
                        # store's first snapshots, the collector's pass over what start-up made)
                        # runs on for a few seconds: the window is the steady state after it.
                        await asyncio.sleep(settle)
                        figures = await _measure(
                            bot,
                            playing,
                            seconds,
                            probes,
                            sb.voice_server.udp_port,
                            sb.voice_server.arrival_clock,
                            machine,
                        )
                        figures["setup_s"] = setup_s
                        figures["setup_failed"] = float(len(failed))
                        return figures


@contextlib.contextmanager
def cpu_hog(on: bool) -> Iterator[None]:
    """A CPU-bound process at normal priority while inside (nothing when ``on`` is false)."""
    if not on:
        yield
        return
    import subprocess

    hog = subprocess.Popen([sys.executable, "-c", HOG_CODE])
    try:
        yield
    finally:
        hog.kill()
        hog.wait()


async def _measure(
    bot: BotProcess,
    playing: list[_Guild],
    seconds: float,
    probes: tuple[GcPauses, LoopLag],
    media_port: int,
    clock: ArrivalClock,
    machine: PauseProbe,
) -> dict[str, float]:
    """The window: the bot's reports at both ends, the recordings' packets in between.

    ``machine`` (the pause probe) is stopped at the window's end, so that every pause in the
    window has been read.
    """
    pauses, lag = probes
    sandbox = psutil.Process()
    # Collect before the clock starts, and take what is left out of the collector's reach for
    # the window (this process runs the sandbox: its pauses must not fall in the window).
    c0 = time.perf_counter()
    gc.collect()
    collect_s = time.perf_counter() - c0
    gc.freeze()
    try:
        start_idx = [len(g.rec.packets) for g in playing]
        sandbox_cpu0 = sum(sandbox.cpu_times()[:2])
        t0 = time.monotonic()
        drops0 = socket_drops(media_port)
        held0, clock.longest_hold = clock.held, 0.0
        ours0, busy0 = cpu_seconds()
        r0 = await bot.request()
        s0 = time.monotonic()
        await asyncio.sleep(seconds)  # the window itself: nothing to wait on
        sleep_over = time.monotonic() - s0 - seconds
        r1 = await bot.request()
        end_idx = [len(g.rec.packets) for g in playing]
        wall = time.monotonic() - t0
        t1 = time.monotonic()
        drops1 = socket_drops(media_port)
        held1, longest_hold = clock.held, clock.longest_hold
        ours1, busy1 = cpu_seconds()
    finally:
        gc.unfreeze()
    await machine.stop()  # before reading its lines: a pause at the window's end is in them
    machine_late = pauses_in(machine.lines or [], (t0, t1))
    sandbox_long_gc = _during(pauses.long, t0, t1)
    sandbox_long_lag = _during(lag.long, t0, t1)
    bot_gc = [r0["gc"], r1["gc"]] if r0.get("gc") and r1.get("gc") else None
    bot_lag = _during(r1["lag"]["long"], r0["t"], r1["t"]) if r1.get("lag") else []
    bot_long_gc = _during(bot_gc[1]["long"], r0["t"], r1["t"]) if bot_gc else []
    probe_figures = {
        "listener_socket_drops": float(drops1 - drops0)
        if drops0 is not None and drops1 is not None
        else math.nan,
        "outside_cpu_pct": ((busy1 - busy0) - (ours1 - ours0)) / wall * 100,
        "sandbox_clock_held": float(held1 - held0),
        "sandbox_clock_hold_max_ms": longest_hold * 1e3,
        "sandbox_collect_s": collect_s,
        "sandbox_sleep_over_s": sleep_over,
        "sandbox_gc_long": float(len(sandbox_long_gc)),
        "sandbox_gc_max_ms": max((e[2] for e in sandbox_long_gc), default=0.0) * 1e3,
        "sandbox_lag_max_ms": max((e[1] for e in sandbox_long_lag), default=0.0) * 1e3,
        "bot_gc_gen2": float(bot_gc[1]["count"][2] - bot_gc[0]["count"][2]) if bot_gc else math.nan,
        "bot_gc_total_ms": (sum(bot_gc[1]["total"]) - sum(bot_gc[0]["total"])) * 1e3
        if bot_gc
        else math.nan,
        "bot_gc_max_ms": max((e[2] for e in bot_long_gc), default=0.0) * 1e3,
        "bot_lag_max_ms": max((e[1] for e in bot_lag), default=0.0) * 1e3,
        "bot_lag_long": float(len(bot_lag)),
    }
    print(
        "  probes: " + ", ".join(f"{k} {v:.4g}" for k, v in probe_figures.items()),
        file=sys.stderr,
        flush=True,
    )
    for what, events in (
        ("sandbox gc", sandbox_long_gc),
        ("sandbox loop lag", sandbox_long_lag),
        ("bot gc", bot_long_gc),
        ("bot loop lag", bot_lag),
        ("machine pause (ms late, at its end)", machine_late),
    ):
        for e in events[:10]:
            print(
                f"    {what} at {e[0] - t0:+.2f} s of the window: "
                + ", ".join(f"{v:.4g}" for v in e[1:]),
                file=sys.stderr,
                flush=True,
            )
    sandbox_cpu = sum(sandbox.cpu_times()[:2]) - sandbox_cpu0
    # When players re-anchored: per report of the bot (every `--rss-interval` s), how many of
    # each kind, and the share of that interval its loop thread waited runnable for a CPU.
    kind_of = {str(g.handle.id): g.kind for g in playing}
    ri = PLAYER_FIELDS.index("reanchors")
    reanchored_at: list[str] = []
    periods: list[tuple[float, float, dict[str, int]]] = []
    in_window = [r for r in bot.reports if r0["t"] <= r["t"] <= r1["t"]]
    for ra, rb in itertools.pairwise([r0, *in_window, r1]):
        moved = {
            gid: v[ri] - ra["players"][gid][ri]
            for gid, v in rb["players"].items()
            if gid in ra["players"] and v[ri] != ra["players"][gid][ri]
        }
        if moved and rb["t"] > ra["t"]:
            periods.append((ra["t"], rb["t"], {g: n for g, n in moved.items() if g in kind_of}))
            paused = longest_pause_for(machine_late, (t0, t1), (ra["t"], rb["t"]), bot.interval)
            counts = [sum(n for g, n in moved.items() if kind_of.get(g) == k) for k in KINDS]
            waited = (
                f"{(rb['loop'][1] - ra['loop'][1]) / (rb['t'] - ra['t']) * 100:.0f} %"
                if ra["loop"] and rb["loop"]
                else "?"
            )
            reanchored_at.append(
                f"{rb['t'] - r0['t']:+.1f} s: {counts[0]}/{counts[1]} (loop waited {waited}"
                + (f"; machine paused {paused:.0f} ms" if paused else "")
                + ")"
            )
    if reanchored_at:
        print(
            f"    re-anchors (passthrough/transcode) by the bot's report (window from monotonic"
            f" {r0['t']:.2f}): " + ", ".join(reanchored_at),
            file=sys.stderr,
        )
    machine_figures = machine_pause_figures(machine.lines, (t0, t1), periods, bot.interval)
    print(
        "  machine pauses: "
        + (
            f"{machine_figures['machine_pauses']:.0f} in the window (pause_probe under"
            f" {machine.policy}: a {BENCH_EVERY_MS:g} ms sleep woken > {BENCH_LIMIT_MS:g} ms"
            f" late), longest {machine_figures['machine_pause_max_ms']:.0f} ms; players"
            f" re-anchored in a report period with a pause >= {ATTRIBUTED_MS:g} ms:"
            f" {machine_figures['reanchored_in_pause']:.0f}"
            if machine.lines is not None
            else f"not measured (pause_probe: {machine.problem})"
        ),
        file=sys.stderr,
        flush=True,
    )
    samples = [r for r in bot.reports if r0["t"] <= r["t"] <= r1["t"]]
    cpu = r1["cpu"] - r0["cpu"]
    bot_wall = r1["t"] - r0["t"]
    # The bot's event loop thread: share of the window on a CPU, and waiting runnable for one.
    loop_ran, loop_waited = (
        ((r1["loop"][0] - r0["loop"][0]) / bot_wall, (r1["loop"][1] - r0["loop"][1]) / bot_wall)
        if r0["loop"] and r1["loop"]
        else (math.nan, math.nan)
    )
    expected = wall / FRAME_S
    # What the bot sent its decode workers (a message carries the requests one loop turn made).
    pool_messages, pool_requests = (
        ((r1["pool_sent"][0] - r0["pool_sent"][0]) / bot_wall,
         (r1["pool_sent"][1] - r0["pool_sent"][1]) / bot_wall)
        if r0.get("pool_sent") and r1.get("pool_sent")
        else (math.nan, math.nan)
    )  # fmt: skip
    print(
        f"  decode workers: {pool_messages:.0f} messages a second carrying {pool_requests:.0f}"
        " requests"
        if not math.isnan(pool_messages)
        else "  decode workers: none (everything in the bot's threads)",
        file=sys.stderr,
        flush=True,
    )

    stalls = {
        "any": 0,
        "underrun": 0,
        "reanchor": 0,
        "short": 0,
        "gap": 0,
        "passthrough": 0,
        "transcode": 0,
    }
    # Per kind ("passthrough", "transcode"): players that re-anchored, underruns, bursts heard.
    kinds: dict[str, dict[str, float]] = {
        kind: {"reanchored": 0, "underruns": 0, "bursts": 0, "min_gap": math.inf} for kind in KINDS
    }
    arrivals: list[list[float]] = []
    lost_at: dict[int, int] = {}
    frames = lost = sent = underruns = late = reconnects = reanchors = reanchors_before = 0
    reanchors_before_max = 0
    max_gap = 0.0
    for g, i0, i1 in zip(playing, start_idx, end_idx, strict=True):
        packets = g.rec.packets[i0:i1]
        w = (
            _window(packets)
            if packets
            else {"frames": 0, "lost": 0, "max_gap": wall, "min_gap": math.inf, "bursts": 0}
        )
        frames += int(w["frames"])
        lost += int(w["lost"])
        max_gap = max(max_gap, w["max_gap"])
        b, a = (
            dict(zip(PLAYER_FIELDS, r["players"][str(g.handle.id)], strict=True)) for r in (r0, r1)
        )
        under = a["underruns"] - b["underruns"]
        underruns += under
        sent += a["frames_sent"] + a["silence_sent"] - b["frames_sent"] - b["silence_sent"]
        late += a["late_frames"] - b["late_frames"]
        reconnects += a["reconnects"] - b["reconnects"]
        reanchors += a["reanchors"] - b["reanchors"]
        reanchors_before += b["reanchors"]
        reanchors_before_max = max(reanchors_before_max, b["reanchors"])
        why = {
            "underrun": under > 0,
            "reanchor": a["reanchors"] > b["reanchors"],
            "short": w["frames"] < MIN_DELIVERED * expected,
            "gap": w["max_gap"] > STALL_GAP_S,
        }
        for key, hit in why.items():
            stalls[key] += hit
        kind = kinds[g.kind]
        kind["reanchored"] += why["reanchor"]
        kind["underruns"] += under
        kind["bursts"] += w["bursts"]
        kind["min_gap"] = min(kind["min_gap"], w["min_gap"])
        if any(why.values()):
            stalls["any"] += 1
            stalls[g.kind] += 1
        for seqs in _streams(packets).values():
            arrivals.append([t for _, t in seqs])
            for (s0, a0), (s1, _) in itertools.pairwise(seqs):
                if s1 - s0 > 1:  # a loss: when the packet before it arrived, by the second
                    lost_at[int(a0 - t0)] = lost_at.get(int(a0 - t0), 0) + s1 - s0 - 1
    if lost_at:
        print(
            f"    frames lost by second of the window: {sorted(lost_at.items())}", file=sys.stderr
        )
    # Frames heard in each second, every stream together: a stall of the sender shows as a
    # second short and a later one over; falling behind, as every second a little short.
    heard = [0] * (int(wall) + 1)
    for stream in arrivals:
        for at in stream:
            if 0 <= at - t0 < len(heard):
                heard[int(at - t0)] += 1
    print(f"    frames heard by second of the window: {heard}", file=sys.stderr)
    pacing = bc.pacing_stats(arrivals)
    rss = [r["rss"] / 2**20 for r in samples]
    rss_at = [r["t"] - r0["t"] for r in samples]
    third = max(1, len(rss) // 3)
    first, last = rss[:third], rss[-third:]
    stream_s = bot_wall * len(playing)
    ours = [r1["players"][str(g.handle.id)] for g in playing]
    p99 = PLAYER_FIELDS.index("p99_lateness_ms")
    worst = PLAYER_FIELDS.index("max_lateness_ms")
    figures = {
        "guilds": float(len(playing)),
        "seconds": wall,
        "passthrough": float(sum(g.kind == "passthrough" for g in playing)),
        "stalled": float(stalls["any"]),
        "stalled_passthrough": float(stalls["passthrough"]),
        "stalled_transcode": float(stalls["transcode"]),
        "stalled_underrun": float(stalls["underrun"]),
        "stalled_reanchor": float(stalls["reanchor"]),
        "stalled_gap": float(stalls["gap"]),
        "stalled_short": float(stalls["short"]),
        "underruns": float(underruns),
        "late_frames": float(late),
        "reconnects": float(reconnects),
        "reanchors": float(reanchors),
        "reanchors_before": float(reanchors_before),
        "reanchors_before_max": float(reanchors_before_max),
        "frames_sent": float(sent),
        "frames": float(frames),
        "frames_expected": expected * len(playing),
        "frames_lost": float(lost),
        "dev_p99": pacing["dev_p99"],
        "dev_max": pacing["dev_max"],
        "gap_p99": pacing["gap_p99"],
        "gap_max_ms": max_gap * 1e3,
        "player_late_p99_max": max(v[p99] for v in ours),
        "player_late_max": max(v[worst] for v in ours),
        "cpu_pct_per_stream": cpu / stream_s * 100,
        "cpu_pct_total": cpu / bot_wall * 100,
        "loop_cpu_pct": loop_ran * 100,
        "loop_wait_pct": loop_waited * 100,
        "pool_messages_per_s": pool_messages,
        "pool_requests_per_s": pool_requests,
        "sandbox_cpu_pct": sandbox_cpu / wall * 100,
        "rss_first_mb": sum(first) / len(first),
        "rss_last_mb": sum(last) / len(last),
        "rss_growth_mb": sum(last) / len(last) - sum(first) / len(first),
        "rss_samples": float(len(rss)),
        "bursts": sum(k["bursts"] for k in kinds.values()),
        "min_gap_ms": min(k["min_gap"] for k in kinds.values()) * 1e3,
    }
    per_kind = {f"{kind}_{key}": v for kind, fig in kinds.items() for key, v in fig.items()}
    per_kind |= {f"{kind}_min_gap_ms": fig["min_gap"] * 1e3 for kind, fig in kinds.items()}
    rss_series = {f"rss_{t:.1f}s_mb": v for t, v in zip(rss_at, rss, strict=True)}
    return figures | per_kind | probe_figures | machine_figures | rss_series


def load_table(r: dict[str, float], title: str) -> str:
    """The figures of one `load` run as Markdown tables."""
    text: str = bc.table(
        title,
        ["guilds", "failed to start", "passthrough", "window s", "stalled",
         "of which: underrun / re-anchor / < 95 % delivered / a gap > 100 ms heard",
         f"re-anchored in a machine pause >= {ATTRIBUTED_MS:g} ms (in the re-anchor count too)",
         "underruns", "reconnects",
         "frames sent (bot)", "frames received", "frames lost", "delivered %"],
        [[int(r["guilds"]), int(r["setup_failed"]), int(r["passthrough"]), r["seconds"],
          int(r["stalled"]),
          f"{r['stalled_underrun']:.0f} / {r['stalled_reanchor']:.0f} / {r['stalled_short']:.0f}"
          f" / {r['stalled_gap']:.0f}",
          _measured(r["reanchored_in_pause"], whole=True),
          int(r["underruns"]), int(r["reconnects"]),
          int(r["frames_sent"]), int(r["frames"]),
          int(r["frames_lost"]), 100 * r["frames"] / r["frames_expected"]]],
    )  # fmt: skip
    text += bc.table(
        "Pacing and cost (dev and gap: arrivals as the listener's kernel stamped them; lateness"
        " and CPU: the bot's)",
        ["dev p99 ms", "dev max ms", "gap p99 ms", "gap max ms", "player late p99 ms",
         "player late max ms", "late frames", "re-anchors", "re-anchors before (start-up)",
         "most re-anchors before, one player",
         "bot cpu %/stream (incl. children)",
         "bot cpu % total (incl. children)", "bot loop on a CPU %", "bot loop waiting for one %",
         "sandbox cpu %"],
        [[r["dev_p99"], r["dev_max"], r["gap_p99"], r["gap_max_ms"], r["player_late_p99_max"],
          r["player_late_max"], int(r["late_frames"]), int(r["reanchors"]),
          int(r["reanchors_before"]), int(r["reanchors_before_max"]), r["cpu_pct_per_stream"],
          r["cpu_pct_total"], r["loop_cpu_pct"], r["loop_wait_pct"], r["sandbox_cpu_pct"]]],
    )  # fmt: skip
    text += bc.table(
        "The instrument: this process (the sandbox, the listener) and the bot's, in the window"
        " (a datagram the listener's socket dropped is lost to it, however the bot sent it)",
        ["listener socket drops", "sandbox loop lag max ms", "sandbox collection max ms",
         "collect before the window s", "bot loop lag max ms", "bot collection max ms",
         "bot full collections", "arrival clock reads held up", "longest hold ms",
         "outside the case, cpu %",
         f"machine pauses (probe woken > {BENCH_LIMIT_MS:g} ms late)", "longest machine pause ms"],
        [[r["listener_socket_drops"], r["sandbox_lag_max_ms"], r["sandbox_gc_max_ms"],
          r["sandbox_collect_s"], r["bot_lag_max_ms"], r["bot_gc_max_ms"], r["bot_gc_gen2"],
          int(r["sandbox_clock_held"]), r["sandbox_clock_hold_max_ms"],
          r["outside_cpu_pct"], _measured(r["machine_pauses"], whole=True),
          _measured(r["machine_pause_max_ms"])]],
    )  # fmt: skip
    text += bc.table(
        f"Per kind, heard by the listener (a burst: two packets < {BURST_S * 1e3:g} ms apart)",
        ["kind", "players re-anchored", "underruns", "packets < 5 ms apart", "min gap ms"],
        [[kind, int(r[f"{kind}_reanchored"]), int(r[f"{kind}_underruns"]),
          int(r[f"{kind}_bursts"]), r[f"{kind}_min_gap_ms"]]
         for kind in ("passthrough", "transcode")],
    )  # fmt: skip
    series = sorted(
        (float(k[4:-4]), v) for k, v in r.items() if k.startswith("rss_") and k.endswith("s_mb")
    )
    text += bc.table(
        "Bot process RSS over the window (MB)",
        [f"{t:g} s" for t, _ in series] + ["growth, last third - first third"],
        [[*(v for _, v in series), r["rss_growth_mb"]]],
    )
    return text


def _measured(value: float, *, whole: bool = False) -> object:
    """A table cell: "not measured" for NaN, else the figure (a whole number when ``whole``)."""
    if math.isnan(value):
        return "not measured"
    return int(value) if whole else value


_INDEX_PROBE = """
import sys, av, psutil
path, count, packets = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
proc = psutil.Process()
containers = [av.open(path) for _ in range(count)]
streams = [c.streams.audio[0] for c in containers]
demuxers = [c.demux(s) for c, s in zip(containers, streams)]
for d in demuxers:  # the first packets allocate the demuxers' buffers: not what is measured
    for _ in range(50):
        next(d)
rss0, entries0 = proc.memory_info().rss, sum(len(s.index_entries) for s in streams)
for _ in range(packets):
    for d in demuxers:
        next(d)
rss1, entries1 = proc.memory_info().rss, sum(len(s.index_entries) for s in streams)
print((rss1 - rss0) / (count * packets), (entries1 - entries0) / (count * packets))
"""


_INDEX_CAP_PROBE = """
import sys, av
container = av.open(sys.argv[1])
stream = container.streams.audio[0]
most = packets = 0
for packet in container.demux(stream):
    packets += 1
    most = max(most, len(stream.index_entries))
print(packets, most, len(stream.index_entries))
"""


def seek_index_probe(count: int = 40, packets: int = 3000) -> dict[str, float]:
    """What FFmpeg keeps per packet demuxed, for each format the load plays.

    The demuxer adds a seek index entry (24 bytes) for every packet it reads: a bot demuxing
    in its own threads grows by that much while its tracks play, and gives it back when each
    track ends. Measured in a child process (``count`` streams, ``packets`` packets each) so
    that nothing else moves its RSS.

    The index is bounded: FFmpeg halves it when it reaches ``max_index_size`` (1 MiB, 43,690
    entries), about 15 minutes into an Opus track; one 1,000 s Opus stream is demuxed to the end
    to show it. (A smaller ``max_index_size`` passed through PyAV's open options had no effect.)

    Returns:
        ``{fmt}.bytes_per_packet`` (RSS growth) and ``{fmt}.entries_per_packet`` (PyAV's
        ``index_entries``) for ``webm`` (Opus) and ``mp3``; ``cap.packets``, ``cap.most`` (the
        most entries seen) and ``cap.last`` (entries at the end) of the long stream.
    """

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="legato-index-") as tmp:
        seconds = packets * 0.03 + 10.0  # MP3 packets are 26 ms
        for fmt, codec in (("webm", "libopus"), ("mp3", "libmp3lame")):
            path = Path(tmp) / f"probe.{fmt}"
            write_tone(path, freq=440.0, seconds=seconds, container=fmt, codec=codec)
            per_packet, entries = _probe(_INDEX_PROBE, path, count, packets)
            out[f"{fmt}.bytes_per_packet"] = per_packet
            out[f"{fmt}.entries_per_packet"] = entries
        path = Path(tmp) / "long.ogg"
        write_tone(
            path, freq=440.0, seconds=1000.0, container="ogg", codec="libopus", bitrate=32_000
        )
        total, most, last = _probe(_INDEX_CAP_PROBE, path)
        out.update({"cap.packets": total, "cap.most": most, "cap.last": last})
    return out


def _probe(code: str, *args: object) -> list[float]:
    """Run ``code`` in a fresh Python with ``args``; the numbers it prints."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
        timeout=GUARD,
    )
    return [float(v) for v in done.stdout.split()]


def index_note(probe: dict[str, float], r: dict[str, float], opus: int, mp3: int) -> str:
    """The RSS growth a load run's demuxers account for (``opus`` and ``mp3`` of them in the
    bot process), beside the growth it measured."""
    per_s = (
        opus * 50 * probe["webm.bytes_per_packet"]
        + mp3 * (48000 / 1152) * probe["mp3.bytes_per_packet"]
    )
    # The growth figure compares the means of the last and first thirds: two thirds apart.
    expected = per_s * r["seconds"] * 2 / 3 / 1e6
    cap = (
        f"a {probe['cap.packets']:.0f}-packet stream peaked at {probe['cap.most']:.0f} entries,"
        f" {probe['cap.last']:.0f} at its end"
    )
    return (
        f"FFmpeg's seek index, measured apart: {probe['webm.bytes_per_packet']:.0f} B per Opus "
        f"packet and {probe['mp3.bytes_per_packet']:.0f} B per MP3 packet "
        f"({probe['webm.entries_per_packet']:.2f} / {probe['mp3.entries_per_packet']:.2f} index "
        f"entries per packet), freed at each track's end and bounded by FFmpeg ({cap}): "
        f"{expected:.1f} MB of this run's growth ({r['rss_growth_mb']:.1f} MB) with {opus} Opus"
        f" and {mp3} MP3 demuxers in the bot process.\n"
    )


#: The load cases: name -> (guilds, passthrough share, decode_processes, decode_threads_first,
#: a CPU-bound process beside the bot). `make bench` runs `QUICK_CASES`; ``--full`` all of them.
LOAD_CASES: dict[str, tuple[int, float, int, int, bool]] = {
    "mixed": (100, 0.5, LOAD_DECODE_PROCESSES, 0, False),
    "mixed_threads_first": (100, 0.5, LOAD_DECODE_PROCESSES, 8, False),
    "mixed_threads": (100, 0.5, 0, 0, False),
    "hog50": (50, 0.5, LOAD_DECODE_PROCESSES, 0, True),
    "hog100": (100, 0.5, LOAD_DECODE_PROCESSES, 0, True),
    "passthrough": (100, 1.0, LOAD_DECODE_PROCESSES, 0, False),
    "mp3": (100, 0.0, LOAD_DECODE_PROCESSES, 0, False),
    "mp3_threads": (100, 0.0, 0, 0, False),
}
QUICK_CASES = ("mixed", "mixed_threads_first", "mixed_threads", "hog50", "hog100")
#: The figures of each case kept in `FIGURES` as ``load.{case}.{key}``.
CASE_KEYS = (
    "guilds",
    "stalled",
    "stalled_gap",
    "stalled_reanchor",
    "underruns",
    "reanchors",
    "reanchors_before",
    "reanchors_before_max",
    "frames_lost",
    "dev_p99",
    "gap_p99",
    "gap_max_ms",
    "player_late_p99_max",
    "cpu_pct_per_stream",
    "loop_cpu_pct",
    "loop_wait_pct",
    "pool_messages_per_s",
    "pool_requests_per_s",
    "sandbox_cpu_pct",
    "rss_growth_mb",
    "setup_s",
    "listener_socket_drops",
    "sandbox_lag_max_ms",
    "bot_lag_max_ms",
    "bot_gc_max_ms",
    "sandbox_clock_held",
    "sandbox_clock_hold_max_ms",
    "outside_cpu_pct",
    "machine_pauses",
    "machine_pause_max_ms",
    "reanchored_in_pause",
    "bursts",
    "min_gap_ms",
    *(
        f"{kind}_{key}"
        for kind in ("passthrough", "transcode")
        for key in ("reanchored", "underruns", "bursts", "min_gap_ms")
    ),
)


def run(
    quick: bool = True,
    cases: Sequence[str] | None = None,
    queue: bool = True,
    seconds: float = 60.0,
    dump_stalls: bool = False,
) -> str:
    """The load section of `make bench`: many guilds, a mix of passthrough and transcode.

    The 100-guild mix runs three times: with the defaults (every track in 2 worker processes),
    with the first 8 decodes and every Opus stream in the bot's threads
    (``decode_threads_first = 8``) and everything in the bot's threads
    (``decode_processes = 0``). Then beside a CPU-bound process at normal priority: 50 guilds
    (no player may re-anchor) and 100 (overload: the passthrough guilds keep their grid, the
    transcoding ones may fall behind as underruns, never as bursts).

    Args:
        quick: `QUICK_CASES` (else every case of `LOAD_CASES`), unless ``cases`` says.
        cases: The cases to run, by name.
        queue: Run the queue storm too.
        seconds: Each case's window.
        dump_stalls: See `load`; each case's bot log is kept as ``out/load_bot_{case}.log``.
    """
    text = ""
    if queue:
        # The queue storm first: its bot runs in this process, which the load runs leave
        # holding their recordings.
        ops = asyncio.run(queue_ops())
        FIGURES.update({f"load.queue.{k}": v for k, v in ops.items()})
        isolated = asyncio.run(queue_ops(processes=QUEUE_PROCESSES))
        FIGURES.update({f"load.queue.processes.{k}": v for k, v in isolated.items()})
        text += queue_table(ops, isolated)
    names = list(cases) if cases is not None else list(QUICK_CASES if quick else LOAD_CASES)
    probe: dict[str, float] | None = None
    for name in names:
        guilds, share, processes, threads_first, hog = LOAD_CASES[name]
        r = asyncio.run(
            load(
                guilds,
                seconds,
                passthrough_share=share,
                decode_processes=processes,
                decode_threads_first=threads_first,
                hog=hog,
                dump_stalls=dump_stalls,
                keep_log=HERE.parent / "out" / f"load_bot_{name}.log" if dump_stalls else None,
            )
        )
        # The case's sandbox, recordings and loop are garbage now, some of it in cycles: free
        # it here, between windows, not in the next case's first collection.
        gc.collect()
        for key in CASE_KEYS:
            FIGURES[f"load.{name}.{key}"] = r[key]
        if not processes:
            where = "decoding in threads"
        elif threads_first:
            where = (
                f"the first {threads_first} decodes in threads, the rest in {processes} processes"
            )
        else:
            where = f"decoding in {processes} worker processes"
        beside = ", beside a CPU-bound process" if hog else ""
        title = (
            f"Load: one bot process, {guilds} guilds, {name}, {where}{beside}"
            f" ({r['seconds']:.0f} s)"
        )
        text += load_table(r, title)
        if not processes or threads_first:  # the demuxers in the bot process
            if probe is None:
                probe = seek_index_probe()
                FIGURES.update({f"load.seek_index.{k}": v for k, v in probe.items()})
            opus = round(guilds * share)
            mp3 = guilds - opus if not processes else min(threads_first, guilds - opus)
            text += index_note(probe, r, opus, mp3)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--guilds", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument(
        "--passthrough",
        type=float,
        default=0.5,
        help="share of guilds playing Opus in WebM (the rest play MP3)",
    )
    ap.add_argument("--rss-interval", type=float, default=10.0, help="seconds between reports")
    ap.add_argument(
        "--settle", type=float, default=SETTLE_S, help="seconds from all heard to the window"
    )
    ap.add_argument(
        "--decode-processes",
        type=int,
        default=LOAD_DECODE_PROCESSES,
        help="[playback] decode_processes: decode in this many worker processes (0: threads)",
    )
    ap.add_argument(
        "--decode-threads-first",
        type=int,
        default=0,
        help="[playback] decode_threads_first: decodes kept in threads before the processes",
    )
    ap.add_argument("--hog", action="store_true", help="a CPU-bound process beside the bot")
    ap.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="[playback] thread_switch_interval_ms of the bot (default: Legato's)",
    )
    ap.add_argument("--queue-only", action="store_true")
    ap.add_argument("--no-queue", action="store_true")
    ap.add_argument(
        "--cases",
        default=None,
        help="run these LOAD_CASES one after another in this process (comma-separated), as"
        " `make bench` does, instead of the one case the options above describe",
    )
    ap.add_argument(
        "--dump-stalls",
        action="store_true",
        help="the bot logs every thread's stack when its loop stalls 0.3 s (kept in out/)",
    )
    args = ap.parse_args()  # fmt: skip
    if args.cases:
        (HERE.parent / "out").mkdir(exist_ok=True)
        print(
            run(
                cases=args.cases.split(","),
                queue=False,
                seconds=args.seconds,
                dump_stalls=args.dump_stalls,
            )
        )
    elif not args.queue_only:
        r = asyncio.run(
            load(
                args.guilds,
                args.seconds,
                passthrough_share=args.passthrough,
                rss_interval=args.rss_interval,
                settle=args.settle,
                decode_processes=args.decode_processes,
                decode_threads_first=args.decode_threads_first,
                hog=args.hog,
                dump_stalls=args.dump_stalls,
                keep_log=HERE.parent / "out" / "load_bot.log" if args.dump_stalls else None,
                switch_interval_ms=args.switch_interval_ms,
            )
        )
        decode = (
            f"{args.decode_processes} decode processes after {args.decode_threads_first} in threads"
            if args.decode_processes
            else ("decoding in the bot's threads")
        )
        title = f"Load: one bot process, {args.guilds} guilds ({r['seconds']:.0f} s), {decode}"
        print(load_table(r, title))
    if not args.no_queue and not args.cases:
        runs = [asyncio.run(queue_ops(processes=n)) for n in (0, QUEUE_PROCESSES)]
        print(queue_table(*runs))


async def queue_ops(
    guilds: int = 10, rate: float = 500.0, seconds: float = 2.0, processes: int = 0
) -> dict[str, float]:
    """The queue storm of `tests.e2e.queue_storm` at `rate` commands a second; its figures.

    `processes`: ``[playback] resolve_processes`` (0: yt-dlp in the bot's threads).

    Returns:
        Commands sent, the rate answered (commands / seconds from the first sent to the last
        answered), round-trip percentiles, refusals and inconsistencies (must be 0).
    """
    with tempfile.TemporaryDirectory(prefix="legato-storm-") as tmp:
        root = Path(tmp)
        files = await asyncio.to_thread(TrackFiles, root, 60.0)
        with MediaServer(root) as media:
            config_path = root / "legato.toml"
            config_path.write_text(
                storm_config(media, resolve_processes=processes), encoding="utf-8"
            )
            # No 3 s answer deadline: at 500 commands a second answers queue up for seconds;
            # the storm checks that the queues stay consistent, which needs every answer.
            sandbox = Sandbox(timeout=GUARD, interaction_deadline=None)
            async with sandbox as sb, running_bot(sb, config_path, GUARD) as bot:
                r: StormResult = await queue_storm(
                    sb, bot, media, files, guilds=guilds, rate=rate, seconds=seconds
                )
    for problem in r.problems[:10]:
        print("  queue storm:", problem, file=sys.stderr)
    lat = sorted(r.latencies)
    # /play waits for yt-dlp; the other commands answer without it: the queue path alone.
    # (`answered_at` and `latencies` are appended together, one entry per answer.)
    others = [t for command, t in r.answered_at if command != "play"]
    path_lat = sorted(
        t for (command, _), t in zip(r.answered_at, r.latencies, strict=True) if command != "play"
    )
    return {
        "guilds": float(guilds),
        "processes": float(processes),
        "target_rate": rate,
        "sent": float(r.sent),
        "answered_rate": r.answered / r.elapsed if r.elapsed else 0.0,
        "queue_path_rate": len(others) / max(others) if others else 0.0,
        "rtt_p50_ms": bc.q(lat, 0.50) * 1e3,
        "rtt_p99_ms": bc.q(lat, 0.99) * 1e3,
        "queue_path_rtt_p50_ms": bc.q(path_lat, 0.50) * 1e3 if path_lat else 0.0,
        "queue_path_rtt_p99_ms": bc.q(path_lat, 0.99) * 1e3 if path_lat else 0.0,
        "refused": float(r.refused),
        "inconsistencies": float(len(r.problems)),
        "tracks_added": float(sum(len(g.added) for g in r.ledgers.values())),
    }


def _yt_dlp_in(r: dict[str, float]) -> str:
    n = int(r["processes"])
    return f"{n} process{'es' if n > 1 else ''}" if n else "threads"


def queue_table(*runs: dict[str, float]) -> str:
    """The queue storm's figures as a Markdown table, a row per run."""
    r0 = runs[0]
    text: str = bc.table(
        f"Queue commands across {int(r0['guilds'])} guilds (sandbox -> bot -> cog handlers)",
        ["yt-dlp in", "target /s", "sent", "answered /s (incl. yt-dlp /play)", "rtt p50 ms",
         "rtt p99 ms", "queue path answered /s (no /play)", "queue path rtt p50 ms",
         "queue path rtt p99 ms", "refused (bad position, empty)", "tracks added",
         "inconsistencies"],
        [[_yt_dlp_in(r), r["target_rate"], int(r["sent"]), r["answered_rate"], r["rtt_p50_ms"],
          r["rtt_p99_ms"], r["queue_path_rate"], r["queue_path_rtt_p50_ms"],
          r["queue_path_rtt_p99_ms"], int(r["refused"]), int(r["tracks_added"]),
          int(r["inconsistencies"])] for r in runs],
    )  # fmt: skip
    text += "\n"
    for r in runs:
        text += (
            f"yt-dlp in {_yt_dlp_in(r)}: queue commands answered {r['answered_rate']:.0f}/s "
            f"with /play; the queue path alone {r['queue_path_rate']:.0f}/s "
            f"(target {r['target_rate']:.0f}/s).\n"
        )
    return text


if __name__ == "__main__":
    main()
