"""What the cog shows: time parsing, progress bars, safe titles within Discord's embed limits."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legato.audio.track import Track
from legato.cogs.format import (
    BUFFERING_NOTE,
    EMBED_DESCRIPTION_LIMIT,
    EMBED_TITLE_LIMIT,
    EMBED_TOTAL_LIMIT,
    LOADING_NOTE,
    BadInput,
    embed_length,
    format_time,
    now_playing_embed,
    over_limit,
    parse_position,
    progress_bar,
    queue_embed,
    queue_pages,
    safe_text,
    track_line,
    utf16_len,
)

# --- time -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0:00"), (5.9, "0:05"), (83, "1:23"), (3723, "1:02:03"), (-4, "0:00"), (None, "?:??")],
)
def test_format_time(seconds: float | None, text: str) -> None:
    assert format_time(seconds) == text


@pytest.mark.parametrize(
    ("text", "current", "expected"),
    [
        ("83", 0, 83.0),
        ("1:23", 0, 83.0),
        ("01:23", 50, 83.0),
        ("1:02:03", 0, 3723.0),
        ("0:00", 100, 0.0),
        ("+10", 30, 40.0),
        ("-5", 30, 25.0),
        ("-50", 30, 0.0),  # clamped at the start
        ("+1:00", 30, 90.0),
        (" 12.5 ", 0, 12.5),
        ("+ 10", 1, 11.0),
    ],
)
def test_parse_position(text: str, current: float, expected: float) -> None:
    assert parse_position(text, current=current, duration=4000) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "abc",
        "1:2:3:4",
        "1:60",
        "1:60:00",
        "--5",
        "+",
        "1.2.3",
        "١٢",
        "1e3",
        "10s",
        ":30",
    ],
)
def test_parse_position_rejects_junk(text: str) -> None:
    with pytest.raises(BadInput) as info:
        parse_position(text, current=0, duration=4000)
    assert "is not a position" in info.value.user_message
    assert "`1:23`" in info.value.user_message


def test_parse_position_past_the_end() -> None:
    with pytest.raises(BadInput) as info:
        parse_position("+30", current=100, duration=120)
    assert info.value.user_message == "2:10 is past the end of the track (2:00 long)."


def test_parse_position_unknown_duration_allows_any_forward() -> None:
    assert parse_position("9:00:00", current=0, duration=None) == 32400.0


def test_parse_position_echo_is_safe() -> None:
    with pytest.raises(BadInput) as info:
        parse_position("@everyone `x` " + "z" * 500, current=0, duration=None)
    message = info.value.user_message
    assert "@everyone" not in message
    assert len(message) < 300


# --- progress ---------------------------------------------------------------------------------


def test_progress_bar_positions() -> None:
    assert progress_bar(0, 100, width=10) == "●───────── 0:00 / 1:40"
    assert progress_bar(50, 100, width=10) == "━━━━━●──── 0:50 / 1:40"
    assert progress_bar(100, 100, width=10) == "━━━━━━━━━● 1:40 / 1:40"
    assert progress_bar(500, 100, width=10) == "━━━━━━━━━● 1:40 / 1:40"
    assert progress_bar(-3, 100, width=10).startswith("●")


def test_progress_bar_live_and_unknown_length() -> None:
    assert progress_bar(65, None, live=True) == "🔴 live · 1:05"
    assert progress_bar(65, 300, live=True) == "🔴 live · 1:05"
    assert progress_bar(65, None) == "1:05 / ?:??"
    assert progress_bar(65, 0) == "1:05 / ?:??"


def test_track_line_says_live_only_for_live_streams() -> None:
    radio = Track(url="/radio", title="radio", duration=None, live=True)
    assert track_line(1, radio) == "`1.` radio · 🔴 live"
    assert track_line(2, Track(url="/f.mp3", title="file", duration=None)) == "`2.` file · ?:??"


@given(st.floats(0, 1e6), st.floats(0.001, 1e6), st.integers(2, 40))
def test_progress_bar_always_has_one_head(position: float, duration: float, width: int) -> None:
    bar = progress_bar(position, duration, width=width).split(" ")[0]
    assert len(bar) == width
    assert bar.count("●") == 1


# --- text -------------------------------------------------------------------------------------


def test_safe_text_keeps_plain_titles() -> None:
    assert safe_text("Never Gonna Give You Up", 100) == "Never Gonna Give You Up"
    assert safe_text("Café — Ünïcödé 日本語 🎵", 100) == "Café — Ünïcödé 日本語 🎵"


def test_safe_text_truncates_giant_titles() -> None:
    out = safe_text("x" * 1_000_000, EMBED_TITLE_LIMIT)
    assert utf16_len(out) == EMBED_TITLE_LIMIT
    assert out.endswith("…")


def test_safe_text_counts_astral_characters_as_two() -> None:
    out = safe_text("🎵" * 300, 11)
    assert out == "🎵" * 5 + "…"
    assert utf16_len(out) == 11


def test_safe_text_never_splits_marks_from_their_letter() -> None:
    cluster = "b\u0301\u0302"  # no precomposed form: three code points on screen as one
    assert safe_text(cluster * 40, 10) == cluster * 3 + "…"
    # A cut inside the third cluster drops it whole rather than leaving a bare "b" or a mark.
    assert safe_text(cluster * 40, 9) == cluster * 2 + "…"
    assert safe_text(cluster * 40, 8) == cluster * 2 + "…"


def test_safe_text_caps_zalgo() -> None:
    zalgo = "Z" + "\u0336\u0337\u0338\u0339\u033a" * 40 + "a"
    out = safe_text(zalgo, 100)
    assert out.startswith("Z")
    marks = sum(1 for ch in out if unicodedata.category(ch).startswith("M"))
    assert marks == 3
    assert out.endswith("a")


def test_safe_text_removes_bidi_and_zero_width() -> None:
    evil = "abc\u202edcba\u2066x\u2069\u200b\u200e\ufeffz\u00ad"
    assert safe_text(evil, 100) == "abcdcbaxz"


def test_safe_text_keeps_rtl_script() -> None:
    assert safe_text("שלום עולם مرحبا", 100) == "שלום עולם مرحبا"


def test_safe_text_collapses_control_and_whitespace() -> None:
    assert safe_text("a\n\n\tb\x00\x07c\r\n", 100) == "a b c"


def test_safe_text_escapes_markdown_and_mentions() -> None:
    out = safe_text("**bold** [x](http://evil) `code` @everyone <@123>", 200)
    assert "\\*\\*bold\\*\\*" in out
    assert "\\[x\\]" in out
    assert "@everyone" not in out
    assert out.count("`") == out.count("\\`")


def test_safe_text_does_not_end_in_lone_backslash() -> None:
    out = safe_text("a" * 8 + "*" * 10, 10)
    assert out.endswith("…")
    before = out[:-1]
    assert (len(before) - len(before.rstrip("\\"))) % 2 == 0


def test_safe_text_zwj_emoji_not_cut_dangling() -> None:
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    out = safe_text(family * 10, 6)
    assert not out[:-1].endswith("\u200d")


unicode_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=3000
)


@settings(max_examples=200)
@given(unicode_text, st.integers(2, 300))
def test_safe_text_fits_any_input(text: str, limit: int) -> None:
    out = safe_text(text, limit)
    assert utf16_len(out) <= limit
    assert not any(unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn") for ch in out)
    assert "\u202e" not in out
    if out:
        assert not unicodedata.category(out[0]).startswith("M")


# --- embeds -----------------------------------------------------------------------------------

GIANT = ("🎶 Z\u0336\u0337\u0338 \u202e" + "x" * 50 + "*[`]") * 2000


def giant_track(i: int = 0) -> Track:
    return Track(
        url=f"https://media.test/{i}",
        title=GIANT,
        duration=3600.0 + i,
        page_url=f"https://media.test/page/{i}",
        thumbnail="https://media.test/thumb.png",
        requester_id=1000 + i,
    )


def test_now_playing_embed_fields() -> None:
    track = Track(
        url="https://media.test/a.ogg",
        title="Tone [440 Hz]",
        duration=120.0,
        thumbnail="https://media.test/t.png",
        requester_id=42,
    )
    embed = now_playing_embed(track, position=30.0, volume=80, loop="queue")
    assert embed.title == "Tone \\[440 Hz\\]"
    assert embed.url == "https://media.test/a.ogg"
    assert embed.description is not None
    assert "0:30 / 2:00" in embed.description
    values = {f.name: f.value for f in embed.fields}
    assert values == {"Requested by": "<@42>", "Loop": "queue", "Volume": "80%"}
    assert embed.thumbnail.url == "https://media.test/t.png"


def test_now_playing_embed_says_when_the_player_waits_for_the_server() -> None:
    track = Track(url="https://media.test/a.mp3", title="a", duration=60.0)
    buffering = now_playing_embed(track, position=5.0, volume=100, loop="off", waiting="buffering")
    assert buffering.author.name == "Buffering"
    assert buffering.description == f"{BUFFERING_NOTE}\n{progress_bar(5.0, 60.0)}"
    assert "slower than real time" in BUFFERING_NOTE
    loading = now_playing_embed(track, position=0.0, volume=100, loop="off", waiting="loading")
    assert loading.author.name == "Buffering"
    assert loading.description is not None
    assert loading.description.startswith(LOADING_NOTE)
    # Paused says paused, whatever the server does.
    paused = now_playing_embed(
        track, position=5.0, volume=100, loop="off", paused=True, waiting="buffering"
    )
    assert paused.author.name == "Paused"


def test_now_playing_embed_refuses_non_http_thumbnail() -> None:
    track = Track(url="/tmp/a.ogg", title="a", thumbnail="file:///etc/passwd")
    embed = now_playing_embed(track, position=0, volume=100, loop="off", paused=True)
    assert embed.thumbnail.url is None
    assert embed.url is None
    assert embed.author.name == "Paused"


def test_giant_titles_stay_within_embed_limits() -> None:
    embed = now_playing_embed(giant_track(), position=10, volume=100, loop="off")
    assert utf16_len(embed.title or "") <= EMBED_TITLE_LIMIT
    assert embed_length(embed) <= EMBED_TOTAL_LIMIT
    queue = [giant_track(i) for i in range(35)]
    for page in range(queue_pages(len(queue))):
        q = queue_embed(giant_track(99), queue, page=page, loop="off")
        assert utf16_len(q.description or "") <= EMBED_DESCRIPTION_LIMIT
        assert embed_length(q) <= EMBED_TOTAL_LIMIT


def test_queue_embed_pages() -> None:
    tracks = [
        Track(url=f"https://m.test/{i}", title=f"t{i}", duration=60.0, requester_id=7)
        for i in range(23)
    ]
    assert queue_pages(23) == 3
    assert queue_pages(0) == 1
    first = queue_embed(None, tracks, page=0, loop="off")
    assert first.description is not None
    assert first.description.splitlines()[0].startswith("`1.` [t0](https://m.test/0)")
    assert first.footer.text == "Page 1/3 · 23 queued · 23:00 · loop: off"
    last = queue_embed(tracks[0], tracks, page=7, loop="track")  # clamped to the last page
    assert last.description is not None
    assert last.description.startswith("**Now:** [t0]")
    assert "`21.` [t20]" in last.description
    assert "`23.` [t22]" in last.description
    assert "t19" not in last.description
    assert last.footer.text is not None
    assert last.footer.text.startswith("Page 3/3")


def test_queue_embed_empty_and_unknown_total() -> None:
    empty = queue_embed(None, [], page=0, loop="off")
    assert empty.description == "Nothing queued."
    live = Track(url="https://m.test/live", title="radio", duration=None, live=True)
    q = queue_embed(None, [live], page=0, loop="off")
    assert q.footer.text == "Page 1/1 · 1 queued · unknown · loop: off"


def test_track_line_without_http_url_is_plain() -> None:
    line = track_line(1, Track(url="/music/a.ogg", title="local", duration=5.0))
    assert line == "`1.` local · 0:05"


def test_empty_title_falls_back_to_url() -> None:
    line = track_line(None, Track(url="https://m.test/x", title="\u200b\u202e", duration=None))
    assert line.startswith("[https://m.test/x](https://m.test/x)")


@pytest.mark.parametrize(
    ("length", "limit", "over"),
    [(10800.0065, 10800, False), (10800.999, 10800, False), (10801, 10800, True), (5, 0.5, True)],
)
def test_over_limit_compares_the_seconds_shown(length: float, limit: float, over: bool) -> None:
    assert over_limit(length, limit) is over
    assert (format_time(length) != format_time(limit)) is over
