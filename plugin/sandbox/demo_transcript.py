"""The demo's conversation as a listener sees it: commands, replies, embeds, buttons, progress."""

import logging
import re
import time
from typing import Any, TextIO

from legato.sandbox.models import JSON, Message
from legato.sandbox.users import Reply, ScriptedUser
from legato.sandbox.world import World

_log = logging.getLogger(__name__)


class Transcript:
    """Print the conversation like a chat client, and a progress line that updates in place."""

    def __init__(self, out: TextIO, world: World, *, progress: bool) -> None:
        self._out = out
        self._world = world
        self._progress = progress
        self._progress_shown = False
        # Not a terminal (a log, a pipe): a progress line now and then instead of `\r` updates.
        self._in_place = out.isatty()
        self._last_plain = 0.0
        self.printed: set[int] = set()

    def line(self, text: str = "") -> None:
        """Print a line (ending any progress line first)."""
        self.end_progress()
        print(text, file=self._out, flush=True)

    def event(self, text: str) -> None:
        """Something that happened, not said: `-> alice joined General`."""
        self.line(f"  · {text}")

    def command(self, user: ScriptedUser, command: str, options: dict[str, Any]) -> None:
        """What the user typed."""
        shown = " ".join(f"{k}: {v}" for k, v in options.items())
        self.line(f"{user.name} ▸ /{command}" + (f" {shown}" if shown else ""))

    def reply(self, reply: Reply, bot_name: str) -> None:
        """The bot's answer to a command (marked when only the user sees it)."""
        message = reply.message
        if message is not None:
            self.printed.add(message.id)
        who = f"{bot_name} (only you)" if reply.ephemeral else bot_name
        self._bubble(who, reply.content, reply.embeds, reply.components)

    def message(self, message: Message, bot_name: str) -> None:
        """A message the bot posted in the channel on its own (e.g. "Now playing")."""
        self.printed.add(message.id)
        self._bubble(bot_name, message.content, message.embeds, message.components)

    def _bubble(self, who: str, content: str, embeds: list[JSON], components: list[JSON]) -> None:
        lines = [self._plain(content)] if content else []
        for embed in embeds:
            lines.extend("│ " + text for text in self._embed_lines(embed))
        labels = [c.get("label") for c in _walk(components) if c.get("type") == 2]
        if labels:
            lines.append(" ".join(f"[{label}]" for label in labels if label))
        if not lines:
            lines = ["(no text)"]
        self.line(f"    {who}: {lines[0]}")
        pad = " " * (len(who) + 6)
        for text in lines[1:]:
            self.line(pad + text)

    def _embed_lines(self, embed: JSON) -> list[str]:
        out: list[str] = []
        author = embed.get("author")
        if isinstance(author, dict) and author.get("name"):
            out.append(str(author["name"]))
        for key in ("title", "description"):
            if embed.get(key):
                out.extend(str(embed[key]).splitlines())
        out.extend(f"{f.get('name', '')}: {f.get('value', '')}" for f in embed.get("fields") or [])
        footer = embed.get("footer")
        if isinstance(footer, dict) and footer.get("text"):
            out.append(str(footer["text"]))
        return [self._plain(x) for x in out]

    def _plain(self, text: str) -> str:
        """Markdown and mentions as a client shows them."""

        def channel(m: re.Match[str]) -> str:
            found = self._world.find_channel(int(m.group(1)))
            return f"#{found.name}" if found is not None else "#deleted-channel"

        def user(m: re.Match[str]) -> str:
            found = self._world.users.get(int(m.group(1)))
            return f"@{found.name}" if found is not None else "@unknown-user"

        text = re.sub(r"<#(\d+)>", channel, text)
        text = re.sub(r"<@!?(\d+)>", user, text)
        text = re.sub(r"\[([^\]]+)\]\(<?[^)>]+>?\)", r"\1", text)  # [title](url) -> title
        return text.replace("**", "").replace("`", "")

    def progress(self, text: str) -> None:
        """Replace the progress line with `text`."""
        if not self._progress:
            return
        if not self._in_place:
            now = time.monotonic()
            if now - self._last_plain >= 2.0:
                self._last_plain = now
                print(text, file=self._out, flush=True)
            return
        self._out.write("\r" + text.ljust(78))
        self._out.flush()
        self._progress_shown = True

    def end_progress(self) -> None:
        """Finish the progress line so the next line starts clean."""
        if self._progress_shown:
            self._out.write("\n")
            self._out.flush()
            self._progress_shown = False


def _walk(components: list[JSON]) -> list[JSON]:
    found: list[JSON] = []
    for component in components:
        found.append(component)
        found.extend(_walk(list(component.get("components") or [])))
    return found


# --- the bot ----------------------------------------------------------------------------------


#: The example an owner starts from: its bot class and its configuration file are what runs.
