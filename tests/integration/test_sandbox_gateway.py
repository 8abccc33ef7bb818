"""The sandbox gateway and REST API spoken to directly, without discord.py: edge cases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from legato.sandbox.server import Sandbox

pytestmark = pytest.mark.integration


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(with_voice=False, timeout=20.0) as sb:
        yield sb


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _receive_json(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=20)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    data: dict[str, Any] = msg.json()
    return data


async def _close_code(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    while (msg := await ws.receive(timeout=20)).type is aiohttp.WSMsgType.TEXT:
        pass
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    return ws.close_code


async def _identify(
    ws: aiohttp.ClientWebSocketResponse, token: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    hello = await _receive_json(ws)
    assert hello == {"op": 10, "d": {"heartbeat_interval": 41_250}}
    await ws.send_json({"op": 2, "d": {"token": token, "intents": 641, "properties": {}}})
    ready = await _receive_json(ws)
    guild = await _receive_json(ws)
    return ready, guild


async def test_identify_heartbeat_ready_and_guild_create(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(sandbox.gateway_url + "?v=10&encoding=json") as ws:
        ready, guild = await _identify(ws, sandbox.bot_token)
        assert (ready["op"], ready["t"], ready["s"]) == (0, "READY", 1)
        assert ready["d"]["user"]["id"] == str(sandbox.bot.id)
        assert ready["d"]["application"] == {"id": str(sandbox.application_id), "flags": 0}
        assert ready["d"]["guilds"] == [{"id": str(sandbox.guild.id), "unavailable": True}]
        assert ready["d"]["resume_gateway_url"] == sandbox.gateway_url
        assert (guild["t"], guild["s"]) == ("GUILD_CREATE", 2)
        channels = {c["name"]: c for c in guild["d"]["channels"]}
        assert channels["General"]["type"] == 2
        assert (channels["General"]["bitrate"], channels["General"]["user_limit"]) == (64_000, 0)
        assert channels["music"]["type"] == 0
        assert str(sandbox.bot.id) in {m["user"]["id"] for m in guild["d"]["members"]}
        await ws.send_json({"op": 1, "d": 2})
        assert await _receive_json(ws) == {"op": 11, "d": None}
        assert sandbox.gateway.heartbeats == 1


async def test_wrong_token_closes_4004(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    async with http.ws_connect(sandbox.gateway_url) as ws:
        await _receive_json(ws)
        await ws.send_json({"op": 2, "d": {"token": "nope", "properties": {}}})
        assert await _close_code(ws) == 4004


async def test_dispatch_before_identify_closes_4003(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(sandbox.gateway_url) as ws:
        await _receive_json(ws)
        await ws.send_json({"op": 4, "d": {"guild_id": "1", "channel_id": None}})
        assert await _close_code(ws) == 4003


async def test_unknown_opcode_closes_4001(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    async with http.ws_connect(sandbox.gateway_url) as ws:
        await _identify(ws, sandbox.bot_token)
        await ws.send_json({"op": 42, "d": None})
        assert await _close_code(ws) == 4001


async def test_resume_replays_only_what_was_missed(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(sandbox.gateway_url) as ws:
        ready, _ = await _identify(ws, sandbox.bot_token)
        session_id = ready["d"]["session_id"]
        alice = sandbox.add_user("alice")
        assert (await _receive_json(ws))["s"] == 3  # GUILD_MEMBER_ADD, seen
        await sandbox.gateway.force_reconnect()
        assert await _close_code(ws) == 4000
    await alice.join_voice(sandbox.general)
    await alice.leave_voice()
    async with http.ws_connect(sandbox.gateway_url) as ws:
        await _receive_json(ws)
        resume = {"token": sandbox.bot_token, "session_id": session_id, "seq": 3}
        await ws.send_json({"op": 6, "d": resume})
        frames = [await _receive_json(ws) for _ in range(3)]
        assert [(f["t"], f["s"]) for f in frames] == [
            ("VOICE_STATE_UPDATE", 4),
            ("VOICE_STATE_UPDATE", 5),
            ("RESUMED", 6),
        ]
        assert frames[0]["d"]["channel_id"] == str(sandbox.general.id)
        assert frames[1]["d"]["channel_id"] is None
    assert sandbox.gateway.resumes[-1].replayed == ["VOICE_STATE_UPDATE", "VOICE_STATE_UPDATE"]


async def test_resume_of_an_unknown_session_is_invalid(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(sandbox.gateway_url) as ws:
        await _receive_json(ws)
        resume = {"token": sandbox.bot_token, "session_id": "nope", "seq": 1}
        await ws.send_json({"op": 6, "d": resume})
        assert await _receive_json(ws) == {"op": 9, "d": False}


async def test_bot_voice_join_without_a_voice_server_has_a_null_endpoint(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(sandbox.gateway_url) as ws:
        ready, _ = await _identify(ws, sandbox.bot_token)
        op4 = {"guild_id": str(sandbox.guild.id), "channel_id": str(sandbox.lounge.id)}
        await ws.send_json({"op": 4, "d": {**op4, "self_mute": False, "self_deaf": True}})
        state = await _receive_json(ws)
        server = await _receive_json(ws)
        assert state["t"] == "VOICE_STATE_UPDATE"
        assert state["d"]["session_id"] == ready["d"]["session_id"]
        assert state["d"]["self_deaf"] is True
        assert state["d"]["member"]["user"]["id"] == str(sandbox.bot.id)
        assert server["t"] == "VOICE_SERVER_UPDATE"
        assert server["d"]["endpoint"] is None
        assert server["d"]["guild_id"] == str(sandbox.guild.id)
        # op4 to a text channel is ignored, as Discord does.
        await ws.send_json({"op": 4, "d": {**op4, "channel_id": str(sandbox.music.id)}})
        await ws.send_json({"op": 1, "d": 3})
        assert await _receive_json(ws) == {"op": 11, "d": None}
    voice = sandbox.voice_state(sandbox.bot.id)
    assert voice is not None
    assert voice.channel_id == sandbox.lounge.id


async def test_rest_content_type_auth_and_404(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    auth = {"Authorization": f"Bot {sandbox.bot_token}"}
    async with http.get(sandbox.api_base + "/users/@me", headers=auth) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/json"
        assert (await resp.json())["id"] == str(sandbox.bot.id)
    async with http.get(sandbox.api_base + "/users/@me") as resp:
        assert resp.status == 401
    async with http.get(sandbox.api_base + "/gateway/bot", headers=auth) as resp:
        assert (await resp.json())["url"] == sandbox.gateway_url
    async with http.get(sandbox.api_base + "/no/such/route", headers=auth) as resp:
        assert resp.status == 404
        assert await resp.json() == {"message": "404: Not Found", "code": 0}
    assert sandbox.rest.unknown_routes == ["GET /api/v10/no/such/route"]


async def test_malformed_payloads_get_discord_errors(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(sandbox.gateway_url) as ws:
        await _identify(ws, sandbox.bot_token)
        await ws.send_json({"op": 4, "d": {"channel_id": None}})  # no guild_id
        assert await _close_code(ws) == 4002
    auth = {"Authorization": f"Bot {sandbox.bot_token}"}
    async with http.get(sandbox.api_base + "/channels/not-a-number", headers=auth) as resp:
        assert resp.status == 400
        assert (await resp.json())["code"] == 50035
