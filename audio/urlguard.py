"""Which URLs Legato may fetch: refuse local schemes, internal addresses and unlisted domains.

A user's link makes the bot's machine send requests; without a guard, ``/play
http://169.254.169.254/latest/meta-data/`` or ``http://127.0.0.1:8080/admin`` turns the bot into a
way into the network it runs in (server-side request forgery). :class:`UrlPolicy` decides, for
one URL:

- the scheme is allowed (``http``/``https``; ``file`` only with ``allow_local_files``);
- there is no userinfo (``http://evil@127.0.0.1``), no backslash or control character in the
  authority (parsers disagree about those), and the port is a number;
- the host, once normalised (lower case, no trailing dot, IDNA; numeric spellings such as
  ``2130706433``, ``0x7f.1`` or ``0177.0.0.1`` read the way ``inet_aton`` reads them), is not a
  loopback, link-local, private, shared (CGNAT), unspecified, multicast or reserved address, nor
  an IPv6 form embedding one (IPv4-mapped, IPv4-compatible, 6to4, NAT64), unless
  ``allow_private``; cloud metadata addresses are refused even then;
- when ``allowed_domains`` is set, the host is one of them or a subdomain, matched on label
  boundaries (``example.com`` allows ``a.example.com``, not ``badexample.com``);
- every address a host name resolves to passes the same address rules (:meth:`UrlPolicy.check`
  resolves off the event loop).

``allowed_hosts`` names exact exceptions (``"127.0.0.1:8000"``, ``"media.lan"``): such a host
(and port, when one is given) skips the address and domain rules, and nothing else does. Tests
and the sandbox serve media from 127.0.0.1 this way without opening all of loopback.

Checking a URL is not enough: whoever then fetches it may follow a redirect, read a playlist's
entries, or look the name up again and get another answer. So the check is also where the
connection is made: :meth:`UrlPolicy.connect` resolves a host once, checks every address it got,
and connects to a checked one, with no second lookup. Every connection made for a track goes
through it (:mod:`legato.audio.fetch` says how: yt-dlp's requests, the decoder's reads, each
redirect hop and each playlist, manifest, segment and key), so nothing fetches around the guard.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn, TypeAlias

from legato.errors import ResolveError
from legato.hosts import (
    DEFAULT_PORTS,
    HostEntryError,
    IPAddress,
    canonical_hosts,
    normalise_host,
    parse_host_entry,
)

__all__ = [
    "METADATA_ADDRESSES",
    "NOT_ALLOWED",
    "TOO_MANY_REDIRECTS",
    "TOO_SLOW",
    "UNKNOWN_HOST",
    "UNREACHABLE",
    "HostEntryError",
    "UrlPolicy",
    "address_problem",
    "canonical_hosts",
]

_log = logging.getLogger(__name__)

#: What ``socket.getaddrinfo`` answers: (family, type, proto, canonname, sockaddr) tuples.
AddrInfo: TypeAlias = Sequence[tuple[Any, ...]]
#: A name lookup: ``(host, port) -> getaddrinfo``'s answer. Raises ``OSError`` when it fails.
Lookup: TypeAlias = Callable[[str, int], AddrInfo]


def system_lookup(host: str, port: int) -> AddrInfo:
    """The system resolver, for TCP."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)


#: What a refused URL tells the user. The log detail says which rule refused it.
NOT_ALLOWED: Final = "That address is not allowed."
#: A host name that does not resolve.
UNKNOWN_HOST: Final = "I could not find that web address."
#: Could not reach the host while following its redirects (the resolver's wording).
UNREACHABLE: Final = "I could not reach that site."
#: Following the redirects took longer than the timeout (the resolver's wording).
TOO_SLOW: Final = "Looking that up took too long; try again later."
#: A redirect loop, or a chain longer than ``max_redirects``.
TOO_MANY_REDIRECTS: Final = "That link redirects too many times."

#: Cloud instance-metadata endpoints (AWS/GCP/Azure/OpenStack, AWS IPv6, ECS task metadata,
#: Alibaba): refused even when private addresses are allowed, as they hand out credentials.
METADATA_ADDRESSES: Final = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200")
)

_CGNAT: Final = ipaddress.ip_network("100.64.0.0/10")
_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")
_V4_COMPATIBLE: Final = ipaddress.ip_network("::/96")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_BAD_AUTHORITY: Final = re.compile(r"[ \\]")
_BAD_HEADER: Final = re.compile(r"[\r\n\x00]")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, NAT64, compatible), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _V4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_problem(ip: IPAddress, *, allow_private: bool = False) -> str | None:
    """Why Legato must not connect to ``ip``, or ``None`` when it may.

    Args:
        ip: The address.
        allow_private: Allow every non-public address except the cloud metadata ones.

    Returns:
        A short reason ("loopback", "private"...) for the log, or ``None``.
    """
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            # A connection to it goes to the IPv4 address inside: judge that one.
            problem = address_problem(inner, allow_private=allow_private)
            return f"{problem} ({inner} embedded)" if problem is not None else None
    if allow_private:
        return None
    for reason, hit in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("shared (CGNAT)", ip in _CGNAT),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    ):
        if hit:
            return reason
    if not ip.is_global:
        return "not a public address"
    return None


