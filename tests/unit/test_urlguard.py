"""UrlPolicy: schemes, address spellings, embedded IPv4, domain lists, exceptions, headers."""

from __future__ import annotations

import ipaddress
import logging
import socket

import pytest

from legato.audio.urlguard import (
    NOT_ALLOWED,
    UNKNOWN_HOST,
    UrlPolicy,
    address_problem,
    canonical_hosts,
)
from legato.errors import ResolveError

DEFAULT = UrlPolicy()

REFUSED = [
    # local and odd schemes
    "file:///etc/passwd",
    "FILE:///etc/passwd",
    "ftp://example.com/a.mp3",
    "gopher://example.com/",
    "data:audio/mp3;base64,AAAA",
    "javascript:alert(1)",
    "example.com/a.mp3",
    # loopback in every spelling getaddrinfo accepts
    "http://127.0.0.1/",
    "http://127.8.9.10:8080/x",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0x7f.1/",
    "http://0177.0.0.1/",
    "http://0177.0.0.01/",
    "http://127.1/",
    "http://127.0.1/",
    "http://127.0.0.1./",
    "http://[::1]/",
    "http://[0:0:0:0:0:0:0:1]/",
    "http://localhost/",
    "http://LOCALHOST:80/",
    "http://media.localhost/",
    "http://127\u30020\u30020\u30021/",  # ideographic full stops: IDNA reads them as dots
    "http://\uff11\uff12\uff17.0.0.1/",  # full-width digits
    # link-local, metadata
    "http://169.254.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",
    "http://[fd00:ec2::254]/",
    "http://2852039166/",  # 169.254.169.254 as one number
    # private, CGNAT, unspecified, multicast, reserved, broadcast
    "http://10.0.0.1/",
    "http://10.1/",
    "http://172.16.0.1/",
    "http://172.31.255.255/",
    "http://192.168.1.1/",
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://100.64.0.1/",
    "http://100.127.255.254/",
    "http://0.0.0.0/",
    "http://0/",
    "http://[::]/",
    "http://224.0.0.1/",
    "http://239.255.255.250/",
    "http://[ff02::1]/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    "http://198.18.0.1/",
    # IPv6 forms embedding a refused IPv4 address
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:10.0.0.1]/",
    "http://[::127.0.0.1]/",
    "http://[2002:7f00:1::]/",
    "http://[2002:a9fe:a9fe::]/",
    "http://[64:ff9b::10.0.0.1]/",
    # userinfo and parser differentials
    "http://evil@127.0.0.1/",
    "http://example.com@127.0.0.1/",
    "http://user:pass@example.com/",
    "http://127.0.0.1\\@example.com/",
    "http://exa mple.com/",
    "http://example.com\t/",
    "http://exam\nple.com/",
    "http://example.com:99999/",
    "http://example.com:port/",
    # malformed numeric hosts
    "http://1.2.3.4.5/",
    "http://08.0.0.1/",
    "http://256.0.0.1/",
    "http://1.2.3.256/",
    "http:///nohost",
    "http://[::1/",
]

ALLOWED = [
    "http://example.com/a.mp3",
    "https://www.example.com:8443/watch?v=1&list=2#t=3",
    "https://8.8.8.8/",
    "http://[2001:4860:4860::8888]/",
    "http://93.184.216.34./",
    "https://b\u00fccher.example/",  # IDNA
    "https://xn--bcher-kva.example/",
    "HTTPS://EXAMPLE.COM/UPPER",
]


@pytest.mark.parametrize("url", REFUSED)
def test_refused(url: str) -> None:
    with pytest.raises(ResolveError) as info:
        DEFAULT.check_url(url)
    assert info.value.user_message == NOT_ALLOWED
    assert "refused" in str(info.value)


@pytest.mark.parametrize("url", ALLOWED)
def test_allowed(url: str) -> None:
    DEFAULT.check_url(url)


def test_refusal_is_logged_with_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="legato.audio.urlguard")
    with pytest.raises(ResolveError, match=r"127\.0\.0\.1 is loopback"):
        DEFAULT.check_url("http://0x7f.1/")
    assert any("127.0.0.1 is loopback" in r.getMessage() for r in caplog.records)


