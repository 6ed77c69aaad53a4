"""The guests step, and the demo guest it serves when a site names no bundle of its own.

`bundle()` makes the demo bundle from the cached base tree (the armmp zImage, and a deterministic initramfs of
busybox httpd, xen-netfront and the site in guest/) with no emulation, cached by its inputs. `install()` lays
each site's guest (its bundle, else the demo) and the board's guest manager into the image's store as `current`,
checked first by the board's own manifest validator (the bundles themselves: appliance.bundles).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import config, cpio, kmod, log, shipped_links
from ..bundles import STORE, install_manager, store, user_bundle
from ..bundles import check as check_bundles
from ..config import Config
from ..cpio import Entry
from ..errors import GuestError
from ..files import sha256
from ..log import step
from ..manager import manifest as board_manifest
from . import rootfs
from .configure import TITLE
from .step import Step

if TYPE_CHECKING:
    from .context import Context

DEMO_NAME = "demo"
STATIC_NAME = "static"     # `--static DIR`: the demo's kernel and httpd serving a folder of static files
DEMO_RELEASE = "1.0"       # bump when the demo changes in a way its inputs' digest would not show
# the board's default (ip=… for a Linux guest, appliance.port for the demo) and, for the guest's first page sooner:
# quiet (each line the kernel prints goes through Xen to xenconsoled in dom0; its errors and our init's lines still
# do), and cryptomgr.notests (the crypto API's self-tests at boot, for algorithms this guest never uses: a good
# part of its time to /init under QEMU, docs/internals.md)
DEMO_CMDLINE = board_manifest.DEFAULT_CMDLINE + " quiet cryptomgr.notests"
NETFRONT = "kernel/drivers/net/xen-netfront.ko"
_PLACES = {"init": "init", "httpd.conf": "etc/httpd.conf", "udhcpc.script": "etc/udhcpc.script"}  # guest/ -> initramfs


@dataclass(frozen=True)
class Bundle:
    path: Path
    name: str
    version: str


def _kernel(tree: Path) -> tuple[str, Path]:
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise GuestError(f"expected one kernel in {tree}/boot for the demo guest, found {[p.name for p in kernels]}")
    return kernels[0].name.removeprefix("vmlinuz-"), kernels[0]


def static_files(site: Path) -> dict[str, Path]:
    """A folder of static files as the guest's site: its regular files (no symlinks) by their path in it."""
    if not site.is_dir():
        raise GuestError(f"{site}: not a directory (a static site is a folder of files with an index.html)")
    files: dict[str, Path] = {}
    for top, _, names in os.walk(site):          # symlinks are left out: not followed, not packed
        for n in names:
            p = Path(top) / n
            if p.is_file() and not p.is_symlink():
                files[str(p.relative_to(site))] = p
    files = dict(sorted(files.items()))
    bad = [n for n in files if not n.isprintable() or n.startswith(".") or "/." in n]
    if bad:
        raise GuestError(f"{site}: {bad[0]!r}: a file of a static site needs a printable name, not hidden")
    if "index.html" not in files:
        raise GuestError(f"{site}: no index.html (the page visitors get)")
    return files


def demo_files(root: Path) -> dict[str, Path]:
    """The demo guest's files (root's guest/) by their path in it; a link (a portal probe's answer) as the file it
    names, also in an installed copy, which has the links in a table."""
    demo = root / "guest"
    files = {str(p.relative_to(demo)): p for p in demo.rglob("*") if p.is_file()}
    # lexically: a link's folder may hold nothing else, and then the installed copy has no such folder
    files.update({rel: Path(os.path.normpath(demo / rel / ".." / to)) for rel, to in shipped_links(demo).items()})
    return {rel: files[rel] for rel in sorted(files, key=Path)}


def _inputs(cfg: Config, base: rootfs.Base, site: Path | None = None) -> dict[str, Path]:
    kver, vmlinuz = _kernel(base.tree)
    moddir = base.tree / "usr/lib/modules" / kver
    files = {"vmlinuz": vmlinuz, "busybox.deb": base.deb("busybox-static")}
    files.update({f"modules/{m}": moddir / m for m in kmod.module_paths(moddir, [NETFRONT])})
    files.update({f"guest/{rel}": p for rel, p in demo_files(cfg.root).items()})
    if site is not None:      # the demo's httpd and status page, serving the folder's files instead of the game
        files = {n: p for n, p in files.items() if not n.startswith("guest/site/") or n.startswith("guest/site/cgi-bin/")}
        files.update({f"guest/site/{n}": p for n, p in static_files(site).items()})
    files["builder"] = Path(__file__)  # how the bundle is made is an input too
    files["packer"] = Path(cpio.__file__)
    files["kmod"] = Path(kmod.__file__)
    return files


