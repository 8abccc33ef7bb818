"""``"auto"`` version and transport: what each kind of endpoint gets."""

from __future__ import annotations

import pytest

from legato.config import VoiceConfig
from legato.voice.endpoint import auto_gateway_version, auto_transports, websocket_url
from legato.voice.gateway import VoiceOptions


@pytest.mark.parametrize(
    "endpoint",
    [
        "c-ams07-1a2b.discord.media:443",
        "rotterdam5347.discord.media",
        "wss://c-fra09-ffff.discord.media:443/",
        "us-east123.discord.gg:443",
        "US-EAST123.DISCORD.GG",
        "c-ams07-1a2b.discord.media.:443",  # a fully qualified name with its root dot
    ],
)
def test_discord_endpoints_get_v8_and_udp_first(endpoint: str) -> None:
    assert auto_gateway_version(endpoint) == 8
    assert auto_transports(endpoint) == ["udp", "webrtc"]


@pytest.mark.parametrize(
    "endpoint",
    [
        "127.0.0.1:3004",  # Spacebar's default
        "localhost:3004",
        "[::1]:40000",  # the sandbox on IPv6 loopback
        "ws://127.0.0.1:3004",
        "voice.spacebar.example:443",  # Spacebar behind a TLS proxy: still v6-only
        "wss://voice.example.org",
        "discord.media.evil.example:443",  # the domain must be the suffix, not a prefix
        "notdiscord.media:443",
        "192.0.2.10",
    ],
)
def test_other_endpoints_get_v6_and_webrtc_first(endpoint: str) -> None:
    assert auto_gateway_version(endpoint) == 6
    assert auto_transports(endpoint) == ["webrtc", "udp"]


def test_auto_is_the_default_and_a_number_overrides_it() -> None:
    assert VoiceOptions().gateway_version == "auto"
    assert VoiceOptions.from_config(VoiceConfig()).gateway_version == "auto"
    assert VoiceOptions.from_config(VoiceConfig(gateway_version=8)).gateway_version == 8
    with pytest.raises(ValueError, match=r"4\.\.8"):
        VoiceOptions(gateway_version=3)


@pytest.mark.parametrize(
    "endpoint",
    [
        "c-waw04-7cacab58.discord.media:2096",  # what Discord hands out since mid-2025
        "c-fra16-6b81d8c4.discord.media:2053",
        "c-ams07-1a2b.discord.media:8443",
        "c-ams07-1a2b.discord.media:443",
        "rotterdam5347.discord.media",
    ],
)
def test_discord_endpoints_get_tls_whatever_the_port(endpoint: str) -> None:
    """Discord's voice servers moved off 443 (2048, 2053, 2083, 2087, 2096, 8443); all are TLS."""
    url = websocket_url(endpoint, 8)
    assert url == f"wss://{endpoint}/?v=8"


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("127.0.0.1:3004", "ws://127.0.0.1:3004/?v=6"),  # Spacebar's default
        ("voice.example.org:8443", "ws://voice.example.org:8443/?v=6"),
        ("voice.example.org", "wss://voice.example.org/?v=6"),
    ],
)
def test_other_endpoints_keep_their_scheme_rule(endpoint: str, url: str) -> None:
    assert websocket_url(endpoint, 6) == url