def test_log_detail_of_a_giant_url_is_bounded() -> None:
    with pytest.raises(ResolveError) as info:
        DEFAULT.check_url("gopher://" + "a" * 100_000)
    assert len(str(info.value)) < 400


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::ffff:127.0.0.1", "loopback (127.0.0.1 embedded)"),
        ("169.254.169.254", "a cloud metadata address"),
        ("::ffff:169.254.169.254", "a cloud metadata address (169.254.169.254 embedded)"),
        ("100.64.0.1", "shared (CGNAT)"),
        ("10.0.0.1", "private"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("8.8.8.8", None),
        ("2001:4860:4860::8888", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_address_problem(address: str, reason: str | None) -> None:
    assert address_problem(ipaddress.ip_address(address)) == reason


# --- allow_private, local files -------------------------------------------------------------


def test_allow_private_still_refuses_metadata() -> None:
    policy = UrlPolicy(allow_private=True)
    for url in ("http://127.0.0.1:8000/a.mp3", "http://10.1.2.3/", "http://localhost/x"):
        policy.check_url(url)
    for url in (
        "http://169.254.169.254/",
        "http://[fd00:ec2::254]/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://2852039166/",
    ):
        with pytest.raises(ResolveError, match="metadata"):
            policy.check_url(url)


def test_local_files_only_when_allowed() -> None:
    policy = UrlPolicy(allow_local_files=True)
    policy.check_url("file:///music/a.flac")
    policy.check_url("file://localhost/music/a.flac")
    with pytest.raises(ResolveError, match="another machine"):
        policy.check_url("file://fileserver/share/a.flac")
    with pytest.raises(ResolveError, match="scheme 'file'"):
        DEFAULT.check_url("file:///music/a.flac")


def test_custom_schemes() -> None:
    UrlPolicy(allowed_schemes=("https",)).check_url("https://example.com/")
    with pytest.raises(ResolveError, match="scheme 'http'"):
        UrlPolicy(allowed_schemes=("https",)).check_url("http://example.com/")


# --- domain lists ---------------------------------------------------------------------------


DOMAINS = UrlPolicy(allowed_domains=("example.com", "SoundCloud.com.", "b\u00fccher.example"))


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/",
        "https://a.example.com/",
        "https://a.b.example.com:8443/x",
        "https://EXAMPLE.COM./",
        "https://soundcloud.com/artist/track",
        "https://m.soundcloud.com/",
        "https://xn--bcher-kva.example/",
        "https://www.b\u00fccher.example/",
    ],
)
def test_domain_list_allows_the_domains_and_their_subdomains(url: str) -> None:
    DOMAINS.check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://badexample.com/",
        "https://example.com.evil.net/",
        "https://example.co/",
        "https://com/",
        "https://notsoundcloud.com/",
        "https://93.184.216.34/",  # addresses are never "in" a domain list
        "https://[2606:2800:220:1::]/",
        "https://evil.net/?u=https://example.com/",
        "https://evil.net/#example.com",
        "https://example.com@evil.net/",
    ],
)
def test_domain_list_refuses_lookalikes(url: str) -> None:
    with pytest.raises(ResolveError) as info:
        DOMAINS.check_url(url)
    assert info.value.user_message == NOT_ALLOWED


def test_empty_domain_list_allows_every_host() -> None:
    UrlPolicy(allowed_domains=()).check_url("https://anything.example.org/")


def test_bad_policy_entries_are_rejected() -> None:
    with pytest.raises(ValueError, match="address, not a domain"):
        UrlPolicy(allowed_domains=("127.0.0.1",))
    with pytest.raises(ValueError, match="host or host:port"):
        UrlPolicy(allowed_hosts=("user@host",))
    with pytest.raises(ValueError, match="max_redirects"):
        UrlPolicy(max_redirects=-1)


# --- exact host exceptions ------------------------------------------------------------------


def test_allowed_hosts_are_exact_host_and_port() -> None:
    policy = UrlPolicy(allowed_hosts=("127.0.0.1:8000", "[::1]:9000", "media.localhost"))
    policy.check_url("http://127.0.0.1:8000/a.mp3")
    policy.check_url("http://2130706433:8000/a.mp3")  # the same address spelt otherwise
    policy.check_url("http://[::1]:9000/a.mp3")
    policy.check_url("http://media.localhost:1234/a.mp3")  # no port given: any port
    for url in (
        "http://127.0.0.1:8001/",
        "http://127.0.0.1/",
        "http://127.0.0.2:8000/",
        "http://localhost:8000/",
        "http://[::1]:8000/",
        "http://other.localhost/",
    ):
        with pytest.raises(ResolveError):
            policy.check_url(url)


def test_allowed_host_default_port_follows_the_scheme() -> None:
    policy = UrlPolicy(allowed_hosts=("10.0.0.5:443",))
    policy.check_url("https://10.0.0.5/")
    with pytest.raises(ResolveError):
        policy.check_url("http://10.0.0.5/")


def test_allowed_hosts_skip_the_domain_list() -> None:
    policy = UrlPolicy(allowed_domains=("example.com",), allowed_hosts=("127.0.0.1:8000",))
    policy.check_url("http://127.0.0.1:8000/a.mp3")
    with pytest.raises(ResolveError):
        policy.check_url("http://127.0.0.1:8001/a.mp3")


