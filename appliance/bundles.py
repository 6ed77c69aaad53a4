"""Guest bundles: a Xen ARM zImage, an optional ramdisk and guest.yaml, read and checked by the board's own manifest
validator before a byte is copied; a site's store in an image tree, and the guest manager laid beside it.

The demo guest, and laying each site's guest into an image, are the build's (appliance/build/guest.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from . import config
from .config import Config, SiteSpec
from .errors import GuestError
from .files import sha256
from .manager import manifest
from .manager.errors import Error as ManagerError
from .manager.store import ROOT as BOARD_STORE

STORE = BOARD_STORE.lstrip("/")   # the board's stores, in an image's tree
MAX_YAML = 64 << 10           # bytes of guest.yaml read: a manifest is a few hundred


class _PlainLoader(yaml.SafeLoader):
    """YAML without anchors or aliases: a few hundred bytes of nested aliases expand to gigabytes (the "billion
    laughs"), and a manifest has no use for them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (& and *) are not allowed in a "
                                              "guest.yaml", event.start_mark)
        return super().compose_node(parent, index)


def read_yaml(path: Path) -> Any:
    """guest.yaml, parsed: at most MAX_YAML bytes, UTF-8, no anchors or aliases; GuestError naming it otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML + 1)
    except OSError as exc:
        raise GuestError(f"{path}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_YAML:
        raise GuestError(f"{path}: more than {MAX_YAML >> 10} KiB; a guest.yaml is a few lines")
    try:
        return yaml.load(raw.decode("utf-8"), Loader=_PlainLoader)  # noqa: S506 - a SafeLoader without aliases
    except UnicodeDecodeError:
        raise GuestError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None)
        raise GuestError(f"{path}: not valid YAML" + (f" at line {mark.line + 1}" if mark else "")
                         + (f": {problem}" if problem and "alias" in problem else "")) from None


def defaults(site: SiteSpec) -> dict[str, Any]:
    """What a site gives the guests that serve it, where a bundle's guest.yaml leaves it out."""
    return {"memory": site.memory_mib, "vcpus": site.vcpus, "port": site.port,
            "health": {"path": site.health_path, "deadline": site.deadline}}


def _name(stem: str) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "-" for c in stem).strip("-.") or "guest"


def bundle_data(path: Path, name: str | None = None, version: str | None = None) -> tuple[Any, str, Path]:
    """A bundle's manifest as written (not yet checked), the place to name in errors and the directory of its
    files: a directory with guest.yaml, or a bare Xen ARM kernel (a zImage, a MirageOS or Mini-OS .xen) whose
    version is name (default: its file name) and its content hash, unless version is given."""
    if path.is_file():
        digest = sha256(path)
        stem = _name(name or path.name.split(".")[0])
        data: Any = {"version": version or f"{stem}-{digest[:10]}", "kernel": path.name,
                     "sha256": {path.name: digest}}
        return data, str(path), path.parent
    where = str(path / "guest.yaml")
    data = read_yaml(path / "guest.yaml")
    if version is not None and isinstance(data, dict):
        data = {**data, "version": version}
    return data, where, path


def check_bundle(data: Any, where: str, folder: Path, site: str, site_defaults: dict[str, Any]
                 ) -> manifest.Manifest:
    """The board's own validator on a bundle, before anything is copied: its manifest, then its files."""
    if isinstance(data, dict):
        data = {**data, "name": site}  # a version belongs to the site whose store holds it
    try:
        m = manifest.validate(data, where, site_defaults)
        manifest.check_files(m, folder, where)
    except ManagerError as exc:
        raise GuestError(str(exc)) from None
    return m


def read_bundle(path: Path, site: SiteSpec) -> tuple[manifest.Manifest, Path]:
    """A bundle's checked manifest and the directory its files are in, before anything is copied."""
    data, where, folder = bundle_data(path)
    return check_bundle(data, where, folder, site.name, defaults(site)), folder


def user_bundle(cfg: Config, i: int) -> Path | None:
    """The bundle site i names (relative to the recipe), or None for the demo guest."""
    spec = cfg.recipe.sites[i].bundle
    if not spec:
        return None
    src = Path(spec).expanduser()
    src = src if src.is_absolute() else cfg.recipe_path.parent / src
    if not src.exists():
        raise GuestError(f"{config.rel(cfg.recipe_path)}: sites[{i}].bundle: no such file or directory {src}")
    return src


def check(cfg: Config) -> None:
    """For `--dry-run`: every site's bundle is complete and checks out (its checksums, its kernel a zImage)."""
    for i, site in enumerate(cfg.recipe.sites):
        src = user_bundle(cfg, i)
        if src is not None:
            read_bundle(src, site)
        elif "booth" in cfg.recipe.overlays:
            missing = [n for n in ("init", "site/index.html", "site/game.js", "site/rules.js")
                       if not (cfg.root / "guest" / n).is_file()]
            if missing:
                raise GuestError(f"the demo guest's sources are incomplete: guest/{', guest/'.join(missing)} missing")


def store(tree: Path, bundle: Path, site: SiteSpec, *, current: bool = True) -> str:
    """Lay a bundle into the tree's store of its site, checked before any of it is copied; its version."""
    m, folder = read_bundle(bundle, site)
    root = tree / STORE / site.name
    dest = root / m.version
    tmp = root / f".{m.version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for fname in m.files:
        shutil.copyfile(folder / fname, tmp / fname)
    (tmp / "manifest.json").write_text(manifest.to_json(m))
    try:
        manifest.check_files(m, tmp, str(tmp / "manifest.json"))   # the copy, as the board will check it
    except ManagerError as exc:
        shutil.rmtree(tmp)
        raise GuestError(str(exc)) from None
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    for d in (tree / "var/lib/appliance", tree / STORE, root):
        d.chmod(0o755)
    if current:
        link = root / "current"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(m.version)
    return m.version


MANAGER = "usr/local/lib/appliance"    # /usr/local/sbin/appliance-guest imports appliance.manager from here


_COMPILE = """
import importlib.util, py_compile, sys
args = sys.argv[1:]
for out, shown in zip(args[::2], args[1::2]):
    py_compile.compile(out, cfile=importlib.util.cache_from_source(out), dfile=shown, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


def install_manager(cfg: Config, tree: Path) -> None:
    """The board's guest manager and the card settings' rules (cardsettings.py): the very package the host imports,
    with its bytecode made here (the board's python3 is the same 3.11; a hash-checked .pyc does not depend on file
    times, so the image stays the same). The bytecode is made by a fresh interpreter with a fixed hash seed: marshal
    writes a code object differently when its strings are referenced elsewhere in the process (a host that had
    imported cardsettings made another .pyc of it), and a set constant's order follows the hash seed."""
    dest = tree / MANAGER / "appliance"
    shutil.rmtree(dest, ignore_errors=True)
    src = Path(manifest.__file__).parent
    outs: list[str] = []
    for p in [src.parent / "__init__.py", src.parent / "cardsettings.py", *sorted(src.glob("*.py"))]:
        out = dest / p.relative_to(src.parent)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, out)
        outs += [str(out), f"/{MANAGER}/appliance/{p.relative_to(src.parent)}"]
    subprocess.run([sys.executable, "-s", "-c", _COMPILE, *outs], check=True, env={"PYTHONHASHSEED": "0"})
    for d in [dest, *dest.rglob("*")]:
        d.chmod(0o755 if d.is_dir() else 0o644)
