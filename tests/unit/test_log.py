"""Logging helpers: guild ids on every line, and the token never in a log."""

from __future__ import annotations

import logging

import pytest

from legato.log import RedactToken, guild_logger


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
