"""dom0's initramfs: ours, not initramfs-tools'. Static busybox, board/initramfs-init and the boards' short
module list with what those depend on, packed on the host with no emulation (no udev coldplug), reproducibly,
and cached by what shapes it (kernel, modules, init, busybox, the packer).
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .. import cpio, kmod, log
from ..config import Config
from ..log import step
from . import rootfs
from .bootfiles import Kernel, find_kernel
from .step import Step

if TYPE_CHECKING:
    from .context import Context

INIT = "board/initramfs-init"  # dom0's /init


def early_modules(tree: Path) -> list[str]:
    """The modules the tree's /etc/modules-load.d asks for (the overlays' Xen, bridge and nftables ones)."""
    names: list[str] = []
    for conf in sorted((tree / "etc/modules-load.d").glob("*.conf")):
        for line in conf.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith(("#", ";")):
                names.append(line)
    return names


def initramfs(cfg: Config, tree: Path, kernel: Kernel, base: rootfs.Base) -> Path:
    """dom0's initramfs: static busybox, board/initramfs-init and the boards' modules with what they depend
    on, packed on the host (no emulation, no udev), reproducibly, and cached by its inputs. It also loads the
    modules of the tree's modules-load.d: loaded there, before anything else runs, they cost a fraction of
    the time systemd-modules-load took in a busy boot, and xenstored and the firewall no longer wait for it."""
    moddir = tree / "usr/lib/modules" / kernel.version

    def with_softdeps(names: list[str]) -> list[str]:
        return list(dict.fromkeys([*kmod.softdeps(moddir, kmod.module_paths(moddir, names)), *names]))

    # each board's own list (the init loads the one boot.scr names), and the modules-load.d ones for every board
    lists = {f"etc/modules.{b.name}": with_softdeps(list(b.modules)) for b in (cfg.board, *cfg.also)}
    lists["etc/modules"] = with_softdeps(early_modules(tree))
    wanted = list(dict.fromkeys(m for names in lists.values() for m in names))
    paths = kmod.module_paths(moddir, wanted)
    init, busybox = cfg.root / INIT, base.deb("busybox-static")
    h = hashlib.sha256(kernel.version.encode())
    for name, data in [("init", init.read_bytes()), ("busybox", busybox.read_bytes()),
                       ("packer", Path(cpio.__file__).read_bytes()),
                       ("kmod", Path(kmod.__file__).read_bytes()),
                       *((f, "\n".join(names).encode()) for f, names in sorted(lists.items())),
                       *((rel, (moddir / rel).read_bytes()) for rel in paths)]:
        h.update(f"{name}\0".encode() + hashlib.sha256(data).digest())
    cached = cfg.cache / "initrd" / f"initrd-{h.hexdigest()[:16]}.img"
    if cached.exists():
        log.info(f"initramfs from cache ({cached.name})")
    else:
        with step(f"Making dom0's initramfs ({len(paths)} modules, busybox, {INIT})"):
            work = cached.with_name(cached.name + ".work")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            try:
                entries = [cpio.directory(d) for d in ("dev", "proc", "root", "run", "sys", "tmp")]  # mount points
                entries += [cpio.CONSOLE, cpio.file("init", init.read_bytes(), 0o755),
                            cpio.file("bin/busybox", cpio.busybox(busybox, work), 0o755),
                            cpio.symlink("bin/sh", "busybox"), cpio.symlink("sbin/modprobe", "/bin/busybox"),
                            *(cpio.file(f, "".join(f"{m}\n" for m in names).encode())
                              for f, names in sorted(lists.items()))]
                entries += kmod.modules(kernel.version, {rel: moddir / rel for rel in paths}, work)
                (work / "initrd.img").write_bytes(gzip.compress(cpio.pack(entries), compresslevel=9, mtime=0))
                (work / "initrd.img").rename(cached)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    target = tree / "boot" / f"initrd.img-{kernel.version}"
    shutil.copyfile(cached, target)
    return target


class Initramfs(Step):
    name = "initramfs"
    tools = ("depmod", "dpkg-deb")

    def run(self, ctx: Context) -> None:
        ctx.kernel = find_kernel(ctx.tree)
        ctx.initrd = initramfs(ctx.cfg, ctx.tree, ctx.kernel, ctx.base)
