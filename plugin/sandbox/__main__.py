"""Run a piece of the sandbox from the command line: ``python -m legato.sandbox SUBCOMMAND``.

Subcommands:
    demo     Legato end to end against the sandbox (``make demo``); exit code 0 when the audio
             checks pass.
    discord  the whole sandbox Discord (gateway, REST, voice), for pointing a bot at it.
    voice    the voice server alone; ``--session SERVER:USER:SESSION`` prints a token to use.

``voice`` and ``discord`` play Discord's voice servers by default: ``wss://`` with a certificate
from a local CA (its ``.pem`` is printed, for ``SSL_CERT_FILE``), DAVE required (4017 without),
the two ``aead_*_rtpsize`` modes. Their endpoint is ``localhost:PORT``: the ``*.discord.media``
names the in-process sandbox hands out resolve only inside its own process
(:mod:`legato.sandbox.names`); ``--endpoint-host`` names another host (one mapped to 127.0.0.1 in
the hosts file, say). ``--profile spacebar`` plays a self-hosted Spacebar voice server instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from legato.config import ENV_CONFIG, load_config
from legato.errors import ConfigError
from legato.sandbox.profiles import PROFILES, voice_profile
from legato.sandbox.relay import RelayOptions
from legato.sandbox.voice import DEFAULT_HEARTBEAT_INTERVAL, SandboxVoiceServer
from legato.voice.endpoint import is_discord_endpoint

# Exit codes of `demo`: the audio checks failed, or the demo could not run at all.
EXIT_FAILED = 1
EXIT_USAGE = 2


def _session_spec(raw: str) -> tuple[int, int, str]:
    try:
        server_id, user_id, session_id = raw.split(":", 2)
        return int(server_id), int(user_id), session_id
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected SERVER_ID:USER_ID:SESSION_ID, got {raw!r}"
        ) from None


def _fraction(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {raw!r}")
    return value


def _voice_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``SandboxVoiceServer`` keywords the profile, TLS, DAVE and endpoint options make."""
    profile = voice_profile(args.profile)
    tls = profile.tls if args.tls is None else args.tls
    options: dict[str, Any] = {"profile": profile, "tls": tls}
    if args.dave is not None:
        options["dave_protocol_version"] = 1 if args.dave else 0
    # A client in another process cannot resolve the in-process *.discord.media names.
    options["endpoint_host"] = args.endpoint_host or ("localhost" if tls else None)
    return options


def _path_lines(server: SandboxVoiceServer) -> list[str]:
    """What a client needs to know about the voice path: scheme, version, DAVE, CA file."""
    version = server.profile.version or 8
    dave = "DAVE required" if server.dave_protocol_version else "no DAVE"
    lines = [f"{server.url}/?v={version}, {dave}, modes {', '.join(server.modes)}"]
    if server.tls:
        lines.append(f"CA certificate (SSL_CERT_FILE): {server.ca_file}")
    return lines


