"""What yt-dlp needs for sites that check who is asking (YouTube), and what their refusals mean.

Since 2025.11, yt-dlp solves YouTube's JavaScript challenges with an external runtime (Deno by
default) running the EJS solver scripts (the ``yt-dlp-ejs`` package). Legato depends on
``yt-dlp[default,deno]``, which installs both, and points yt-dlp at the bundled Deno explicitly
(``js_runtimes``), in the bot's threads and in resolver worker processes alike: the options are
built here from :class:`SourceSettings`, which travels with the resolver's settings.

A server's address is often asked to sign in ("confirm you're not a bot"). The remedies are a
cookies file and a PO-token provider; ``[sources]`` configures both. The cookies file is only
read: its cookies are loaded afresh into yt-dlp's jar for each call (and the jar emptied after),
and the file is never written (yt-dlp's own ``cookiefile`` option saves the jar back on close).
Its contents are never logged, nor quoted in an error. The cookies go with yt-dlp's requests
only: the stream URL it answers with is opened without them (YouTube's are signed URLs).

:func:`classify_refusal` turns yt-dlp's text for a site's refusal into one sentence a user can
act on; :data:`REMEDIES` holds what the operator is told.
"""

from __future__ import annotations

import functools
import http.cookiejar
import importlib
import os
import re
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from legato.sourcecheck import (
    RUNTIME_KINDS,
    CookieFileError,
    check_cookie_file,
    readable_by_others,
    runtime_kind,
)

__all__ = [
    "AGE_RESTRICTED",
    "LIVE_NOT_STARTED",
    "NO_FORMAT",
    "PRIVATE",
    "REGION_BLOCKED",
    "REMEDIES",
    "REMOVED",
    "RUNTIME_KINDS",
    "SIGN_IN",
    "CookieFileError",
    "SourceSettings",
    "bundled_deno",
    "check_cookie_file",
    "classify_refusal",
    "js_runtimes",
    "read_cookies",
    "readable_by_others",
    "runtime_kind",
    "use_plugin_dirs",
    "ydl_params",
]

SIGN_IN: Final = (
    "YouTube wants me to sign in before I can play that; the bot's owner has been told."
)
AGE_RESTRICTED: Final = "That video is age-restricted, so I can't play it."
REGION_BLOCKED: Final = "That video isn't available in the country the bot runs in."
PRIVATE: Final = "That video is private."
REMOVED: Final = "That video is no longer available."
LIVE_NOT_STARTED: Final = "That live stream or premiere hasn't started yet; try again once it's on."
NO_FORMAT: Final = "I could not get playable audio for that video; the bot's owner has been told."

#: What the operator is told (a log line) when a user got one of the messages above.
REMEDIES: Final = {
    SIGN_IN: (
        "YouTube asked this bot to sign in: set `[sources] cookies_file` (cookies of a YouTube "
        "account, Netscape format) and, if it keeps asking, a PO-token provider "
        "(`[sources] pot_provider`); see README, 'Playing from YouTube'"
    ),
    AGE_RESTRICTED: (
        "YouTube wants a signed-in adult account for this video: set `[sources] cookies_file` to "
        "the cookies of an account that may watch it"
    ),
    REGION_BLOCKED: "the video is blocked in the country of the bot's address; no setting of "
    "Legato changes that",
    NO_FORMAT: (
        "yt-dlp found no playable format: check the JavaScript runtime and the EJS scripts "
        "(`python -m legato doctor`), update yt-dlp, or set a PO-token provider "
        "(`[sources] pot_provider`)"
    ),
}

