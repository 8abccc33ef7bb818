"""What the cog builds from the configuration's plain values for the audio stack.

The configuration (:mod:`legato.config`) holds plain, checked values and imports nothing of
:mod:`legato.audio`; the objects the audio stack takes are made here from them.
"""

from __future__ import annotations

import os

from legato.audio.sources import SourceSettings
from legato.audio.urlguard import UrlPolicy
from legato.config import PlaybackConfig, SourcesConfig

__all__ = ["source_settings", "url_policy"]


def source_settings(src: SourcesConfig) -> SourceSettings:
    """``[sources]`` as the resolver takes it."""
    return SourceSettings(
        # Absolute: worker processes may not share the bot's working directory.
        cookies_file=os.path.abspath(src.cookies_file) if src.cookies_file else None,
        player_clients=src.youtube_player_clients,
        extractor_args=src.extractor_args,
        pot_provider=src.pot_provider or None,
        plugin_dirs=src.plugin_dirs,
        js_runtime=src.js_runtime or None,
    )


def url_policy(pb: PlaybackConfig) -> UrlPolicy:
    """The URL guard ``[playback]`` asks for: users' links make the bot fetch things, so no
    internal addresses, and only the allowed domains when some are configured."""
    return UrlPolicy(
        allowed_domains=pb.allowed_domains or None,
        allow_private=pb.allow_private_addresses,
        allow_local_files=pb.allow_local_files,
        allowed_hosts=pb.allowed_hosts,
        timeout=pb.resolve_timeout,
    )
