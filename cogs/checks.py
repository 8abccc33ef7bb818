"""Who may do what (voice-channel presence, the DJ rules of ``[permissions]``) and what may be
played (the query of /play, the tracks it found, against ``[playback]``).

These are plain functions the commands call with the state they already hold; a refusal raises
:class:`Denied` or :class:`~legato.cogs.format.BadInput`, whose ``user_message`` the cog sends
ephemerally.
"""

from __future__ import annotations

import os
import re
from collections import deque
from typing import Final, Literal

import discord

from legato.audio.resolve import split_url
from legato.audio.track import Track
from legato.cogs.format import BadInput, format_time, is_blank, over_limit
from legato.config import PermissionsConfig, PlaybackConfig
from legato.errors import LegatoError

__all__ = [
    "CommandRate",
    "Denied",
    "NotPlaying",
    "check_query",
    "check_tracks",
    "is_dj",
    "is_search",
    "is_url",
    "listeners",
    "require_may",
    "require_same_channel",
    "require_voice",
    "voice_channel_of",
]

VoiceLike = discord.VoiceChannel | discord.StageChannel

# As legato.audio.resolve decides: a URL is the whole query; words around one are a search.
_URL: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$")


class Denied(LegatoError):
    """The caller may not do this (not in voice, not a DJ, ...); ``user_message`` says why."""

    default_user_message = "You can't do that right now."


class NotPlaying(LegatoError):
    """A command needs a player (or a current track) and there is none."""

    default_user_message = "Nothing is playing."


def voice_channel_of(member: discord.Member | discord.User) -> VoiceLike | None:
    """The voice channel ``member`` is in, or ``None``."""
    state = getattr(member, "voice", None)
    channel = state.channel if state is not None else None
    if isinstance(channel, (discord.VoiceChannel, discord.StageChannel)):
        return channel
    return None


def require_voice(member: discord.Member | discord.User) -> VoiceLike:
    """The caller's voice channel.

    Raises:
        Denied: The caller is in no voice channel.
    """
    channel = voice_channel_of(member)
    if channel is None:
        raise Denied("caller not in voice", user_message="Join a voice channel first.")
    return channel


def require_same_channel(member: discord.Member | discord.User, bot_channel: VoiceLike) -> None:
    """Refuse unless ``member`` listens in ``bot_channel``.

    Raises:
        Denied: The caller is elsewhere or in no voice channel.
    """
    channel = voice_channel_of(member)
    if channel is None or channel.id != bot_channel.id:
        raise Denied(
            f"caller in {channel and channel.id}, bot in {bot_channel.id}",
            user_message=f"You need to be in {bot_channel.mention} with me to do that.",
        )


def listeners(channel: VoiceLike) -> list[discord.Member]:
    """Members in ``channel`` other than bots."""
    return [m for m in channel.members if not m.bot]


def is_dj(member: discord.Member, perms: PermissionsConfig, channel: VoiceLike | None) -> bool:
    """Whether ``member`` counts as a DJ.

    With no ``dj_role`` configured there are no DJ rules and everyone counts. Otherwise: members
    with the role (by id, or by name ignoring case), members who may manage channels, and a
    listener alone with the bot.
    """
    role = perms.dj_role
    if role in ("", 0):
        return True
    if member.guild_permissions.manage_channels or member.guild_permissions.administrator:
        return True
    for r in member.roles:
        if (isinstance(role, int) and r.id == role) or (
            isinstance(role, str) and r.name.casefold() == role.casefold()
        ):
            return True
    return channel is not None and [m.id for m in listeners(channel)] == [member.id]


def require_may(
    who: Literal["requester", "dj", "everyone"],
    member: discord.Member,
    perms: PermissionsConfig,
    *,
    action: str,
    requester_id: int | None = None,
    channel: VoiceLike | None = None,
) -> None:
    """Refuse ``action`` unless the rule ``who`` lets ``member`` do it.

    Args:
        who: The configured rule: ``everyone``; ``dj``; ``requester`` (DJs, or whoever asked for
            the track concerned).
        member: The caller.
        perms: The ``[permissions]`` section.
        action: Verb phrase for the message ("skip", "clear the queue").
        requester_id: Who asked for the track concerned (for ``requester``).
        channel: The bot's voice channel (a listener alone there counts as DJ).

    Raises:
        Denied: The rule refuses the caller.
    """
    if who == "everyone" or is_dj(member, perms, channel):
        return
    if who == "requester" and requester_id is not None and requester_id == member.id:
        return
    needed = "the DJ role" if who == "dj" else "the DJ role or to have requested the track"
    raise Denied(
        f"{member.id} may not {action} (rule {who})",
        user_message=f"You need {needed} to {action}.",
    )


