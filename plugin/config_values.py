"""What a good configuration value is, key by key, and how a bad one is reported.

Each converter factory returns a :class:`Conv`: how one key is read from a TOML value and from a
``LEGATO_*`` environment string. A converter raises :class:`Bad` (what was expected, and a hint)
on a value it refuses; the loader (:mod:`legato.config_load`) turns that into a
:class:`~legato.errors.ConfigError` naming the file, the key and the value. :func:`key` declares
a section field with its converter and description (:mod:`legato.config` holds the sections).
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

from legato.hosts import HostEntryError, canonical_hosts
from legato.sourcecheck import runtime_kind

__all__ = [
    "WHO",
    "Bad",
    "Conv",
    "base_url",
    "boolean",
    "choice",
    "directories",
    "domains",
    "extractor_args",
    "file_path",
    "hosts",
    "integer",
    "js_runtime",
    "key",
    "loopback_host",
    "names",
    "number",
    "player_clients",
    "port",
    "pot_provider",
    "provider",
    "role",
    "show",
    "text",
]


class Bad(Exception):
    """Raised by a converter: ``expected`` says what a good value looks like; ``hint``, when
    given, which part of the value is wrong and how to fix it."""

    def __init__(self, expected: str, hint: str = "") -> None:
        super().__init__(expected)
        self.expected = expected
        self.hint = hint

    def explain(self) -> str:
        """``expected ...`` and the hint, for the end of an error message."""
        return f"expected {self.expected}" + (f"; {self.hint}" if self.hint else "")


@dataclass(frozen=True, slots=True)
class Conv:
    """How one key is read: from a TOML value and from an environment string."""

    from_toml: Callable[[object], object]
    from_env: Callable[[str], object]


def key(default: object, conv: Conv, doc: str) -> Any:
    """A section field: its default, the converter the loader reads its values with, and a
    one-line description (both kept in the field's metadata as ``conv`` and ``doc``)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable default")  # pragma: no cover - a programming error
    return field(default=default, metadata={"conv": conv, "doc": doc})


# --- converters -------------------------------------------------------------------------------

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def boolean() -> Conv:
    expected = "true or false"

    def from_toml(v: object) -> bool:
        if isinstance(v, bool):
            return v
        raise Bad(expected)

    def from_env(s: str) -> bool:
        low = s.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise Bad("true/false, yes/no, on/off or 1/0")

    return Conv(from_toml, from_env)


def integer(lo: int, hi: int, unit: str = "") -> Conv:
    suffix = f" ({unit})" if unit else ""
    expected = f"an integer from {lo} to {hi}{suffix}"

    def check(v: int) -> int:
        if not lo <= v <= hi:
            raise Bad(expected)
        return v

    def from_toml(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise Bad(expected)
        return check(v)

    def from_env(s: str) -> int:
        try:
            return check(int(s.strip().replace("_", "")))
        except ValueError:
            raise Bad(expected) from None

    return Conv(from_toml, from_env)


def number(lo: float, hi: float, unit: str = "") -> Conv:
    suffix = f" {unit}" if unit else ""
    expected = f"a number from {lo:g} to {hi:g}{suffix}"

    def check(v: float) -> float:
        if v != v or not lo <= v <= hi:  # NaN compares false with everything
            raise Bad(expected)
        return float(v)

    def from_toml(v: object) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise Bad(expected)
        return check(v)

    def from_env(s: str) -> float:
        try:
            return check(float(s.strip()))
        except ValueError:
            raise Bad(expected) from None

    return Conv(from_toml, from_env)


def choice(*options: str | int) -> Conv:
    expected = "one of " + ", ".join(repr(o) for o in options)

    def from_toml(v: object) -> str | int:
        for o in options:
            if type(v) is type(o) and v == o:
                return o
        raise Bad(expected)

    def from_env(s: str) -> str | int:
        for o in options:
            if str(o) == s.strip():
                return o
        raise Bad(expected)

    return Conv(from_toml, from_env)


def text(pattern: str | None = None, expected: str = "a string") -> Conv:
    rx = re.compile(pattern) if pattern else None

    def from_toml(v: object) -> str:
        if not isinstance(v, str) or (rx is not None and not rx.fullmatch(v)):
            raise Bad(expected)
        return v

    return Conv(from_toml, from_toml)


def role() -> Conv:
    expected = 'a role name, a role id (integer) or "" for none'

    def from_toml(v: object) -> str | int:
        if isinstance(v, bool):
            raise Bad(expected)
        if isinstance(v, int):
            if v <= 0:
                raise Bad(expected)
            return v
        if isinstance(v, str):
            return v.strip()
        raise Bad(expected)

    def from_env(s: str) -> str | int:
        s = s.strip()
        return int(s) if s.isdigit() else s

    return Conv(from_toml, from_env)


def _listed(
    check: Callable[[list[object]], tuple[str, ...]],
    expected: str | Callable[[], str],
    sep: str = ",",
) -> Conv:
    """A list key: a TOML array, or in the environment ``sep``-separated items (each stripped,
    blank ones dropped); either list goes whole to ``check``. ``expected`` may be a function,
    for a message that is costly to build."""

    def from_toml(v: object) -> tuple[str, ...]:
        if not isinstance(v, list):
            raise Bad(expected() if callable(expected) else expected)
        return check(v)

    def from_env(s: str) -> tuple[str, ...]:
        return check([x.strip() for x in s.split(sep) if x.strip()])

    return Conv(from_toml, from_env)


_DOMAIN: Final = re.compile(
    r"(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9-]{1,63}"
)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def domains() -> Conv:
    expected = 'a list of bare domain names such as ["youtube.com", "soundcloud.com"]'

    def one(v: object) -> str:
        if not isinstance(v, str):
            raise Bad(expected)
        d = v.strip().lower().rstrip(".")
        if not _DOMAIN.fullmatch(d) or _is_address(d):
            raise Bad(expected)
        return d

    return _listed(lambda items: tuple(one(x) for x in items), expected)


def hosts() -> Conv:
    expected = (
        'a list of "host", "host:port", "[v6]" or "[v6]:port" entries (port 1 to 65535; no '
        'scheme, path or user name) such as ["127.0.0.1:8000", "media.lan"]'
    )

    def check(items: list[object]) -> tuple[str, ...]:
        if not all(isinstance(x, str) for x in items):
            raise Bad(expected)
        try:
            return canonical_hosts(cast(list[str], items))
        except HostEntryError as exc:
            raise Bad(expected, f"entry {exc.entry!r} {exc.why}") from None

    return _listed(check, expected)


def loopback_host() -> Conv:
    expected = 'a loopback address such as "127.0.0.1", "::1" or "localhost"'

    def from_toml(v: object) -> str:
        if not isinstance(v, str):
            raise Bad(expected)
        if v == "localhost":
            return v
        try:
            if ipaddress.ip_address(v).is_loopback:
                return v
        except ValueError:
            pass
        raise Bad(expected)

    return Conv(from_toml, from_toml)


def names() -> Conv:
    expected = "a list of 1 to 10 names of 1 to 32 letters, digits, '_' or '-'"
    rx = re.compile(r"[A-Za-z0-9_-]{1,32}")

    def check(items: list[object]) -> tuple[str, ...]:
        if not 1 <= len(items) <= 10 or not all(isinstance(x, str) for x in items):
            raise Bad(expected)
        names = tuple(cast(str, x) for x in items)
        if not all(rx.fullmatch(n) for n in names) or len(set(names)) != len(names):
            raise Bad(expected)
        return names

    return _listed(check, expected)


def provider() -> Conv:
    expected = (
        "one of 'youtube', 'soundcloud', 'none', or an http(s) URL template containing {query}"
    )

    def from_toml(v: object) -> str:
        if isinstance(v, str) and v in ("youtube", "soundcloud", "none"):
            return v
        if (
            isinstance(v, str)
            and re.fullmatch(r"https?://[^\s]+", v) is not None
            and "{query}" in v
        ):
            return v
        raise Bad(expected)

    return Conv(from_toml, from_toml)


def base_url(schemes: tuple[str, ...], expected: str, *, strip_slash: bool) -> Conv:
    """``""``, or an absolute URL with one of ``schemes``, a host, and no query, fragment or
    user name; ``strip_slash`` drops a trailing ``/`` (for a base that paths are appended to)."""

    def from_toml(v: object) -> str:
        if not isinstance(v, str):
            raise Bad(expected)
        if v == "":
            return v
        try:
            parts = urllib.parse.urlsplit(v)
            parts.port  # noqa: B018 - raises ValueError on a port that is not a number
        except ValueError:
            raise Bad(expected) from None
        if (
            parts.scheme not in schemes
            or not parts.hostname
            or parts.query
            or parts.fragment
            or "@" in parts.netloc
            or re.search(r"[\s\\]", v)
        ):
            raise Bad(expected)
        return v.rstrip("/") if strip_slash else v

    return Conv(from_toml, from_toml)


def port() -> Conv:
    return integer(0, 65535, "0 picks a free port")


def file_path() -> Conv:
    expected = 'a file path, or "" for none'

    def from_toml(v: object) -> str:
        if not isinstance(v, str) or "\x00" in v or len(v) > 4096:
            raise Bad(expected)
        return v.strip()

    return Conv(from_toml, from_toml)


def player_clients() -> Conv:
    def known() -> list[str]:
        # yt-dlp's own list (yt_dlp/extractor/youtube/_base.py), so a new client needs no
        # change here; names starting with "_" are yt-dlp's internal ones.
        from yt_dlp.extractor.youtube._base import INNERTUBE_CLIENTS

        return sorted(c for c in INNERTUBE_CLIENTS if not c.startswith("_"))

    def expected() -> str:
        return (
            "a list of YouTube player clients: 'default', 'all', "
            + ", ".join(repr(c) for c in known())
            + " (a leading '-' leaves one out)"
        )

    def check(items: list[object]) -> tuple[str, ...]:
        clients = known()
        names: list[str] = []
        for item in items:
            if not isinstance(item, str):
                raise Bad(expected())
            name = item.strip()
            if name not in ("default", "all") and name.removeprefix("-") not in clients:
                raise Bad(expected())
            names.append(name)
        return tuple(names)

    return _listed(check, expected)


_EXTRACTOR: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_ARG_KEY: Final = re.compile(r"[a-z0-9_][a-z0-9_-]{0,63}")
_ARG_VALUE: Final = re.compile(r"[^\x00-\x1f\x7f]{0,1000}")
#: Extractor arguments refused in extractor_args: they have keys of their own, or are yt-dlp's
#: developer switches (which turn the EJS scripts' hash checks off).
_OWN_KEYS: Final = {
    ("youtube", "player_client"): "sources.youtube_player_clients",
    ("youtubepot-bgutilhttp", "base_url"): "sources.pot_provider",
    ("youtubepot-bgutilscript", "server_home"): "sources.pot_provider",
}


def extractor_args() -> Conv:
    expected = (
        'a table of yt-dlp extractor arguments, {extractor = {key = ["value", ...]}}, such as '
        '{youtube = {player_skip = ["webpage"]}} (in the environment: '
        "'youtube:player_skip=webpage,configs;key=value other:key=value')"
    )

    def triple(extractor: object, key: object, values: object) -> tuple[str, str, tuple[str, ...]]:
        if not isinstance(extractor, str) or not _EXTRACTOR.fullmatch(extractor.lower()):
            raise Bad(expected)
        if not isinstance(key, str) or not _ARG_KEY.fullmatch(key.lower()):
            raise Bad(expected)
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list) or not all(
            isinstance(x, str) and _ARG_VALUE.fullmatch(x) for x in values
        ):
            raise Bad(expected)
        name, arg = extractor.lower(), key.lower().replace("-", "_")
        if name == "youtube-ejs":
            raise Bad("no 'youtube-ejs' arguments: they are yt-dlp's developer switches")
        own = _OWN_KEYS.get((name, arg))
        if own is not None:
            raise Bad(f"{own} instead of {name}.{arg}")
        return name, arg, tuple(cast(list[str], values))

    def from_toml(v: object) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
        if not isinstance(v, dict):
            raise Bad(expected)
        out: list[tuple[str, str, tuple[str, ...]]] = []
        for extractor, table in v.items():
            if not isinstance(table, dict):
                raise Bad(expected)
            out.extend(triple(extractor, key, values) for key, values in table.items())
        return tuple(out)

    def from_env(s: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
        out: list[tuple[str, str, tuple[str, ...]]] = []
        for part in s.split():
            extractor, colon, rest = part.partition(":")
            if not colon:
                raise Bad(expected)
            for pair in filter(None, rest.split(";")):
                key, eq, values = pair.partition("=")
                if not eq:
                    raise Bad(expected)
                out.append(triple(extractor, key, values.split(",")))
        return tuple(out)

    return Conv(from_toml, from_env)


def _optional_text(expected: str, accept: Callable[[str], str]) -> Conv:
    """A string without NUL, stripped: ``""`` for none, else what ``accept`` makes of it
    (``accept`` raises ``Bad`` on a value it refuses)."""

    def from_toml(v: object) -> str:
        if not isinstance(v, str) or "\x00" in v:
            raise Bad(expected)
        v = v.strip()
        return accept(v) if v else v

    return Conv(from_toml, from_toml)


def pot_provider() -> Conv:
    expected = (
        'the PO-token provider\'s address ("http://127.0.0.1:4416"), the directory of its script '
        'server, or "" for none'
    )

    def accept(v: str) -> str:
        if re.fullmatch(r"https?://[^\s/?#]+/?", v) or os.path.isabs(v):
            return v.rstrip("/") if v.startswith("http") else v
        raise Bad(expected)

    return _optional_text(expected, accept)


def directories() -> Conv:
    expected = "a list of absolute directory paths"

    def check(items: list[object]) -> tuple[str, ...]:
        if not all(isinstance(x, str) and os.path.isabs(x) and "\x00" not in x for x in items):
            raise Bad(expected)
        return tuple(cast(list[str], items))

    return _listed(check, expected, os.pathsep)


def js_runtime() -> Conv:
    expected = (
        'a deno, node, bun or qjs executable (a path, or a name looked up in PATH), or "" for '
        "the Deno installed with Legato"
    )

    def accept(v: str) -> str:
        try:
            runtime_kind(v)
        except ValueError:
            raise Bad(expected) from None
        return v

    return _optional_text(expected, accept)


WHO: Final = choice("requester", "dj", "everyone")


def show(value: object) -> str:
    """``value`` as an error message shows it: its repr (booleans as TOML writes them), cut to
    80 characters."""
    shown = repr(value) if not isinstance(value, bool) else str(value).lower()
    return shown if len(shown) <= 80 else shown[:77] + "..."
