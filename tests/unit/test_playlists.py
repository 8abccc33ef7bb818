"""Plain M3U and PLS playlists are read as lists of tracks; HLS playlists are left alone."""

from __future__ import annotations

from legato.audio.playlists import PlaylistEntry, looks_like_playlist, parse_playlist

BASE = "https://radio.example/lists/top.m3u"


def test_extended_m3u_gives_titles_lengths_and_absolute_urls() -> None:
    text = (
        "\ufeff#EXTM3U\n#EXTINF:181,Artist - One\none.mp3\n\n"
        "#EXTINF:-1,Live\nhttp://a.example/live\n"
    )
    assert parse_playlist(text, BASE) == [
        PlaylistEntry("https://radio.example/lists/one.mp3", "Artist - One", 181.0),
        PlaylistEntry("http://a.example/live", "Live", None),
    ]


def test_plain_m3u_is_one_url_a_line() -> None:
    text = "# a comment\nhttp://a.example/1.mp3\r\n/abs/2.ogg\n"
    assert [e.url for e in parse_playlist(text, BASE) or []] == [
        "http://a.example/1.mp3",
        "https://radio.example/abs/2.ogg",
    ]


def test_pls_entries_in_number_order() -> None:
    text = (
        "[playlist]\nFile2=b.mp3\nTitle2=B\nLength2=-1\nFile1=http://a.example/a.mp3\n"
        "Title1=A\nLength1=200\nNumberOfEntries=2\nVersion=2\n"
    )
    assert parse_playlist(text, BASE) == [
        PlaylistEntry("http://a.example/a.mp3", "A", 200.0),
        PlaylistEntry("https://radio.example/lists/b.mp3", "B", None),
    ]


def test_hls_is_not_a_plain_playlist() -> None:
    media = "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\nseg0.ts\n#EXT-X-ENDLIST\n"
    master = "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\nlow.m3u8\n"
    assert parse_playlist(media, BASE) is None
    assert parse_playlist(master, BASE) is None


def test_other_text_is_not_a_playlist_but_an_empty_extm3u_is_an_empty_one() -> None:
    assert parse_playlist("", BASE) is None
    assert parse_playlist("<html><body>Not found</body></html>\n", BASE) is None
    assert parse_playlist("just some words\n", BASE) is None
    assert parse_playlist("#EXTM3U\n", BASE) == []


def test_playlist_paths() -> None:
    assert looks_like_playlist("http://a.example/x.M3U?token=1")
    assert looks_like_playlist("http://a.example/x.pls")
    assert looks_like_playlist("http://a.example/x.m3u8")
    assert not looks_like_playlist("http://a.example/x.mp3?list=a.m3u")
