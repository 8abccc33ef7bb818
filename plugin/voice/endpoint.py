"""Voice server endpoints: which server is Discord's, and what to speak to each (pure).

VOICE_SERVER_UPDATE's ``endpoint`` decides the websocket URL (``ws``/``wss``), the gateway version
and the transports ``"auto"`` tries (PROTOCOL.md "Voice gateway"). No I/O here.
"""

from __future__ import annotations

import ipaddress
from typing import Final

__all__ = [
    "DISCORD_VOICE_DOMAINS",
    "auto_gateway_version",
    "auto_transports",
    "is_discord_endpoint",
    "is_loopback",
    "split_host_port",
    "websocket_url",
]

_LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.localdomain"})
#: Domains Discord's voice servers live under (``c-ams07-1a2b.discord.media:443``; older
#: endpoints were ``us-east123.discord.gg``).
DISCORD_VOICE_DOMAINS: Final = ("discord.media", "discord.gg")


def is_discord_endpoint(endpoint: str) -> bool:
    """Whether VOICE_SERVER_UPDATE's ``endpoint`` is one of Discord's voice servers.

    Args:
        endpoint: ``host``, ``host:port``, ``[v6]:port``, optionally with a ``wss://``/``ws://``
            prefix.
    """
    endpoint = endpoint.strip().rstrip("/").removeprefix("wss://").removeprefix("ws://")
    host = split_host_port(endpoint)[0].lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in DISCORD_VOICE_DOMAINS)


def auto_transports(endpoint: str) -> list[str]:
    """The transports ``transport = "auto"`` tries toward ``endpoint``, in order.

    Discord's voice servers get ``udp`` first: it is the path Discord documents for bots and the
    cheaper one (no ICE, DTLS or SRTP). Any other endpoint gets ``webrtc`` first: Spacebar's
    voice server speaks only that. The second is tried when the first fails.
    """
    return ["udp", "webrtc"] if is_discord_endpoint(endpoint) else ["webrtc", "udp"]


def auto_gateway_version(endpoint: str) -> int:
    """Return the voice gateway version ``"auto"`` uses toward ``endpoint``.

    Discord's voice servers (hosts under ``discord.media`` or ``discord.gg``) get v8: DAVE's
    binary messages and buffered resume need it, and Discord closes non-E2EE voice with 4017.
    Every other endpoint gets v6, which every server from v4 up accepts: Spacebar speaks only v6
    (it closes 4002 on v8's heartbeat object, a heartbeat interval after media started), and the
    sandbox, self-hosted by definition, takes either. The host decides, not ``:443`` and TLS
    (PROTOCOL.md "Voice gateway"): a Spacebar behind a TLS proxy on 443 is still v6-only. There is
    no fallback from one version to the other; set ``gateway_version`` to override.

    Args:
        endpoint: VOICE_SERVER_UPDATE's ``endpoint`` (``host``, ``host:port``, ``[v6]:port``,
            optionally with a ``wss://``/``ws://`` prefix).
    """
    return 8 if is_discord_endpoint(endpoint) else 6


def websocket_url(endpoint: str, version: int, secure: bool | None = None) -> str:
    """Return the voice websocket URL for a VOICE_SERVER_UPDATE endpoint.

    Discord's endpoints (``c-waw04-7cacab58.discord.media:2096``; ``:443`` until mid-2025, other
    HTTPS ports such as 2053, 2087 or 2096 since) always need TLS, whatever the port; self-hosted
    servers hand out ``127.0.0.1:3004`` and speak plain ``ws://`` (PROTOCOL.md "Voice gateway").
    For any other host, loopback and ports other than 443 mean ``ws://``.

    Args:
        endpoint: ``host``, ``host:port`` or ``[v6]:port``; a ``wss://``/``ws://`` prefix is
            honoured.
        version: The ``v`` query parameter.
        secure: Force ``wss`` (True) or ``ws`` (False); ``None`` decides from the endpoint.
    """
    endpoint = endpoint.strip().rstrip("/")
    if endpoint.startswith("wss://"):
        endpoint, secure = endpoint[6:], True if secure is None else secure
    elif endpoint.startswith("ws://"):
        endpoint, secure = endpoint[5:], False if secure is None else secure
    host, port = split_host_port(endpoint)
    if secure is None:
        secure = is_discord_endpoint(host) or not (
            is_loopback(host) or (port is not None and port != 443)
        )
    return f"{'wss' if secure else 'ws'}://{endpoint}/?v={version}"


def split_host_port(endpoint: str) -> tuple[str, int | None]:
    """Split ``host:port`` or ``[v6]:port`` (the port is None when absent or not a number)."""
    if endpoint.startswith("["):
        host, _, rest = endpoint[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    host, sep, port = endpoint.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return endpoint, None


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (``localhost`` or a loopback address)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
