"""The seam between the player and whatever carries its frames (the voice client, or a test)."""

from __future__ import annotations

from typing import Final, Protocol, runtime_checkable

#: One Opus frame of silence; five of them are sent before speaking goes off so that the
#: receiver's decoder does not interpolate from the last audible frame.
OPUS_SILENCE: Final = b"\xf8\xff\xfe"
SILENCE_FRAMES: Final = 5


class FrameSink(Protocol):
    """Receives the player's output, in order, on the event loop."""

    async def set_speaking(self, speaking: bool) -> None:
        """Announce speaking on or off; awaited before the first frame that follows it."""

    def send_frame(self, opus: bytes) -> None:
        """Send one 20 ms Opus frame now. Must not block; a dropped frame is the sink's to count."""


@runtime_checkable
class LinkCounters(Protocol):
    """A sink that counts how often its link was re-established (the voice client does)."""

    @property
    def reconnects(self) -> int:
        """Times the link was opened again after the first time (resumes included)."""

    @property
    def resumes(self) -> int:
        """Of those, how many resumed the session instead of starting a new one."""


@runtime_checkable
class SendGate(Protocol):
    """A sink that cannot take media yet at times: the voice client while DAVE end-to-end
    encryption is negotiated but its group is not in force (a frame would go out as plaintext,
    which Discord's receivers drop and which leaks the audio).

    The player holds its track while ``can_send`` is false: it sends nothing and consumes no
    frame, then starts from where it was once :meth:`wait_can_send` returns.
    """

    @property
    def can_send(self) -> bool:
        """Whether a frame sent now would go out as it should (encrypted when it must be)."""

    async def wait_can_send(self) -> None:
        """Return once ``can_send`` is true (at once if it is)."""
