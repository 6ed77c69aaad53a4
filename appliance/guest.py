"""Guest bundles: a Xen ARM zImage, an optional ramdisk and guest.yaml; the demo guest; the image's guest store.

`build()` makes the demo bundle from the cached base tree (the armmp zImage, and a deterministic initramfs of
busybox httpd, xen-netfront and the site in guest/) with no emulation, cached by its inputs. `install()` lays
the recipe's guest into the image's store as `current`, checked by the launcher's own code.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.machinery
import importlib.util
import ipaddress
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from . import config, cpio, log, rootfs
from .config import Config
from .cpio import Entry
from .errors import GuestError
from .files import sha256
from .log import step

DEMO_NAME = "demo"
DEMO_RELEASE = "1.0"       # bump when the demo changes in a way its inputs' digest would not show
LAUNCHER = "overlays/booth/usr/local/sbin/appliance-guest"
STORE = "var/lib/appliance/guests"
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


def _inputs(cfg: Config, base: rootfs.Base) -> dict[str, Path]:
    kver, vmlinuz = _kernel(base.tree)
    moddir = base.tree / "usr/lib/modules" / kver
    files = {"vmlinuz": vmlinuz, "busybox.deb": base.deb("busybox-static")}
    files.update({f"modules/{m}": moddir / m for m in cpio.module_paths(moddir, [NETFRONT])})
    demo = cfg.root / "guest"
    files.update({f"guest/{p.relative_to(demo)}": p for p in sorted(demo.rglob("*")) if p.is_file()})
    files["builder"] = Path(__file__)  # how the bundle is made is an input too
    files["packer"] = Path(cpio.__file__)
    return files


def _digest(files: dict[str, Path]) -> str:
    h = hashlib.sha256(DEMO_RELEASE.encode())
    for name, p in sorted(files.items()):
        h.update(f"{name}\0{p.stat().st_mode & 0o111}\0".encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def build(cfg: Config, base: rootfs.Base | None = None) -> Bundle:
    """The demo guest bundle (build/guests/demo-VERSION/): made once per set of inputs, then reused."""
    base = base or rootfs.ensure(cfg)
    files = _inputs(cfg, base)
    version = f"{DEMO_RELEASE}-{_digest(files)[:10]}"
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
            "extra": "console=hvc0 ip={address}::{gateway}:{netmask}:{name}:eth0:off appliance.port={port}",
            "built_from": {"kernel": kver, "busybox": files["busybox.deb"].name},
        }
        (tmp / "guest.yaml").write_text(json.dumps(manifest, indent=1) + "\n")
        shutil.rmtree(tmp / "work", ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        for old in out.parent.glob(f"{DEMO_NAME}-*"):
            if old != out:
                shutil.rmtree(old)  # earlier demo builds: their inputs are gone
        log.info(f"{out.relative_to(cfg.root)}: vmlinuz {files['vmlinuz'].stat().st_size >> 10} KiB, "
                 f"initrd.gz {len(initrd) >> 10} KiB")
    return Bundle(out, DEMO_NAME, version)


def _initramfs(files: dict[str, Path], kver: str, version: str, tmp: Path) -> list[Entry]:
    mods = {n.removeprefix("modules/"): p for n, p in files.items() if n.startswith("modules/")}
    entries = [cpio.directory(d) for d in ("dev", "proc", "run", "sys", "tmp", "www", "www/cgi-bin")]
    entries += [cpio.CONSOLE, cpio.symlink("bin/sh", "busybox"),
                cpio.file("bin/busybox", cpio.busybox(files["busybox.deb"], tmp), 0o755),
                cpio.file("etc/guest-version", f"{version}\n".encode())]
    entries += cpio.modules(kver, mods, tmp)
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


def launcher(cfg: Config) -> ModuleType:
    """The board's own launcher, imported from the overlay, so the host checks a bundle as the board will."""
    path = cfg.root / LAUNCHER
    name = f"appliance_guest_launcher_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    keep, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ in the overlay (or the image)
    try:
        loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = keep
    return module


def site(cfg: Config) -> dict[str, Any]:
    """What /etc/appliance/guest.json says on the board: the recipe's guest and network values."""
    g, n = cfg.recipe.guest, cfg.recipe.network
    iface = ipaddress.IPv4Interface(n.address)
    return {"bridge": n.bridge, "address": g.address, "netmask": str(iface.netmask), "prefix": iface.network.prefixlen,
            "gateway": str(iface.ip), "mac": g.mac, "memory": g.memory_mib, "vcpus": g.vcpus, "port": g.port,
            "health_path": g.health_path, "deadline": g.deadline}


