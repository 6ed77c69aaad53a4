"""The disk image, made from files alone: no loop devices, no mounts, no root-only kernel features.

MBR (a GPT's entries would overlap the SPL at 8 KiB), a FAT boot partition at 1 MiB made with
mkfs.vfat + mcopy, an ext4 root made with `mke2fs -d`, both spliced sparsely into the image file, then
the SPL. Identities and timestamps are fixed, so the same inputs give the same bytes.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import MiB, log
from ..config import rel
from ..errors import BuildError
from ..files import partial
from ..identity import Identity
from ..log import run
from .step import Step

if TYPE_CHECKING:
    from .context import Context

BOOT_START = 1 * MiB


@dataclass(frozen=True)
class Layout:
    boot_start: int
    boot_size: int
    root_start: int
    root_size: int

    @property
    def total(self) -> int:
        return self.root_start + self.root_size


def clamp_times(top: Path, sde: int) -> int:
    """Clamp every mtime/atime under top to SOURCE_DATE_EPOCH; return the number of entries."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if st.st_mtime > sde or st.st_atime > sde:
                os.utime(p, (min(st.st_atime, sde), min(st.st_mtime, sde)), follow_symlinks=False)
            n += 1
    os.utime(top, (sde, sde))
    return n + 1


def tree_bytes(top: Path) -> tuple[int, int]:
    """(bytes in 4 KiB blocks, number of inodes) that the tree needs."""
    blocks = inodes = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            inodes += 1
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                blocks += (st.st_size + 4095) // 4096
    return blocks * 4096, inodes


def layout(boot_size: int, root_tree: Path, root_free: int) -> Layout:
    used, inodes = tree_bytes(root_tree)
    # ext4 overhead: inode tables, journal (64 MiB for this size), bitmaps, reserved blocks; rounded to 4 MiB.
    root = used + used // 8 + inodes * 256 + 80 * MiB + root_free
    root = (root + 4 * MiB - 1) // (4 * MiB) * (4 * MiB)
    return Layout(BOOT_START, boot_size, BOOT_START + boot_size, root)


def make_root_fs(tree: Path, out: Path, size: int, ident: Identity, sde: int) -> None:
    out.unlink(missing_ok=True)
    with open(out, "wb") as f:
        f.truncate(size)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "root", "-U", ident.root_uuid, "-m", "1",
         "-E", f"hash_seed={ident.hash_seed},lazy_itable_init=0,nodiscard", "-d", tree, out],
        env={"E2FSPROGS_FAKE_TIME": str(sde)}, what="mke2fs -d (root filesystem)")
    fix_times(tree, out, sde)


def fix_times(tree: Path, fs: Path, sde: int) -> None:
    """mke2fs -d copies each file's ctime (the time of the copy) and atime (which its own reading may have
    just set, relatime); set both to SDE for reproducibility. The superblock's count of bytes ever written goes to
    0 (and so stays: e2fsprogs adds to it only when it is not 0): it counts how mke2fs wrote, which depends on the
    workspace's filesystem (tmpfs or disk) as well as the tree, and made two builds of the same tree differ."""
    cmds = [f'sif "/" ctime @{sde}', f'sif "/" atime @{sde}', "ssv kbytes_written 0"]
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), tree)
            if '"' in rel or "\n" in rel:
                raise BuildError(f"rootfs path {rel!r} cannot be stamped reproducibly (a quote or newline in it)")
            cmds += [f'sif "/{rel}" ctime @{sde}', f'sif "/{rel}" atime @{sde}']
    script = fs.with_suffix(".debugfs")
    script.write_text("\n".join(cmds) + "\n")
    run(["debugfs", "-w", "-f", script, fs], env={"E2FSPROGS_FAKE_TIME": str(sde)}, what="debugfs (timestamps)")
    script.unlink()


def check_boot_room(files: dict[str, Path], size: int, recipe: str) -> None:
    """Refuse, before mkfs, a boot partition too small for its files (with FAT's tables and each file's last
    cluster), naming the recipe's setting: mcopy's own error would say only "disk full"."""
    need = sum(p.stat().st_size for p in files.values()) + 2 * MiB + len(files) * 4096
    if need > size:
        raise BuildError(f"{recipe}: image.boot_size: {size >> 20}MiB cannot hold the boot files (Xen, the kernel, "
                         f"the initramfs, the DTBs, boot.scr): they need {-(-need // MiB)}MiB")


