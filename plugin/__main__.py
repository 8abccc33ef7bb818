"""``python -m legato run``: a ready-made bot with the Music extension, for owners without one.
``python -m legato doctor``: checks what a working bot needs (:mod:`legato.doctor`).

Reads the configuration like the extension does (``--config``, else ``$LEGATO_CONFIG``, else
``legato.toml``; a file named by the first two must exist) and the token from ``DISCORD_TOKEN``
only.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import discord
import yarl
from discord.ext import commands

from legato.config import ENV_TOKEN, BotConfig, Config, load_config
from legato.doctor import Status, check_all, format_table, log_rows
from legato.errors import ConfigError
from legato.log import RedactToken

__all__ = [
    "NO_TOKEN_MESSAGE",
    "LegatoBot",
    "Unreachable",
    "backoff_delays",
    "main",
    "point_discord_py_at",
    "unreachable",
]

_log = logging.getLogger("legato")

#: What ``run`` prints, with exit code 2, when ``DISCORD_TOKEN`` is not set.
NO_TOKEN_MESSAGE: Final = f"""\
legato: {ENV_TOKEN} is not set, so there is no bot to log in as.

To run your own bot:
  1. Open the Discord developer portal (https://discord.com/developers/applications),
     create an application, open its "Bot" page and press "Reset Token" to get the token.
  2. Invite it with the "bot" and "applications.commands" scopes and the Connect and Speak
     permissions (OAuth2 -> URL Generator).
  3. Run:  {ENV_TOKEN}=<your token> python -m legato run

No bot yet? `make demo` runs Legato against a local Discord sandbox: no token, no account.
"""

_EXIT_USAGE: Final = 2
#: Discord could not be reached: after the retries, or at once for a cause that will not pass.
_EXIT_UNREACHABLE: Final = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m legato", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start a ready-made bot with the Music extension")
    run.add_argument(
        "--config", metavar="PATH", help="configuration file (default: $LEGATO_CONFIG, legato.toml)"
    )
    doctor = sub.add_parser(
        "doctor", help="check what a working bot needs; exits 1 when something is missing"
    )
    doctor.add_argument(
        "--config", metavar="PATH", help="configuration file (default: $LEGATO_CONFIG, legato.toml)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "doctor":
        rows = check_all(args.config)
        print(format_table(rows))
        return 1 if any(row.status is Status.FAIL for row in rows) else 0
    if args.command != "run":  # pragma: no cover - argparse refuses other commands
        return _EXIT_USAGE
    token = os.environ.get(ENV_TOKEN, "").strip()
    if not token:
        print(NO_TOKEN_MESSAGE, file=sys.stderr, end="")
        return _EXIT_USAGE
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"legato: {exc}", file=sys.stderr)
        return _EXIT_USAGE
    return asyncio.run(_run(config, token))


class LegatoBot(commands.Bot):
    """The ready-made bot: no prefix commands, the Music extension, slash commands synced.

    Args:
        config: Legato's configuration (handed to the extension as ``legato_config``).
        **options: Passed to :class:`discord.ext.commands.Bot` (tests turn off chunking).
    """

    def __init__(self, config: Config, **options: Any) -> None:
        options.setdefault("command_prefix", commands.when_mentioned)
        # guilds and voice_states are all Legato needs; nothing privileged.
        options.setdefault("intents", discord.Intents.default())
        options.setdefault("help_command", None)
        super().__init__(**options)
        self.legato_config = config
        self._gc_frozen = False

    async def setup_hook(self) -> None:
        # What `python -m legato doctor` would say, in the log: a missing JS runtime or a broken
        # cookies file shows at start rather than at the first /play.
        log_rows(await asyncio.to_thread(check_all, config=self.legato_config))
        await self.load_extension("legato")
        if self.legato_config.bot.sync_commands:
            synced = await self.tree.sync()
            _log.info("synced %d application commands", len(synced))

    async def on_ready(self) -> None:
        """Once, at the first READY: take what start-up made out of the cyclic collector's reach.

        discord.py's caches, yt-dlp's extractor classes and the cog live as long as the bot; a
        full collection over them paused every player for 50 to 90 ms (measured at 100 guilds),
        which a listener hears as a gap. Frozen, they are no longer scanned.
        """
        if not self._gc_frozen:
            self._gc_frozen = True
            gc.collect()
            gc.freeze()
            _log.debug("garbage collector: %d start-up objects frozen", gc.get_freeze_count())


def point_discord_py_at(bot: BotConfig) -> None:
    """Point discord.py, process-wide, at the server ``[bot] api_base`` and ``gateway_url`` name.

    discord.py reads both from class attributes (``Route.BASE``, ``DEFAULT_GATEWAY``); an empty
    value leaves Discord's in place.
    """
    if bot.api_base:
        discord.http.Route.BASE = bot.api_base
        _log.info("REST API: %s ([bot] api_base)", bot.api_base)
    if bot.gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(bot.gateway_url)
        _log.info("gateway: %s ([bot] gateway_url)", bot.gateway_url)


@dataclass(frozen=True, slots=True)
class Unreachable:
    """Why Discord could not be reached.

    Attributes:
        reason: One line for the owner ("127.0.0.1:8000: connection refused").
        transient: The cause may pass by itself (refused, reset, timed out, temporary DNS
            failure, a 5xx answer), so trying again may help.
    """

    reason: str
    transient: bool


# Causes that come and go with the network or the server: worth another try.
_TRANSIENT_ERRNOS: Final = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EPIPE,
    }
)


def unreachable(exc: BaseException) -> Unreachable | None:
    """Read what ``bot.start`` raised as "Discord cannot be reached", or ``None`` for anything
    else (a refused token is not this: it is :class:`discord.LoginFailure`).

    Args:
        exc: The exception, as raised (aiohttp's, discord.py's or an ``OSError``).

    Returns:
        The reason and whether it may pass, or ``None``.
    """
    if isinstance(exc, discord.DiscordServerError):  # 5xx after discord.py's own retries
        return Unreachable(f"the server answered {_status(exc)}", transient=True)
    if isinstance(exc, discord.HTTPException):
        return Unreachable(f"the server answered {_status(exc)}", transient=False)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return Unreachable(
            f"{exc.host}:{exc.port}: its TLS certificate was refused ({exc.certificate_error})",
            transient=False,
        )
    if isinstance(exc, TimeoutError):  # aiohttp's timeouts included
        return Unreachable("timed out", transient=True)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return Unreachable("the server closed the connection", transient=True)
    if isinstance(exc, aiohttp.ClientConnectorError):
        why, transient = _os_cause(exc.os_error)
        return Unreachable(f"{exc.host}:{exc.port}: {why}", transient)
    if isinstance(exc, OSError):
        why, transient = _os_cause(exc)
        return Unreachable(why, transient)
    if isinstance(exc, aiohttp.ClientError):
        return Unreachable(str(exc) or type(exc).__name__, transient=False)
    return None


def _status(exc: discord.HTTPException) -> str:
    # discord.py types the response as aiohttp's or requests' (for webhooks); only aiohttp's
    # reaches here, but requests' has no ``method``.
    method = getattr(exc.response, "method", "a request")
    return f"{exc.status} {exc.response.reason} to {method} {exc.response.url}"


def _os_cause(cause: OSError) -> tuple[str, bool]:
    """The wording of an OS-level failure, and whether it may pass."""
    if isinstance(cause, socket.gaierror):
        # EAI_AGAIN is "try again later"; any other answer (no such name) will not change.
        transient = cause.errno == socket.EAI_AGAIN
        kind = "temporary DNS failure" if transient else "host name not found"
        return f"{kind} ({cause.strerror})", transient
    if isinstance(cause, TimeoutError):
        return "timed out", True
    if cause.errno is not None:
        return os.strerror(cause.errno).lower(), cause.errno in _TRANSIENT_ERRNOS
    # Several addresses failed differently ("Multiple exceptions: ..."): a network matter.
    return str(cause) or type(cause).__name__, True


def backoff_delays(first: float, cap: float) -> Iterator[float]:
    """The waits between tries: ``first``, then each doubled, none above ``cap``."""
    delay = first
    while True:
        yield min(delay, cap)
        delay *= 2


async def _run(config: Config, token: str) -> int:
    discord.utils.setup_logging(level=getattr(logging, config.bot.log_level), root=True)
    redact = RedactToken(token)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redact)
    point_discord_py_at(config.bot)
    attempts = config.bot.connect_attempts
    delays = backoff_delays(config.bot.connect_backoff, config.bot.connect_backoff_max)
    attempt = 1
    while True:
        # A new bot for each try: a failed start closes the bot (and unloads the extension).
        bot = LegatoBot(config)
        try:
            async with bot:
                await bot.start(token)
        except discord.LoginFailure:
            print(
                f"legato: Discord refused the token in {ENV_TOKEN}; reset it in the developer "
                "portal.",
                file=sys.stderr,
            )
            return _EXIT_USAGE
        except (OSError, aiohttp.ClientError, discord.HTTPException) as exc:
            failure = unreachable(exc)
            if failure is None:  # pragma: no cover - every exception caught here is read
                raise
            if failure.transient and attempt < attempts:
                delay = next(delays)
                _log.warning(
                    "cannot reach Discord (attempt %d of %d): %s; retrying in %.2f s",
                    attempt,
                    attempts,
                    failure.reason,
                    delay,
                )
                await asyncio.sleep(delay)
                attempt += 1
                continue
            gave_up = (
                f" (gave up after {attempt} attempt{'' if attempt == 1 else 's'})"
                if failure.transient
                else ""
            )
            print(f"legato: cannot reach Discord: {failure.reason}{gave_up}", file=sys.stderr)
            return _EXIT_UNREACHABLE
        return 0


if __name__ == "__main__":
    sys.exit(main())
