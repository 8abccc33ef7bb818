"""What the Music cog shows: times, progress bars, safe titles and embeds.

Titles come from the internet: they may be megabytes long, carry Discord markdown, mentions,
bidirectional overrides, zero-width characters or a stack of combining marks. Everything shown
goes through :func:`safe_text`, which cleans and truncates it to a Discord limit without splitting
a character from its marks.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Literal

import discord

from legato.audio.track import Track
from legato.errors import LegatoError

if TYPE_CHECKING:
    from legato.audio.player import PlayerStats
    from legato.voice.client import VoiceLinkStats

__all__ = [
    "BUFFERING_NOTE",
    "EMBED_DESCRIPTION_LIMIT",
    "EMBED_FIELD_LIMIT",
    "EMBED_TITLE_LIMIT",
    "EMBED_TOTAL_LIMIT",
    "LOADING_NOTE",
    "NOT_E2EE",
    "QUEUE_PAGE_SIZE",
    "BadInput",
    "debug_embed",
    "embed_length",
    "format_privacy_code",
    "format_time",
    "is_blank",
    "now_playing_embed",
    "over_limit",
    "parse_position",
    "progress_bar",
    "queue_embed",
    "queue_pages",
    "safe_text",
    "track_line",
    "utf16_len",
]

# Discord's embed limits (https://discord.com/developers/docs/resources/message#embed-object-
# embed-limits), counted here in UTF-16 code units, which is never fewer than Discord counts.
EMBED_TITLE_LIMIT: Final = 256
EMBED_DESCRIPTION_LIMIT: Final = 4096
EMBED_FIELD_LIMIT: Final = 1024
EMBED_FOOTER_LIMIT: Final = 2048
EMBED_TOTAL_LIMIT: Final = 6000
#: Tracks on one page of /queue.
QUEUE_PAGE_SIZE: Final = 10
#: Longest title on a queue line: ten lines stay far below the description limit.
LINE_TITLE_LIMIT: Final = 80
#: Combining marks kept on one base character ("Zalgo" text stacks hundreds).
MAX_MARKS: Final = 3

#: What /nowplaying says while the player waits for a started track's audio (``BUFFERING``).
BUFFERING_NOTE: Final = "⏳ Buffering: the track's server is sending audio slower than real time."
#: ... and while it waits for a track's first audio (``LOADING``).
LOADING_NOTE: Final = "⏳ Buffering: waiting for the track's server to send audio."

_ELLIPSIS: Final = "…"
_ZWJ: Final = "\u200d"


class BadInput(LegatoError):
    """A command argument the user typed cannot be used; ``user_message`` says why."""

    default_user_message = "That input is not valid."


# --- time -------------------------------------------------------------------------------------

_CLOCK: Final = re.compile(r"(?:(\d{1,3}):)?(\d{1,3}):(\d{1,2}(?:\.\d+)?)", re.ASCII)
_SECONDS: Final = re.compile(r"\d{1,6}(?:\.\d+)?", re.ASCII)


def format_time(seconds: float | None) -> str:
    """Format ``seconds`` as ``m:ss`` or ``h:mm:ss``; ``None`` (not known yet) as ``?:??``."""
    if seconds is None or math.isnan(seconds) or math.isinf(seconds):
        return "?:??"
    total = max(0, int(seconds))
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def over_limit(length: float, limit: float) -> bool:
    """Whether ``length`` is over ``limit``, compared in the whole seconds :func:`format_time`
    shows: 3:00:00.0065 is not over 3:00:00, or the refusal would read "3:00:00 long; the limit
    is 3:00:00"."""
    return math.floor(length) > math.floor(limit)


def parse_position(text: str, *, current: float, duration: float | None) -> float:
    """Turn what a user typed for /seek into an absolute position in seconds.

    Accepts ``83`` (seconds), ``1:23``, ``1:02:03``, and relative ``+10`` / ``-5`` (also
    ``+1:00``). The result is clamped at 0; a target at or past the end is refused.

    Args:
        text: The user's input.
        current: The current position in seconds (for relative input).
        duration: The track's length, or ``None`` when unknown (then only clamping at 0).

    Returns:
        The target position in seconds.

    Raises:
        BadInput: The text is not a position, or is past the end of the track.
    """
    raw = text.strip()
    sign = 0
    if raw and raw[0] in "+-":
        sign = 1 if raw[0] == "+" else -1
        raw = raw[1:].strip()
    value = _parse_clock(raw)
    if value is None:
        shown = safe_text(text, 40) or "nothing"
        raise BadInput(
            f"unparsable position {text!r}",
            user_message=(
                f"`{shown}` is not a position. Use seconds (`83`), minutes:seconds (`1:23`), "
                "hours:minutes:seconds (`1:02:03`) or a step such as `+10` or `-5`."
            ),
        )
    target = current + sign * value if sign else value
    target = max(0.0, target)
    if duration is not None and target >= duration:
        raise BadInput(
            f"position {target} past duration {duration}",
            user_message=(
                f"{format_time(target)} is past the end of the track "
                f"({format_time(duration)} long)."
            ),
        )
    return target


