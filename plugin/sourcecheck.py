"""Checks of ``[sources]`` values that need no yt-dlp: the cookies file, the JavaScript runtime.

Pure (a ``stat`` and a one-byte read at most): the configuration checks its values with these,
and :mod:`legato.audio.sources` uses the same ones when it hands the values to yt-dlp.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Final

__all__ = [
    "RUNTIME_KINDS",
    "CookieFileError",
    "check_cookie_file",
    "readable_by_others",
    "runtime_kind",
]

#: yt-dlp's name for each runtime, by the executable's name.
RUNTIME_KINDS: Final = {
    "deno": "deno",
    "node": "node",
    "nodejs": "node",
    "bun": "bun",
    "qjs": "quickjs",
}


class CookieFileError(ValueError):
    """The cookies file cannot be used; the message names the file, never its contents."""


def runtime_kind(path: str) -> str:
    """yt-dlp's name (``deno``, ``node``, ``bun``, ``quickjs``) for a runtime executable.

    Raises:
        ValueError: The executable's name is none of deno, node, nodejs, bun, qjs.
    """
    name = Path(path).name.lower().removesuffix(".exe")
    base = re.split(r"[^a-z]", name, maxsplit=1)[0]
    kind = RUNTIME_KINDS.get(base)
    if kind is None:
        raise ValueError(
            f"cannot tell which JavaScript runtime {path!r} is: its name must start with "
            f"{', '.join(sorted(RUNTIME_KINDS))}"
        )
    return kind


def readable_by_others(path: str | os.PathLike[str]) -> bool:
    """Whether users other than the file's owner may read it (group or other read bit)."""
    return bool(os.stat(path).st_mode & (stat.S_IRGRP | stat.S_IROTH))


def check_cookie_file(path: str | os.PathLike[str]) -> None:
    """Check that ``path`` is a readable regular file (its format is checked when it is read:
    :func:`legato.audio.sources.read_cookies`).

    Raises:
        CookieFileError: It does not exist, is not a file, or cannot be read.
    """
    file = Path(path)
    try:
        st = file.stat()
    except FileNotFoundError:
        raise CookieFileError(f"the cookies file {file} does not exist") from None
    except OSError as exc:
        raise CookieFileError(f"the cookies file {file} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CookieFileError(f"the cookies file {file} is not a regular file")
    try:
        with file.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise CookieFileError(f"the cookies file {file} cannot be read: {exc.strerror}") from None
