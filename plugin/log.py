"""Logging helpers: a per-guild adapter and a filter that keeps the bot token out of logs."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

__all__ = ["GuildLogger", "RedactToken", "guild_logger"]


class GuildLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefix every message with the guild it concerns and add ``guild_id`` to the record."""

    def __init__(self, logger: logging.Logger, guild_id: int) -> None:
        super().__init__(logger, {"guild_id": guild_id})
        self.guild_id = guild_id

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        extra.setdefault("guild_id", self.guild_id)
        kwargs["extra"] = extra
        return f"[guild {self.guild_id}] {msg}", kwargs


def guild_logger(name: str, guild_id: int) -> GuildLogger:
    """Return a :class:`GuildLogger` over ``logging.getLogger(name)``."""
    return GuildLogger(logging.getLogger(name), guild_id)


class RedactToken(logging.Filter):
    """Replace every occurrence of a secret in a record's rendered message with ``[redacted]``.

    Installed on handlers by ``python -m legato run`` with the bot token, so that a library that
    logs a payload or a URL with the token in it cannot leak it.
    """

    def __init__(self, *secrets: str) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if len(s) >= 8)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = record.getMessage()
        if any(s in message for s in self._secrets):
            for s in self._secrets:
                message = message.replace(s, "[redacted]")
            record.msg = message
            record.args = None
        return True
