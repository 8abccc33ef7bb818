"""The sandbox's world model: pure data and the payloads it renders."""

from __future__ import annotations

import pytest

from legato.sandbox.models import EPHEMERAL, LOADING, ChannelType, InteractionType, snowflake_time
from legato.sandbox.world import World

START_MS = 1_764_000_000_000


def make_world() -> tuple[World, int]:
    world = World(START_MS)
    owner = world.add_user("owner")
    guild = world.add_guild("g", owner=owner)
    return world, guild.id


def test_snowflakes_increase_and_carry_the_start_time() -> None:
    world = World(START_MS)
    first, second = world.new_id(), world.new_id()
    assert second == first + 1
    assert snowflake_time(first) == "2025-11-24T16:00:00+00:00"


def test_command_sync_keeps_ids_of_commands_that_stay() -> None:
    world, guild_id = make_world()
    first = world.replace_commands(7, guild_id, [{"name": "play", "description": "p"}])
    second = world.replace_commands(
        7, guild_id, [{"name": "play", "description": "p2"}, {"name": "skip"}]
    )
    assert second[0].id == first[0].id
    assert second[1].id != first[0].id
    payload = second[1].payload()
    assert payload["description"] == ""
    assert payload["guild_id"] == str(guild_id)
    assert payload["application_id"] == "7"
    assert world.find_command(guild_id, "skip") is second[1]
    with pytest.raises(KeyError):
        world.find_command(guild_id, "play-nothing")


def test_voice_moves_and_channel_deletion() -> None:
    world, guild_id = make_world()
    guild = world.guilds[guild_id]
    alice = world.add_user("alice")
    world.add_member(guild, alice)
    voice = world.add_channel(guild, "General", ChannelType.VOICE)
    text = world.add_channel(guild, "music", ChannelType.TEXT)
    state = world.set_voice(guild, alice.id, voice.id)
    assert guild.voice_states[alice.id].session_id == state.session_id
    with pytest.raises(KeyError):
        world.set_voice(guild, alice.id, text.id)
    emptied = world.remove_channel(voice)
    assert [(s.user_id, s.channel_id) for s in emptied] == [(alice.id, None)]
    assert guild.voice_states == {}
    assert voice.id not in guild.channels


def test_permissions_add_up_roles_and_owner_gets_all() -> None:
    world, guild_id = make_world()
    guild = world.guilds[guild_id]
    bob = world.add_user("bob")
    role = world.add_role(guild, "Mover", permissions=1 << 24)
    world.add_member(guild, bob, roles=(role,))
    assert guild.permissions_of(bob.id) & (1 << 24)
    assert guild.permissions_of(bob.id) & (1 << 20)  # connect, from @everyone
    assert guild.permissions_of(guild.owner_id) == (1 << 53) - 1


def test_edits_keep_ephemeral_and_clear_loading() -> None:
    world, guild_id = make_world()
    bot = world.add_user("bot", bot=True)
    message = world.add_message(
        channel_id=1, guild_id=guild_id, author=bot, body={"flags": EPHEMERAL}, extra_flags=LOADING
    )
    message.apply_edit({"content": "done", "flags": 0}, edited_at="t")
    assert (message.content, message.flags, message.edits) == ("done", EPHEMERAL, 1)
    assert world.channel_messages(1) == []  # ephemeral messages are not listed


def test_interaction_payload_has_what_discord_py_reads() -> None:
    world, guild_id = make_world()
    guild = world.guilds[guild_id]
    alice = world.add_user("alice")
    world.add_member(guild, alice)
    bot = world.add_user("bot", bot=True)
    world.add_member(guild, bot)
    channel = world.add_channel(guild, "music", ChannelType.TEXT)
    interaction = world.add_interaction(
        type=InteractionType.APPLICATION_COMMAND,
        guild_id=guild_id,
        channel_id=channel.id,
        user_id=alice.id,
        data={"id": "1", "name": "ping", "type": 1},
    )
    payload = world.interaction_payload(interaction, application_id=bot.id, bot_id=bot.id)
    for key in ("id", "application_id", "type", "token", "version", "attachment_size_limit"):
        assert key in payload
    assert payload["guild_id"] == str(guild_id)
    assert payload["channel"]["id"] == str(channel.id)
    assert payload["member"]["user"]["id"] == str(alice.id)
    assert int(payload["member"]["permissions"]) == guild.permissions_of(alice.id)
    assert world.interactions_by_token[payload["token"]] is interaction
