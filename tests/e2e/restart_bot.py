"""A bot process for tests/e2e/test_restart_resume.py: Legato's ready-made bot at a sandbox.

``python -m tests.e2e.restart_bot API_BASE GATEWAY_URL CONFIG`` with the sandbox's token in
``DISCORD_TOKEN``. The bot is :class:`legato.__main__.LegatoBot` as ``python -m legato run``
makes it (only guild chunking is off, as for every bot against the sandbox), so the restart is
measured on the bot owners run. Prints ``ready`` when discord.py is ready; logs to stderr; runs
until killed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from legato.__main__ import LegatoBot
from legato.config import load_config
from legato.sandbox.server import point_discord_py_here

#: What the parent waits for on stdout.
READY_LINE = "ready"


async def main(api_base: str, gateway_url: str, config_path: str) -> None:
    """Point discord.py at the sandbox and run the bot until the process is killed."""
    point_discord_py_here(api_base=api_base, gateway_url=gateway_url)
    bot = LegatoBot(load_config(config_path), chunk_guilds_at_startup=False)

    async def on_ready() -> None:
        print(READY_LINE, flush=True)  # noqa: T201 - the parent reads this

    bot.add_listener(on_ready, "on_ready")
    async with bot:
        await bot.start(os.environ["DISCORD_TOKEN"])


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(main(*sys.argv[1:4]))
