"""Guest bundles: a Xen ARM zImage, an optional ramdisk and guest.yaml; the demo guest; the image's guest store.

`build()` makes the demo bundle from the cached base tree (the armmp zImage, and a deterministic initramfs of
busybox httpd, xen-netfront and the site in guest/) with no emulation, cached by its inputs. `install()` lays
each site's guest into the image's store as `current`, checked first by the board's own manifest validator.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import config, cpio, kmod, log
from .config import Config, SiteSpec
from .cpio import Entry
from .errors import GuestError
from .files import sha256
from .log import step
from .manager import manifest
from .manager.errors import Error as ManagerError

if TYPE_CHECKING:
    from .build.rootfs import Base

DEMO_NAME = "demo"
DEMO_RELEASE = "1.0"       # bump when the demo changes in a way its inputs' digest would not show
DEMO_CMDLINE = manifest.DEFAULT_CMDLINE   # the board's default: ip=… for a Linux guest, appliance.port for the demo
STORE = "var/lib/appliance/sites"
NETFRONT = "kernel/drivers/net/xen-netfront.ko"
_PLACES = {"init": "init", "httpd.conf": "etc/httpd.conf", "udhcpc.script": "etc/udhcpc.script"}  # guest/ -> initramfs


@dataclass(frozen=True)
class Bundle:
    path: Path
    name: str
    version: str


# ---------------------------------------------------------------- the demo guest


def _kernel(tree: Path) -> tuple[str, Path]:
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise GuestError(f"expected one kernel in {tree}/boot for the demo guest, found {[p.name for p in kernels]}")
    return kernels[0].name.removeprefix("vmlinuz-"), kernels[0]


def _inputs(cfg: Config, base: Base) -> dict[str, Path]:
    kver, vmlinuz = _kernel(base.tree)
    moddir = base.tree / "usr/lib/modules" / kver
    files = {"vmlinuz": vmlinuz, "busybox.deb": base.deb("busybox-static")}
    files.update({f"modules/{m}": moddir / m for m in kmod.module_paths(moddir, [NETFRONT])})
    demo = cfg.root / "guest"
    files.update({f"guest/{p.relative_to(demo)}": p for p in sorted(demo.rglob("*")) if p.is_file()})
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


def build(cfg: Config, base: Base | None = None, release: str = DEMO_RELEASE) -> Bundle:
    """The demo guest bundle (build/guests/demo-VERSION/): made once per set of inputs, then reused.

    Another `release` makes another version of the same demo (the tests switch between two of them)."""
    if base is None:
        from .build import rootfs  # the build's steps lay bundles made here: no import at the top

        base = rootfs.ensure(cfg)
    files = _inputs(cfg, base)
    version = f"{release}-{_digest(files, release)[:10]}"
    out = cfg.root / "build" / "guests" / f"{DEMO_NAME}-{version}"
    if (out / "guest.yaml").exists():
        log.info(f"demo guest {version} from cache ({out.relative_to(cfg.root)})")
        return Bundle(out, DEMO_NAME, version)
    with step(f"Building the demo guest {version} (zImage + busybox httpd initramfs)"):
        kver, _ = _kernel(base.tree)
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        initrd = gzip.compress(cpio.pack(_initramfs(files, kver, version, tmp)), compresslevel=9, mtime=0)
        (tmp / "initrd.gz").write_bytes(initrd)
        shutil.copyfile(files["vmlinuz"], tmp / "vmlinuz")
        manifest = {
            "name": DEMO_NAME, "version": version, "kernel": "vmlinuz", "ramdisk": "initrd.gz",
            "sha256": {n: sha256(tmp / n) for n in ("vmlinuz", "initrd.gz")},
            "cmdline": DEMO_CMDLINE,
        }
        (tmp / "guest.yaml").write_text(json.dumps(manifest, indent=1) + "\n")
        shutil.rmtree(tmp / "work", ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        for old in out.parent.glob(f"{DEMO_NAME}-{release}-*"):
            if old != out:
                shutil.rmtree(old)  # earlier builds of this release: their inputs are gone
        log.info(f"{out.relative_to(cfg.root)}: vmlinuz {files['vmlinuz'].stat().st_size >> 10} KiB, "
                 f"initrd.gz {len(initrd) >> 10} KiB")
    return Bundle(out, DEMO_NAME, version)


def _initramfs(files: dict[str, Path], kver: str, version: str, tmp: Path) -> list[Entry]:
    mods = {n.removeprefix("modules/"): p for n, p in files.items() if n.startswith("modules/")}
    entries = [cpio.directory(d) for d in ("dev", "proc", "run", "sys", "tmp", "www", "www/cgi-bin")]
    entries += [cpio.CONSOLE, cpio.symlink("bin/sh", "busybox"),
                cpio.file("bin/busybox", cpio.busybox(files["busybox.deb"], tmp), 0o755),
                cpio.file("etc/guest-version", f"{version}\n".encode())]
    entries += kmod.modules(kver, mods, tmp)
    for name, p in files.items():
        if not name.startswith("guest/"):
            continue
        rel = name.removeprefix("guest/")
        mode = 0o755 if p.stat().st_mode & 0o111 else 0o644
        dest = _PLACES.get(rel) or (f"www/{rel.removeprefix('site/')}" if rel.startswith("site/") else None)
        if dest:
            entries.append(cpio.file(dest, p.read_bytes(), mode))
    return list({e.path: e for e in entries}.values())  # a directory named twice is packed once


# ---------------------------------------------------------------- bundles and the store


def defaults(site: SiteSpec) -> dict[str, Any]:
    """What a site gives the guests that serve it, where a bundle's guest.yaml leaves it out."""
    return {"memory": site.memory_mib, "vcpus": site.vcpus, "port": site.port,
            "health": {"path": site.health_path, "deadline": site.deadline}}


