"""CPU per stream-second of Legato's audio source: transcode (MP3, AAC) and Opus passthrough.

Each case opens a 60 s 440 Hz sine (the shared harness's media: MP3 and AAC at 44.1 kHz, Opus in
WebM at 48 kHz, amplitude 0.3) with ``legato.audio.decode.open_source`` and reads 20 ms Opus
frames as the player does, in batches of 10. CPU is ``time.process_time`` (all threads of this
process) over a window after a warm-up, divided by the seconds of audio produced: "% of one core
per stream". The transcode cases run with Legato's default encoder (128 kbit/s, complexity 10,
no FEC) and with the peer's (discord.py's ``opus.Encoder``: 131072 bit/s, in-band FEC, 15 %
expected loss, and libopus's default complexity, 9: discord.py sets none).

A second table reads the passthrough and MP3 cases over HTTP from a server on loopback, through
the URL guard's reader (``legato.audio.fetch``: every byte FFmpeg reads comes through Python),
beside the same case read from the file: the guard's cost per stream.

    python bench/bench_audio.py [--quick] [--media-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import opuslib
import opuslib.api.ctl
import opuslib.api.encoder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from legato.audio.decode import open_source  # noqa: E402
from legato.audio.encode import OpusSettings  # noqa: E402
from legato.audio.resolve import StreamInfo  # noqa: E402
from legato.audio.source import FRAME_MS  # noqa: E402
from legato.audio.urlguard import UrlPolicy  # noqa: E402
from tests.media import write_tone  # noqa: E402

MEDIA_DIR = Path.home() / ".cache" / "legato-bench"
SECONDS = 60.0


def _libopus_default_complexity() -> int:
    """The complexity a new libopus encoder starts with (9 in libopus 1.3.1 to 1.6)."""
    encoder = opuslib.Encoder(48_000, 2, "audio")
    return int(
        opuslib.api.encoder.encoder_ctl(encoder.encoder_state, opuslib.api.ctl.get_complexity)
    )


#: discord.py 2.7.1's ``opus.Encoder`` as ``VoiceClient.play`` builds it: 128 x 1024 bit/s, FEC
#: at 15 % expected loss, and libopus's own complexity (it sets none).
PEER_SETTINGS = OpusSettings(
    bitrate=131_072, complexity=_libopus_default_complexity(), fec=True, expected_loss=15
)
DEFAULT_SETTINGS = OpusSettings()


def _describe(settings: OpusSettings) -> str:
    fec = f"FEC at {settings.expected_loss} % loss" if settings.fec else "no FEC"
    return f"{settings.bitrate // 1000} kbit/s, complexity {settings.complexity}, {fec}"


_DEFAULTS = f"Legato defaults ({_describe(DEFAULT_SETTINGS)})"
_PEER = f"peer's encoder ({_describe(PEER_SETTINGS)})"

#: Filled by ``run``; ``bench/run.py`` reads it for its ratios (cpu in % of one core per stream).
FIGURES: dict[str, float] = {}


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    ext: str
    settings: OpusSettings
    volume: float = 1.0


CASES = (
    Case("mp3.defaults", f"MP3 44.1 kHz transcode, {_DEFAULTS}", "mp3", DEFAULT_SETTINGS),
    Case("mp3.peer_settings", f"MP3 44.1 kHz transcode, {_PEER}", "mp3", PEER_SETTINGS),
    Case("aac.defaults", f"AAC 44.1 kHz transcode, {_DEFAULTS}", "m4a", DEFAULT_SETTINGS),
    Case("aac.peer_settings", f"AAC 44.1 kHz transcode, {_PEER}", "m4a", PEER_SETTINGS),
    Case("passthrough", "Opus WebM passthrough", "webm", DEFAULT_SETTINGS),
    Case("webm_volume", "Opus WebM at volume 0.5 (decode+encode)", "webm", DEFAULT_SETTINGS, 0.5),
)


def media(directory: Path) -> dict[str, Path]:
    """The 60 s files, written on first use."""
    directory.mkdir(parents=True, exist_ok=True)
    specs = {
        "mp3": ("mp3", "libmp3lame", 44100),
        "m4a": ("m4a", "aac", 44100),
        "webm": ("webm", "libopus", 48000),
    }
    paths: dict[str, Path] = {}
    for ext, (container, codec, rate) in specs.items():
        path = directory / f"legato_tone_{int(SECONDS)}s_440hz.{ext}"
        if not path.exists():
            write_tone(
                path,
                container=container,
                codec=codec,
                freq=440.0,
                seconds=SECONDS,
                rate=rate,
                amplitude=0.3,
            )
        paths[ext] = path
    return paths


def measure(
    path: Path | str, case: Case, window_frames: int, warmup_frames: int
) -> dict[str, float]:
    """CPU over ``window_frames`` frames after ``warmup_frames``; the open is not counted.

    ``path`` is a file, or an ``http://`` URL read through the URL guard (allowing only its
    host and port, as a configured media server would be).
    """
    if isinstance(path, str):
        host = path.split("/")[2]
        info = StreamInfo(url=path, url_policy=UrlPolicy(allowed_hosts=(host,)))
    else:
        info = StreamInfo(url=str(path), is_local=True)
    source = open_source(info, opus=case.settings, volume=case.volume)
    try:
        done = 0
        while done < warmup_frames:
            done += len(source.read(10))
        frames = 0
        size = 0
        passthrough = source.passthrough
        start = time.process_time()
        while frames < window_frames:
            got = source.read(10)
            if not got:
                break
            frames += len(got)
            size += sum(map(len, got))
        cpu = time.process_time() - start
    finally:
        source.close()
    audio_seconds = frames * FRAME_MS / 1000
    return {
        "frames": float(frames),
        "us_per_frame": cpu / frames * 1e6,
        "cpu_pct": cpu / audio_seconds * 100,
        "bytes": size / frames,
        "passthrough": float(passthrough),
    }


def run(quick: bool, media_dir: Path = MEDIA_DIR) -> str:
    """Measure every case; return a Markdown table (and fill ``FIGURES``)."""
    paths = media(media_dir)
    warmup = 50
    window = 1000 if quick else 2900  # 20 s or 58 s of audio
    repeat = 3 if quick else 5  # single passes of 20 s moved 0.31-0.50 in a ratio
    lines = [
        f"### Legato audio source: CPU per stream, {window * FRAME_MS / 1000:g} s window "
        f"after {warmup * FRAME_MS} ms, best of {repeat}",
        "",
        "| case | frames | us/frame | cpu %/stream | streams/core | bytes/pkt | passthrough |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        results = [measure(paths[case.ext], case, window, warmup) for _ in range(repeat)]
        best = min(results, key=lambda r: r["cpu_pct"])
        FIGURES[f"ours.{case.key}.cpu"] = best["cpu_pct"]
        lines.append(
            f"| {case.label} | {best['frames']:.0f} | {best['us_per_frame']:.1f} | "
            f"{best['cpu_pct']:.3f} | {100 / best['cpu_pct']:.0f} | {best['bytes']:.0f} | "
            f"{'yes' if best['passthrough'] else 'no'} |"
        )
    return "\n".join(lines) + "\n\n" + run_guarded(quick, media_dir)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        del format, args

    def copyfile(self, source: object, outputfile: object) -> None:
        # A source is closed after its window: the client hangs up mid-file.
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            super().copyfile(source, outputfile)  # type: ignore[arg-type]


@contextlib.contextmanager
def serving(directory: Path) -> Iterator[str]:
    """``directory`` over HTTP on 127.0.0.1 (with ``Content-Length``); its base URL."""

    def handler(*args: object, **kwargs: object) -> _Quiet:
        return _Quiet(*args, directory=str(directory), **kwargs)  # type: ignore[arg-type]

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


GUARDED_CASES = ("passthrough", "mp3.defaults")


def run_guarded(quick: bool, media_dir: Path = MEDIA_DIR) -> str:
    """The passthrough and MP3 cases from a file and over HTTP through the guarded reader,
    alternated, best of each; fills ``ours.guarded.*`` beside ``ours.*``."""
    paths = media(media_dir)
    warmup = 50
    window = 1000 if quick else 2900
    repeat = 3 if quick else 5
    lines = [
        f"### The URL guard's reader: CPU per stream over HTTP on loopback, best of {repeat}",
        "",
        "| case | from the file, cpu %/stream | guarded HTTP, cpu %/stream | ratio |",
        "|---|---|---|---|",
    ]
    cases = {case.key: case for case in CASES}
    with serving(media_dir) as base:
        for key in GUARDED_CASES:
            case = cases[key]
            url = f"{base}/{paths[case.ext].name}"
            local, guarded = [], []
            for _ in range(repeat):
                local.append(measure(paths[case.ext], case, window, warmup)["cpu_pct"])
                guarded.append(measure(url, case, window, warmup)["cpu_pct"])
            FIGURES[f"ours.guarded.{key}.file_cpu"] = min(local)
            FIGURES[f"ours.guarded.{key}.cpu"] = min(guarded)
            lines.append(
                f"| {case.label} | {min(local):.3f} | {min(guarded):.3f} | "
                f"{min(guarded) / min(local):.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20 s windows, best of 3")
    parser.add_argument("--media-dir", type=Path, default=MEDIA_DIR)
    args = parser.parse_args()
    print(run(args.quick, args.media_dir))


if __name__ == "__main__":
    main()