def _digest(files: dict[str, Path], release: str) -> str:
    h = hashlib.sha256(release.encode())
    for name, p in sorted(files.items()):
        h.update(f"{name}\0{p.stat().st_mode & 0o111}\0".encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def bundle(cfg: Config, base: rootfs.Base | None = None, release: str = DEMO_RELEASE, site: Path | None = None
           ) -> Bundle:
    """The demo guest bundle (build/guests/demo-VERSION/): made once per set of inputs, then reused.

    Another `release` makes another version of the same demo (the tests switch between two of them); `site`, a
    folder of static files, makes the same guest serve them (build/guests/static-VERSION/, by their content)."""
    base = base or rootfs.ensure(cfg)
    files = _inputs(cfg, base, site)
    name = DEMO_NAME if site is None else STATIC_NAME
    version = f"{release}-{_digest(files, release)[:10]}" if site is None else f"site-{_digest(files, '')[:10]}"
    out = cfg.work / "guests" / f"{name}-{version}"
    if (out / "guest.yaml").exists():
        log.info(f"{name} guest {version} from cache ({config.rel(out)})")
        return Bundle(out, name, version)
    with step(f"Building the {name} guest {version} (zImage + busybox httpd initramfs)"):
        kver, _ = _kernel(base.tree)
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        initrd = gzip.compress(cpio.pack(_initramfs(files, kver, version, tmp)), compresslevel=9, mtime=0)
        (tmp / "initrd.gz").write_bytes(initrd)
        shutil.copyfile(files["vmlinuz"], tmp / "vmlinuz")
        manifest = {
            "name": name, "version": version, "kernel": "vmlinuz", "ramdisk": "initrd.gz",
            "sha256": {n: sha256(tmp / n) for n in ("vmlinuz", "initrd.gz")},
            "cmdline": DEMO_CMDLINE,
        }
        (tmp / "guest.yaml").write_text(json.dumps(manifest, indent=1) + "\n")
        shutil.rmtree(tmp / "work", ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        for old in out.parent.glob(f"{DEMO_NAME}-{release}-*" if site is None else f".{STATIC_NAME}-*.tmp"):
            if old != out:
                shutil.rmtree(old)  # earlier builds of this release: their inputs are gone
        log.info(f"{config.rel(out)}: vmlinuz {files['vmlinuz'].stat().st_size >> 10} KiB, "
                 f"initrd.gz {len(initrd) >> 10} KiB")
    return Bundle(out, name, version)


def place(rel: str) -> str | None:
    """Where a file of guest/ goes in the guest's initramfs: the site's in www/, the portal probes' answers in
    www/ too (packed first, so a site's own file of the same name wins), dom0's figures' CGI in dom0/."""
    if rel in _PLACES:
        return _PLACES[rel]
    for tree, dest in (("site/", "www/"), ("probes/", "www/"), ("dom0/", "dom0/")):
        if rel.startswith(tree):
            return dest + rel.removeprefix(tree)
    return None


def _initramfs(files: dict[str, Path], kver: str, version: str, tmp: Path) -> list[Entry]:
    mods = {n.removeprefix("modules/"): p for n, p in files.items() if n.startswith("modules/")}
    entries = [cpio.directory(d) for d in ("dev", "proc", "run", "sys", "tmp", "www", "www/cgi-bin", "dom0")]
    entries += [cpio.CONSOLE, cpio.symlink("bin/sh", "busybox"),
                cpio.file("bin/busybox", cpio.busybox(files["busybox.deb"], tmp), 0o755),
                cpio.file("etc/guest-version", f"{version}\n".encode())]
    entries += kmod.modules(kver, mods, tmp)
    for name, p in files.items():
        if not name.startswith("guest/"):
            continue
        rel = name.removeprefix("guest/")
        mode = 0o755 if p.stat().st_mode & 0o111 else 0o644
        dest = place(rel)
        if dest:
            parents = [str(q) for q in reversed(Path(dest).parents) if str(q) not in (".", "www")]
            entries += [cpio.directory(d) for d in parents]
            entries.append(cpio.file(dest, p.read_bytes(), mode))
    return list({e.path: e for e in entries}.values())  # a directory named twice is packed once


def install(cfg: Config, base: rootfs.Base | None, tree: Path) -> dict[str, str]:
    """Lay each site's guest (its bundle, else the demo) into the tree's store as current: site -> version."""
    if "booth" not in cfg.recipe.overlays:
        return {}  # no guest manager in this image, so no guest to serve
    install_manager(cfg, tree)
    out = {}
    for i, site in enumerate(cfg.recipe.sites):
        folder = static_dir(cfg, i)
        src = user_bundle(cfg, i) or bundle(cfg, base, site=folder).path
        with step(f"Installing the guest of site {site.name} from {config.rel(src)} into /{STORE}/{site.name}"):
            out[site.name] = store(tree, src, site)
    return out


def build_task(recipe: str = "booth", cache: str | Path | None = None, static: Path | None = None) -> Bundle:
    """`invoke guest [--static DIR]`: the demo bundle (or a static site's) for a recipe's board packages (from the
    cached base tree)."""
    cfg = config.load(recipe, cache=Path(cache) if cache else None)
    if static is not None:
        static_files(static)       # checked before the base tree is looked for
    made = bundle(cfg, site=static)
    log.info(f"{made.name} guest {made.version}: {made.path}")
    return made


def static_dir(cfg: Config, i: int) -> Path | None:
    """The folder of static files site i names (relative to the recipe), checked; None when it names none."""
    spec = cfg.recipe.sites[i].static
    if not spec:
        return None
    src = config.static_dir(spec, cfg.recipe_path, cfg.root)
    try:
        static_files(src)
    except GuestError as exc:
        raise GuestError(f"{config.rel(cfg.recipe_path)}: sites[{i}].static: {exc}") from None
    return src


class Guest(Step):
    name = "guest"
    title = TITLE      # part of configuring the rootfs, as the user sees it

    def verify(self, ctx: Context) -> None:
        check_bundles(ctx.cfg)
        for i in range(len(ctx.cfg.recipe.sites)):
            static_dir(ctx.cfg, i)

    def run(self, ctx: Context) -> None:
        install(ctx.cfg, ctx.base, ctx.tree)