def _name(stem: str) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "-" for c in stem).strip("-.") or "guest"


def read_bundle(path: Path, site: SiteSpec) -> tuple[manifest.Manifest, Path]:
    """A bundle's checked manifest and the directory its files are in, before anything is copied: a directory
    with guest.yaml, or a bare Xen ARM kernel (a zImage, a MirageOS or Mini-OS .xen) named by its content."""
    if path.is_file():
        digest = sha256(path)
        name = _name(path.name.split(".")[0])
        data: Any = {"version": f"{name}-{digest[:10]}", "kernel": path.name,
                     "sha256": {path.name: digest}}
        where, folder = str(path), path.parent
    else:
        where, folder = str(path / "guest.yaml"), path
        try:
            data = yaml.safe_load((path / "guest.yaml").read_text())
        except OSError as exc:
            raise GuestError(f"{where}: cannot read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise GuestError(f"{where}: not UTF-8 text") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise GuestError(f"{where}: not valid YAML" + (f" at line {mark.line + 1}" if mark else "")) from None
    if isinstance(data, dict):
        data = {**data, "name": site.name}  # a version belongs to the site whose store holds it
    try:
        m = manifest.validate(data, where, defaults(site))
        manifest.check_files(m, folder, where)
    except ManagerError as exc:
        raise GuestError(str(exc)) from None
    return m, folder


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
            missing = [n for n in ("init", "site/index.html", "site/game.js")
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


def install_manager(cfg: Config, tree: Path) -> None:
    """The board's guest manager: the very package the host imports, with its bytecode made here (the board's
    python3 is the same 3.11; a hash-checked .pyc does not depend on file times, so the image stays the same)."""
    import importlib.util
    import py_compile

    dest = tree / MANAGER / "appliance"
    shutil.rmtree(dest, ignore_errors=True)
    src = Path(manifest.__file__).parent
    for p in [src.parent / "__init__.py", *sorted(src.glob("*.py"))]:
        out = dest / p.relative_to(src.parent)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, out)
        py_compile.compile(str(out), cfile=importlib.util.cache_from_source(str(out)),
                           dfile=f"/{MANAGER}/appliance/{p.relative_to(src.parent)}", doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    for d in [dest, *dest.rglob("*")]:
        d.chmod(0o755 if d.is_dir() else 0o644)


def install(cfg: Config, base: Base | None, tree: Path) -> dict[str, str]:
    """Lay each site's guest (its bundle, else the demo) into the tree's store as current: site -> version."""
    if "booth" not in cfg.recipe.overlays:
        return {}  # no guest manager in this image, so no guest to serve
    install_manager(cfg, tree)
    out = {}
    for i, site in enumerate(cfg.recipe.sites):
        src = user_bundle(cfg, i) or build(cfg, base).path
        with step(f"Installing the guest of site {site.name} from {config.rel(src)} into /{STORE}/{site.name}"):
            out[site.name] = store(tree, src, site)
    return out


def build_task(recipe: str = "booth", cache: str | Path | None = None) -> Bundle:
    """`invoke guest`: the demo bundle for a recipe's board packages (from the cached base tree)."""
    from .config import load

    cfg = load(recipe, cache=Path(cache) if cache else None)
    bundle = build(cfg)
    log.info(f"demo guest {bundle.version}: {bundle.path}")
    return bundle
