"""Small file helpers shared by the build, the guest bundles and the block maps.

A file is written whole or not at all: under a temporary name beside it, then renamed into place.
"""

from __future__ import annotations

from pathlib import Path

from .manager.manifest import sha256  # noqa: F401  (one copy, the board's: the guest manager checks with it)


def partial(path: Path) -> Path:
    """The temporary name a file is made under; a build drops leftovers of these at its start."""
    return path.with_name(f".{path.name}.partial")


def write_atomic(path: Path, data: bytes) -> None:
    tmp = partial(path)
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
