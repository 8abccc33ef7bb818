"""Message components of the Music cog: the /queue pager."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any, Final

import discord

from legato.errors import LegatoError

__all__ = ["NEXT_ID", "PREV_ID", "QueuePager"]

_log = logging.getLogger(__name__)

#: Prefixes of the pager buttons' custom ids (a per-message suffix follows).
PREV_ID: Final = "legato:queue:prev"
NEXT_ID: Final = "legato:queue:next"

#: Renders page ``n`` (clamped by the renderer) and returns the embed and the page count.
PageRenderer = Callable[[int], tuple[discord.Embed, int]]


class QueuePager(discord.ui.View):
    """Previous/next buttons under a /queue embed; only whoever ran /queue may page.

    Each press renders the queue as it is then, so the pages follow the live queue.

    Args:
        owner_id: The user who ran /queue.
        render: Builds one page.
        pages: How many pages the first render had.
        timeout: Seconds of inactivity before the buttons go grey.
    """

    def __init__(
        self, owner_id: int, render: PageRenderer, pages: int, *, timeout: float = 180.0
    ) -> None:
        super().__init__(timeout=timeout)
        self.owner_id = owner_id
        self.page = 0
        self._render = render
        self.message: discord.InteractionMessage | None = None
        # Unique per pager: two /queue messages in one channel must not share custom ids.
        nonce = secrets.token_hex(4)
        self.prev_button.custom_id = f"{PREV_ID}:{nonce}"
        self.next_button.custom_id = f"{NEXT_ID}:{nonce}"
        self._sync(pages)

    def _sync(self, pages: int) -> None:
        self.page = min(max(0, self.page), pages - 1)
        self.prev_button.disabled = self.page <= 0
        self.next_button.disabled = self.page >= pages - 1

    async def interaction_check(self, interaction: discord.Interaction[Any]) -> bool:
        if interaction.user.id == self.owner_id:
            return True
        await interaction.response.send_message(
            f"Only <@{self.owner_id}> can turn these pages; run /queue to get your own.",
            ephemeral=True,
            allowed_mentions=discord.AllowedMentions.none(),
        )
        return False

    async def _turn(self, interaction: discord.Interaction[Any], step: int) -> None:
        _, pages = self._render(self.page)
        self.page = min(max(0, self.page + step), pages - 1)
        embed, pages = self._render(self.page)
        self._sync(pages)
        await interaction.response.edit_message(embed=embed, view=self)

    @discord.ui.button(label="Previous", emoji="◀️", custom_id=PREV_ID)
    async def prev_button(
        self, interaction: discord.Interaction[Any], _: discord.ui.Button[QueuePager]
    ) -> None:
        await self._turn(interaction, -1)

    @discord.ui.button(label="Next", emoji="▶️", custom_id=NEXT_ID)
    async def next_button(
        self, interaction: discord.Interaction[Any], _: discord.ui.Button[QueuePager]
    ) -> None:
        await self._turn(interaction, +1)

    async def on_timeout(self) -> None:
        if self.message is None:
            return
        for item in self.children:
            if isinstance(item, discord.ui.Button):
                item.disabled = True
        try:
            await self.message.edit(view=self)
        except discord.HTTPException as exc:
            # The message may be gone; the buttons then no longer matter.
            _log.debug("could not grey out the queue pager: %s", exc)

    async def on_error(
        self,
        interaction: discord.Interaction[Any],
        error: Exception,
        item: discord.ui.Item[Any],
    ) -> None:
        if isinstance(error, LegatoError):
            message = error.user_message
        else:
            _log.error("queue pager failed", exc_info=error)
            message = "Something went wrong turning the page."
        if interaction.response.is_done():
            await interaction.followup.send(message, ephemeral=True)
        else:
            await interaction.response.send_message(message, ephemeral=True)
