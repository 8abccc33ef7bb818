"""Turn what a user typed into tracks, and a track into a stream URL at play time (yt-dlp).

yt-dlp is blocking and slow, so it runs in an executor under a timeout. It is asked for metadata
only (``skip_download``), quietly, without a cache directory, and playlists are read flat: their
entries are resolved one by one in :meth:`Resolver.stream`, when each is about to play, because
stream URLs expire. Each worker thread keeps its own ``YoutubeDL`` per mode (listing, playing)
and reuses it, as yt-dlp's command line does for several URLs: making one costs more than a
local extraction (~45 ms registering its extractors, ~20 ms loading CA certificates), paid with
the GIL held, which stalls the event loop. Cookies are dropped after each call (those of
``[sources] cookies_file`` are loaded afresh into each; :mod:`legato.audio.sources`). Every yt-dlp
failure becomes a :class:`ResolveError` whose ``str`` keeps the detail and whose
``user_message`` is a safe sentence.

Even reused, yt-dlp's own Python work (a generic page's embed scan, format sorting: tens of ms
a call) holds the GIL, and every socket call of the event loop then waits for it. With
``processes``, extractions run in worker processes instead (``[playback] resolve_processes``):
at 500 queue commands a second with /play among them, that doubled the commands answered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.process
import functools
import http.cookiejar
import logging
import multiprocessing
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import av
import av.error
import yt_dlp
import yt_dlp.networking.exceptions
import yt_dlp.utils

from legato.audio import sources
from legato.audio.fetch import VOUCHED, guard_ydl, request
from legato.audio.playlists import PlaylistEntry, looks_like_playlist, parse_playlist
from legato.audio.source import ShutDown
from legato.audio.sources import SourceSettings
from legato.audio.track import StreamInfo, Track
from legato.audio.urlguard import NOT_ALLOWED, UrlPolicy
from legato.errors import ResolveError

__all__ = ["Resolver", "ResolverSettings", "StreamInfo", "split_url"]

T = TypeVar("T")

_log = logging.getLogger(__name__)

#: A query that is one URL (scheme, "://", no spaces); anything else is searched for.
_URL: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$")

#: Schemes yt-dlp may fetch. Anything else (ftp, file, data, rtmp...) is refused up front.
_WEB_SCHEMES: Final = frozenset({"http", "https"})

#: Audio-only first, Opus (the only codec we can pass through) first among them; WebM/Ogg Opus
#: before any other audio; then the best audio in anything, then whatever is there.
_FORMAT: Final = "bestaudio[acodec=opus]/bestaudio[ext=webm]/bestaudio/best"

NOT_FOUND: Final = "I could not find that: the link answered \u201cnot found\u201d (404)."
NO_AUDIO: Final = "There is no playable audio at that link."
TOO_SLOW: Final = "Looking that up took too long; try again later."
REFUSED: Final = "The site refused to let me play that."
UNREACHABLE: Final = "I could not reach that site."
UNSUPPORTED_SCHEME: Final = "I can only play web links (http or https) and search terms."
NO_LOCAL: Final = "Playing files from the bot's computer is turned off."
NO_RESULTS: Final = "The search found nothing playable."
GENERIC: Final = "I could not find anything playable for that."
NOT_A_URL: Final = "That is not a valid web address."
COOKIES_BROKEN: Final = "The bot's sign-in is misconfigured; the bot's owner has been told."


def split_url(url: str) -> urllib.parse.SplitResult:
    """Split a link a user gave, as ``urllib.parse.urlsplit`` does, checking its port too.

    ``urlsplit`` raises a bare ``ValueError`` on an unclosed or stray bracket (``http://[::1``,
    ``https://]/``), an IPv4 address in brackets or a port that is not a number; such a link is
    the user's mistake, not a bug.

    Raises:
        ResolveError: The link cannot be split (``user_message`` is :data:`NOT_A_URL`).
    """
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - parsed lazily: a bad port raises only here
    except ValueError as exc:
        raise ResolveError(f"malformed link {url!r}: {exc}", user_message=NOT_A_URL) from exc
    return parts


@dataclass(frozen=True)
class ResolverSettings:
    """How queries are resolved.

    Attributes:
        max_playlist: The most tracks one playlist adds.
        search_provider: A yt-dlp search prefix (``ytsearch``, ``scsearch``...) or a URL
            template containing ``{query}`` (a self-hosted or offline search page; yt-dlp reads
            whatever that page lists).
        search_results: How many results a search returns.
        allow_local_files: Whether paths and ``file://`` URLs on the bot's machine may be played.
        timeout: Seconds one yt-dlp call (or one local probe) may take.
        sources: Cookies, JavaScript runtime, PO-token provider and extractor arguments for
            sites that check who is asking (:mod:`legato.audio.sources`); the same in the bot's
            threads and in worker processes, which are handed these settings with each call.
        url_policy: Which addresses may be fetched (:mod:`legato.audio.urlguard`): every
            connection yt-dlp makes, and later the decoder's (it travels with the
            :class:`StreamInfo`), goes through it (:mod:`legato.audio.fetch`). ``None``: the
            caller vouches for every URL, as tests do (:data:`legato.audio.fetch.VOUCHED`:
            private addresses allowed, the connections still made by Legato's own client).
    """

    max_playlist: int = 100
    search_provider: str = "ytsearch"
    search_results: int = 5
    allow_local_files: bool = False
    timeout: float = 30.0
    url_policy: UrlPolicy | None = None
    sources: SourceSettings = field(default_factory=SourceSettings)

    def __post_init__(self) -> None:
        if self.max_playlist < 1:
            raise ValueError(f"max_playlist must be at least 1, got {self.max_playlist}")
        if self.search_results < 1:
            raise ValueError(f"search_results must be at least 1, got {self.search_results}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        provider = self.search_provider
        if "://" in provider:
            if "{query}" not in provider:
                raise ValueError(f"a search URL template needs '{{query}}': {provider!r}")
            if urllib.parse.urlsplit(provider).scheme not in _WEB_SCHEMES:
                raise ValueError(f"a search URL template must be http(s): {provider!r}")
        elif not provider.isalnum():
            raise ValueError(f"search_provider must be a yt-dlp prefix or a URL: {provider!r}")


class _YdlLogger:
    """yt-dlp's messages into our log instead of stdout/stderr."""

    def debug(self, msg: str) -> None:
        _log.debug("yt-dlp: %s", msg)

    def info(self, msg: str) -> None:
        _log.debug("yt-dlp: %s", msg)

    def warning(self, msg: str) -> None:
        _log.info("yt-dlp: %s", msg)

    def error(self, msg: str) -> None:
        _log.info("yt-dlp: %s", msg)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it, through yt-dlp's ``exc_info`` and Python's ``__cause__``."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 8:
        chain.append(current)
        inner = getattr(current, "exc_info", None)
        nxt = inner[1] if isinstance(inner, tuple) and len(inner) > 1 else None
        current = nxt if isinstance(nxt, BaseException) else (current.__cause__ or None)
    return chain


def _wrapped(exc: BaseException, url: str) -> ResolveError:
    """A ResolveError for a yt-dlp failure: the URL guard's own refusal when it is one."""
    chain = _chain(exc)
    refusal = next((item for item in chain if isinstance(item, ResolveError)), None)
    if refusal is not None:
        return refusal
    return ResolveError(f"yt-dlp failed for {url}: {exc}", user_message=_classify(chain))


def _classify(chain: list[BaseException]) -> str:
    """A user message for a yt-dlp (or network) failure and its causes."""
    for item in chain:
        if isinstance(item, yt_dlp.networking.exceptions.HTTPError):
            if item.status == 404 or item.status == 410:
                return NOT_FOUND
            if item.status in (401, 403, 451):
                return REFUSED
        if isinstance(item, TimeoutError) or "timed out" in str(item).lower():
            return TOO_SLOW
        if isinstance(item, yt_dlp.networking.exceptions.TransportError):
            return UNREACHABLE
        if isinstance(item, yt_dlp.utils.UnsupportedError):
            return NO_AUDIO
        if isinstance(item, yt_dlp.utils.GeoRestrictedError):
            return sources.REGION_BLOCKED
    text = " ".join(str(item) for item in chain).lower()
    # A site's refusal (sign-in, age, region, private, removed, not started, no format).
    refusal = sources.classify_refusal(text)
    if refusal is not None:
        return refusal
    if "http error 404" in text or "404: not found" in text:
        return NOT_FOUND
    if "timed out" in text:
        return TOO_SLOW
    if "unsupported url" in text or "no video formats" in text or "no formats" in text:
        return NO_AUDIO
    if "http error 403" in text or "forbidden" in text:
        return REFUSED
    return GENERIC


def _track_from_entry(entry: Mapping[str, Any], parent_url: str | None, requester_id: int) -> Track:
    """A Track for one info dict (a flat playlist entry or a full extraction)."""
    page = entry.get("webpage_url") or entry.get("original_url")
    url = entry.get("url")
    # Entries a page lists inline (several <audio> on one page) all name that page as theirs:
    # their own media URL is what identifies them. A flat entry's url is its own page.
    if page and page != parent_url:
        target = page
    elif url:
        target = url
    else:
        target = page or parent_url or ""
    duration = entry.get("duration")
    title = entry.get("title") or entry.get("id") or target
    # yt-dlp may "smuggle" data for its extractor into a URL's fragment: keep it in the URL we
    # resolve again, but show people the plain page.
    shown, _ = yt_dlp.utils.unsmuggle_url(str(page or target))
    return Track(
        url=str(target),
        title=str(title),
        duration=float(duration) if isinstance(duration, int | float) else None,
        page_url=str(shown),
        thumbnail=entry.get("thumbnail") if isinstance(entry.get("thumbnail"), str) else None,
        requester_id=requester_id,
        live=entry.get("is_live") is True or entry.get("live_status") == "is_live",
    )


def _track_from_playlist(entry: PlaylistEntry, requester_id: int) -> Track:
    name = urllib.parse.unquote(urllib.parse.urlsplit(entry.url).path.rsplit("/", 1)[-1])
    return Track(
        url=entry.url,
        title=entry.title or name or entry.url,
        duration=entry.duration,
        page_url=entry.url,
        requester_id=requester_id,
    )


#: The most of a playlist file that is read.
_PLAYLIST_BYTES: Final = 512 * 1024


def _read_text(policy: UrlPolicy, url: str, timeout: float) -> tuple[str, str]:
    """A playlist file's text (its first ``_PLAYLIST_BYTES``) and the URL it came from."""
    response, final = request(policy, url, timeout=timeout)
    with response:
        data = response.read(_PLAYLIST_BYTES)
    return data.decode("utf-8", errors="replace"), final


#: Per worker thread (or process): its YoutubeDL for each set of options, made on first use.
_YDLS: Final = threading.local()


def _ydl_options(settings: ResolverSettings, *, flat: bool) -> dict[str, Any]:
    """The YoutubeDL options for a listing (``flat``) or a playing extraction."""
    options: dict[str, Any] = {
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "logger": _YdlLogger(),
        "skip_download": True,
        "cachedir": False,
        # Listing: a URL naming a playlist adds it. Playing: only the item itself (a video
        # URL that also names a playlist must not resolve to the playlist's first entry).
        "noplaylist": not flat,
        "extract_flat": "in_playlist" if flat else False,
        "playlistend": settings.max_playlist if flat else 1,
        "format": _FORMAT,
        "socket_timeout": settings.timeout,
        "retries": 1,
        "extractor_retries": 0,
        "ignoreerrors": False,
        "check_formats": False,
        "default_search": "error",
    }
    # JS runtime (js_runtimes), player clients, PO-token provider (extractor_args). Never
    # "cookiefile": yt-dlp writes its jar back to that file on close.
    options.update(sources.ydl_params(settings.sources))
    return options


def _file_cookies(settings: ResolverSettings) -> list[http.cookiejar.Cookie]:
    """The cookies file's cookies, read now (``[sources] cookies_file``)."""
    path = settings.sources.cookies_file
    if path is None:
        return []
    try:
        return sources.read_cookies(path)
    except sources.CookieFileError as exc:
        raise ResolveError(str(exc), user_message=COOKIES_BROKEN) from exc


def _failure(detail: str, message: str) -> ResolveError:
    """The error for a failed extraction; the operator is told the remedy when there is one."""
    remedy = sources.REMEDIES.get(message)
    if remedy is not None:
        _log.warning("%s (%s)", remedy, detail)
    elif message == COOKIES_BROKEN:
        _log.error("fix `[sources] cookies_file`: %s", detail)
    return ResolveError(detail, user_message=message)


def _extract_blocking(
    settings: ResolverSettings, url: str, flat: bool, trusted: bool
) -> dict[str, Any]:
    """yt-dlp's info for ``url`` on this thread's YoutubeDL, checked by the URL policy."""
    key = (flat, settings)
    cache: dict[tuple[bool, ResolverSettings], yt_dlp.YoutubeDL] | None = getattr(
        _YDLS, "cache", None
    )
    if cache is None:
        cache = _YDLS.cache = {}
    ydl = cache.get(key)
    if ydl is None:
        sources.use_plugin_dirs(settings.sources.plugin_dirs)
        ydl = cache[key] = yt_dlp.YoutubeDL(_ydl_options(settings, flat=flat))
        guard_ydl(ydl, settings.url_policy or VOUCHED)
    # The cookies file's cookies, read afresh each call and never written back; the jar is
    # emptied below.
    cookies = _file_cookies(settings)
    try:
        for cookie in cookies:
            ydl.cookiejar.set_cookie(cookie)
        info = ydl.extract_info(url, download=False)
    except BaseException:
        # Whatever state a failed extraction left behind is not carried into the next one.
        del cache[key]
        ydl.close()
        raise
    finally:
        ydl.cookiejar.clear()  # one query's cookies are not sent with another's
    if not isinstance(info, dict):
        raise ResolveError(f"yt-dlp returned nothing for {url}", user_message=NO_AUDIO)
    if settings.url_policy is not None:
        # Where yt-dlp's own redirects ended, and what it found there.
        settings.url_policy.check_info(info, trusted_page=trusted)
    return info


#: What a worker process hands back: the info, or (None, detail, user message).
_Outcome = tuple[dict[str, Any] | None, str, str]


def _extract_in_process(
    settings: ResolverSettings, url: str, flat: bool, trusted: bool
) -> _Outcome:
    """:func:`_extract_blocking` in a worker process: failures come back classified (a yt-dlp
    exception and its traceback do not cross a process boundary), the info as plain data."""
    try:
        info = _extract_blocking(settings, url, flat, trusted)
    except ResolveError as exc:
        return None, str(exc), exc.user_message
    except (yt_dlp.utils.YoutubeDLError, OSError, ValueError, KeyError) as exc:
        error = _wrapped(exc, url)
        return None, str(error), error.user_message
    return yt_dlp.YoutubeDL.sanitize_info(info), "", ""


#: What the worker processes' fork server imports once. One server forks the workers of both
#: pools (yt-dlp's here, the decoders of ``legato.audio.workers``), and its list is fixed when it
#: first starts, so it names what either needs.
_WORKER_PRELOAD: Final = ["legato.audio.resolve", "legato.audio.decode", "legato.audio.workers"]


def worker_context() -> multiprocessing.context.BaseContext:
    """Where Legato's worker processes come from: forked from a server that has imported yt-dlp
    and the decoder, not from the bot's own process, whose threads and event loop a fork would
    copy mid-flight (``spawn`` where there is no fork server)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_WORKER_PRELOAD)
    return context


def _process_pool(processes: int) -> concurrent.futures.ProcessPoolExecutor:
    return concurrent.futures.ProcessPoolExecutor(processes, mp_context=worker_context())


class Resolver:
    """Resolve queries into tracks and tracks into stream URLs with yt-dlp, off the event loop."""

    def __init__(
        self,
        settings: ResolverSettings | None = None,
        executor: concurrent.futures.Executor | None = None,
        *,
        processes: int = 0,
    ) -> None:
        """Make a resolver.

        Args:
            settings: How queries are resolved.
            executor: Runs the blocking work (``None``: the loop's default executor).
            processes: When above 0, yt-dlp's extractions run in a pool of that many worker
                processes (made on first use, made again if one dies) instead of `executor`:
                its Python work then no longer holds the bot's GIL against the event loop.
                :meth:`close` shuts the pool down.
        """
        if processes < 0:
            raise ValueError(f"processes must be 0 or more, got {processes}")
        self.settings = settings or ResolverSettings()
        self._executor = executor
        self._processes = processes
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._closed = False

    def close(self) -> None:
        """Shut the worker processes down (extractions still waiting are cancelled)."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # ---- public API

    async def resolve(self, query: str, *, requester_id: int = 0) -> list[Track]:
        """Turn a URL, a playlist, a local path or search terms into tracks.

        Args:
            query: What the user typed.
            requester_id: Put on every track returned.

        Returns:
            One track, or a playlist's entries (at most ``max_playlist``), or search results.

        Raises:
            ResolveError: nothing playable, an unsupported or refused link, or a timeout.
        """
        query = query.strip()
        if not query:
            raise ResolveError("empty query", user_message="Tell me what to play.")
        local = self._local_path(query)
        if local is not None:
            return [await self._resolve_local(local, requester_id)]
        if _URL.match(query):
            self._check_url(query)
            # A playlist file is read before yt-dlp sees it: yt-dlp would open its entries.
            listed = await self._plain_playlist(query, None, requester_id)
            if listed is not None:
                return listed
            info = await self._extract(query, flat=True)
            listed = await self._plain_playlist(query, info, requester_id)
            if listed is not None:
                return listed
            tracks = self._tracks(info, query, requester_id, limit=self.settings.max_playlist)
            if info.get("_type") not in ("playlist", "multi_video") and info.get("formats"):
                # One item, extracted in full: its stream is known now, and the opener plays
                # it without resolving it again (see Track.stream).
                try:
                    found = self._stream_info(info, tracks[0].url, tracks[0].duration)
                except ResolveError:
                    return tracks
                return [tracks[0].with_stream(found, time.monotonic())]
            return tracks
        return await self._search(query, requester_id)

    async def stream(self, track: Track) -> StreamInfo:
        """Resolve ``track`` again, now, to a fresh stream URL.

        Raises:
            ResolveError: the track can no longer be found or has no playable audio.
        """
        local = self._local_path(track.url)
        if local is not None:
            return await self._stream_local(local)
        self._check_url(track.url)
        info = await self._extract(track.url, flat=False)
        return self._stream_info(info, track.url, track.duration)

    def _stream_info(
        self, info: Mapping[str, Any], page: str, duration_hint: float | None
    ) -> StreamInfo:
        """The stream yt-dlp's answer for one item names (its chosen audio format).

        Raises:
            ResolveError: the answer names no stream.
        """
        while info.get("_type") in ("playlist", "multi_video"):
            entries = [e for e in info.get("entries") or [] if e]
            if not entries:
                raise ResolveError(f"{page}: playlist is empty", user_message=NO_AUDIO)
            info = entries[0]
        requested = info.get("requested_formats")
        chosen: Mapping[str, Any] = info
        if requested:
            audio = [f for f in requested if f.get("acodec") not in (None, "none")]
            chosen = audio[0] if audio else requested[0]
        url = chosen.get("url") or info.get("url")
        if not url:
            raise ResolveError(f"{page}: no stream URL in yt-dlp's answer", user_message=NO_AUDIO)
        acodec = chosen.get("acodec")
        rate = chosen.get("asr")
        duration = info.get("duration")
        headers = chosen.get("http_headers") or info.get("http_headers") or {}
        sent = {str(k): str(v) for k, v in headers.items()}
        fragments: tuple[str, ...] = ()
        if chosen.get("protocol") == "http_dash_segments" and chosen.get("fragments"):
            base = str(chosen.get("fragment_base_url") or url)
            fragments = tuple(
                str(f.get("url") or urllib.parse.urljoin(base, str(f.get("path", ""))))
                for f in chosen["fragments"]
            )
        return StreamInfo(
            url=str(url),
            http_headers=sent,
            codec=str(acodec) if acodec and acodec != "none" else None,
            sample_rate=int(rate) if isinstance(rate, int | float) else None,
            duration=float(duration) if isinstance(duration, int | float) else duration_hint,
            is_local=False,
            url_policy=self.settings.url_policy,
            fragments=fragments,
        )

    # ---- queries

    async def _search(self, terms: str, requester_id: int) -> list[Track]:
        provider = self.settings.search_provider
        count = self.settings.search_results
        if "{query}" in provider:
            url = provider.replace("{query}", urllib.parse.quote_plus(terms))
            try:
                info = await self._extract(url, flat=True, trusted=True)
                tracks = self._tracks(info, url, requester_id, limit=count)
            except ResolveError as exc:
                if exc.user_message != NO_AUDIO:
                    raise
                # A results page that lists nothing is "no results", not a broken link.
                raise ResolveError(
                    f"search for {terms!r} found nothing: {exc}", user_message=NO_RESULTS
                ) from exc
        else:
            info = await self._extract(f"{provider}{count}:{terms}", flat=True)
            tracks = self._tracks(info, None, requester_id, limit=count)
        if not tracks:
            raise ResolveError(f"search for {terms!r} found nothing", user_message=NO_RESULTS)
        return tracks

    def _tracks(
        self, info: Mapping[str, Any], url: str | None, requester_id: int, *, limit: int
    ) -> list[Track]:
        if info.get("_type") not in ("playlist", "multi_video"):
            return [_track_from_entry(info, None, requester_id)]
        parent = info.get("webpage_url") or url
        tracks: list[Track] = []
        for entry in info.get("entries") or []:
            if not entry:
                continue
            tracks.append(_track_from_entry(entry, parent, requester_id))
            if len(tracks) >= limit:
                break
        if not tracks:
            raise ResolveError(f"{url}: the playlist has no entries", user_message=NO_AUDIO)
        return tracks

    async def _plain_playlist(
        self, url: str, info: Mapping[str, Any] | None, requester_id: int
    ) -> list[Track] | None:
        """The tracks of an M3U or PLS file ``url`` names, or ``None`` when it is none.

        yt-dlp takes an ``#EXTM3U`` file for an HLS stream and a ``.pls`` for a media file. So
        a path ending like a playlist's (before yt-dlp: ``info`` is ``None``), or yt-dlp's
        answer with an ``m3u8`` format, is read through the guard and parsed
        (:mod:`legato.audio.playlists`). Each entry becomes a track, checked like any link
        when it plays; entries the guard refuses by their form are left out.
        """
        manifest: str | None = None
        if info is None:
            manifest = url if looks_like_playlist(url) else None
        elif info.get("_type") not in ("playlist", "multi_video"):
            for fmt in info.get("formats") or ():
                if str(fmt.get("protocol", "")).startswith("m3u8") and fmt.get("manifest_url"):
                    manifest = str(fmt["manifest_url"])
                    break
        if manifest is None:
            return None
        policy = self.settings.url_policy or VOUCHED
        call = functools.partial(_read_text, policy, manifest, self.settings.timeout)
        try:
            async with asyncio.timeout(self.settings.timeout):
                text, final = await _submit(self._executor, call)
        except TimeoutError as exc:
            raise ResolveError(f"reading {manifest} timed out", user_message=TOO_SLOW) from exc
        except OSError as exc:
            raise ResolveError(f"reading {manifest} failed: {exc}", user_message=GENERIC) from exc
        entries = parse_playlist(text, final)
        if entries is None:
            return None
        tracks: list[Track] = []
        refused = 0
        for entry in entries:
            if len(tracks) >= self.settings.max_playlist:
                break
            try:
                policy.check_url(entry.url)
            except ResolveError:
                refused += 1
                continue
            tracks.append(_track_from_playlist(entry, requester_id))
        if refused:
            _log.info("%s: %d playlist entries refused by the URL guard", manifest, refused)
        if not tracks:
            message = NOT_ALLOWED if refused else NO_AUDIO
            raise ResolveError(f"{manifest}: no playable entries", user_message=message)
        return tracks

    def _check_url(self, url: str) -> None:
        scheme = split_url(url).scheme.lower()
        if scheme == "file":
            raise ResolveError(f"local files are disabled: {url}", user_message=NO_LOCAL)
        if scheme not in _WEB_SCHEMES:
            raise ResolveError(
                f"unsupported scheme {scheme!r}: {url}", user_message=UNSUPPORTED_SCHEME
            )

    # ---- yt-dlp

    async def _extract(self, url: str, *, flat: bool, trusted: bool = False) -> dict[str, Any]:
        if self._processes:
            return await self._extract_isolated(url, flat=flat, trusted=trusted)
        call = functools.partial(_extract_blocking, self.settings, url, flat, trusted)
        try:
            async with asyncio.timeout(self.settings.timeout):
                return await _submit(self._executor, call)
        except TimeoutError as exc:
            raise ResolveError(
                f"yt-dlp took longer than {self.settings.timeout}s for {url}", user_message=TOO_SLOW
            ) from exc
        except ResolveError as exc:
            if exc.user_message == COOKIES_BROKEN:
                raise _failure(str(exc), exc.user_message) from exc
            raise
        except (yt_dlp.utils.YoutubeDLError, OSError, ValueError, KeyError) as exc:
            error = _wrapped(exc, url)
            raise _failure(str(error), error.user_message) from exc

    async def _extract_isolated(self, url: str, *, flat: bool, trusted: bool) -> dict[str, Any]:
        """:meth:`_extract` in a worker process."""
        if self._closed:
            raise ShutDown("cannot schedule new futures after shutdown")  # as an executor says
        if self._pool is None:
            self._pool = _process_pool(self._processes)
        pool = self._pool
        call = functools.partial(_extract_in_process, self.settings, url, flat, trusted)
        try:
            async with asyncio.timeout(self.settings.timeout):
                info, detail, message = await _submit(pool, call)
        except TimeoutError as exc:
            raise ResolveError(
                f"yt-dlp took longer than {self.settings.timeout}s for {url}", user_message=TOO_SLOW
            ) from exc
        except concurrent.futures.process.BrokenProcessPool as exc:
            # A worker died (killed, out of memory): this query fails; the next gets a new pool.
            _log.warning("a yt-dlp worker process died (%s); starting new ones", exc)
            if self._pool is pool:
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            raise ResolveError(
                f"yt-dlp's worker process died on {url}", user_message=GENERIC
            ) from exc
        if info is None:
            raise _failure(detail, message)
        return info

    # ---- local files

    def _local_path(self, query: str) -> Path | None:
        """The path a query names when it is a local file and local files are allowed."""
        if query.lower().startswith("file://"):
            if not self.settings.allow_local_files:
                raise ResolveError(f"local files are disabled: {query}", user_message=NO_LOCAL)
            return Path(urllib.parse.unquote(split_url(query).path))
        if _URL.match(query):
            return None
        if os.path.isabs(query) or query.startswith(("./", "../", "~")):
            if not self.settings.allow_local_files:
                raise ResolveError(f"local files are disabled: {query}", user_message=NO_LOCAL)
            return Path(query).expanduser()
        return None

    async def _probe_local(self, path: Path) -> StreamInfo:
        try:
            async with asyncio.timeout(self.settings.timeout):
                return await _submit(self._executor, functools.partial(_probe_blocking, path))
        except TimeoutError as exc:
            raise ResolveError(f"probing {path} timed out", user_message=TOO_SLOW) from exc

    async def _resolve_local(self, path: Path, requester_id: int) -> Track:
        info = await self._probe_local(path)
        return Track(
            url=str(path),
            title=path.stem,
            duration=info.duration,
            page_url=None,
            requester_id=requester_id,
            stream=info,
            resolved_at=time.monotonic(),
        )

    async def _stream_local(self, path: Path) -> StreamInfo:
        return await self._probe_local(path)


def _submit(executor: concurrent.futures.Executor | None, call: Callable[[], T]) -> Awaitable[T]:
    """``run_in_executor``, with an executor shut down under it told apart by type
    (:class:`~legato.audio.source.ShutDown`; ``submit`` raises no other ``RuntimeError``)."""
    try:
        return asyncio.get_running_loop().run_in_executor(executor, call)
    except RuntimeError as exc:
        raise ShutDown(str(exc)) from exc


def _probe_blocking(path: Path) -> StreamInfo:
    if not path.is_file():
        raise ResolveError(f"no such file: {path}", user_message="That file does not exist.")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ResolveError(f"{path} has no audio stream", user_message=NO_AUDIO)
            audio = container.streams.audio[0]
            duration = container.duration / av.time_base if container.duration else None
            return StreamInfo(
                url=str(path),
                http_headers={},
                codec=audio.codec_context.name,
                sample_rate=audio.rate,
                duration=duration,
                is_local=True,
            )
    except av.error.FFmpegError as exc:
        raise ResolveError(f"{path} is not media: {exc}", user_message=NO_AUDIO) from exc
