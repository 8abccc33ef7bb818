"""A yt-dlp plugin extractor for the tests: it refuses as YouTube does, in yt-dlp's own words.

Loaded through ``[sources] plugin_dirs`` (this file's grandparent's parent is the plugin
directory). ``http://HOST/legato-refuse/KIND`` fails the way yt-dlp's YouTube extractor fails
for KIND, with the reason YouTube gives and yt-dlp's own raising helpers
(``raise_login_required``, ``raise_geo_restricted``, ``raise_no_formats``) and format selection,
so what reaches Legato is what yt-dlp raises for the real site.
"""

from __future__ import annotations

from typing import Any

from yt_dlp.extractor.common import InfoExtractor
from yt_dlp.utils import remove_end

#: YouTube's reasons (playabilityStatus.reason, and its subreason after ". "), verbatim.
REASONS = {
    "bot": "Sign in to confirm you\u2019re not a bot. This helps protect our community. Learn more",
    "age": "Sign in to confirm your age. This video may be inappropriate for some users.",
    "private": "Video unavailable. This video is private",
    "private-signin": "Private video. Sign in if you've been granted access to this video",
    "removed": "Video unavailable. This video has been removed by the uploader",
    "terminated": (
        "This video is no longer available because the YouTube account associated with this "
        "video has been terminated."
    ),
    "live": "This live event will begin in 3 hours.",
    "premiere": "Premieres in 2 days",
}


class LegatoRefusalsIE(InfoExtractor):  # type: ignore[misc]  # yt-dlp ships no types
    """Fails as YouTube's extractor does (see the module's docstring)."""

    IE_NAME = "legato-refusals"
    _VALID_URL = r"https?://[^/]+/legato-refuse/(?P<id>[a-z-]+)"

    def _real_extract(self, url: str) -> dict[str, Any]:
        kind = self._match_id(url)
        if kind == "region":
            self.raise_geo_restricted(
                "The uploader has not made this video available in your country",
                countries=["NZ"],
                metadata_available=True,
            )
        if kind == "images":
            # Only storyboards: yt-dlp warns "Only images are available for download" and its
            # format selection fails with "Requested format is not available".
            return {
                "id": kind,
                "title": kind,
                "formats": [
                    {
                        "format_id": "sb0",
                        "url": "https://i.ytimg.com/sb/x/storyboard3_L0/default.jpg",
                        "ext": "mhtml",
                        "protocol": "mhtml",
                        "acodec": "none",
                        "vcodec": "none",
                    }
                ],
            }
        reason = REASONS[kind]
        # As yt_dlp/extractor/youtube/_video.py words a reason that asks to sign in.
        if "sign in" in reason.lower():
            reason = remove_end(reason, "This helps protect our community. Learn more")
            reason = f"{remove_end(reason.strip(), '.')}. {self._login_hint(method='cookies')}"
        self.raise_no_formats(reason, expected=True, video_id=kind)
        raise AssertionError("unreachable")