async def _run_voice(args: argparse.Namespace) -> int:
    relay = (
        RelayOptions(loss=args.loss, reorder=args.reorder, seed=args.seed)
        if args.loss or args.reorder
        else None
    )
    server = SandboxVoiceServer(
        args.host,
        port=args.port,
        heartbeat_interval=args.heartbeat_interval,
        relay=relay,
        **_voice_options(args),
    )
    async with server:
        version = server.profile.version or 8
        print(f"voice sandbox: endpoint {server.endpoint}  url {server.url}/?v={version}")
        print(f"media (udp): {args.host}:{server.udp_port}")
        for line in _path_lines(server)[1:]:
            print(line)
        if relay is not None:
            print(
                f"lossy relay (op2 names it): {args.host}:{server.media_port}, "
                f"loss {relay.loss:g}, reorder {relay.reorder:g}, seed {relay.seed}"
            )
        for server_id, user_id, session_id in args.session:
            token = server.register_session(
                server_id=server_id, user_id=user_id, session_id=session_id
            )
            print(f"  server {server_id} user {user_id} session {session_id}: token {token}")
        print("Ctrl-C stops it.", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            stats = server.stats
            print(
                f"\nrtp {stats.rtp_packets}, rtcp {stats.rtcp_packets}, "
                f"malformed {stats.malformed_packets}, "
                f"undecryptable {stats.undecryptable_packets}, bad json {stats.bad_json}"
            )
            if server.relay is not None:
                rs = server.relay.stats
                print(
                    f"relay: rtp {rs.rtp_packets}, dropped {rs.dropped}, "
                    f"reordered {rs.reordered}, released {rs.released}"
                )
            for line in recording_report(server, args.record):
                print(line)
    return 0


def recording_report(server: SandboxVoiceServer, out_dir: Path | None) -> list[str]:
    """A line of figures per recording; with ``out_dir``, its Ogg Opus and WAV are written there.

    Files are named ``server-SERVER_ID-user-USER_ID.ogg`` and ``.wav``; a recording with no
    frames gets no files.
    """
    lines = []
    for (server_id, user_id), rec in sorted(server.recordings.items()):
        st = rec.stats()
        line = (
            f"server {server_id} user {user_id}: {st.frames} frames ({rec.duration:.2f} s), "
            f"gaps {st.gaps}, sequence errors {st.sequence_errors}, "
            f"timestamp errors {st.timestamp_errors}, jitter {st.jitter * 1e3:.2f} ms"
        )
        if st.frames:
            line += f", dominant {rec.dominant_frequency():.1f} Hz"
        lines.append(line)
        if out_dir is not None and st.frames:
            out_dir.mkdir(parents=True, exist_ok=True)
            stem = out_dir / f"server-{server_id}-user-{user_id}"
            rec.write_ogg_opus(stem.with_suffix(".ogg"))
            rec.write_wav(stem.with_suffix(".wav"))
            lines.append(f"  wrote {stem}.ogg and {stem}.wav")
    return lines


def _exit_report(server: SandboxVoiceServer) -> list[str]:
    """What the voice server received, for the end of ``discord``: counts, sessions, recordings."""
    stats = server.stats
    lines = [
        f"voice: rtp {stats.rtp_packets}, undecryptable {stats.undecryptable_packets}, "
        f"DAVE undecryptable {stats.dave_undecryptable}, "
        f"plaintext dropped {stats.dave_plaintext_dropped}"
    ]
    for server_id, user_id in sorted(server.recordings):
        try:
            info = server.session(user_id, server_id)
        except KeyError:
            continue  # left the channel: its recording is reported below all the same
        lines.append(
            f"session server {server_id} user {user_id}: v{info.version} {info.protocol} "
            f"{info.mode}, DAVE {info.dave_protocol_version}"
        )
    for (server_id, channel_id), channel in sorted(server.dave_channels().items()):
        ls = channel.listener.stats
        lines.append(
            f"DAVE group server {server_id} channel {channel_id}: decrypted {ls.decrypted}, "
            f"plaintext {ls.plaintext}, plaintext dropped {ls.plaintext_dropped}, "
            f"failed {ls.failed}, privacy code {channel.listener.client.privacy_code}"
        )
    return [*lines, *recording_report(server, None)]


async def _run_demo(args: argparse.Namespace) -> int:
    from legato.sandbox.demo import DemoOptions, run_demo

    try:
        # The [sandbox] section of the configuration names the guild, listeners and tone.
        config = load_config(args.config) if args.config or os.environ.get(ENV_CONFIG) else None
    except ConfigError as exc:
        print(f"demo: {exc}")
        return EXIT_USAGE
    options = DemoOptions(out_dir=Path(args.out), transport=args.transport, progress=args.progress)
    if config is not None:
        sandbox = config.sandbox
        options = dataclasses.replace(
            options,
            host=sandbox.host,
            guild_name=sandbox.demo_guild,
            listeners=sandbox.demo_listeners,
            tone_hz=sandbox.demo_tone_hz,
            seconds=sandbox.demo_seconds,
        )
    if args.seconds is not None:
        options = dataclasses.replace(options, seconds=args.seconds)
    report = await run_demo(options)
    return 0 if report.passed else EXIT_FAILED


async def _run_discord(args: argparse.Namespace) -> int:
    from legato.sandbox.server import Sandbox

    async with Sandbox(voice_options=_voice_options(args)) as sb:
        voice = sb.voice_server
        listeners = [sb.add_user(name) for name in args.user]
        print("sandbox Discord: running (Ctrl-C stops it)")
        print(f"  API base         {sb.api_base}")
        print(f"  gateway          {sb.gateway_url}")
        print(f"  bot token        {sb.bot_token}")
        print(f"  bot user id      {sb.bot.id} ({sb.bot.name}); application id {sb.application_id}")
        print(f"  voice endpoint   {voice.endpoint} ({args.profile} profile)")
        path, *ca = _path_lines(voice)
        print(f"  voice path       {path}")
        for line in ca:
            print(f"  {line}")
        print(f"  guild            {sb.guild.id} ({sb.guild.name})")
        for handle in sb.guilds:
            for channel in (*handle.text_channels.values(), *handle.voice_channels.values()):
                kind = "voice" if channel.is_voice else "text"
                print(f"    {kind:5} channel  {channel.id} (#{channel.name})")
            print(f"    DJ role        {handle.dj_role.id}")
        for user in listeners:
            print(f"  member           {user.id} ({user.name})")
        print()
        print("Point discord.py here before starting the bot with the token above:")
        print(f'  discord.http.Route.BASE = "{sb.api_base}"')
        print(f'  discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL("{sb.gateway_url}")')
        print("(or legato.sandbox.server.point_discord_py_here(api_base=..., gateway_url=...))")
        print("and pass chunk_guilds_at_startup=False.", end=" ")
        if voice.tls:
            print(f"Start it with SSL_CERT_FILE={voice.ca_file} to trust the voice server.")
        else:
            print()
        print("For Legato's ready-made bot:")
        print(
            f"  LEGATO_BOT_API_BASE={sb.api_base} LEGATO_BOT_GATEWAY_URL={sb.gateway_url} "
            "DISCORD_TOKEN=<the bot token> python -m legato run",
            flush=True,
        )
        if voice.tls and not is_discord_endpoint(voice.endpoint):
            print(
                "  (Legato's voice client takes its Discord path, v8 over wss:// with DAVE, only\n"
                "  toward *.discord.media hosts: map one to 127.0.0.1 in the hosts file and pass\n"
                "  --endpoint-host NAME, or pass --no-tls --no-dave for its self-hosted path.)",
                flush=True,
            )
        try:
            await asyncio.Event().wait()
        finally:
            print()
            for line in _exit_report(voice):
                print(line, flush=True)
    return 0


def _add_profile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile",
        choices=tuple(PROFILES),
        default="discord",
        help="which voice server to play: Discord's, or a self-hosted Spacebar "
        "(v6, webrtc only, no resume, ws://)",
    )
    parser.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve wss:// with a certificate from a local CA (default: as the profile; "
        "Discord's yes, Spacebar's no)",
    )
    parser.add_argument(
        "--dave",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require DAVE, closing 4017 without it (default: as the profile; Discord's yes)",
    )
    parser.add_argument(
        "--endpoint-host",
        default=None,
        metavar="NAME",
        help="the host VOICE_SERVER_UPDATE names (default: localhost with TLS, else the address)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m legato.sandbox`` argument parser, one subparser a subcommand."""
    parser = argparse.ArgumentParser(prog="python -m legato.sandbox")
    parser.add_argument(
        "--log-level", default=None, help="logging level (default INFO; WARNING for demo)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    voice = commands.add_parser("voice", help="run the voice server alone")
    voice.add_argument("--host", default="127.0.0.1")
    voice.add_argument("--port", type=int, default=0, help="websocket port (0: any free one)")
    voice.add_argument(
        "--heartbeat-interval", type=float, default=DEFAULT_HEARTBEAT_INTERVAL, help="seconds"
    )
    voice.add_argument(
        "--session",
        type=_session_spec,
        action="append",
        default=[],
        metavar="SERVER_ID:USER_ID:SESSION_ID",
        help="register a session and print its token (repeatable)",
    )
    voice.add_argument(
        "--record",
        type=Path,
        default=None,
        metavar="DIR",
        help="on exit, write each user's audio there as Ogg Opus and WAV",
    )
    voice.add_argument(
        "--loss",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="put a lossy relay in front of the media port dropping this fraction of RTP (0.05)",
    )
    voice.add_argument(
        "--reorder",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="with the relay: swap this fraction of RTP packets with the next one",
    )
    voice.add_argument("--seed", type=int, default=0, help="the relay's random seed (0)")
    _add_profile(voice)
    voice.set_defaults(run=_run_voice)

    demo = commands.add_parser("demo", help="run Legato end to end against the sandbox")
    demo.add_argument("--out", default="out", help="directory for media and demo.wav (out)")
    demo.add_argument(
        "--config",
        help="configuration whose [sandbox] section to use (default: $LEGATO_CONFIG, else none)",
    )
    demo.add_argument(
        "--transport", choices=("udp", "webrtc", "auto"), default="udp", help="voice transport"
    )
    demo.add_argument("--seconds", type=float, default=None, help="length of each tone (8)")
    demo.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress line"
    )
    demo.set_defaults(run=_run_demo, log_level_default="WARNING")

    discord = commands.add_parser("discord", help="run the sandbox Discord until Ctrl-C")
    discord.add_argument(
        "--user", action="append", default=[], help="add a member with this name (repeatable)"
    )
    _add_profile(discord)
    discord.set_defaults(run=_run_discord)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand until it ends or Ctrl-C."""
    args = build_parser().parse_args(argv)
    level = args.log_level or getattr(args, "log_level_default", "INFO")
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    code = 0
    with contextlib.suppress(KeyboardInterrupt):
        code = asyncio.run(args.run(args)) or 0
    return code


if __name__ == "__main__":
    raise SystemExit(main())
