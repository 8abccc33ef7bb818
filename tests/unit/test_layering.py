"""Core modules stay sans-I/O: no event loop, sockets, clocks or I/O libraries (STYLE.md §2)."""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE_MODULES = [
    "plugin/voice/protocol.py",
    "plugin/voice/events.py",
    "plugin/voice/close.py",
    "plugin/voice/endpoint.py",
    "plugin/voice/state.py",
    "plugin/voice/rtp.py",
    "plugin/voice/crypto.py",
    "plugin/voice/payloads.py",
    "audio/pacer.py",
    "audio/queue.py",
    "audio/supply.py",
]
FORBIDDEN = {"asyncio", "socket", "time", "websockets", "aiortc", "discord", "aiohttp"}


def imported_roots(path: Path) -> set[str]:
    """Top-level names of every module imported anywhere in the file (also inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            roots.add(node.args[0].value.split(".")[0])
    return roots


@pytest.mark.parametrize("relative", CORE_MODULES)
def test_core_module_is_sans_io(relative: str) -> None:
    path = ROOT / relative
    assert path.is_file(), f"{relative} is missing"
    bad = imported_roots(path) & FORBIDDEN
    assert not bad, f"{relative} imports {sorted(bad)}"


def test_checker_catches_forbidden_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nimport asyncio.events\nfrom time import monotonic\n"
        "def f():\n    import socket\n    return __import__('websockets')\n"
    )
    assert imported_roots(sample) & FORBIDDEN == {"asyncio", "time", "socket", "websockets"}


@pytest.mark.parametrize(
    "module",
    [
        "legato.voice.protocol",
        "legato.voice.events",
        "legato.voice.close",
        "legato.voice.endpoint",
        "legato.voice.state",
        "legato.voice.rtp",
        "legato.voice.crypto",
    ],
)
def test_core_modules_import(module: str) -> None:
    assert importlib.util.find_spec(module) is not None


# --- the package root imports no subpackage ---------------------------------------------------

#: Root modules whose job is wiring: the extension entry, the CLI, the environment check.
WIRING = {"__init__.py", "__main__.py", "doctor.py"}
#: The subpackages a root module may not import: the root is what they stand on.
SUBPACKAGES = ("legato.audio", "legato.cogs", "legato.voice", "legato.sandbox")


def imported_modules(path: Path, package: str = "legato") -> set[str]:
    """Dotted names of every module imported anywhere in ``path``, a module of ``package``
    (relative imports resolved against it), also inside functions and through
    ``importlib.import_module``/``__import__`` with a literal name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = parts[: len(parts) - (node.level - 1)]
                base = ".".join(p for p in (*parent, base) if p)
            names.add(base)
            # ``from legato import audio`` imports the subpackage by its name.
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            literal = first.value if isinstance(first, ast.Constant) else None
            if name in ("import_module", "__import__") and isinstance(literal, str):
                names.add(literal)
    return names


def within(module: str, packages: Iterable[str]) -> bool:
    """Whether ``module`` is one of ``packages`` or inside one of them."""
    return any(module == p or module.startswith(p + ".") for p in packages)


def root_modules() -> list[str]:
    return sorted(p.name for p in (ROOT / "plugin").glob("*.py") if p.name not in WIRING)


def reaches_down(path: Path) -> set[str]:
    return {name for name in imported_modules(path) if within(name, SUBPACKAGES)}


@pytest.mark.parametrize("name", root_modules())
def test_root_module_imports_no_subpackage(name: str) -> None:
    bad = reaches_down(ROOT / "plugin" / name)
    assert not bad, f"plugin/{name} imports {sorted(bad)}: the root must not depend on them"


def test_root_modules_are_found() -> None:
    assert {"config.py", "store.py", "errors.py"} <= set(root_modules())


def test_subpackage_checker_catches_every_spelling(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import legato.audio.queue\nfrom legato.cogs import music\nfrom .voice import client\n"
        "from . import sandbox\nfrom legato import errors, audio\nimport legato_other\n"
        "def f():\n    from legato.audio.urlguard import UrlPolicy\n"
    )
    assert reaches_down(sample) == {
        "legato.audio.queue",
        "legato.cogs",
        "legato.cogs.music",
        "legato.voice",
        "legato.voice.client",
        "legato.sandbox",
        "legato.audio",
        "legato.audio.urlguard",
        "legato.audio.urlguard.UrlPolicy",
    }


