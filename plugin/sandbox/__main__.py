"""Run a piece of the sandbox from the command line: ``python -m legato.sandbox SUBCOMMAND``.

Subcommands:
    voice   the voice server alone; ``--session SERVER:USER:SESSION`` prints a token to use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Sequence

from legato.sandbox.voice import DEFAULT_HEARTBEAT_INTERVAL, SandboxVoiceServer


def _session_spec(raw: str) -> tuple[int, int, str]:
    try:
        server_id, user_id, session_id = raw.split(":", 2)
        return int(server_id), int(user_id), session_id
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected SERVER_ID:USER_ID:SESSION_ID, got {raw!r}"
        ) from None


async def _run_voice(args: argparse.Namespace) -> None:
    server = SandboxVoiceServer(
        args.host,
        port=args.port,
        tls=args.tls,
        heartbeat_interval=args.heartbeat_interval,
    )
    async with server:
        print(f"voice sandbox: endpoint {server.endpoint}  url {server.url}/?v=8")
        print(f"media (udp): {args.host}:{server.udp_port}")
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


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m legato.sandbox`` argument parser, one subparser a subcommand."""
    parser = argparse.ArgumentParser(prog="python -m legato.sandbox")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    voice = commands.add_parser("voice", help="run the voice server alone")
    voice.add_argument("--host", default="127.0.0.1")
    voice.add_argument("--port", type=int, default=0, help="websocket port (0: any free one)")
    voice.add_argument("--tls", action="store_true", help="serve wss:// (self-signed)")
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
    voice.set_defaults(run=_run_voice)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand until it ends or Ctrl-C."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(args.run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
