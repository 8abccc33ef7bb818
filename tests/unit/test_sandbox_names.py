"""The sandbox's Discord-shaped voice names resolve to loopback in-process, and only those."""

from __future__ import annotations

import socket

from legato.sandbox import names
from legato.voice.endpoint import auto_gateway_version, is_discord_endpoint


def test_a_minted_name_is_discords_shape_and_resolves_here() -> None:
    name = names.mint()
    assert is_discord_endpoint(f"{name}:2096")
    assert auto_gateway_version(f"{name}:2096") == 8
    names.register(name, "127.0.0.1")
    assert names.resolved(name) == "127.0.0.1"
    assert names.resolved(name.upper() + ".") == "127.0.0.1"  # case and the root dot
    infos = socket.getaddrinfo(name, 443, socket.AF_INET, socket.SOCK_STREAM)
    assert {info[4][0] for info in infos} == {"127.0.0.1"}


def test_other_names_go_to_the_system_resolver() -> None:
    names.register(names.mint(), "127.0.0.1")
    assert names.resolved("c-ams07-1a2b.discord.media") is None
    infos = socket.getaddrinfo("localhost", 80, socket.AF_INET, socket.SOCK_STREAM)
    assert {info[4][0] for info in infos} == {"127.0.0.1"}


def test_names_are_handed_down_through_the_environment() -> None:
    name = names.mint()
    names.register(name, "127.0.0.2")
    value = names.environ_value()
    assert f"{name}=127.0.0.2" in value.split()
    other = names.mint()
    names.register_from_environ({names.ENV: f"{other}=127.0.0.3 junk"})
    assert names.resolved(other) == "127.0.0.3"
    names.register_from_environ({})  # nothing handed down: nothing to do