def _parse_clock(raw: str) -> float | None:
    if _SECONDS.fullmatch(raw):
        return float(raw)
    match = _CLOCK.fullmatch(raw)
    if match is None:
        return None
    hours, minutes, seconds = match.groups()
    if float(seconds) >= 60 or (hours is not None and int(minutes) >= 60):
        return None
    return int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)


def progress_bar(
    position: float, duration: float | None, *, width: int = 20, live: bool = False
) -> str:
    """Draw ``position`` within ``duration`` as ``━━━●────────`` followed by the times.

    A live stream shows only the elapsed time; another track whose length is not known yet
    shows the elapsed time over ``?:??``.
    """
    if live:
        return f"🔴 live · {format_time(position)}"
    if duration is None or duration <= 0 or not math.isfinite(duration):
        return f"{format_time(position)} / {format_time(None)}"
    fraction = min(1.0, max(0.0, position / duration))
    head = min(width - 1, int(fraction * width))
    bar = "━" * head + "●" + "─" * (width - head - 1)
    return f"{bar} {format_time(min(position, duration))} / {format_time(duration)}"


# --- text -------------------------------------------------------------------------------------


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units (astral characters count two)."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


# Backslash before ASCII punctuation shows it literally. discord.utils.escape_markdown leaves a
# lone "[" or "]" alone, which would end a masked link's text early, so this set is our own.
_MARKDOWN: Final = re.compile(r"[\\*_~`|>#\[\]<]")


def _is_mark(ch: str) -> bool:
    return unicodedata.category(ch) in ("Mn", "Me", "Mc")


def _clean(text: str) -> str:
    out: list[str] = []
    marks = 0
    for ch in unicodedata.normalize("NFC", text):
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Zl", "Zp") or ch.isspace():
            ch = " "
        elif cat == "Cf" and ch != _ZWJ:
            continue  # bidi overrides, zero-width spaces, soft hyphens, tags
        elif cat in ("Co", "Cn", "Cs"):
            continue
        if _is_mark(ch):
            marks += 1
            if marks > MAX_MARKS or not out or out[-1] == " ":
                continue
        else:
            marks = 0
        out.append(ch)
    return re.sub(r" {2,}", " ", "".join(out)).strip()


def is_blank(text: str) -> bool:
    """Whether ``text`` shows nothing: only whitespace (any Unicode space), control and format
    characters (NUL, ESC, zero-width and bidi marks) or unassigned code points."""
    return not _clean(text)