class CommandRate:
    """A per-user sliding window: at most ``limit`` commands in any ``window`` seconds.

    Pure: the caller passes the time. Refused attempts are not counted, so a user who keeps
    spamming is let in again as soon as the window has room, not later. Users with nothing in
    their window are dropped now and then, so memory stays bounded by the users active in one
    window.

    Args:
        limit: Commands allowed per window; 0 turns the limit off.
        window: The window, in seconds.
    """

    _SWEEP_EVERY: Final = 1024  # users tracked before stale ones are swept

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._seen: dict[int, deque[float]] = {}
        self._sweep_at = self._SWEEP_EVERY

    def __len__(self) -> int:
        """Users tracked now (some may have nothing left in their window)."""
        return len(self._seen)

    def take(self, user_id: int, now: float) -> float:
        """Count one command by ``user_id`` at ``now`` if the window has room.

        Returns:
            0 when the command may run (it is counted), else the seconds until it could.
        """
        if self.limit <= 0:
            return 0.0
        times = self._seen.get(user_id)
        if times is None:
            if len(self._seen) >= self._sweep_at:
                self._sweep(now)
            times = self._seen[user_id] = deque(maxlen=self.limit)
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.limit:
            return times[0] + self.window - now
        times.append(now)
        return 0.0

    def _sweep(self, now: float) -> None:
        horizon = now - self.window
        self._seen = {u: t for u, t in self._seen.items() if t and t[-1] > horizon}
        self._sweep_at = max(self._SWEEP_EVERY, 2 * len(self._seen))


# --- what may be played -----------------------------------------------------------------------


def is_url(query: str) -> bool:
    """Whether the resolver takes ``query`` as a link (the whole query is one URL)."""
    return _URL.match(query.strip()) is not None


def is_search(query: str) -> bool:
    """Whether the resolver takes ``query`` as words to search for (no link, no path)."""
    q = query.strip()
    return not is_url(q) and not os.path.isabs(q) and not q.startswith(("./", "../", "~"))


def check_query(query: str, playback: PlaybackConfig) -> None:
    """Refuse a blank query, a link to a site not allowed, or a search when searching is off.

    Raises:
        BadInput: The query may not be played; ``user_message`` says why.
    """
    query = query.strip()
    if is_blank(query):
        # Not only "": NUL, ESC or U+3000 alone would be searched for as if they were words.
        raise BadInput(f"blank query {query!r}", user_message="Tell me what to play.")
    if is_url(query):
        host = (split_url(query).hostname or "").lower().rstrip(".")
        allowed = playback.allowed_domains
        if allowed and not any(host == d or host.endswith("." + d) for d in allowed):
            raise BadInput(
                f"host {host!r} not allowed",
                user_message=(
                    "Links from that site are not allowed here. Allowed: "
                    + ", ".join(allowed[:10])
                    + "."
                ),
            )
    elif playback.search_provider == "none" and is_search(query):
        raise BadInput("search is off", user_message="Searching is turned off; give me a link.")


def check_tracks(
    tracks: list[Track], playback: PlaybackConfig, *, search: bool
) -> tuple[list[Track], int]:
    """Apply the length limit; a search keeps its first result.

    Returns:
        The tracks to queue and how many were left out for being too long.

    Raises:
        BadInput: Every track is too long.
    """
    limit = playback.max_track_duration
    if search:
        tracks = tracks[:1]
    if limit <= 0:
        return tracks, 0
    fitting = [t for t in tracks if t.duration is None or not over_limit(t.duration, limit)]
    if not fitting:
        longest = max(t.duration or 0.0 for t in tracks)
        raise BadInput(
            f"track {longest}s over limit {limit}s",
            user_message=f"That is {format_time(longest)} long; the limit is {format_time(limit)}.",
        )
    return fitting, len(tracks) - len(fitting)
