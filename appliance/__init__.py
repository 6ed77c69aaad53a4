"""appliance: build, flash, emulate and update SD-card images of a Xen appliance for small ARM boards.

The data flows one way: recipe -> rootfs -> boot files -> image -> flash | emulate | deploy.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def checkout(root: Path = ROOT) -> bool:
    """Whether the package runs from a source checkout (an editable install, or `invoke` in it)."""
    return (root / "pyproject.toml").is_file() and (root / "tasks.py").is_file()


def default_cache(root: Path = ROOT) -> Path:
    """The cache when no setting names one: `.cache/` in a checkout, else $XDG_CACHE_HOME/appliance
    (~/.cache/appliance); the XDG spec ignores a relative XDG_CACHE_HOME."""
    if checkout(root):
        return root / ".cache"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "appliance"