@pytest.mark.parametrize(
    "entry",
    [
        "http://127.0.0.1:8000/",
        "127.0.0.1:8000/x",
        "h.lan?q",
        "h.lan:0",
        "::1",
        "[10.0.0.1]",
        "a_b",
    ],
)
def test_allowed_hosts_refuses_what_is_not_host_or_host_port(entry: str) -> None:
    with pytest.raises(ValueError, match="host or host:port"):
        UrlPolicy(allowed_hosts=(entry,))
    with pytest.raises(ValueError, match="host or host:port"):
        canonical_hosts([entry])


def test_canonical_hosts() -> None:
    assert canonical_hosts(["LOCALHOST", "0x7f.1:80", "[::1]:9"]) == (
        "localhost",
        "127.0.0.1:80",
        "[::1]:9",
    )
    # The canonical forms mean what they meant.
    policy = UrlPolicy(allowed_hosts=canonical_hosts(["0x7f.1:80", "[::1]:9"]))
    policy.check_url("http://127.0.0.1/")
    policy.check_url("http://[::1]:9/")


# --- DNS answers (the machine's resolver: /etc/hosts, no network) ---------------------------


def _own_name() -> tuple[str, list[str]]:
    """The machine's host name and what it resolves to (it is never a public address here)."""
    name = socket.gethostname()
    try:
        answers = socket.getaddrinfo(name, 80, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return name, []
    return name, sorted({str(a[4][0]) for a in answers})


def test_names_resolving_to_internal_addresses_are_refused() -> None:
    # The host name escapes every rule about names; only its DNS answer gives it away, and the
    # answer is judged where the connection is made: nothing is connected to when it is refused.
    name, addresses = _own_name()
    DEFAULT.check_url(f"http://{name}/a.mp3")
    with pytest.raises(ResolveError) as info:
        DEFAULT.connect((name, 80), 2.0)
    if addresses:
        assert f"{name} resolves to " in str(info.value)
        assert info.value.user_message == NOT_ALLOWED
        # Allowed, it is connected to: port 1 refuses, which is the socket's answer, not ours.
        with pytest.raises(ConnectionRefusedError):
            UrlPolicy(allow_private=True).connect((name, 1), 2.0)
    else:
        assert info.value.user_message == UNKNOWN_HOST
    with pytest.raises(ResolveError, match="loopback name"):
        DEFAULT.connect(("localhost.", 80), 2.0)


def test_names_that_do_not_resolve_say_so() -> None:
    with pytest.raises(ResolveError) as info:
        DEFAULT.connect(("no-such-host.invalid", 80), 2.0)
    assert info.value.user_message == UNKNOWN_HOST


# --- yt-dlp answers and headers -------------------------------------------------------------


def test_check_info_checks_every_url_in_the_answer() -> None:
    good = {
        "webpage_url": "https://93.184.216.34/watch",
        "url": "https://8.8.8.8/media.webm",
        "http_headers": {"User-Agent": "x", "Referer": "https://93.184.216.34/"},
        "requested_formats": [{"url": "https://8.8.4.4/a.webm"}],
        "entries": [{"url": "https://1.1.1.1/b.mp3", "webpage_url": "https://1.0.0.1/"}],
    }
    DEFAULT.check_info(good)
    bad_cases: list[dict[str, object]] = [
        {**good, "webpage_url": "http://127.0.0.1/after-redirect"},
        {**good, "url": "http://169.254.169.254/latest/meta-data/"},
        {**good, "requested_formats": [{"url": "http://[::1]/a.webm"}]},
        {**good, "entries": [{"url": "http://10.0.0.1/b.mp3"}]},
        {**good, "entries": [{"webpage_url": "http://2130706433/"}]},
        {**good, "http_headers": {"Host": "internal.service"}},
        {**good, "http_headers": {"Referer": "https://x/\r\nX-Injected: 1"}},
    ]
    for bad in bad_cases:
        with pytest.raises(ResolveError) as info:
            DEFAULT.check_info(bad)
        assert info.value.user_message == NOT_ALLOWED


def test_check_info_trusts_a_configured_page_but_not_what_it_lists() -> None:
    page = {"webpage_url": "http://127.0.0.1:9/search?q=x", "entries": []}
    DEFAULT.check_info(page, trusted_page=True)
    with pytest.raises(ResolveError):
        DEFAULT.check_info(page)
    listing = {**page, "entries": [{"url": "http://127.0.0.1:9/a.mp3"}]}
    with pytest.raises(ResolveError):
        DEFAULT.check_info(listing, trusted_page=True)
