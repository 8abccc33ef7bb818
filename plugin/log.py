r"""Logging helpers: a per-guild adapter, a filter that keeps the bot token out of logs, and the
escaping of what users typed in every record Legato logs.

**User text in logs.** Queries, seek positions, autocomplete text and anything else a user types
reach log lines (directly, or inside an exception's message). A newline in it would start a
line that looks like another record (``x\nERROR legato.cogs.music: ...``), an ESC would drive
the terminal. Every record whose logger is ``legato`` or below it therefore has its arguments
escaped as it is made: control characters, line and paragraph separators and invisible
format characters become ``\n``, ``\x1b``, ``\u2028``... (:func:`escape_text`).

It is done in one place that no call site can forget: the process's ``LogRecord`` factory,
wrapped (not replaced) when this module is imported, which ``import legato`` does first
thing. The alternatives each leave a way round: a ``logging.Filter`` on the ``legato`` logger
never sees the records of ``legato.cogs.music`` (logger filters do not apply to child loggers'
records); handlers and formatters belong to the application; a helper or an adapter at each
call site is one forgotten call away from a forged line. Records of other loggers are left
exactly as they were made.

The format string itself is not escaped: it is source code (ruff's ``G`` rules keep f-strings
and ``.format`` out of it) and may mean its newlines. Numbers stay numbers, so ``%d`` and
``%.1f`` work. A traceback (``exc_info``) is formatted by the application's formatter and is not
escaped; Legato's own exception messages quote user text with ``!r``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, Final

__all__ = ["GuildLogger", "RedactToken", "escape_text", "guild_logger"]

_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_text(text: str) -> str:
    r"""Write every character that is not printable (``str.isprintable``: control characters,
    line and paragraph separators, format characters such as bidi overrides, spaces other than
    ' ') as a Python escape: ``\n``, ``\x1b``, ``\u2028``."""
    if text.isprintable():
        return text
    out: list[str] = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        else:
            code = ord(ch)
            out.append(
                f"\\x{code:02x}"
                if code < 0x100
                else f"\\u{code:04x}"
                if code < 0x10000
                else f"\\U{code:08x}"
            )
    return "".join(out)


class _Escaped:
    """A log argument rendered escaped, by ``%s`` and ``%r`` alike (lazily, as logging does)."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return escape_text(str(self.value))

    def __repr__(self) -> str:
        return escape_text(repr(self.value))


def _escaped(value: object) -> object:
    if value is None or isinstance(value, int | float):
        return value  # for %d, %x, %.1f; their text is digits
    if isinstance(value, str) and value.isprintable():
        return value
    return _Escaped(value)


def _ours(name: str) -> bool:
    return name == "legato" or name.startswith("legato.")


def _escape_record(record: logging.LogRecord) -> None:
    if not isinstance(record.msg, str):
        record.msg = _Escaped(record.msg)
    args = record.args
    if isinstance(args, Mapping):
        record.args = {key: _escaped(value) for key, value in args.items()}
    elif args:
        record.args = tuple(_escaped(value) for value in args)


def _install() -> None:
    previous: Callable[..., logging.LogRecord] = logging.getLogRecordFactory()
    if getattr(previous, "legato_escapes", False):
        return  # installed by an earlier import of this module (the extension was reloaded)

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if _ours(record.name):
            _escape_record(record)
        return record

    factory.legato_escapes = True  # type: ignore[attr-defined]  # marks the wrapper as ours
    logging.setLogRecordFactory(factory)


_install()


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
