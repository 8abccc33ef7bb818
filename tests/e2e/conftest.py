"""Fixtures for tests that run a real discord.py bot.

discord.py's ``Bot.close()`` unloads every extension, and unloading ``legato`` deletes ``legato``
and every ``legato.*`` module from ``sys.modules`` (that is how it makes a reload re-import them).
The next import then builds new module objects, so classes and exceptions imported earlier by
other tests stop matching (``isinstance`` and ``except`` see two different ``VoiceConnectError``s).
Each e2e test therefore puts the original modules back when it ends.

The music harness's fixtures (``tones``, the module's media server; ``sandbox``, the default
sandbox; ``path_sandbox``, one per voice path) are defined in ``test_music_cog`` and offered here
to every ``test_music_*`` module; a module that defines a fixture of the same name keeps its own.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tests.e2e.test_music_cog import path_sandbox, sandbox, tones

__all__ = ["path_sandbox", "sandbox", "tones"]


@pytest.fixture(autouse=True)
def _keep_legato_modules() -> Iterator[None]:
    saved = {
        name: module
        for name, module in sys.modules.items()
        if name == "legato" or name.startswith("legato.")
    }
    yield
    for name in [n for n in sys.modules if n == "legato" or n.startswith("legato.")]:
        if name not in saved:
            del sys.modules[name]
    sys.modules.update(saved)
