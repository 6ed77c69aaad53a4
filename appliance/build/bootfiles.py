"""Boot files: Xen, the dom0 zImage, the initramfs, the boards' DTBs and a boot.scr made with mkimage; the SPL.

The boot partition's files are laid in the workspace and checked against each board's RAM layout; the SPL
comes from the board's U-Boot package in the rootfs cache.
"""

from __future__ import annotations

import itertools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from ..config import BoardSpec, Config
from ..errors import BuildError, RecipeError
from ..identity import Identity
from ..log import run
from . import rootfs
from .step import Step

if TYPE_CHECKING:
    from .context import Context


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    xen: Path
    dtb_dir: Path


def find_kernel(tree: Path) -> Kernel:
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    xens = sorted((tree / "boot").glob("xen-*-armhf"))
    if len(kernels) != 1 or not xens:
        raise BuildError(f"expected one kernel and a Xen in {tree}/boot, found {[p.name for p in kernels + xens]}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    return Kernel(version, kernels[0], xens[-1], tree / "usr/lib" / f"linux-image-{version}")


def xen_args(cfg: Config, b: BoardSpec) -> str:
    args = f"console=dtuart dtuart={b.console.xen_uart} dom0_mem={b.dom0.memory_mib}M dom0_max_vcpus={b.dom0.vcpus}"
    return f"{args} {b.xen_args}".strip()


def dom0_args(cfg: Config, ident: Identity, b: BoardSpec) -> str:
    # appliance.board: which of the initramfs's module lists (etc/modules.BOARD) this board loads.
    # cryptomgr.notests: no self-tests of the kernel's crypto algorithms against test vectors as each registers
    # (they catch a miscompiled implementation, not an attack): about a second of an emulated boot.
    # rw: the initramfs checks the root before it mounts it (read-only if the check fails: board/initramfs-init).
    args = (f"console={b.console.dom0} root=PARTUUID={ident.root_partuuid} rootwait rw clk_ignore_unused "
            f"cryptomgr.notests appliance.board={b.name}")
    return f"{args} {b.dom0_args}".strip()


def boot_cmd(cfg: Config, ident: Identity, xen_version: str = "4.17") -> str:
    names = {b.uboot.board_name for b in cfg.also}
    if cfg.board.uboot.board_name in names:
        raise RecipeError(f"{cfg.recipe_path.name}: also_boots: a board reports the same ${{board_name}} "
                          f"'{cfg.board.uboot.board_name}' as {cfg.board.name}, so boot.scr cannot tell them apart")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(cfg.root / "board")),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template("boot.cmd.j2").render(
        image=cfg.image_name, xen_version=xen_version, board=cfg.board, others=cfg.also,
        xen_args=lambda b: xen_args(cfg, b), dom0_args=lambda b: dom0_args(cfg, ident, b))


def collect(cfg: Config, ident: Identity, tree: Path, kernel: Kernel, initrd: Path, out: Path,
            sde: int) -> dict[str, Path]:
    """Lay the boot partition's files in out/ and compile boot.scr."""
    if out.exists():
        shutil.rmtree(out)
    (out / "dtbs").mkdir(parents=True)
    files = {"xen": kernel.xen, "vmlinuz": kernel.vmlinuz, "initrd.img": initrd}
    for b in (cfg.board, *cfg.also):
        if b.dtb:
            src = kernel.dtb_dir / b.dtb
            if not src.exists():
                raise BuildError(f"board/{b.name}.yaml: dtb: {b.dtb} is not in {kernel.dtb_dir.name}")
            files[f"dtbs/{b.dtb}"] = src
    for name, src in files.items():
        shutil.copyfile(src, out / name)
    xen_version = kernel.xen.name.split("-")[1]
    (out / "boot.cmd").write_text(boot_cmd(cfg, ident, xen_version))
    run(["mkimage", "-A", "arm", "-O", "linux", "-T", "script", "-C", "none", "-n", f"{cfg.image_name} boot script",
         "-d", out / "boot.cmd", out / "boot.scr"], env={"SOURCE_DATE_EPOCH": str(sde)}, what="mkimage")
    placed = {name: out / name for name in files}
    placed["boot.scr"] = out / "boot.scr"
    check_layout(cfg.board, {k: p.stat().st_size for k, p in placed.items()})
    return placed


def regions(b: BoardSpec, sizes: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Where each loaded file sits in RAM on board b: name -> (start, end)."""
    dtb = sizes.get(f"dtbs/{b.dtb}", 0) + 8192 if b.dtb else b.load.dtb_room + 4096
    return {
        "xen": (b.load.xen, b.load.xen + sizes["xen"]),
        "vmlinuz": (b.load.kernel, b.load.kernel + sizes["vmlinuz"]),
        "initrd.img": (b.load.initrd, b.load.initrd + sizes["initrd.img"]),
        "dtb": (b.load.dtb, b.load.dtb + max(dtb, b.load.dtb_room)),
    }


def check_layout(b: BoardSpec, sizes: dict[str, int]) -> None:
    """Every loaded file lies in the board's RAM and none overlaps another or the relocated DTB."""
    regs = sorted(regions(b, sizes).items(), key=lambda kv: kv[1])
    end_of_ram = b.ram.base + b.ram.size
    for name, (start, end) in regs:
        if start < b.ram.base or end > end_of_ram:
            raise BuildError(f"board/{b.name}.yaml: load: {name} at {start:#x}-{end:#x} is outside RAM "
                             f"{b.ram.base:#x}-{end_of_ram:#x}")
    for (n1, (s1, e1)), (n2, (s2, _)) in itertools.pairwise(regs):
        if e1 > s2:
            raise BuildError(f"board/{b.name}.yaml: load: {n1} ({s1:#x}-{e1:#x}) overlaps {n2} at {s2:#x}")


def extract_spl(base: rootfs.Base, cfg: Config, work: Path) -> Path | None:
    """The board's SPL from its U-Boot package, or None when QEMU loads U-Boot with -bios."""
    if cfg.board.uboot.offset is None:
        return None
    deb = base.deb(cfg.board.uboot.package)
    dest = work / "uboot"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    run(["dpkg-deb", "-x", deb, dest], what=f"dpkg-deb -x {deb.name}")
    spl = dest / cfg.board.uboot.file
    if not spl.exists():
        raise BuildError(f"board/{cfg.board.name}.yaml: uboot.file: {cfg.board.uboot.file} is not in {deb.name}")
    return spl


class BootFiles(Step):
    name = "boot files"
    title = "Collecting boot files and compiling boot.scr"
    tools = ("mkimage", "dpkg-deb")

    def verify(self, ctx: Context) -> None:
        boot_cmd(ctx.cfg, ctx.ident)

    def run(self, ctx: Context) -> None:
        ctx.boot_files = collect(ctx.cfg, ctx.ident, ctx.tree, ctx.kernel, ctx.initrd, ctx.work / "boot", ctx.sde)
        ctx.spl = extract_spl(ctx.base, ctx.cfg, ctx.work)
