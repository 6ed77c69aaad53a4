"""dom0's initramfs: ours, not initramfs-tools'. Static busybox, board/initramfs-init and the boards' short
module list with what those depend on, packed on the host with no emulation (no udev coldplug), reproducibly,
and cached by what shapes it (kernel, modules, init, busybox, the packer).
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from .. import cpio, kmod, log
from ..config import Config
from ..errors import BuildError
from ..log import step
from . import rootfs
from .bootfiles import Kernel, find_kernel
from .step import Step

if TYPE_CHECKING:
    from .context import Context

INIT = "board/initramfs-init"  # dom0's /init
# The root's check before it is mounted, as initramfs-tools does: the tree's own e2fsck with the libraries it loads.
# /run/initramfs/fsck-root then tells systemd-fsck-root it was done; the boot's writers no longer wait for it.
FSCK = "usr/sbin/e2fsck"
# a board with no RTC battery starts in 1970 or from a saved clock: the check must not take that for damage
E2FSCK_CONF = b"[options]\n\tbroken_system_clock = true\n"


def elf_needs(data: bytes, what: str) -> tuple[str | None, list[str]]:
    """An ELF executable's or library's interpreter and the shared libraries it names (DT_NEEDED), read from its
    program headers and dynamic section: no host tool reads a foreign architecture's binaries."""
    if data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        raise BuildError(f"{what}: not an ELF file")
    wide, end = data[4] == 2, "<" if data[5] == 1 else ">"
    phoff, (phentsize, phnum) = (struct.unpack_from(end + ("Q" if wide else "I"), data, 32 if wide else 28)[0],
                                 struct.unpack_from(end + "HH", data, 54 if wide else 42))
    ph = end + ("IIQQQQQQ" if wide else "IIIIIIII")
    loads, interp, dynamic = [], None, None
    for i in range(phnum):
        f = struct.unpack_from(ph, data, phoff + i * phentsize)
        kind, offset, vaddr, size = (f[0], f[2], f[3], f[5]) if wide else (f[0], f[1], f[2], f[4])
        if kind == 1:
            loads.append((vaddr, offset, size))
        elif kind == 2:
            dynamic = (offset, size)
        elif kind == 3:
            interp = data[offset:offset + size].rstrip(b"\0").decode()
    if dynamic is None:
        return interp, []
    entry = end + ("qQ" if wide else "iI")
    tags = [struct.unpack_from(entry, data, dynamic[0] + i)
            for i in range(0, dynamic[1], struct.calcsize(entry))]
    strtab = next((v for t, v in tags if t == 5), None)
    base = next((strtab - a + o for a, o, n in loads if strtab is not None and a <= strtab < a + n), None)
    if base is None:
        raise BuildError(f"{what}: its dynamic section has no string table")
    return interp, [data[base + v:data.index(b"\0", base + v)].decode() for t, v in tags if t == 1]


def with_libraries(tree: Path, program: str, place: str) -> dict[str, bytes]:
    """The tree's program (put at place) and every library it loads, directly or not, with the dynamic loader:
    paths in the initramfs -> contents. Libraries go to lib/<multiarch>/ and the loader where the program names
    it, as the loader looks for them there; the initramfs's lib/ stays a folder (the modules are in it)."""
    dirs = [*(str(d.relative_to(tree)) for d in sorted(tree.glob("usr/lib/*-linux-gnu*"))), "usr/lib"]  # multiarch
    out: dict[str, bytes] = {}
    loaders: set[str] = set()
    todo = [(program, place)]
    while todo:
        rel, to = todo.pop()
        if to in out:
            continue
        data = (tree / rel).read_bytes()     # through the tree's own links (libfoo.so.2 -> libfoo.so.2.4)
        out[to] = data
        interp, needs = elf_needs(data, f"{tree.name}/{rel}")
        if interp:
            todo.append((interp.lstrip("/"), interp.lstrip("/")))
            loaders.add(Path(interp).name)
        for lib in needs:
            if lib in loaders:           # libc names the loader too: it is there already, where programs look
                continue
            d = next((d for d in dirs if (tree / d / lib).exists()), None)
            if d is None:
                raise BuildError(f"{rel} needs {lib}, which the tree does not have")
            todo.append((f"{d}/{lib}", f"lib/{Path(d).name}/{lib}" if d != "usr/lib" else f"lib/{lib}"))
    return out


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

    # each board's own list (the init loads the one boot.scr names), and the modules-load.d ones for every board;
    # then what they want loaded first (a soft dependency: ext4's crc32c, for which a CPU without the ARMv8 CRC
    # instructions refuses the accelerated module and takes the generic one), which the init lets fail
    lists = {f"etc/modules.{b.name}": list(b.modules) for b in (cfg.board, *cfg.also)}
    lists["etc/modules"] = early_modules(tree)
    named = list(dict.fromkeys(m for names in lists.values() for m in names))
    lists["etc/modules.soft"] = kmod.softdeps(moddir, kmod.module_paths(moddir, named))
    wanted = [*lists["etc/modules.soft"], *named]
    paths = kmod.module_paths(moddir, wanted)
    init, busybox = cfg.root / INIT, base.deb("busybox-static")
    fsck = with_libraries(tree, FSCK, "sbin/e2fsck")
    h = hashlib.sha256(kernel.version.encode())
    for name, data in [("init", init.read_bytes()), ("busybox", busybox.read_bytes()),
                       ("packer", Path(cpio.__file__).read_bytes()),
                       ("kmod", Path(kmod.__file__).read_bytes()),
                       *((f, "\n".join(names).encode()) for f, names in sorted(lists.items())),
                       *sorted(fsck.items()), ("e2fsck.conf", E2FSCK_CONF),
                       *((rel, (moddir / rel).read_bytes()) for rel in paths)]:
        h.update(f"{name}\0".encode() + hashlib.sha256(data).digest())
    cached = cfg.cache / "initrd" / f"initrd-{h.hexdigest()[:16]}.img"
    if cached.exists():
        log.info(f"initramfs from cache ({cached.name})")
    else:
        with step(f"Making dom0's initramfs ({len(paths)} modules, busybox, e2fsck, {INIT})"):
            work = cached.with_name(cached.name + ".work")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            try:
                entries = [cpio.directory(d) for d in ("dev", "proc", "root", "run", "sys", "tmp")]  # mount points
                entries += [cpio.CONSOLE, cpio.file("init", init.read_bytes(), 0o755),
                            cpio.file("bin/busybox", cpio.busybox(busybox, work), 0o755),
                            cpio.symlink("bin/sh", "busybox"), cpio.symlink("sbin/modprobe", "/bin/busybox"),
                            *(cpio.file(f, "".join(f"{m}\n" for m in names).encode())
                              for f, names in sorted(lists.items())),
                            *(cpio.file(f, data, 0o755) for f, data in sorted(fsck.items())),
                            cpio.file("etc/e2fsck.conf", E2FSCK_CONF)]
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