# -- client modules hold no server code (issue #14) ------------------------------------------

#: The client's packages: what a bot loads. The sandbox (Discord's side) builds on them, never
#: the other way round.
CLIENT_PACKAGES = ["plugin/voice", "audio", "cogs"]

#: Server halves that moved out of the client's modules: ``client module -> (names, new home)``.
MOVED_TO_SANDBOX = {
    "legato.voice.rtp": (
        ("parse_discovery_request", "discovery_response", "pack_receiver_report"),
        "legato.sandbox.rtp",
    ),
    "legato.voice.crypto": (("PacketDecryptor", "DecryptionFailed"), "legato.sandbox.crypto"),
    "legato.voice.sdp": (("build_remote_offer",), "legato.sandbox.sdp"),
    "legato.voice.dave": (("pack_server_binary", "parse_client_binary"), "legato.sandbox.dave"),
}


def _is_sandbox(module: str) -> bool:
    return within(module, ("legato.sandbox",))


_IMPORT_ROOTS = {"plugin": "legato", "cogs": "legato.cogs", "audio": "legato.audio"}


def _package_of(path: Path) -> str:
    """The package a source file's relative imports resolve against."""
    top, *folders = path.relative_to(ROOT).parent.parts
    return ".".join((_IMPORT_ROOTS[top], *folders))


def _client_files() -> list[Path]:
    files = [p for package in CLIENT_PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert files, "no client modules found"
    return files


@pytest.mark.parametrize("path", _client_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_client_module_never_imports_the_sandbox(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path, _package_of(path)) if _is_sandbox(m))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_sandbox_import_checker_catches_every_form(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import legato.sandbox.rtp\nfrom legato import sandbox\nfrom legato.voice import rtp\n"
        "def f():\n    import importlib\n    importlib.import_module('legato.sandbox.webrtc')\n"
        "    from ..sandbox import dave\n"
    )
    found = {m for m in imported_modules(sample, "legato.voice") if _is_sandbox(m)}
    assert found == {
        "legato.sandbox.rtp",
        "legato.sandbox",
        "legato.sandbox.webrtc",
        "legato.sandbox.dave",
    }


@pytest.mark.parametrize("client_module", sorted(MOVED_TO_SANDBOX))
def test_server_halves_live_in_the_sandbox_only(client_module: str) -> None:
    names, home = MOVED_TO_SANDBOX[client_module]
    client = importlib.import_module(client_module)
    server = importlib.import_module(home)
    for name in names:
        assert not hasattr(client, name), f"{client_module}.{name} is server code"
        assert name not in getattr(client, "__all__", ()), f"{client_module}.__all__ has {name}"
        assert hasattr(server, name), f"{home}.{name} is missing"


def test_audio_analysis_lives_in_the_sandbox() -> None:
    assert importlib.util.find_spec("legato.audio.analysis") is None
    assert importlib.util.find_spec("legato.sandbox.analysis") is not None


# --- audio and voice stand side by side: only the cog joins them -----------------------------

#: For each client package, the packages it may not import (the diagram in README's "How it is
#: built"): the player knows a frame sink, not the voice client; the voice client knows frames,
#: not the player; neither knows the cog.
SIDE_BY_SIDE = {
    "audio": ("legato.voice", "legato.cogs"),
    "plugin/voice": ("legato.audio", "legato.cogs"),
}


@pytest.mark.parametrize(
    "path",
    [p for folder in SIDE_BY_SIDE for p in sorted((ROOT / folder).rglob("*.py"))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_audio_and_voice_do_not_import_each_other_or_the_cog(path: Path) -> None:
    folder = next(f for f in SIDE_BY_SIDE if path.is_relative_to(ROOT / f))
    banned = SIDE_BY_SIDE[folder]
    bad = sorted(name for name in imported_modules(path, _package_of(path)) if within(name, banned))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
