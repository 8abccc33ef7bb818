"""Host names the sandbox hands out as Discord's, resolved to loopback in this process.

Discord's VOICE_SERVER_UPDATE names a voice server ``c-waw04-7cacab58.discord.media:2096``, and a
client (Legato's ``auto`` version and transport, the ``wss://`` it chooses) decides from that
name that it is talking to Discord: gateway v8, DAVE, TLS. The sandbox's voice server hands out a
name of the same shape, ``c-sbx01-<8 hex>.discord.media``, unique to it, and this module makes
``socket.getaddrinfo`` in this process answer it with the server's loopback address; every other
name goes to the system's resolver unchanged. A name stays resolvable after its server closed (a
reconnecting client is refused at once, as by a dead server, not left waiting on DNS).

Another process cannot resolve it unless told: a bot process started against an in-process
sandbox gets :data:`ENV` in its environment (``Sandbox.child_environ()``), which
:func:`register_from_environ` reads (``point_discord_py_here`` calls it). The command line sandbox
hands out ``localhost`` instead (``python -m legato.sandbox discord --endpoint-host``).
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Mapping
from typing import Any, Final

__all__ = [
    "DOMAIN",
    "ENV",
    "environ_value",
    "mint",
    "register",
    "register_from_environ",
    "resolved",
]

#: Discord's voice domain (``legato.voice.gateway.DISCORD_VOICE_DOMAINS``).
DOMAIN: Final = "discord.media"
#: Environment variable handing names down to a child process: ``name=address`` pairs, spaced.
#: Not ``LEGATO_*``: those are configuration overrides, and an unknown one is refused.
ENV: Final = "SANDBOX_VOICE_HOSTS"

_lock = threading.Lock()
_names: dict[str, str] = {}
_system_getaddrinfo = socket.getaddrinfo


def mint() -> str:
    """A fresh name in Discord's form: ``c-sbx01-<8 hex digits>.discord.media``."""
    return f"c-sbx01-{secrets.token_hex(4)}.{DOMAIN}"


def _getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(host, str):
        host = _names.get(host.lower().rstrip("."), host)
    return _system_getaddrinfo(host, *args, **kwargs)


def register(name: str, address: str) -> None:
    """Resolve ``name`` to ``address`` in this process from now on."""
    with _lock:
        _names[name.lower()] = address
        socket.getaddrinfo = _getaddrinfo


def resolved(name: str) -> str | None:
    """The address ``name`` resolves to in this process, if the sandbox handed it out."""
    return _names.get(name.lower().rstrip("."))


def environ_value() -> str:
    """Every name registered in this process, as :data:`ENV`'s value."""
    with _lock:
        return " ".join(f"{name}={address}" for name, address in sorted(_names.items()))


def register_from_environ(environ: Mapping[str, str] = os.environ) -> None:
    """Register the names a parent process handed down in :data:`ENV` (none: nothing to do)."""
    for pair in environ.get(ENV, "").split():
        name, sep, address = pair.partition("=")
        if sep and name and address:
            register(name, address)