def read_bundle(path: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """A bundle's manifest and files: a directory with guest.yaml, or a bare zImage (MirageOS/Mini-OS .xen)."""
    if path.is_file():
        digest = sha256(path)
        name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in path.name.split(".")[0]) or "guest"
        return ({"name": name, "version": f"{name}-{digest[:10]}", "kernel": path.name,
                 "sha256": {path.name: digest}}, {path.name: path})
    try:
        data = yaml.safe_load((path / "guest.yaml").read_text())
    except OSError as exc:
        raise GuestError(f"{path}/guest.yaml: cannot read: {exc.strerror}") from None
    except yaml.YAMLError:
        raise GuestError(f"{path}/guest.yaml: not valid YAML") from None
    if not isinstance(data, dict):
        raise GuestError(f"{path}/guest.yaml: must be a mapping of keys")
    files = {}
    for key in ("kernel", "ramdisk"):
        fname = data.get(key)
        if key == "kernel" and not isinstance(fname, str):
            raise GuestError(f"{path}/guest.yaml: kernel: missing (the file name of the guest's zImage)")
        if isinstance(fname, str):
            files[fname] = path / fname
    return data, files


def user_bundle(cfg: Config) -> Path | None:
    """The bundle the recipe names (guest.bundle, relative to the recipe), or None for the demo guest."""
    spec = cfg.recipe.guest.bundle
    if not spec:
        return None
    src = Path(spec).expanduser()
    src = src if src.is_absolute() else cfg.recipe_path.parent / src
    if not src.exists():
        raise GuestError(f"{config.rel(cfg.recipe_path)}: guest.bundle: no such file or directory {src}")
    return src


def check(cfg: Config) -> None:
    """For `--dry-run`: the recipe's own bundle is complete, its checksums match and its kernel is a zImage."""
    src = user_bundle(cfg)
    if src is None:
        missing = [n for n in ("init", "site/index.html", "site/game.js") if not (cfg.root / "guest" / n).is_file()]
        if missing:
            raise GuestError(f"the demo guest's sources are incomplete: guest/{', guest/'.join(missing)} missing")
        return
    manifest, files = read_bundle(src)
    sums = manifest.get("sha256") or {}
    for fname, p in files.items():
        if not p.is_file():
            raise GuestError(f"{src}: {fname}: no such file in the bundle")
        if not isinstance(sums, dict) or sums.get(fname) != sha256(p):
            raise GuestError(f"{src}/guest.yaml: sha256: {fname} is missing or does not match the file")
    if not launcher(cfg).is_zimage(files[manifest["kernel"]]):
        raise GuestError(f"{files[manifest['kernel']]}: not an ARM zImage (Linux zImage, Mini-OS or MirageOS .xen)")


def install(cfg: Config, base: rootfs.Base | None, tree: Path) -> str | None:
    """Lay the recipe's guest (guest.bundle, else the demo) into the tree's store as `current`; its version."""
    src = user_bundle(cfg)
    if src is None and "booth" not in cfg.recipe.overlays:
        return None  # no launcher in this image, so no guest to serve
    src = src or build(cfg, base).path
    manifest, files = read_bundle(src)
    version = str(manifest.get("version", ""))
    if not version or "/" in version or version.startswith(".") or version in ("current", "previous"):
        raise GuestError(f"{src}: version: '{version}' cannot name a directory of the guest store")
    s = site(cfg)
    # What the bundle leaves out comes from the recipe, so the board's guest.yaml is complete on its own.
    for key, value in (("memory", s["memory"]), ("vcpus", s["vcpus"]), ("mac", s["mac"]),
                       ("health", {"port": s["port"], "path": s["health_path"], "deadline": s["deadline"]})):
        manifest.setdefault(key, value)
    store = tree / STORE
    dest = store / version
    with step(f"Installing guest {manifest.get('name')} {version} into /{STORE} as current"):
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        store.chmod(0o755)
        for fname, p in files.items():
            if not p.is_file():
                raise GuestError(f"{src}: {fname}: no such file in the bundle")
            shutil.copyfile(p, dest / fname)
        (dest / "guest.yaml").write_text(json.dumps(manifest, indent=1) + "\n")
        mod = launcher(cfg)
        try:
            mod.verify(mod.load(dest, s))
        except mod.Error as exc:
            raise GuestError(f"guest bundle {src}: {exc}") from None
        current = store / "current"
        if current.is_symlink() or current.exists():
            current.unlink()
        current.symlink_to(version)
    return version


def build_task(recipe: str = "booth") -> Bundle:
    """`invoke guest`: the demo bundle for a recipe's board packages (from the cached base tree)."""
    from .config import load

    cfg = load(recipe)
    bundle = build(cfg)
    log.info(f"demo guest {bundle.version}: {bundle.path}")
    return bundle
