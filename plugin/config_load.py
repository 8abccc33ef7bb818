"""Reading a configuration: where the file is, reading it safely, and turning TOML tables and
``LEGATO_*`` variables into checked values, key by key.

Nothing here knows which sections exist: the caller (:func:`legato.config.parse_config`) passes
its section dataclasses, whose fields carry their converters (:func:`legato.config_values.key`).
Every refusal is a :class:`~legato.errors.ConfigError` naming the file (or variable), the dotted
key, the value and what was expected; unknown names get a "did you mean".
"""

from __future__ import annotations

import difflib
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, Final

from legato.config_values import Bad, Conv, show
from legato.errors import ConfigError

__all__ = [
    "DEFAULT_PATH",
    "ENV_CONFIG",
    "ENV_PREFIX",
    "ENV_TOKEN",
    "apply_env",
    "config_path",
    "read_config_file",
    "read_tables",
]

#: Read when no explicit path and no ``LEGATO_CONFIG`` is given.
DEFAULT_PATH: Final = "legato.toml"
#: Environment variable naming the configuration file.
ENV_CONFIG: Final = "LEGATO_CONFIG"
#: Prefix of the per-key override variables: ``LEGATO_<SECTION>_<KEY>``.
ENV_PREFIX: Final = "LEGATO_"
#: The only place the bot token is read from.
ENV_TOKEN: Final = "DISCORD_TOKEN"

_TOKEN_KEYS: Final = frozenset({"token", "bot_token", "discord_token"})
_TOKEN_HINT: Final = (
    "the bot token must not be in the configuration file; set the DISCORD_TOKEN environment "
    "variable instead (and remove the key, and rotate the token if the file was shared)"
)


# --- the file ---------------------------------------------------------------------------------


def config_path(explicit: str | os.PathLike[str] | None = None, *, env: Mapping[str, str]) -> Path:
    """Return the file to read: ``explicit``, else ``$LEGATO_CONFIG``, else ``legato.toml``."""
    if explicit is not None and str(explicit) != "":
        return Path(explicit)
    named = env.get(ENV_CONFIG, "")
    if named:
        return Path(named)
    return Path(DEFAULT_PATH)


def read_config_file(
    path: str | os.PathLike[str] | None, env: Mapping[str, str]
) -> tuple[dict[str, Any], str | None]:
    """Find and read the configuration file (see :func:`config_path`).

    Returns:
        The parsed TOML and the file's name, or ``({}, None)`` when no path is named (neither
        ``path`` nor ``$LEGATO_CONFIG``) and ``legato.toml`` does not exist.

    Raises:
        ConfigError: A named file does not exist; the file is not a regular file, cannot be
            read, is not UTF-8 or not TOML.
    """
    file = config_path(path, env=env)
    try:
        raw = _read_regular_file(file)
    except FileNotFoundError:
        if path is not None and str(path) != "":
            raise ConfigError(f"{file}: no such configuration file") from None
        if env.get(ENV_CONFIG):
            raise ConfigError(
                f"{file}: no such configuration file (named by ${ENV_CONFIG} or legato.configure())"
            ) from None
        # Only the implicit ./legato.toml may be absent: a path someone named is a mistake.
        return {}, None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot be read: {exc.strerror or exc}") from exc
    try:
        # utf-8-sig drops a leading byte order mark, which Windows editors write.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: is not UTF-8 text (byte {exc.start})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: is not valid TOML: {exc}") from exc
    return data, str(file)


_NOT_REGULAR: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _refuse_unless_regular(file: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _NOT_REGULAR if test(mode)), "an unusual kind of file")
    raise ConfigError(f"{file}: cannot be read: it is {kind}, not a regular file")


def _read_regular_file(file: Path) -> bytes:
    """The bytes of ``file``, refusing anything but a regular file before reading it.

    A FIFO would block the open (and the bot's start) until some writer came; a device could
    be endless. The mode is checked before opening, and again on the open descriptor (opened
    non-blocking, so a FIFO swapped in between cannot block either).

    Raises:
        FileNotFoundError: There is no such file.
        ConfigError: It is not a regular file.
        OSError: It cannot be read.
    """
    _refuse_unless_regular(file, os.stat(file).st_mode)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(file, flags)
    with os.fdopen(fd, "rb") as handle:
        _refuse_unless_regular(file, os.fstat(handle.fileno()).st_mode)
        return handle.read()


