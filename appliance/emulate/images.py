"""What an image file says about itself: its manifest (board, recipe), the recipe it was built from, the board QEMU
should boot it on and the default site's service address.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from .. import ROOT, invoked_as
from ..config import Config, load, load_board
from ..errors import EmulateError

DEFAULT_BOARD = "qemu-virt"


def check_image(img: Path) -> Path:
    img = Path(img).resolve()  # build/latest is a symlink to the .img
    if not img.is_file():
        raise EmulateError(f"{img}: no such image file", hint=f"run {invoked_as()} build")
    if img.suffix != ".img":
        raise EmulateError(f"{img}: QEMU boots a raw .img; decompress {img.name} first")
    return img


def manifest(img: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(img.with_suffix(".manifest.json").read_text())
        if isinstance(data, dict):
            return data
    return {}


def recipe_of(img: Path) -> Config:
    """The recipe the image's manifest names (default: booth)."""
    name = str(manifest(img).get("recipe_file", "booth"))
    return load(name if Path(name).is_absolute() or "/" not in name else str(ROOT / name))


def guest_of(img: Path) -> tuple[str, int]:
    """The default site's service address and port: dom0 owns the address and passes its connections on to
    the site's active guest."""
    site = recipe_of(img).recipe.sites[0]
    return site.address, site.port


def board_for(img: Path) -> str:
    """The board to emulate for img: its own if QEMU can boot that, else one the card also boots."""
    m = manifest(img)
    for name in (m.get("board"), *m.get("also_boots", [])):
        if isinstance(name, str) and load_board(name).qemu is not None:
            return name
    return DEFAULT_BOARD


