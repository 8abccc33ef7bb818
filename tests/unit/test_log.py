"""Logging helpers: guild ids on every line, and the token never in a log."""

from __future__ import annotations

import logging

import pytest

from legato.log import RedactToken, escape_text, guild_logger


def test_guild_logger_prefixes_and_tags(caplog: pytest.LogCaptureFixture) -> None:
    log = guild_logger("legato.test", 1234)
    with caplog.at_level(logging.INFO, logger="legato.test"):
        log.info("joined %s", "General")
    (record,) = caplog.records
    assert record.getMessage() == "[guild 1234] joined General"
    assert record.guild_id == 1234  # type: ignore[attr-defined]  # added through `extra`


def test_redact_token_in_message_and_args() -> None:
    token = "MTIzNDU2.secret-part.xyz"
    flt = RedactToken(token)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "sent %s", (f"auth {token}",), None)
    assert flt.filter(record)
    assert record.getMessage() == "sent auth [redacted]"
    assert token not in record.getMessage()


def test_redact_leaves_other_records_alone() -> None:
    flt = RedactToken("MTIzNDU2.secret-part.xyz")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "count %d", (3,), None)
    assert flt.filter(record)
    assert record.args == (3,)
    assert record.getMessage() == "count 3"


def test_short_secrets_are_not_redacted() -> None:
    # A one-letter "token" would blank every message; only real-length secrets count.
    flt = RedactToken("a")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "banana", None, None)
    assert flt.filter(record)
    assert record.getMessage() == "banana"


# --- user text is escaped in every legato record ------------------------------------------------


def _message(caplog: pytest.LogCaptureFixture) -> str:
    (record,) = caplog.records
    caplog.clear()
    return record.getMessage()


def test_legato_records_escape_control_characters_in_their_arguments(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("legato.cogs.test")
    evil = "x\nERROR legato: forged\x1b[31m\r\u2028\u202e\x00"
    with caplog.at_level(logging.INFO, logger="legato"):
        log.info("query %s", evil)
        assert _message(caplog) == r"query x\nERROR legato: forged\x1b[31m\r\u2028\u202e\x00"
        log.info("query %r", evil)
        assert _message(caplog) == "query " + repr(evil)
        log.info("%(q)s at %(n)d", {"q": evil, "n": 3})
        assert "\n" not in _message(caplog)
        log.warning("failed: %s", ValueError(f"bad {evil}"))
        assert _message(caplog) == r"failed: bad x\nERROR legato: forged\x1b[31m\r\u2028\u202e\x00"
        # Numbers keep their formats; printable text is untouched; the format string is code.
        log.info("%d frames, %.1f ms, %s\ttab", 5, 2.25, "plain text")
        assert _message(caplog) == "5 frames, 2.2 ms, plain text\ttab"
        guild_logger("legato.cogs.test", 7).info("joined %s", "a\nb")
        assert _message(caplog) == r"[guild 7] joined a\nb"


def test_other_loggers_records_are_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="legatox"):
        logging.getLogger("legatox").info("%s", "a\nb")
    assert _message(caplog) == "a\nb"


def test_escape_text() -> None:
    assert escape_text("plain ünïcode ✓") == "plain ünïcode ✓"
    assert escape_text("a\tb\x7f\x85\U000e0001") == r"a\tb\x7f\x85\U000e0001"