# --- the values -------------------------------------------------------------------------------


def read_tables(
    data: Mapping[str, object], sections: Mapping[str, type[Any]], where: str
) -> dict[str, dict[str, object]]:
    """Check parsed TOML against ``sections`` (section name -> its dataclass) and convert each
    value: ``{section: {key: value}}`` for the keys the file sets.

    Raises:
        ConfigError: A token is in the file; a section or key is unknown; a section is not a
            table; a value is bad. ``where`` names the file in the message.
    """
    _refuse_token(data, where, prefix="")
    tables: dict[str, dict[str, object]] = {}
    for name, table in data.items():
        if name not in sections:
            raise ConfigError(f"{where}: unknown section [{name}]{_did_you_mean(name, sections)}")
        if not isinstance(table, dict):
            raise ConfigError(
                f"{where}: {name} = {show(table)} is invalid: expected a table [{name}]"
            )
        tables[name] = _read_section(name, sections[name], table, where)
    return tables


def _read_section(
    name: str, cls: type[Any], table: dict[str, object], where: str
) -> dict[str, object]:
    known = {f.name: f for f in fields(cls)}
    out: dict[str, object] = {}
    for key, value in table.items():
        dotted = f"{name}.{key}"
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{dotted}'{_did_you_mean(key, known, name)}")
        conv: Conv = known[key].metadata["conv"]
        try:
            out[key] = conv.from_toml(value)
        except Bad as bad:
            raise ConfigError(
                f"{where}: {dotted} = {show(value)} is invalid: {bad.explain()}"
            ) from None
    return out


def apply_env(
    tables: dict[str, dict[str, object]],
    sections: Mapping[str, type[Any]],
    env: Mapping[str, str],
) -> None:
    """Overlay ``LEGATO_<SECTION>_<KEY>`` variables on ``tables`` (as :func:`read_tables` made
    them), each converted as its key's environment string. ``LEGATO_*`` variables that name no
    section are left alone: they may be another tool's.

    Raises:
        ConfigError: ``LEGATO_BOT_TOKEN`` is set; a variable names an unknown key of a section,
            or holds a bad value.
    """
    if env.get(ENV_PREFIX + "BOT_TOKEN") is not None:
        raise ConfigError(f"environment variable {ENV_PREFIX}BOT_TOKEN: {_TOKEN_HINT}")
    for var, value in sorted(env.items()):
        if not var.startswith(ENV_PREFIX) or var == ENV_CONFIG:
            continue
        rest = var[len(ENV_PREFIX) :]
        section = next((s for s in sections if rest.startswith(s.upper() + "_")), None)
        if section is None:
            continue  # LEGATO_* variables of other tools are not ours to judge
        key = rest[len(section) + 1 :].lower()
        known = {f.name: f for f in fields(sections[section])}
        if key not in known:
            hint = _did_you_mean(key, known, section, env_style=True)
            raise ConfigError(
                f"environment variable {var}: no key '{section}.{key}' to override{hint}"
            )
        conv: Conv = known[key].metadata["conv"]
        try:
            tables.setdefault(section, {})[key] = conv.from_env(value)
        except Bad as bad:
            raise ConfigError(
                f"environment variable {var} = {show(value)} ({section}.{key}) is invalid: "
                f"{bad.explain()}"
            ) from None


def _refuse_token(data: Mapping[str, object], where: str, *, prefix: str) -> None:
    for key, value in data.items():
        if key.lower() in _TOKEN_KEYS:
            # The value is never echoed: it may be a live token.
            raise ConfigError(f"{where}: key '{prefix}{key}' is refused: {_TOKEN_HINT}")
        if isinstance(value, dict):
            _refuse_token(value, where, prefix=f"{prefix}{key}.")


def _did_you_mean(
    word: str,
    known: Mapping[str, object],
    section: str | None = None,
    *,
    env_style: bool = False,
) -> str:
    close = difflib.get_close_matches(word.lower(), list(known), n=1, cutoff=0.6)
    if not close:
        options = ", ".join(sorted(known))
        return f" (known: {options})"
    if env_style and section is not None:
        return f"; did you mean {ENV_PREFIX}{section.upper()}_{close[0].upper()}?"
    dotted = f"{section}.{close[0]}" if section else f"[{close[0]}]"
    return f"; did you mean '{dotted}'?"
