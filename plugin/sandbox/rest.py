"""The sandbox's Discord REST API (`/api/v10`), an aiohttp web server on 127.0.0.1.

It answers what discord.py 2.7.1 calls while starting, syncing commands, answering
interactions (callbacks, followups, edits of `@original`) and sending channel messages. JSON
responses carry `Content-Type: application/json` exactly: discord.py only decodes that value
(a `; charset=utf-8` suffix would hand it a string). Unknown routes are logged loudly, kept in
`unknown_routes`, and answered 404 the way Discord does.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

from legato.sandbox.events import Signal
from legato.sandbox.gateway import GatewayServer
from legato.sandbox.models import (
    EPHEMERAL,
    JSON,
    LOADING,
    CallbackType,
    Interaction,
    InteractionType,
    Message,
    MessageType,
    User,
)
from legato.sandbox.world import World

_log = logging.getLogger(__name__)

API_PREFIX: Final = "/api/v10"
#: Seconds Discord gives a bot to answer an interaction before forgetting it.
INTERACTION_DEADLINE: Final = 3.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, *, status: int = 200) -> web.Response:
    """Return a JSON response with Discord's exact content type.

    Args:
        data: Anything `json.dumps` accepts.
        status: The HTTP status.

    Returns:
        The response.
    """
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={"Content-Type": "application/json"},
    )


def error_response(status: int, code: int, message: str) -> web.Response:
    """Return Discord's error body `{message, code}`."""
    return json_response({"message": message, "code": code}, status=status)


def _now_iso() -> str:
    return datetime.now(tz=UTC).isoformat()


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true")


async def read_body(request: web.Request) -> JSON:
    """Return the JSON body of a request, from `payload_json` when it is multipart (files)."""
    if request.content_type.startswith("multipart/"):
        form = await request.post()
        raw = form.get("payload_json")
        if raw is None:
            return {}
        if isinstance(raw, str | bytes | bytearray):
            return dict(json.loads(raw))
        return dict(json.loads(raw.file.read()))
    if not request.can_read_body:
        return {}
    data = await request.json()
    return dict(data) if isinstance(data, dict) else {"__list__": data}