# yt-dlp's text for each refusal, lower-cased: YouTube's own reasons (which yt-dlp passes on,
# curly apostrophe and all) and yt-dlp's (yt_dlp/extractor/youtube/_video.py, YoutubeDL.py,
# extractor/common.py). Order matters: "sign in to confirm your age" is about age, not bots;
# "private video. sign in if you've been granted access" (to which yt-dlp adds its cookies hint)
# and "video unavailable. this video is private" are about privacy.
_PATTERNS: Final[tuple[tuple[re.Pattern[str], str], ...]] = (
    (
        re.compile(r"confirm your age|age[- ]restricted|inappropriate for some users|age.gate"),
        AGE_RESTRICTED,
    ),
    (re.compile(r"this video is private|private video"), PRIVATE),
    (
        re.compile(
            r"not a bot|sign in to confirm|captcha|login details are needed|"
            r"only available for registered users|use --cookies"
        ),
        SIGN_IN,
    ),
    (
        re.compile(
            r"not made this video available in your country|blocked it in your country|"
            r"not available (?:from|in) your (?:location|country)|geo.?restrict"
        ),
        REGION_BLOCKED,
    ),
    (
        re.compile(r"live event will begin|premieres in|will begin in a few moments|is_upcoming"),
        LIVE_NOT_STARTED,
    ),
    (
        re.compile(
            r"has been removed|no longer available|has been terminated|video unavailable|"
            r"this video is unavailable"
        ),
        REMOVED,
    ),
    (
        re.compile(
            r"requested format is not available|only images are available|"
            r"no video formats found|drm protected|challenge solving failed"
        ),
        NO_FORMAT,
    ),
)


def classify_refusal(text: str) -> str | None:
    """The user's sentence for a site's refusal in yt-dlp's error text, or ``None``.

    Args:
        text: The error text (any case), e.g. ``str()`` of a ``DownloadError``.
    """
    low = text.lower()
    for pattern, message in _PATTERNS:
        if pattern.search(low):
            return message
    return None


@dataclass(frozen=True)
class SourceSettings:
    """What yt-dlp is given for sites that check who is asking (``[sources]``).

    Attributes:
        cookies_file: A Netscape-format cookies file, read afresh for each call; ``None``: none.
        player_clients: YouTube player clients, in order (yt-dlp's ``youtube:player_client``).
        extractor_args: More yt-dlp extractor arguments: (extractor, key, values) triples.
        pot_provider: The PO-token provider (bgutil-ytdlp-pot-provider): its HTTP server's
            ``http(s)://`` address, or the directory of its script server.
        plugin_dirs: Directories of yt-dlp plugins (a provider plugin not installed with pip).
        js_runtime: The JavaScript runtime's executable (a path, or a name looked up in
            ``PATH``); ``None``: the Deno that the ``deno`` package installs.
    """

    cookies_file: str | None = None
    player_clients: tuple[str, ...] = ()
    extractor_args: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    pot_provider: str | None = None
    plugin_dirs: tuple[str, ...] = ()
    js_runtime: str | None = None

    def __post_init__(self) -> None:
        if self.js_runtime is not None:
            runtime_kind(self.js_runtime)  # raises ValueError for a name yt-dlp cannot run


@functools.cache
def bundled_deno() -> str | None:
    """The Deno executable the ``deno`` package installed, or ``None`` (looked up once: it is
    asked at every resolve)."""
    try:
        import deno  # type: ignore[import-untyped]  # no type information shipped
    except ImportError:
        return None
    try:
        return str(deno.find_deno_bin())
    except FileNotFoundError:
        return None


# Set sysconfig up here, at import: its lazy set-up in Python 3.11 is not thread-safe, and the
# deno package (``bundled_deno``) and yt-dlp read it from the threads of several /play resolving
# at once (some got ``None`` for ``EXE`` and failed with a ``TypeError``).
sysconfig.get_config_vars()


def js_runtimes(settings: SourceSettings) -> dict[str, dict[str, str]]:
    """yt-dlp's ``js_runtimes`` option: the configured runtime, else the bundled Deno."""
    if settings.js_runtime is not None:
        return {runtime_kind(settings.js_runtime): {"path": settings.js_runtime}}
    bundled = bundled_deno()
    # Without the package, yt-dlp's own default: a deno next to Python or on PATH.
    return {"deno": {"path": bundled} if bundled else {}}