def _cut(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` UTF-16 units, ending on a whole character cluster."""
    if utf16_len(text) <= limit:
        return text
    budget = limit - 1  # the ellipsis
    units = 0
    end = 0
    for i, ch in enumerate(text):
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > budget:
            break
        end = i + 1
    # Drop the cluster the cut landed in: marks (and joiners) belong to the character before.
    while end < len(text) and end > 0 and (_is_mark(text[end]) or text[end] == _ZWJ):
        end -= 1
    while end > 0 and text[end - 1] == _ZWJ:
        end -= 1
    head = text[:end].rstrip()
    # An odd run of backslashes at the end would escape the ellipsis.
    trailing = len(head) - len(head.rstrip("\\"))
    if trailing % 2:
        head = head[:-1]
    return head + _ELLIPSIS


def safe_text(text: str, limit: int, *, markdown: bool = True) -> str:
    """Make untrusted text safe to show and fit it in ``limit`` UTF-16 units.

    Control, format (bidi, zero-width) and unassigned characters are removed, whitespace is
    collapsed, runs of combining marks are capped, markdown and mentions are escaped (unless
    ``markdown`` is false) and the result is truncated with ``…`` without splitting a character
    from its marks.
    """
    cleaned = _clean(text)
    if markdown:
        cleaned = _MARKDOWN.sub(r"\\\g<0>", cleaned)
        cleaned = discord.utils.escape_mentions(cleaned)
    return _cut(cleaned, limit)


def track_title(track: Track, limit: int) -> str:
    """The track's title made safe, or its URL when the title is empty after cleaning."""
    title = safe_text(track.title, limit)
    return title or safe_text(track.url, limit) or "untitled"


def track_line(index: int | None, track: Track) -> str:
    """One line of the queue: ``3. [title](url) · 3:45 · <@requester>``."""
    title = track_title(track, LINE_TITLE_LIMIT)
    url = _link(track)
    label = f"[{title}]({url})" if url else title
    prefix = f"`{index}.` " if index is not None else ""
    who = f" · <@{track.requester_id}>" if track.requester_id else ""
    length = "🔴 live" if track.live else format_time(track.duration)
    return f"{prefix}{label} · {length}{who}"


def _link(track: Track) -> str | None:
    url = track.page_url or track.url
    if re.fullmatch(r"https?://[^\s()<>]{1,500}", url or ""):
        return url
    return None


# --- embeds -----------------------------------------------------------------------------------


def embed_length(embed: discord.Embed) -> int:
    """Characters of ``embed`` that count against Discord's 6000 total, in UTF-16 units."""
    total = utf16_len(embed.title or "") + utf16_len(embed.description or "")
    total += utf16_len(embed.footer.text or "") + utf16_len(embed.author.name or "")
    for f in embed.fields:
        total += utf16_len(f.name or "") + utf16_len(f.value or "")
    return total


def now_playing_embed(
    track: Track,
    *,
    position: float,
    volume: int,
    loop: str,
    paused: bool = False,
    duration: float | None = None,
    privacy_code: str | None = None,
    waiting: Literal["loading", "buffering"] | None = None,
) -> discord.Embed:
    """The /nowplaying embed: title (linked), requester, thumbnail, progress, loop and volume.

    ``duration`` (what the decoder found) is used when the track's metadata has none;
    ``privacy_code`` (DAVE's, when the connection is end-to-end encrypted) is shown grouped.
    ``waiting``: the player is waiting for the track's server, for its first audio
    (``"loading"``) or mid-track (``"buffering"``); the embed says so (a listener hears silence
    and should know it is the server, not the bot).
    """
    length = track.duration if track.duration is not None else duration
    bar = progress_bar(position, length, live=track.live)
    if paused:
        author, description = "Paused", f"⏸ Paused\n{bar}"
    elif waiting is not None:
        note = BUFFERING_NOTE if waiting == "buffering" else LOADING_NOTE
        author, description = "Buffering", f"{note}\n{bar}"
    else:
        author, description = "Now playing", bar
    embed = discord.Embed(
        title=track_title(track, EMBED_TITLE_LIMIT),
        url=_link(track),
        description=description,
        colour=discord.Colour.blurple(),
    )
    embed.set_author(name=author)
    if track.requester_id:
        embed.add_field(name="Requested by", value=f"<@{track.requester_id}>")
    embed.add_field(name="Loop", value=loop)
    embed.add_field(name="Volume", value=f"{volume}%")
    if privacy_code:
        embed.add_field(
            name="Voice privacy code", value=f"`{format_privacy_code(privacy_code)}`", inline=False
        )
    if track.thumbnail and _is_http(track.thumbnail):
        embed.set_thumbnail(url=track.thumbnail)
    return embed


#: What ``/music privacy`` says when there is no privacy code to compare.
NOT_E2EE: Final = (
    "This voice connection is **not end-to-end encrypted** (no DAVE), so there is no voice "
    "privacy code to compare."
)


def format_privacy_code(code: str) -> str:
    """Group a voice privacy code in fives, as Discord clients show it."""
    digits = code.strip()
    return " ".join(digits[i : i + 5] for i in range(0, len(digits), 5))


def debug_embed(
    player: PlayerStats, voice: VoiceLinkStats, *, state: str, track: Track | None
) -> discord.Embed:
    """The /music debug embed: one player's pacing, encode, buffer and error figures, and its
    voice link's (reconnects, the server's loss reports, DAVE)."""
    embed = discord.Embed(title="Player stats", colour=discord.Colour.dark_grey())
    embed.description = f"State: {state}" + (
        f" · {track_title(track, LINE_TITLE_LIMIT)}" if track is not None else ""
    )
    embed.add_field(
        name="Frames",
        value=(
            f"sent {player.frames_sent}\nsilence {player.silence_sent}\nlate {player.late_frames}"
        ),
    )
    embed.add_field(
        name="Pacing (lateness)",
        value=(
            f"p99 {player.p99_lateness_ms:.1f} ms\nmax {player.max_lateness_ms:.1f} ms\n"
            f"re-anchors {player.reanchors}"
        ),
    )
    embed.add_field(
        name="Encode per frame",
        value=f"mean {player.encode_ms_mean:.3f} ms\np99 {player.encode_ms_p99:.3f} ms",
    )
    embed.add_field(
        name="Buffer",
        value=(
            f"{player.buffer_frames} frames ({player.buffer_frames * 20} ms)\n"
            f"underruns {player.underruns}"
        ),
    )
    embed.add_field(
        name="Errors",
        value=(
            f"source {player.source_errors}\nreopens {player.reopens}\n"
            f"send {player.sink_errors + voice.send_errors}\ndropped {voice.frames_dropped}"
        ),
    )
    if voice.loss_reports:
        loss = (
            f"{voice.fraction_lost * 100:.1f} % last report\n{voice.packets_lost} packets in all\n"
            f"{voice.loss_reports} reports"
        )
    else:
        # Only udp gets the server's reports; over webrtc aiortc consumes them.
        loss = "no reports yet" if voice.transport == "udp" else "not reported"
    embed.add_field(name="Loss (server reports)", value=loss)
    embed.add_field(
        name="Reconnects",
        value=f"{voice.reconnects} (resumes {voice.resumes})",
    )
    latency = "n/a" if voice.latency_ms is None else f"{voice.latency_ms:.0f} ms"
    if voice.average_latency_ms is not None:
        latency += f" (avg {voice.average_latency_ms:.0f} ms)"
    embed.add_field(
        name="Voice",
        value=(
            f"{'connected' if voice.connected else 'not connected'}\n"
            f"transport {voice.transport or 'none'}\nmode {voice.mode or 'none'}\n"
            f"gateway v{voice.gateway_version if voice.gateway_version is not None else '?'}\n"
            f"latency {latency}"
        ),
    )
    if voice.dave_protocol_version > 0:
        dave = f"protocol {voice.dave_protocol_version}, " + (
            "encrypting" if voice.dave_encrypting else "not encrypting yet"
        )
    else:
        dave = "off (not end-to-end encrypted)"
    if voice.dave_protocol_version > 0 or player.holds:
        # How often and how long the track waited for the DAVE group (nothing is sent as
        # plaintext meanwhile); frames withheld as silence would mean a sender that did not wait.
        dave += f"\nheld for the group {player.holds} times ({player.held_ms / 1e3:.1f} s)"
    if voice.dave_withheld_frames:
        dave += f"\nwithheld {voice.dave_withheld_frames} frames"
    embed.add_field(name="DAVE", value=dave)
    return embed


def announce_embed(track: Track) -> discord.Embed:
    """The short "now playing" post sent to the channel where /play ran."""
    embed = discord.Embed(
        description=f"Now playing {track_line(None, track)}",
        colour=discord.Colour.blurple(),
    )
    if track.thumbnail and _is_http(track.thumbnail):
        embed.set_thumbnail(url=track.thumbnail)
    return embed


def queue_pages(count: int, per_page: int = QUEUE_PAGE_SIZE) -> int:
    """How many pages ``count`` upcoming tracks fill (at least one)."""
    return max(1, math.ceil(count / per_page))


def queue_embed(
    current: Track | None,
    upcoming: Sequence[Track],
    *,
    page: int,
    loop: str,
    per_page: int = QUEUE_PAGE_SIZE,
) -> discord.Embed:
    """One page of /queue: what plays now, up to ``per_page`` upcoming tracks and totals.

    ``page`` counts from 0 and is clamped to the pages that exist.
    """
    pages = queue_pages(len(upcoming), per_page)
    page = min(max(0, page), pages - 1)
    start = page * per_page
    lines = [track_line(start + i + 1, t) for i, t in enumerate(upcoming[start : start + per_page])]
    body = "\n".join(lines) if lines else "Nothing queued."
    if current is not None:
        body = f"**Now:** {track_line(None, current)}\n\n{body}"
    known = [t.duration for t in upcoming if t.duration is not None]
    total = format_time(sum(known)) if len(known) == len(upcoming) else "unknown"
    embed = discord.Embed(
        title="Queue",
        description=_cut(body, EMBED_DESCRIPTION_LIMIT),
        colour=discord.Colour.blurple(),
    )
    embed.set_footer(
        text=f"Page {page + 1}/{pages} · {len(upcoming)} queued · {total} · loop: {loop}"
    )
    return embed


def _is_http(url: str) -> bool:
    return re.fullmatch(r"https?://\S{1,2000}", url) is not None