class RestServer:
    """The REST API on 127.0.0.1.

    Args:
        world: The shared model.
        gateway: Where MESSAGE_CREATE/UPDATE/DELETE go.
        bot: The bot's user.
        application_id: The bot's application id.
        bot_token: The token `Authorization: Bot ...` must carry.
        signal: Notified after every change.
        interaction_deadline: Seconds the bot has to answer an interaction's callback, as on
            Discord (3 s; later, 404 "Unknown interaction", code 10062); None: no limit.
    """

    def __init__(
        self,
        world: World,
        *,
        gateway: GatewayServer,
        bot: User,
        application_id: int,
        bot_token: str,
        signal: Signal,
        interaction_deadline: float | None = INTERACTION_DEADLINE,
    ) -> None:
        self.world = world
        self.interaction_deadline = interaction_deadline
        self.gateway = gateway
        self.bot = bot
        self.application_id = application_id
        self._token = bot_token
        self._signal = signal
        self.unknown_routes: list[str] = []
        # Interactions whose callback came after the deadline (answered 10062, as Discord does).
        self.late_callbacks: list[int] = []
        self.requests: list[str] = []
        self.command_syncs: list[tuple[int | None, list[str]]] = []
        self._runner: web.AppRunner | None = None
        self._host = "127.0.0.1"
        self._port = 0

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1") -> None:
        """Listen on an ephemeral port of `host`."""
        app = web.Application(middlewares=[self._middleware])
        p = API_PREFIX
        routes: list[tuple[str, str, Handler, bool]] = [
            ("GET", "/users/@me", self._get_me, True),
            ("GET", "/oauth2/applications/@me", self._get_application, True),
            ("GET", "/applications/@me", self._get_application, True),
            ("GET", "/gateway", self._get_gateway, False),
            ("GET", "/gateway/bot", self._get_gateway_bot, True),
            ("GET", "/applications/{app}/commands", self._get_commands, True),
            ("PUT", "/applications/{app}/commands", self._put_commands, True),
            ("GET", "/applications/{app}/guilds/{guild}/commands", self._get_commands, True),
            ("PUT", "/applications/{app}/guilds/{guild}/commands", self._put_commands, True),
            ("POST", "/interactions/{id}/{token}/callback", self._callback, False),
            ("POST", "/webhooks/{app}/{token}", self._followup, False),
            ("GET", "/webhooks/{app}/{token}/messages/{message}", self._get_webhook_msg, False),
            ("PATCH", "/webhooks/{app}/{token}/messages/{message}", self._edit_webhook_msg, False),
            ("DELETE", "/webhooks/{app}/{token}/messages/{message}", self._del_webhook_msg, False),
            ("GET", "/channels/{channel}", self._get_channel, True),
            ("GET", "/channels/{channel}/messages", self._list_messages, True),
            ("POST", "/channels/{channel}/messages", self._create_message, True),
            ("GET", "/channels/{channel}/messages/{message}", self._get_message, True),
            ("PATCH", "/channels/{channel}/messages/{message}", self._edit_message, True),
            ("DELETE", "/channels/{channel}/messages/{message}", self._delete_message, True),
            ("POST", "/channels/{channel}/typing", self._typing, True),
            ("GET", "/guilds/{guild}", self._get_guild, True),
            ("GET", "/guilds/{guild}/channels", self._get_guild_channels, True),
            ("GET", "/guilds/{guild}/members/{user}", self._get_member, True),
        ]
        for method, path, handler, auth in routes:
            app.router.add_route(method, p + path, self._guarded(handler) if auth else handler)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        self._host = host
        self._port = self._runner.addresses[0][1]
        _log.info("sandbox REST API at %s", self.api_base)

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def api_base(self) -> str:
        """The value for `discord.http.Route.BASE`."""
        return f"http://{self._host}:{self._port}{API_PREFIX}"

    # --- plumbing ----------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path}")
        try:
            return await handler(request)
        except (KeyError, ValueError, TypeError):
            # Non-numeric ids or bodies missing fields: Discord answers 400, not 500.
            _log.warning(
                "sandbox REST: bad request %s %s", request.method, request.path, exc_info=True
            )
            return error_response(400, 50035, "Invalid Form Body")

    def _guarded(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if request.headers.get("Authorization") != f"Bot {self._token}":
                return error_response(401, 0, "401: Unauthorized")
            return await handler(request)

        return guarded

    async def _unknown(self, request: web.Request) -> web.Response:
        route = f"{request.method} {request.path}"
        self.unknown_routes.append(route)
        _log.warning("sandbox REST: no handler for %s; answering 404", route)
        return error_response(404, 0, "404: Not Found")

    def _dispatch_message(self, event: str, message: Message) -> None:
        if not message.ephemeral:
            self.gateway.dispatch(event, message.payload())

    # --- identity and gateway ----------------------------------------------------------------

    async def _get_me(self, request: web.Request) -> web.Response:
        return json_response(
            {**self.bot.payload(), "verified": True, "mfa_enabled": False, "flags": 0}
        )

    async def _get_application(self, request: web.Request) -> web.Response:
        owner = next(iter(self.world.guilds.values())).owner_id if self.world.guilds else None
        owner_user = self.world.users.get(owner) if owner is not None else self.bot
        return json_response(
            {
                "id": str(self.application_id),
                "name": self.bot.name,
                "icon": None,
                "description": "Legato sandbox application",
                "summary": "",
                "type": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "verify_key": "0" * 64,
                "flags": 0,
                "owner": (owner_user or self.bot).payload(),
                "team": None,
                "bot": self.bot.payload(),
                "redirect_uris": [],
                "interactions_endpoint_url": None,
                "approximate_guild_count": len(self.world.guilds),
                "integration_types_config": {"0": {}},
            }
        )

    async def _get_gateway(self, request: web.Request) -> web.Response:
        return json_response({"url": self.gateway.url})

    async def _get_gateway_bot(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "url": self.gateway.url,
                "shards": 1,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 1000,
                    "reset_after": 0,
                    "max_concurrency": 1,
                },
            }
        )

    # --- application commands ----------------------------------------------------------------

    def _scope(self, request: web.Request) -> int | None:
        guild = request.match_info.get("guild")
        return None if guild is None else int(guild)

    async def _get_commands(self, request: web.Request) -> web.Response:
        commands = self.world.commands.get(self._scope(request), {})
        return json_response([c.payload() for c in commands.values()])

    async def _put_commands(self, request: web.Request) -> web.Response:
        if int(request.match_info["app"]) != self.application_id:
            return error_response(403, 50001, "Missing Access")
        scope = self._scope(request)
        if scope is not None and scope not in self.world.guilds:
            return error_response(404, 10004, "Unknown Guild")
        body = await read_body(request)
        definitions = body.get("__list__")
        if not isinstance(definitions, list):
            return error_response(400, 50035, "Invalid Form Body")
        commands = self.world.replace_commands(self.application_id, scope, definitions)
        self.command_syncs.append((scope, [c.name for c in commands]))
        self._signal.notify()
        return json_response([c.payload() for c in commands])

    # --- interactions ------------------------------------------------------------------------

    async def _callback(self, request: web.Request) -> web.Response:
        interaction = self.world.interactions.get(int(request.match_info["id"]))
        if interaction is None or interaction.token != request.match_info["token"]:
            return error_response(404, 10062, "Unknown interaction")
        if interaction.callback_type is not None:
            return error_response(400, 40060, "Interaction has already been acknowledged.")
        late = time.monotonic() - interaction.created
        if self.interaction_deadline is not None and late > self.interaction_deadline:
            self.late_callbacks.append(interaction.id)
            self._signal.notify()
            return error_response(404, 10062, "Unknown interaction")
        body = await read_body(request)
        try:
            callback = CallbackType(int(body["type"]))
        except (KeyError, ValueError):
            return error_response(400, 50035, "Invalid Form Body")
        data: JSON = dict(body.get("data") or {})
        if callback is CallbackType.UPDATE_MESSAGE and interaction.message_id is None:
            # Only component interactions have a message to update.
            return error_response(400, 50035, "Invalid Form Body")
        interaction.callback_type = callback
        interaction.callback_data = data
        message: Message | None = None
        if callback in (CallbackType.CHANNEL_MESSAGE, CallbackType.DEFERRED_CHANNEL_MESSAGE):
            deferred = callback is CallbackType.DEFERRED_CHANNEL_MESSAGE
            message = self.world.add_message(
                channel_id=interaction.channel_id,
                guild_id=interaction.guild_id,
                author=self.bot,
                body={"flags": int(data.get("flags") or 0) & EPHEMERAL} if deferred else data,
                type=(
                    MessageType.CHAT_INPUT_COMMAND
                    if interaction.type is InteractionType.APPLICATION_COMMAND
                    else MessageType.REPLY
                ),
                webhook_id=self.application_id,
                interaction_id=interaction.id,
                extra_flags=LOADING if deferred else 0,
            )
            interaction.original_message_id = message.id
            self._dispatch_message("MESSAGE_CREATE", message)
        elif callback is CallbackType.UPDATE_MESSAGE and interaction.message_id is not None:
            message = self.world.messages[interaction.message_id]
            message.apply_edit(data, edited_at=_now_iso())
            self._dispatch_message("MESSAGE_UPDATE", message)
        elif callback is CallbackType.AUTOCOMPLETE_RESULT:
            interaction.choices = list(data.get("choices") or [])
        elif callback is CallbackType.DEFERRED_UPDATE_MESSAGE and interaction.message_id:
            message = self.world.messages[interaction.message_id]
        interaction.callback_edits = 0 if message is None else message.edits
        self._signal.notify()
        if not _flag(request.query.get("with_response")):
            return web.Response(status=204)
        answer: JSON = {
            "interaction": {
                "id": str(interaction.id),
                "type": int(interaction.type),
                "response_message_id": None if message is None else str(message.id),
                "response_message_loading": callback is CallbackType.DEFERRED_CHANNEL_MESSAGE,
                "response_message_ephemeral": message is not None and message.ephemeral,
            },
            "resource": {"type": int(callback)},
        }
        if message is not None and callback is not CallbackType.DEFERRED_UPDATE_MESSAGE:
            answer["resource"]["message"] = message.payload()
        return json_response(answer)

    def _interaction_for(self, request: web.Request) -> Interaction | None:
        if int(request.match_info["app"]) != self.application_id:
            return None
        return self.world.interactions_by_token.get(request.match_info["token"])

    def _webhook_message(self, interaction: Interaction, ref: str) -> Message | None:
        if ref == "@original":
            message_id = interaction.original_message_id or interaction.message_id
        else:
            message_id = int(ref)
            allowed = {interaction.original_message_id, interaction.message_id}
            if message_id not in allowed and message_id not in interaction.followup_ids:
                return None
        message = self.world.messages.get(message_id) if message_id is not None else None
        return None if message is None or message.deleted else message

    async def _followup(self, request: web.Request) -> web.Response:
        interaction = self._interaction_for(request)
        if interaction is None:
            return error_response(404, 10015, "Unknown Webhook")
        if interaction.callback_type is None:
            return error_response(404, 10015, "Unknown Webhook")
        body = await read_body(request)
        original = (
            self.world.messages.get(interaction.original_message_id)
            if interaction.original_message_id is not None
            else None
        )
        if original is not None and original.flags & LOADING:
            # Discord: the first followup after a "thinking" defer replaces the loading message.
            original.apply_edit(body, edited_at=_now_iso())
            message = original
            self._dispatch_message("MESSAGE_UPDATE", message)
        else:
            message = self.world.add_message(
                channel_id=interaction.channel_id,
                guild_id=interaction.guild_id,
                author=self.bot,
                body=body,
                webhook_id=self.application_id,
                interaction_id=interaction.id,
            )
            interaction.followup_ids.append(message.id)
            self._dispatch_message("MESSAGE_CREATE", message)
        self._signal.notify()
        if _flag(request.query.get("wait")):
            return json_response(message.payload())
        return web.Response(status=204)

    async def _get_webhook_msg(self, request: web.Request) -> web.Response:
        interaction = self._interaction_for(request)
        message = (
            None
            if interaction is None
            else self._webhook_message(interaction, request.match_info["message"])
        )
        if message is None:
            return error_response(404, 10008, "Unknown Message")
        return json_response(message.payload())

    async def _edit_webhook_msg(self, request: web.Request) -> web.Response:
        interaction = self._interaction_for(request)
        message = (
            None
            if interaction is None
            else self._webhook_message(interaction, request.match_info["message"])
        )
        if message is None:
            return error_response(404, 10008, "Unknown Message")
        message.apply_edit(await read_body(request), edited_at=_now_iso())
        self._dispatch_message("MESSAGE_UPDATE", message)
        self._signal.notify()
        return json_response(message.payload())

    async def _del_webhook_msg(self, request: web.Request) -> web.Response:
        interaction = self._interaction_for(request)
        message = (
            None
            if interaction is None
            else self._webhook_message(interaction, request.match_info["message"])
        )
        if message is None:
            return error_response(404, 10008, "Unknown Message")
        self._delete(message)
        return web.Response(status=204)

    def _delete(self, message: Message) -> None:
        message.deleted = True
        if not message.ephemeral:
            self.gateway.dispatch(
                "MESSAGE_DELETE",
                {
                    "id": str(message.id),
                    "channel_id": str(message.channel_id),
                    "guild_id": str(message.guild_id),
                },
            )
        self._signal.notify()

    # --- channels, messages, guilds ----------------------------------------------------------

    async def _get_channel(self, request: web.Request) -> web.Response:
        channel = self.world.find_channel(int(request.match_info["channel"]))
        if channel is None:
            return error_response(404, 10003, "Unknown Channel")
        return json_response(channel.payload())

    def _channel_message(self, request: web.Request) -> Message | None:
        message = self.world.messages.get(int(request.match_info["message"]))
        if message is None or message.deleted or message.ephemeral:
            return None
        if message.channel_id != int(request.match_info["channel"]):
            return None
        return message

    async def _list_messages(self, request: web.Request) -> web.Response:
        channel_id = int(request.match_info["channel"])
        if self.world.find_channel(channel_id) is None:
            return error_response(404, 10003, "Unknown Channel")
        limit = int(request.query.get("limit", "50"))
        messages = self.world.channel_messages(channel_id)
        # Discord lists newest first.
        return json_response([m.payload() for m in reversed(messages)][:limit])

    async def _create_message(self, request: web.Request) -> web.Response:
        channel = self.world.find_channel(int(request.match_info["channel"]))
        if channel is None:
            return error_response(404, 10003, "Unknown Channel")
        body = await read_body(request)
        if not (body.get("content") or body.get("embeds") or body.get("components")):
            return error_response(400, 50006, "Cannot send an empty message")
        body["flags"] = int(body.get("flags") or 0) & ~EPHEMERAL
        message = self.world.add_message(
            channel_id=channel.id, guild_id=channel.guild_id, author=self.bot, body=body
        )
        self._dispatch_message("MESSAGE_CREATE", message)
        self._signal.notify()
        return json_response(message.payload())

    async def _get_message(self, request: web.Request) -> web.Response:
        message = self._channel_message(request)
        if message is None:
            return error_response(404, 10008, "Unknown Message")
        return json_response(message.payload())

    async def _edit_message(self, request: web.Request) -> web.Response:
        message = self._channel_message(request)
        if message is None:
            return error_response(404, 10008, "Unknown Message")
        if message.author.id != self.bot.id:
            return error_response(403, 50005, "Cannot edit a message authored by another user")
        message.apply_edit(await read_body(request), edited_at=_now_iso())
        self._dispatch_message("MESSAGE_UPDATE", message)
        self._signal.notify()
        return json_response(message.payload())

    async def _delete_message(self, request: web.Request) -> web.Response:
        message = self._channel_message(request)
        if message is None:
            return error_response(404, 10008, "Unknown Message")
        self._delete(message)
        return web.Response(status=204)

    async def _typing(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _get_guild(self, request: web.Request) -> web.Response:
        guild = self.world.guilds.get(int(request.match_info["guild"]))
        if guild is None:
            return error_response(404, 10004, "Unknown Guild")
        data = guild.payload()
        for key in ("members", "voice_states", "channels", "threads", "presences"):
            data.pop(key)
        data["approximate_member_count"] = len(guild.members)
        return json_response(data)

    async def _get_guild_channels(self, request: web.Request) -> web.Response:
        guild = self.world.guilds.get(int(request.match_info["guild"]))
        if guild is None:
            return error_response(404, 10004, "Unknown Guild")
        return json_response([c.payload() for c in guild.channels.values()])

    async def _get_member(self, request: web.Request) -> web.Response:
        guild = self.world.guilds.get(int(request.match_info["guild"]))
        member = None if guild is None else guild.members.get(int(request.match_info["user"]))
        if member is None:
            return error_response(404, 10007, "Unknown Member")
        return json_response(member.payload())