def ydl_params(settings: SourceSettings) -> dict[str, Any]:
    """The YoutubeDL options :class:`SourceSettings` stands for (no cookies: see
    :func:`read_cookies`)."""
    args: dict[str, dict[str, list[str]]] = {}
    for extractor, key, values in settings.extractor_args:
        args.setdefault(extractor, {})[key] = list(values)
    if settings.player_clients:
        args.setdefault("youtube", {})["player_client"] = list(settings.player_clients)
    provider = settings.pot_provider
    if provider:
        # bgutil-ytdlp-pot-provider's two modes, as its README documents them.
        if re.match(r"https?://", provider):
            args.setdefault("youtubepot-bgutilhttp", {})["base_url"] = [provider]
        else:
            args.setdefault("youtubepot-bgutilscript", {})["server_home"] = [provider]
    params: dict[str, Any] = {"js_runtimes": js_runtimes(settings)}
    if args:
        params["extractor_args"] = args
    return params


def use_plugin_dirs(dirs: tuple[str, ...]) -> None:
    """Have yt-dlp load plugins from ``dirs`` too (process-wide in yt-dlp; a no-op when empty).

    yt-dlp keeps its plugin directories in a process-wide setting and loads plugins when the
    first ``YoutubeDL`` is made; directories added later are loaded here.
    """
    if not dirs:
        return
    from yt_dlp.globals import all_plugins_loaded, plugin_dirs
    from yt_dlp.plugins import load_all_plugins

    wanted = ["default", *dirs]
    if list(plugin_dirs.value) == wanted:
        return
    plugin_dirs.value = wanted
    if all_plugins_loaded.value:
        importlib.invalidate_caches()  # yt-dlp's plugin finder forgets the old directories
        load_all_plugins()


def read_cookies(path: str | os.PathLike[str]) -> list[http.cookiejar.Cookie]:
    """The unexpired cookies of a Netscape-format cookies file (as browsers' exporters write).

    Parsed here rather than by ``http.cookiejar.MozillaCookieJar`` or yt-dlp's jar: both echo a
    bad line, cookie value included, in their messages.

    Raises:
        CookieFileError: The file is missing, unreadable or not in Netscape format; the message
            gives the line number, never the line.
    """
    check_cookie_file(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CookieFileError(f"the cookies file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise CookieFileError(f"the cookies file {path} cannot be read: {exc.strerror}") from None
    if text.lstrip().startswith(("{", "[")):
        raise CookieFileError(
            f"the cookies file {path} is JSON; export the cookies in Netscape format (cookies.txt)"
        )
    now = time.time()
    cookies: list[http.cookiejar.Cookie] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        http_only = line.startswith("#HttpOnly_")
        if http_only:
            line = line[len("#HttpOnly_") :]
        if not line or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 7:
            raise CookieFileError(
                f"the cookies file {path} is not in Netscape format: line {number} has "
                f"{len(fields)} tab-separated fields, not 7"
            )
        domain, subdomains, cookie_path, secure, expires_text, name, value = fields
        if subdomains not in ("TRUE", "FALSE") or secure not in ("TRUE", "FALSE"):
            raise CookieFileError(
                f"the cookies file {path} is not in Netscape format: line {number}'s second and "
                "fourth fields must be TRUE or FALSE"
            )
        try:
            expires = int(expires_text) if expires_text else 0
        except ValueError:
            raise CookieFileError(
                f"the cookies file {path} is not in Netscape format: line {number}'s expiry is "
                "not a number"
            ) from None
        if expires and expires <= now:
            continue
        cookies.append(
            http.cookiejar.Cookie(
                version=0,
                name=name,
                value=value,
                port=None,
                port_specified=False,
                domain=domain,
                domain_specified=subdomains == "TRUE",
                domain_initial_dot=domain.startswith("."),
                path=cookie_path or "/",
                path_specified=True,
                secure=secure == "TRUE",
                expires=expires or None,
                discard=not expires,
                comment=None,
                comment_url=None,
                rest={"HttpOnly": ""} if http_only else {},
            )
        )
    return cookies
