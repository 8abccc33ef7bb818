"""``allowed_hosts`` entries and host names, read the one way Legato reads them.

Pure functions, no I/O: the configuration checks its ``allowed_hosts`` with
:func:`canonical_hosts`, and the URL guard (:mod:`legato.audio.urlguard`) normalises the hosts
of the URLs it is given and parses its exceptions with the same functions, so that an entry the
configuration accepts is one the guard reads the same way.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Final, TypeAlias

__all__ = [
    "DEFAULT_PORTS",
    "HostEntryError",
    "IPAddress",
    "canonical_hosts",
    "normalise_host",
    "parse_host_entry",
    "show_host",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

#: The port a URL of each scheme means when it names none.
DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_NUMERIC_LABEL: Final = re.compile(r"0x[0-9a-f]*|[0-9]+")


def _loose_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """Read ``host`` the way ``inet_aton`` (and so ``getaddrinfo``) does, if it is numeric.

    ``2130706433``, ``0x7f.1``, ``0177.0.0.1`` and ``127.1`` all mean 127.0.0.1.

    Raises:
        ValueError: It is all numeric labels but no valid address (such a name never resolves
            through DNS the same way on every resolver, so it is refused rather than guessed).
    """
    labels = host.split(".")
    if not all(_NUMERIC_LABEL.fullmatch(label) for label in labels):
        return None
    if len(labels) > 4:
        raise ValueError(f"{host!r} has more than four numeric parts")
    values: list[int] = []
    for label in labels:
        if label.startswith("0x"):
            values.append(int(label[2:] or "0", 16))
        elif len(label) > 1 and label.startswith("0"):
            values.append(int(label, 8))  # ValueError on 8 and 9
        else:
            values.append(int(label))
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        raise ValueError(f"{host!r} is out of range")
    number = 0
    for v in head:
        number = number << 8 | v
    number = number << (8 * (4 - len(head))) | last
    return ipaddress.IPv4Address(number)


def normalise_host(raw: str) -> tuple[str, IPAddress | None]:
    """Canonical host and its address when it is an IP literal (any spelling)."""
    host = raw.strip().lower()
    if "%" in host:  # an IPv6 zone id: only link-local addresses have one
        host = host.split("%", 1)[0]
    host = host.rstrip(".")
    if not host:
        raise ValueError("no host")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"{raw!r} is not a valid international domain name") from exc
        host = host.rstrip(".")
    ip: IPAddress | None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = _loose_ipv4(host)
    if ip is not None:
        return str(ip), ip
    if not all(0 < len(label) <= 63 for label in host.split(".")):
        raise ValueError(f"{raw!r} is not a valid host name")
    return host, None


class HostEntryError(ValueError):
    """An ``allowed_hosts`` entry that is not ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``.

    Attributes:
        entry: The entry as given.
        why: What is wrong with it, worded to follow the entry ("is a URL; did you mean
            "127.0.0.1:8000"?").
    """

    def __init__(self, entry: str, why: str) -> None:
        super().__init__(
            f"allowed_hosts entry {entry!r} {why}; expected host or host:port ([v6] or [v6]:port)"
        )
        self.entry = entry
        self.why = why


_URL_START: Final = re.compile(r"(?:([a-z][a-z0-9+.-]*):)?//", re.IGNORECASE)
_HOST_PORT: Final = re.compile(r"(\[[^\]]*\]|[^:\[\]]+)(?::([0-9]{1,6}))?")
_HOST_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def show_host(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


def parse_host_entry(entry: str) -> tuple[str, int | None]:
    """``host`` / ``host:port`` / ``[v6]`` / ``[v6]:port`` of ``allowed_hosts`` → (canonical
    host, port).

    Nothing else is taken: no scheme, user name, path or query; a port from 1 to 65535; a host
    that is an IP address (IPv6 in brackets) or a name of letters, digits and hyphens once IDNA
    has encoded it. A URL (or a host with a path or user name) is refused with the entry it
    probably meant.

    Raises:
        HostEntryError: It is anything else.
    """
    text = entry.strip()
    if not text:
        raise HostEntryError(entry, "is empty")
    url = _URL_START.match(text)
    rest = text[url.end() :] if url else text
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    has_path = len(authority) < len(rest)
    _, at, authority = authority.rpartition("@")
    if url or at or has_path:
        what = "is a URL" if url else "has a user name" if at else "has a path or query"
        try:
            host, port = _parse_host_port(entry, authority)
        except HostEntryError:
            raise HostEntryError(entry, what) from None
        scheme = (url[1] or "").lower() if url else ""
        if port is None and scheme in DEFAULT_PORTS:
            port = DEFAULT_PORTS[scheme]  # the URL meant that port, not every port
        raise HostEntryError(entry, f'{what}; did you mean "{show_host(host, port)}"?')
    return _parse_host_port(entry, text)


def _parse_host_port(entry: str, text: str) -> tuple[str, int | None]:
    """:func:`parse_host_entry` of a ``text`` without scheme, user name or path."""
    m = _HOST_PORT.fullmatch(text)
    if m is None:
        if "[" not in text and text.count(":") > 1:
            try:
                ip = ipaddress.IPv6Address(text)
            except ValueError:
                pass
            else:
                raise HostEntryError(
                    entry, f'needs brackets around an IPv6 address; did you mean "[{ip}]"?'
                )
        raise HostEntryError(entry, "is malformed")
    raw, port_text = m[1], m[2]
    port = None if port_text is None else int(port_text)
    if port is not None and not 1 <= port <= 65535:
        raise HostEntryError(entry, f"has port {port}, not from 1 to 65535")
    if raw.startswith("["):
        inner = raw[1:-1]
        not_v6 = HostEntryError(entry, f"has {inner!r} in brackets, which is not an IPv6 address")
        if "%" in inner:  # a zone id names an interface of this machine, not a host
            raise not_v6
        try:
            ip = ipaddress.IPv6Address(inner)
        except ValueError:
            raise not_v6 from None
        return str(ip), port
    invalid = HostEntryError(entry, f"has host {raw!r}, which is not a valid host name")
    if "%" in raw:
        raise invalid
    try:
        host, ip_or_none = normalise_host(raw)
    except ValueError:
        raise invalid from None
    if ip_or_none is None and (
        len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in host.split("."))
    ):
        raise invalid
    return host, port


def canonical_hosts(entries: Iterable[str]) -> tuple[str, ...]:
    """Canonical forms of ``allowed_hosts`` entries (for configuration checks); each is
    accepted by :class:`UrlPolicy` as it is.

    Raises:
        HostEntryError: An entry is not ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``.
    """
    return tuple(show_host(*parse_host_entry(entry)) for entry in entries)
