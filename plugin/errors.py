"""The exception tree.

Every class carries ``user_message``: a short sentence that is safe to show in Discord.
``str(exc)`` holds the operator's detail (URLs, close codes, library messages) and never reaches
a reply.
"""

from __future__ import annotations

from typing import ClassVar


class LegatoError(Exception):
    """Base of every error Legato raises on purpose."""

    default_user_message: ClassVar[str] = "Something went wrong."

    def __init__(self, detail: str = "", *, user_message: str | None = None) -> None:
        super().__init__(detail or self.default_user_message)
        self.user_message: str = user_message or self.default_user_message


class ConfigError(LegatoError):
    """A configuration file or environment variable holds a value Legato cannot use."""

    default_user_message = "The music bot is misconfigured; an administrator has been told."


class VoiceError(LegatoError):
    """Anything that goes wrong on the voice connection."""

    default_user_message = "The voice connection failed."


class VoiceConnectError(VoiceError):
    """Connecting (or reconnecting) to a voice server failed or timed out."""

    default_user_message = "I could not connect to the voice channel."


class VoiceClosed(VoiceError):
    """The voice server closed the connection with a code that ends it."""

    default_user_message = "The voice server closed the connection."

    def __init__(self, code: int, detail: str = "", *, user_message: str | None = None) -> None:
        super().__init__(f"voice websocket closed with {code}: {detail}", user_message=user_message)
        self.code = code


class TransportError(VoiceError):
    """The media transport (UDP or WebRTC) failed."""

    default_user_message = "The voice connection's audio transport failed."


class AudioError(LegatoError):
    """A track could not be resolved, opened or decoded."""

    default_user_message = "That track could not be played."


class ResolveError(AudioError):
    """A query or URL could not be turned into playable tracks."""

    default_user_message = "I could not find anything playable for that."


class DecodeError(AudioError):
    """A media stream could not be opened or decoded."""

    default_user_message = "That track's audio could not be decoded."


class QueueError(LegatoError):
    """A queue operation was refused."""

    default_user_message = "That queue operation is not possible."


class QueueEmpty(QueueError):
    """The queue has nothing where something was asked for."""

    default_user_message = "The queue is empty."


class QueueFull(QueueError):
    """The queue is at its configured maximum length."""

    default_user_message = "The queue is full."


class InvalidTransition(LegatoError):
    """A state machine was asked for a move its table forbids: a bug, never shown to users."""

    def __init__(self, current: object, new: object) -> None:
        super().__init__(f"invalid transition {current!r} -> {new!r}")
        self.current = current
        self.new = new
