"""appliance: build, flash, emulate and update SD-card images of a Xen appliance for small ARM boards.

The data flows one way: recipe -> rootfs -> boot files -> image -> flash | emulate | deploy.
"""

import json
import os
import sys
from pathlib import Path

MiB = 1 << 20
PACKAGE = Path(__file__).resolve().parent
DATA = ("board", "overlays", "recipes", "guest")   # the tool's own files, at the top level of a checkout
LINKS = "symlinks.json"                            # an installed copy's symlinks (a wheel carries none)


def checkout(root: Path | None = None) -> bool:
    """Whether root (default: the tool root) is a source checkout (an editable install, or `invoke` in it)."""
    root = ROOT if root is None else root
    return (root / "pyproject.toml").is_file() and (root / "tasks.py").is_file()


# The tool root, decided here alone: the checkout's top level, where DATA are as git keeps them; for a tool
# installed from a wheel (`pip install .`, pipx), the copy of them the wheel carries in the package (setup.py).
ROOT = PACKAGE.parent if checkout(PACKAGE.parent) else PACKAGE / "data"


def default_cache(root: Path = ROOT) -> Path:
    """The cache when no setting names one: `.cache/` in a checkout, else $XDG_CACHE_HOME/appliance
    (~/.cache/appliance); the XDG spec ignores a relative XDG_CACHE_HOME."""
    if checkout(root):
        return root / ".cache"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "appliance"


def work_dir(root: Path = ROOT, cache: Path | None = None) -> Path:
    """Where builds keep their lock, workspaces and guest bundles: build/ in a checkout, else the cache's work/
    (an installed tool's own folder is not the user's to write in)."""
    return root / "build" if checkout(root) else (cache or default_cache(root)) / "work"


def invoked_as() -> str:
    """The command the user typed, for the commands we print: `invoke` in a checkout, else the installed
    `appliance`."""
    typed = Path(sys.argv[0])
    return "invoke" if typed.name in ("invoke", "inv") or typed.parts[-2:] == ("invoke", "__main__.py") else "appliance"


def latest_image(cwd: Path | None = None) -> Path:
    """The image the last build wrote: ./build/latest when the current folder has one (a booth folder of one's
    own builds there), else the checkout's build/latest."""
    here = (cwd or Path.cwd()) / "build" / "latest"
    return here if here.exists() or here.is_symlink() or not checkout() else ROOT / "build" / "latest"


def shipped_links(folder: Path) -> dict[str, str]:
    """The symlinks in folder, one of the tool root's, that are not on disk: those of an installed copy, recorded
    by the wheel's build (path in folder -> target). Empty in a checkout, where git keeps them as links."""
    table = ROOT / LINKS
    if checkout() or not folder.resolve().is_relative_to(ROOT) or not table.is_file():
        return {}
    prefix = f"{folder.resolve().relative_to(ROOT)}/"
    return {k.removeprefix(prefix): v for k, v in json.loads(table.read_text()).items() if k.startswith(prefix)}
