"""A minimal bot with Legato: DISCORD_TOKEN=... python examples/bot.py"""

import asyncio
import os

import discord
from discord.ext import commands


class Bot(commands.Bot):
    async def setup_hook(self) -> None:
        self.legato_config_path = "legato.toml"  # optional: $LEGATO_CONFIG, else ./legato.toml
        await self.load_extension("legato")
        await self.tree.sync()  # register /play, /skip, ... with Discord


bot = Bot(command_prefix=commands.when_mentioned, intents=discord.Intents.default())
asyncio.run(bot.start(os.environ["DISCORD_TOKEN"]))