@dataclass(frozen=True, slots=True)
class _Target:
    scheme: str
    host: str  # normalised: lower case, ASCII (IDNA), no trailing dot; an IP in canonical form
    ip: IPAddress | None
    port: int | None


def _normalise_checked(policy: UrlPolicy, raw: str, url: str) -> tuple[str, IPAddress | None]:
    """:func:`~legato.hosts.normalise_host`, a malformed host refused through ``policy``."""
    try:
        return normalise_host(raw)
    except ValueError as exc:
        policy._refuse(url, f"host: {exc}")


@dataclass(frozen=True)
class UrlPolicy:
    """The rules a URL must pass before Legato (or yt-dlp, or FFmpeg for it) fetches it.

    Attributes:
        allowed_schemes: URL schemes accepted; ``file`` is added by ``allow_local_files``.
        allowed_domains: Hosts accepted, each with its subdomains; ``None`` (or empty) accepts
            every host name. IP literals are refused when this is set.
        allow_private: Accept loopback, private, link-local and other non-public addresses
            (never the cloud metadata addresses).
        allow_local_files: Accept ``file://`` URLs (paths on the bot's machine).
        allowed_hosts: Exact exceptions, ``"host"`` (any port) or ``"host:port"``, which skip
            the address and domain rules, e.g. a media server on ``127.0.0.1:8000``.
        max_redirects: Most redirects one request follows (:mod:`legato.audio.fetch`).
        timeout: Seconds a connection may take to be made.
        lookup: Resolves host names (``socket.getaddrinfo`` for TCP); tests give their own.

    Raises:
        ValueError: An ``allowed_domains`` or ``allowed_hosts`` entry is malformed.
    """

    allowed_schemes: tuple[str, ...] = ("http", "https")
    allowed_domains: tuple[str, ...] | None = None
    allow_private: bool = False
    allow_local_files: bool = False
    allowed_hosts: tuple[str, ...] = ()
    max_redirects: int = 5
    timeout: float = 10.0
    lookup: Lookup = field(default=system_lookup, repr=False, compare=False)
    _domains: tuple[str, ...] | None = field(init=False, repr=False, compare=False)
    _exceptions: frozenset[tuple[str, int | None]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        domains: tuple[str, ...] | None = None
        if self.allowed_domains:
            normalised = []
            for d in self.allowed_domains:
                host, ip = normalise_host(d)
                if ip is not None:
                    raise ValueError(f"allowed_domains entry {d!r} is an address, not a domain")
                normalised.append(host)
            domains = tuple(normalised)
        object.__setattr__(self, "_domains", domains)
        object.__setattr__(
            self, "_exceptions", frozenset(parse_host_entry(h) for h in self.allowed_hosts)
        )
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be >= 0, got {self.max_redirects}")

    # -- checks -------------------------------------------------------------------------------

    def check_url(self, url: str) -> None:
        """Check ``url``'s form, scheme, host and any IP literal; no DNS lookup.

        Raises:
            ResolveError: The URL is refused (``user_message`` is :data:`NOT_ALLOWED`).
        """
        self._target(url)

    def connect(
        self,
        address: tuple[str, int],
        timeout: float | None = None,
        source_address: tuple[str, int] | None = None,
    ) -> socket.socket:
        """Connect to ``(host, port)`` the guarded way: one lookup, every address it gave
        checked, and the socket connected to one of those addresses. Blocking.

        It has the signature of ``socket.create_connection``, so that an
        ``http.client.HTTPConnection`` can be given it as its ``_create_connection``.

        Raises:
            ResolveError: The host or one of its addresses is refused, or it does not resolve.
            OSError: No checked address could be connected to.
        """
        host, port = address
        shown = f"{host}:{port}"
        target = self._check_host(_Target("", *_normalise_checked(self, host, shown), port), shown)
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in self._addresses(target, shown):
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(self.timeout if timeout is None else timeout)
                if source_address is not None:
                    sock.bind(source_address)
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            return sock
        raise error if error is not None else OSError(f"{host} has no address to connect to")

    def check_headers(self, headers: Mapping[str, str]) -> None:
        """Refuse request headers that could redirect or split a request FFmpeg makes.

        ``Host`` would send the request to another virtual host than the URL names, and a CR
        or LF would inject headers (FFmpeg joins them with CRLF).

        Raises:
            ResolveError: A header is refused.
        """
        for name, value in headers.items():
            if _BAD_HEADER.search(name) or _BAD_HEADER.search(value):
                self._refuse(name, "header with a line break or NUL")
            if name.strip().lower() == "host":
                self._refuse(value, "explicit Host header")

    def check_info(self, info: Mapping[str, Any], *, trusted_page: bool = False) -> None:
        """Check the URLs and headers in a yt-dlp answer (after its own redirects).

        By form only (:meth:`check_url`): what is refused here is refused at once, and
        whatever is fetched later is checked again, address and all, as it connects. The page
        it ended at (``webpage_url``), the media URL (``url``), the formats it chose, flat
        playlist entries, and ``http_headers``.

        Args:
            info: yt-dlp's info dict.
            trusted_page: The page itself is the operator's (a configured search page): check
                only what it lists.

        Raises:
            ResolveError: One of them is refused.
        """
        if not trusted_page:
            for key in ("webpage_url", "url"):
                value = info.get(key)
                if isinstance(value, str) and "://" in value:
                    self.check_url(value)
            for fmt in info.get("requested_formats") or ():
                if isinstance(fmt, Mapping):
                    self.check_info(fmt)
        for entry in info.get("entries") or ():
            if not isinstance(entry, Mapping):
                continue
            for key in ("webpage_url", "url"):
                value = entry.get(key)
                if isinstance(value, str) and "://" in value:
                    self.check_url(value)
        headers = info.get("http_headers")
        if isinstance(headers, Mapping):
            self.check_headers({str(k): str(v) for k, v in headers.items()})

    # -- internals ----------------------------------------------------------------------------

    def _target(self, url: str) -> _Target:
        if _CONTROL.search(url):
            self._refuse(url, "control character")
        if _BAD_AUTHORITY.search(_authority(url)):
            self._refuse(url, "space or backslash in the host part")
        try:
            parts = urllib.parse.urlsplit(url.strip())
            port = parts.port
        except ValueError as exc:
            self._refuse(url, f"malformed: {exc}")
        scheme = parts.scheme.lower()
        schemes = {s.lower() for s in self.allowed_schemes}
        if self.allow_local_files:
            schemes.add("file")
        if scheme not in schemes:
            self._refuse(url, f"scheme {scheme or '(none)'!r}")
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                self._refuse(url, "file URL on another machine")
            return _Target(scheme, "", None, None)
        if "@" in parts.netloc:
            self._refuse(url, "user name or password in the URL")
        host, ip = _normalise_checked(self, parts.hostname or "", url)
        return self._check_host(_Target(scheme, host, ip, port), url)

    def _check_host(self, target: _Target, url: str) -> _Target:
        """The host rules (addresses by their literal, loopback names, domains)."""
        if self._excepted(target):
            return target
        host, ip = target.host, target.ip
        if ip is not None:
            problem = address_problem(ip, allow_private=self.allow_private)
            if problem is not None:
                self._refuse(url, f"{ip} is {problem}")
        if (
            ip is None
            and not self.allow_private
            and (host == "localhost" or host.endswith(".localhost"))
        ):
            self._refuse(url, f"{host} is a loopback name")
        if self._domains is not None:
            if ip is not None:
                self._refuse(url, "an address where only listed domains are allowed")
            if not any(host == d or host.endswith("." + d) for d in self._domains):
                self._refuse(url, f"{host} is not in the allowed domains")
        return target

    def _addresses(self, target: _Target, url: str) -> AddrInfo:
        """Look ``target`` up once and check every address; the answer, for connecting."""
        port = target.port or DEFAULT_PORTS.get(target.scheme, 0)
        if target.ip is not None:
            family = socket.AF_INET6 if target.ip.version == 6 else socket.AF_INET
            sockaddr: tuple[Any, ...] = (str(target.ip), port)
            if family == socket.AF_INET6:
                sockaddr = (str(target.ip), port, 0, 0)
            return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)]
        try:
            answers = self.lookup(target.host, port)
        except (OSError, UnicodeError) as exc:
            raise ResolveError(
                f"{_short(url)}: host {target.host!r} does not resolve: {exc}",
                user_message=UNKNOWN_HOST,
            ) from exc
        if not answers:
            raise ResolveError(
                f"{_short(url)}: host {target.host!r} has no address", user_message=UNKNOWN_HOST
            )
        if not self._excepted(target):
            for *_, sockaddr in answers:
                ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
                problem = address_problem(ip, allow_private=self.allow_private)
                if problem is not None:
                    self._refuse(url, f"{target.host} resolves to {ip}: {problem}")
        return answers

    def _excepted(self, target: _Target) -> bool:
        if not self._exceptions:
            return False
        if (target.host, None) in self._exceptions:
            return True
        port = target.port or DEFAULT_PORTS.get(target.scheme)
        return port is not None and (target.host, port) in self._exceptions

    def _refuse(self, url: str, why: str) -> NoReturn:
        why = " ".join(why.split())  # library messages carry line breaks
        _log.info("refused %s: %s", _short(url), why)
        raise ResolveError(f"refused {_short(url)}: {why}", user_message=NOT_ALLOWED)


def _authority(url: str) -> str:
    """The text between ``//`` and the next ``/``, ``?`` or ``#`` (before any parsing)."""
    rest = url.strip().split("//", 1)
    if len(rest) < 2:
        return ""
    return re.split(r"[/?#]", rest[1], maxsplit=1)[0]


def _short(url: str, limit: int = 200) -> str:
    """A URL fit for a log line: bounded, without control characters."""
    clean = "".join(c if c.isprintable() else "?" for c in url)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."
