"""Legato: a discord.py music extension with its own voice stack.

Load it with ``await bot.load_extension("legato")``. The configuration file is, in order:
``bot.legato_config`` (a ready :class:`~legato.config.Config`), ``bot.legato_config_path``, the
path given to :func:`configure` (which sets ``$LEGATO_CONFIG``), ``legato.toml``. A file named
must exist; only ``legato.toml`` may be absent, which means defaults.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

# First: every record of a legato logger has what users typed escaped (see legato.log).
from legato import log as _log_escaping  # noqa: F401  # imported for its set-up
from legato.config import ENV_CONFIG, Config, load_config
from legato.errors import (
    AudioError,
    ConfigError,
    DecodeError,
    InvalidTransition,
    LegatoError,
    QueueEmpty,
    QueueError,
    QueueFull,
    ResolveError,
    TransportError,
    VoiceClosed,
    VoiceConnectError,
    VoiceError,
)

if TYPE_CHECKING:
    from discord.ext import commands

__version__ = "0.1.0"

__all__ = [
    "AudioError",
    "Config",
    "ConfigError",
    "DecodeError",
    "InvalidTransition",
    "LegatoError",
    "QueueEmpty",
    "QueueError",
    "QueueFull",
    "ResolveError",
    "TransportError",
    "VoiceClosed",
    "VoiceConnectError",
    "VoiceError",
    "__version__",
    "configure",
    "load_config",
    "setup",
    "teardown",
]

_log = logging.getLogger(__name__)


def configure(path: str | os.PathLike[str] | None) -> None:
    """Name the configuration file that ``load_extension("legato")`` reads.

    It is kept in ``$LEGATO_CONFIG`` of this process: discord.py re-executes this package when
    it loads the extension and drops every ``legato.*`` module when it unloads it, so module
    state would not survive a load or a reload. ``bot.legato_config_path`` still takes
    precedence; ``None`` unsets the variable (back to ``legato.toml``).
    """
    if path is None:
        os.environ.pop(ENV_CONFIG, None)
    else:
        os.environ[ENV_CONFIG] = os.fspath(path)


def resolve_config(bot: object) -> Config:
    """The configuration for ``bot``: its ``legato_config``, or the file it or :func:`configure`
    names, else ``$LEGATO_CONFIG``, else ``legato.toml``.

    Raises:
        ConfigError: The file or an override is bad, or a named file does not exist.
    """
    ready = getattr(bot, "legato_config", None)
    # Checked by shape, not isinstance: a reload of the extension makes new classes, and a
    # Config built before it is still a good one.
    if ready is not None and all(
        hasattr(ready, s) for s in ("voice", "playback", "permissions", "sandbox", "bot")
    ):
        return ready  # type: ignore[no-any-return]  # duck-typed Config, see above
    path = getattr(bot, "legato_config_path", None)
    return load_config(path)


async def setup(bot: commands.Bot) -> None:
    """The extension entry point: read the configuration and add the Music cog.

    Raises:
        ConfigError: The configuration is bad (discord.py wraps it in ``ExtensionFailed``);
            nothing is added.
    """
    from legato.cogs.music import MusicCog  # the cog pulls in discord and the audio stack

    config = resolve_config(bot)
    _log.info("Legato %s loading (configuration: %s)", __version__, config.source or "defaults")
    await bot.add_cog(MusicCog(bot, config))


async def teardown(bot: commands.Bot) -> None:
    """The extension exit point: remove the Music cog, which leaves every voice channel."""
    if bot.get_cog("Music") is not None:
        await bot.remove_cog("Music")
