"""A minimal bot with Legato: DISCORD_TOKEN=... python examples/bot.py"""

import os

import discord
from discord.ext import commands


class Bot(commands.Bot):
    async def setup_hook(self) -> None:
        # The configuration: bot.legato_config_path if set, else $LEGATO_CONFIG, else ./legato.toml
        await self.load_extension("legato")  # the Music cog: /join, /play, /queue ...
        await self.tree.sync()  # register the slash commands with Discord


if __name__ == "__main__":
    Bot(command_prefix=commands.when_mentioned, intents=discord.Intents.default()).run(
        os.environ["DISCORD_TOKEN"]
    )