def make_boot_fs(files: dict[str, Path], out: Path, size: int, ident: Identity, sde: int) -> None:
    out.unlink(missing_ok=True)
    run(["mkfs.vfat", "--invariant", "-i", ident.boot_volid, "-n", "BOOT", "-C", out, str(size // 1024)],
        env={"SOURCE_DATE_EPOCH": str(sde)}, what="mkfs.vfat (boot partition)")
    dirs = sorted({str(Path(n).parent) for n in files if "/" in n})
    env = {"SOURCE_DATE_EPOCH": str(sde), "MTOOLS_SKIP_CHECK": "1"}
    for d in dirs:
        run(["mmd", "-i", out, f"::/{d}"], env=env, what="mmd")
    for name in sorted(files):
        run(["mcopy", "-m", "-i", out, files[name], f"::/{name}"], env=env, what=f"mcopy {name}")


def splice(src: Path, dst_fd: int, offset: int) -> None:
    """Copy src into dst at offset, data extents only, so holes stay holes."""
    with open(src, "rb") as f:
        fd, end, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < end:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break  # only a hole is left
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < hole:
                pos += _copy(fd, dst_fd, min(hole - pos, 8 << 20), pos, offset + pos)


def _copy(src: int, dst: int, count: int, at: int, to: int) -> int:
    """copy_file_range, or plain reads and writes between filesystems that cannot do it (tmpfs -> ext4)."""
    try:
        return os.copy_file_range(src, dst, count, at, to)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    data = os.pread(src, count, at)
    return os.pwrite(dst, data, to)


def assemble(out: Path, lay: Layout, ident: Identity, boot_fs: Path, root_fs: Path,
             spl: Path | None, spl_offset: int | None) -> None:
    out.unlink(missing_ok=True)
    with open(out, "wb") as f:
        f.truncate(lay.total)
    script = (f"label: dos\nlabel-id: 0x{ident.disk_id}\nunit: sectors\n\n"
              f"start={lay.boot_start // 512}, size={lay.boot_size // 512}, type=c, bootable\n"
              f"start={lay.root_start // 512}, size={lay.root_size // 512}, type=83\n")
    run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", out], input=script.encode(), what="sfdisk")
    fd = os.open(out, os.O_WRONLY)
    try:
        splice(boot_fs, fd, lay.boot_start)
        splice(root_fs, fd, lay.root_start)
        if spl is not None and spl_offset is not None:
            data = spl.read_bytes()
            if spl_offset + len(data) > lay.boot_start:
                raise BuildError(f"{spl.name} ({len(data)} bytes at {spl_offset}) would overlap the boot partition")
            os.pwrite(fd, data, spl_offset)
        os.fsync(fd)
    finally:
        os.close(fd)


class Image(Step):
    """The boot and root filesystems, and the image made of them and the SPL, under its partial name."""

    name = "image"
    title = "Making the filesystems and the image (no loop devices, no mounts)"
    tools = ("mke2fs", "debugfs", "mkfs.vfat", "mcopy", "mmd", "sfdisk")

    def run(self, ctx: Context) -> None:
        cfg, work = ctx.cfg, ctx.work
        n = clamp_times(ctx.tree, ctx.sde)
        clamp_times(work / "boot", ctx.sde)
        lay = ctx.layout = layout(cfg.recipe.image.boot_size, ctx.tree, cfg.recipe.image.root_free)
        log.info(f"{n} files; boot {lay.boot_size >> 20} MiB at 1 MiB, root {lay.root_size >> 20} MiB")
        boot = {**ctx.boot_files, "boot.cmd": ctx.boot_files["boot.scr"].with_name("boot.cmd")}
        check_boot_room(boot, lay.boot_size, rel(cfg.recipe_path))
        make_boot_fs(boot, work / "boot.vfat", lay.boot_size, ctx.ident, ctx.sde)
        make_root_fs(ctx.tree, work / "root.ext4", lay.root_size, ctx.ident, ctx.sde)
        ctx.tmp_img = partial(ctx.outputs().img)
        assemble(ctx.tmp_img, lay, ctx.ident, work / "boot.vfat", work / "root.ext4", ctx.spl, cfg.board.uboot.offset)
