"""``python -m legato run``: a ready-made bot with the Music extension, for owners without one.
``python -m legato doctor``: checks what a working bot needs (:mod:`legato.doctor`).

Reads the configuration like the extension does (``--config``, ``$LEGATO_CONFIG``,
``legato.toml``) and the token from ``DISCORD_TOKEN`` only.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, Final

import discord
from discord.ext import commands

from legato.config import ENV_TOKEN, Config, load_config
from legato.doctor import Status, check_all, format_table, log_rows
from legato.errors import ConfigError
from legato.log import RedactToken

__all__ = ["NO_TOKEN_MESSAGE", "LegatoBot", "main"]

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


async def _run(config: Config, token: str) -> int:
    discord.utils.setup_logging(level=getattr(logging, config.bot.log_level), root=True)
    redact = RedactToken(token)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redact)
    bot = LegatoBot(config)
    try:
        async with bot:
            await bot.start(token)
    except discord.LoginFailure:
        print(
            f"legato: Discord refused the token in {ENV_TOKEN}; reset it in the developer portal.",
            file=sys.stderr,
        )
        return _EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
