"""DAVE's cost on the send path: CPU per frame and per stream-second, on and off, beside discord.py.

Both clients encrypt with the same ``davey`` session code (``DaveSession.encrypt_opus``); what
differs is how each calls it. A real MLS group is formed first (the sandbox's
:class:`~legato.sandbox.dave_listener.DaveChannel` with its listener, plus two members), so every
encryption below runs with a live key ratchet.

1. The DAVE step alone: Legato's ``DaveClient.encrypt`` (encrypting, and at protocol 0 where it
   passes frames through), and discord.py 2.7.1's own expression from
   ``VoiceClient._get_voice_packet`` (``dave_session.encrypt_opus(data) if dave_session and
   can_encrypt else data``, with ``VoiceConnectionState.can_encrypt`` borrowed as is).
2. The whole ``udp`` send path per 20 ms frame, DAVE on and off: Legato's
   ``UdpTransport.send_frame(dave.encrypt(frame))`` (what ``VoiceConnection.send_frame`` runs)
   and discord.py's ``send_audio_packet(encode=False)`` on the stand-in ``bench_voice`` uses,
   to a loopback sink that is never read.

CPU is ``time.process_time`` over a batch, best of several; "cpu %/stream" is the share of one
core a stream takes at 50 frames a second.

    python bench/bench_dave.py [--full]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FIGURES: dict[str, float] = {}

CHANNEL_ID = 1_200_000_000_000_000_001
LISTENER_ID = 1_200_000_000_000_000_900
OURS_ID = 1_200_000_000_000_000_100
PEER_ID = 1_200_000_000_000_000_200
FRAMES_PER_SECOND = 50


def _form_group() -> tuple[Any, Any]:
    """Two members (Legato's client for each) in a formed DAVE group with the listener."""
    from legato.sandbox.dave import Deliver
    from legato.sandbox.dave_listener import DaveChannel
    from legato.voice.dave import DaveClient, SendBinary

    channel = DaveChannel(CHANNEL_ID, listener_id=LISTENER_ID)
    clients: dict[int, DaveClient] = {}

    def pump(items: list[Deliver]) -> None:
        queue = deque(items)
        while queue:
            item = queue.popleft()
            client = clients[item.user_id]
            msg = item.message
            if isinstance(msg, SendBinary):
                outs = client.receive_binary(msg.op, msg.payload)
            else:
                outs = client.receive_json(msg.op, msg.data)
            for out in outs:
                if isinstance(out, SendBinary):
                    queue.extend(channel.receive_binary(item.user_id, out.op, out.payload))
                else:
                    queue.extend(channel.receive_json(item.user_id, out.op, out.data))

    for uid in (OURS_ID, PEER_ID):
        client = clients[uid] = DaveClient(uid, CHANNEL_ID)
        first = client.start(1)
        pump(channel.join(uid))
        for out in first:
            assert isinstance(out, SendBinary)
            pump(channel.receive_binary(uid, out.op, out.payload))
    ours, peer = clients[OURS_ID], clients[PEER_ID]
    assert ours.encrypting, "the group did not form"
    assert peer.encrypting, "the group did not form"
    return ours, peer


def _best_us(run: Callable[[], None], count: int, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        c0 = time.process_time()
        run()
        best = min(best, (time.process_time() - c0) / count * 1e6)
    return best


def _dpy_conn(session: Any, version: int) -> Any:
    """discord.py's connection-state fields its send path reads, ``can_encrypt`` borrowed."""
    import discord.voice_state

    class Conn:
        can_encrypt = discord.voice_state.VoiceConnectionState.can_encrypt

        def __init__(self) -> None:
            self.dave_session = session
            self.dave_protocol_version = version

    return Conn()


def _encrypt_only(count: int, repeat: int) -> list[list[object]]:
    from bench_voice import _tone_frames

    from legato.voice.dave import DaveClient

    frames = _tone_frames()
    ours, peer = _form_group()
    plain = DaveClient(OURS_ID, CHANNEL_ID)
    plain.start(0)
    dpy_on = _dpy_conn(peer.session, 1)
    dpy_off = _dpy_conn(None, 0)

    def ours_run(client: DaveClient) -> Callable[[], None]:
        def run() -> None:
            encrypt = client.encrypt
            for i in range(count):
                encrypt(frames[i % 50])

        return run

    def dpy_run(conn: Any) -> Callable[[], None]:
        def run() -> None:
            for i in range(count):
                data = frames[i % 50]
                # discord.py 2.7.1 VoiceClient._get_voice_packet, first statement, verbatim.
                packet = (  # noqa: F841
                    conn.dave_session.encrypt_opus(data)
                    if conn.dave_session and conn.can_encrypt
                    else data
                )

        return run

    cases = [
        ("Legato DaveClient.encrypt", "on", ours_run(ours), "ours.on"),
        ("Legato DaveClient.encrypt", "off (protocol 0)", ours_run(plain), "ours.off"),
        ("discord.py _get_voice_packet DAVE step", "on", dpy_run(dpy_on), "dpy.on"),
        ("discord.py _get_voice_packet DAVE step", "off (no session)", dpy_run(dpy_off), "dpy.off"),
    ]
    rows: list[list[object]] = []
    for label, state, run, key in cases:
        us = _best_us(run, count, repeat)
        FIGURES[f"dave.encrypt.{key}.us"] = us
        rows.append([label, state, us, us * FRAMES_PER_SECOND / 1e6 * 100])
    # The frames really were encrypted, and open for the other member.
    wire = ours.encrypt(frames[0])
    assert wire != frames[0]
    assert peer.session.decrypt(OURS_ID, _audio(), wire) == frames[0]
    return rows


def _audio() -> Any:
    import davey

    return davey.MediaType.audio


async def _send_path(count: int, repeat: int) -> list[list[object]]:
    from bench_voice import GCM, XCHACHA, _dpy_stand_in, _Sink, _tone_frames, _transport

    from legato.voice.dave import DaveClient

    loop = asyncio.get_running_loop()
    sink = _Sink(loop)
    frames = _tone_frames()
    ours, peer = _form_group()
    plain = DaveClient(OURS_ID, CHANNEL_ID)
    plain.start(0)
    try:
        transports = {mode: await _transport(sink, mode) for mode in (GCM, XCHACHA)}
        sink.stop_reading()
        dpy = _dpy_stand_in(sink.port)
        sock = dpy._connection.sock
        dpy_states = {"on": _dpy_conn(peer.session, 1), "off": _dpy_conn(None, 0)}
        for state in dpy_states.values():
            state.sock = sock
            state.send_packet = sock.send

        def ours_run(mode: str, client: DaveClient) -> Callable[[], None]:
            def run() -> None:
                send, encrypt = transports[mode].send_frame, client.encrypt
                for i in range(count):
                    send(encrypt(frames[i % 50]))

            return run

        def dpy_run(state: str) -> Callable[[], None]:
            def run() -> None:
                dpy._connection = dpy_states[state]
                send = dpy.send_audio_packet
                for i in range(count):
                    send(frames[i % 50], encode=False)

            return run

        cases = [
            ("Legato send_frame(dave.encrypt(f))", GCM, "on", ours_run(GCM, ours), "ours.gcm.on"),
            (
                "Legato send_frame(dave.encrypt(f))",
                GCM,
                "off",
                ours_run(GCM, plain),
                "ours.gcm.off",
            ),
            (
                "Legato send_frame(dave.encrypt(f))",
                XCHACHA,
                "on",
                ours_run(XCHACHA, ours),
                "ours.xchacha.on",
            ),
            (
                "Legato send_frame(dave.encrypt(f))",
                XCHACHA,
                "off",
                ours_run(XCHACHA, plain),
                "ours.xchacha.off",
            ),
            ("discord.py send_audio_packet", XCHACHA, "on", dpy_run("on"), "dpy.on"),
            ("discord.py send_audio_packet", XCHACHA, "off", dpy_run("off"), "dpy.off"),
        ]
        rows: list[list[object]] = []
        results: dict[str, float] = {}
        for label, mode, state, run, key in cases:
            us = _best_us(run, count, repeat)
            results[key] = us
            FIGURES[f"dave.send_path.{key}.us"] = us
            rows.append([label, mode, state, us, us * FRAMES_PER_SECOND / 1e6 * 100])
        for key in ("ours.gcm", "ours.xchacha", "dpy"):
            FIGURES[f"dave.send_path.{key}.overhead_us"] = (
                results[f"{key}.on"] - results[f"{key}.off"]
            )
        FIGURES["dave.send_path.ratio_xchacha_on_vs_dpy_on"] = (
            results["ours.xchacha.on"] / results["dpy.on"]
        )
        for row in rows:
            row.append(row[3] / results["dpy.on"])  # type: ignore[operator]
        for transport in transports.values():
            assert transport.stats.send_errors == 0
            await transport.close()
        sock.close()
        return rows
    finally:
        sink.close()


def _table(title: str, headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = [f"\n### {title}\n", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def run(quick: bool) -> str:
    """Run both sections and return them as Markdown (figures land in ``FIGURES``)."""
    count, repeat = (5_000, 3) if quick else (20_000, 5)
    out = _table(
        f"DAVE: the encryption step alone, CPU per 20 ms frame ({count} frames, best of {repeat})",
        ["path", "DAVE", "us/frame", "cpu %/stream"],
        _encrypt_only(count, repeat),
    )
    out += _table(
        f"DAVE: udp send path with DAVE on and off, CPU per frame ({count} frames, "
        f"best of {repeat})",
        ["path", "mode", "DAVE", "us/frame", "cpu %/stream", "x discord.py (DAVE on)"],
        asyncio.run(_send_path(count, repeat)),
    )
    ours = FIGURES["dave.send_path.ours.xchacha.overhead_us"]
    dpy = FIGURES["dave.send_path.dpy.overhead_us"]
    out += (
        f"\n\nDAVE adds {ours:.1f} us/frame to Legato's send path "
        f"({ours * FRAMES_PER_SECOND / 1e4:.3f} % of a core per stream) and "
        f"{dpy:.1f} us/frame to discord.py's.\n"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--full", action="store_true")
    args = ap.parse_args()
    print(run(quick=not args.full))
    print(FIGURES, file=sys.stderr)


if __name__ == "__main__":
    main()
