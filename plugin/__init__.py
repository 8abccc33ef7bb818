"""Legato: a discord.py music extension with its own voice stack.

Load it with ``await bot.load_extension("legato")``.
"""

from __future__ import annotations

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

__version__ = "0.1.0"

__all__ = [
    "AudioError",
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
]
