"""The build: verify everything first, then recipe -> rootfs -> configure -> boot files -> image -> outputs.

Every step is checked before any work starts (`--dry-run` stops there). Outputs are written under
temporary names and renamed when complete, so a failed or interrupted build never leaves a half image
where a finished one belongs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import ROOT, bootfiles, compress, configure, guest, image, log, rootfs
from .config import Config, load, rel
from .errors import BuildError, ToolError
from .files import partial, sha256, write_atomic
from .identity import Identity, derive
from .log import run, step

HOST_TOOLS = ("mmdebstrap", "mke2fs", "debugfs", "mkfs.vfat", "mcopy", "mmd", "sfdisk", "mkimage", "xz",
              "dpkg-deb", "unshare", "chroot", "cp", "tar")


@dataclass(frozen=True)
class Outputs:
    img: Path
    bmap: Path
    xz: Path
    sums: Path
    manifest: Path


@dataclass
class Context:
    """The mutable state of one build: where things are being made."""

    cfg: Config
    ident: Identity
    sde: int
    keys: str | None
    out_dir: Path
    work: Path

    @property
    def tree(self) -> Path:
        return self.work / "rootfs"

    def outputs(self) -> Outputs:
        stem = self.out_dir / self.cfg.image_name
        return Outputs(stem.with_suffix(".img"), stem.with_suffix(".bmap"), stem.with_suffix(".img.xz"),
                       self.out_dir / f"{self.cfg.image_name}.SHA256SUMS",
                       self.out_dir / f"{self.cfg.image_name}.manifest.json")


def source_date_epoch(cfg: Config) -> int:
    """SOURCE_DATE_EPOCH from the environment, else the recipe, else the last git commit."""
    if os.environ.get("SOURCE_DATE_EPOCH", "").isdigit():
        return int(os.environ["SOURCE_DATE_EPOCH"])
    if cfg.recipe.source_date_epoch is not None:
        return cfg.recipe.source_date_epoch
    try:
        out = subprocess.run(["git", "-C", str(cfg.root), "log", "-1", "--format=%ct"], capture_output=True,
                             text=True, check=True).stdout.strip()
        return int(out)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return int(cfg.recipe_path.stat().st_mtime)


def verify(recipe: str, authorized_keys: str | None, *, need_secrets: bool = True) -> Context:
    """Check the recipe, board, overlays, templates and host tools without building anything."""
    cfg = load(recipe)
    missing = [t for t in HOST_TOOLS if not shutil.which(t, path=log.clean_env()["PATH"])]
    if missing:
        raise ToolError(f"host tools missing: {', '.join(missing)}", hint="run ./setup.sh")
    ident = derive(cfg.digest)
    if authorized_keys:  # the command line's path is the user's, relative to where they are
        keys = configure.authorized_keys(authorized_keys, Path.cwd(), "--authorized-keys")
    else:
        keys = configure.authorized_keys(cfg.recipe.ssh.authorized_keys, cfg.recipe_path.parent,
                                         f"{rel(cfg.recipe_path)}: ssh.authorized_keys")
    configure.render_overlays(cfg, configure.context(cfg, ident, need_secrets=need_secrets))
    bootfiles.boot_cmd(cfg, ident)
    guest.check(cfg)
    rootfs.wanted_sources(cfg)
    return Context(cfg, ident, source_date_epoch(cfg), keys, cfg.root / "build", workspace(cfg))


def workspace(cfg: Config) -> Path:
    """Where the tree and filesystems are made: tmpfs when it has room (the copy and mke2fs are then
    memory-bound, not disk-bound), else build/.work."""
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
        roomy = st.f_bavail * st.f_frsize > 4 << 30
    except OSError:
        roomy = False
    tag = hashlib.sha256(str(cfg.root).encode()).hexdigest()[:8]
    return (shm / f"appliance-{tag}" if roomy else cfg.root / "build" / ".work") / cfg.image_name


@contextlib.contextmanager
def exclusive(root: Path):
    """One build at a time per checkout: they share the rootfs cache and the workspace."""
    (root / "build").mkdir(exist_ok=True)
    with open(root / "build" / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another build in this checkout to finish…")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build(recipe: str = "booth", *, dry_run: bool = False, authorized_keys: str | None = None) -> Outputs | None:
    if dry_run:
        return _build(recipe, dry_run=True, authorized_keys=authorized_keys)
    with exclusive(ROOT):
        return _build(recipe, dry_run=False, authorized_keys=authorized_keys)


def _build(recipe: str, *, dry_run: bool, authorized_keys: str | None) -> Outputs | None:
    start = time.monotonic()
    log.durations.clear()
    with step(f"Checking recipe {recipe}, its boards, overlays, templates and host tools"):
        ctx = verify(recipe, authorized_keys)
        cfg = ctx.cfg
        if ctx.keys is None:
            log.warn("the image will have no SSH authorized key, so nobody can log in to it: give one with "
                     "--authorized-keys FILE or ssh.authorized_keys in the recipe")
        log.info(f"{cfg.image_name}: board {cfg.board.name} (+ {', '.join(b.name for b in cfg.also) or 'none'}),"
                 f" {cfg.recipe.suite}/{cfg.board.arch}, SOURCE_DATE_EPOCH={ctx.sde}")
    if dry_run:
        log.info("dry run: the recipe, boards, overlays and templates check out; nothing was built")
        return None
    out = ctx.outputs()
    _drop_partial(ctx.out_dir)
    try:
        return _make(ctx, out, start)
    except BaseException:
        _drop_partial(ctx.out_dir)  # a failed or interrupted build leaves the last finished image alone
        raise


def _make(ctx: Context, out: Outputs, start: float) -> Outputs:
    cfg = ctx.cfg
    base = rootfs.ensure(cfg)
    with step("Copying the base tree into the workspace"):
        rootfs.copy_tree(base.tree, ctx.tree)
    with step("Configuring the rootfs (overlays, users, SSH, fstab)"):
        srcs = rootfs.wanted_sources(cfg)
        configure.system(ctx.tree, cfg, ctx.ident, srcs, ctx.keys, ctx.sde)
        configure.lay(ctx.tree, configure.render_overlays(cfg, configure.context(cfg, ctx.ident)))
        guest.install(cfg, base, ctx.tree)
        configure.undivert_initramfs(ctx.tree)
    kernel = bootfiles.find_kernel(ctx.tree)
    initrd = bootfiles.initramfs(cfg, ctx.tree, kernel, base)
    with step("Collecting boot files and compiling boot.scr"):
        files = bootfiles.collect(cfg, ctx.ident, ctx.tree, kernel, initrd, ctx.work / "boot", ctx.sde)
        spl = extract_spl(base, cfg, ctx.work)
    with step("Making the filesystems and the image (no loop devices, no mounts)"):
        n = image.clamp_times(ctx.tree, ctx.sde)
        image.clamp_times(ctx.work / "boot", ctx.sde)
        lay = image.layout(cfg.recipe.image.boot_size, ctx.tree, cfg.recipe.image.root_free)
        log.info(f"{n} files; boot {lay.boot_size >> 20} MiB at 1 MiB, root {lay.root_size >> 20} MiB")
        image.make_boot_fs(files_for_boot(files), ctx.work / "boot.vfat", lay.boot_size, ctx.ident, ctx.sde)
        image.make_root_fs(ctx.tree, ctx.work / "root.ext4", lay.root_size, ctx.ident, ctx.sde)
        tmp_img = partial(out.img)
        image.assemble(tmp_img, lay, ctx.ident, ctx.work / "boot.vfat", ctx.work / "root.ext4", spl,
                       cfg.board.uboot.offset)
    outputs(ctx, out, tmp_img, base, kernel, lay, start)
    shutil.rmtree(ctx.work, ignore_errors=True)
    return out


def files_for_boot(files: dict[str, Path]) -> dict[str, Path]:
    boot = dict(files)
    boot["boot.cmd"] = files["boot.scr"].with_name("boot.cmd")
    return boot


def extract_spl(base: rootfs.Base, cfg: Config, work: Path) -> Path | None:
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


def _drop_partial(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in out_dir.glob(".*.partial"):
        p.unlink()


def outputs(ctx: Context, out: Outputs, tmp_img: Path, base: rootfs.Base, kernel: bootfiles.Kernel,
            lay: image.Layout, start: float) -> None:
    from . import bmap

    cfg = ctx.cfg
    with step("Writing the block map, the compressed image, checksums and the manifest"):
        tmp_bmap, tmp_xz = partial(out.bmap), partial(out.xz)
        # xz is the slow part: its chunks are cached (see compress.py) and run while the block map is made.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            packed = pool.submit(compress.xz, tmp_img, tmp_xz, rootfs.cache_dir(cfg) / "xz" / cfg.image_name)
            img_sum = pool.submit(sha256, tmp_img)
            bmap.create(tmp_img, tmp_bmap)
            sums = {out.img.name: img_sum.result()}
            chunks, fresh = packed.result()
        log.info(f"{out.xz.name}: {fresh} of {chunks} chunks compressed anew, the rest from the cache")
        sums[out.bmap.name] = sha256(tmp_bmap)
        sums[out.xz.name] = sha256(tmp_xz)
        for tmp, final in ((tmp_bmap, out.bmap), (tmp_xz, out.xz), (tmp_img, out.img)):
            tmp.rename(final)
        write_atomic(out.sums, "".join(f"{h}  {name}\n" for name, h in sums.items()).encode())
        latest = ctx.out_dir / "latest"
        latest.unlink(missing_ok=True)
        latest.symlink_to(out.img.name)
        meta = base.meta
        mapped = _mapped_bytes(out.bmap)
        manifest = {
            "image": out.img.name, "recipe": cfg.recipe.name, "recipe_sha256": cfg.digest,
            "recipe_file": str(cfg.recipe_path.relative_to(cfg.root)) if cfg.recipe_path.is_relative_to(cfg.root)
            else str(cfg.recipe_path),
            "board": cfg.board.name, "also_boots": [b.name for b in cfg.also],
            "source_date_epoch": ctx.sde,
            "build_date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "suite": cfg.recipe.suite, "arch": cfg.board.arch, "sources": meta["sources"],
            "suites_missing_at_build": meta["missing_suites"], "base_rootfs": meta["key"],
            "kernel": kernel.version, "xen": kernel.xen.name,
            "identity": {"disk_id": ctx.ident.disk_id, "root_uuid": ctx.ident.root_uuid,
                         "root_partuuid": ctx.ident.root_partuuid, "boot_uuid": ctx.ident.boot_uuid},
            "layout": {"boot_start": lay.boot_start, "boot_size": lay.boot_size, "root_start": lay.root_start,
                       "root_size": lay.root_size, "spl_offset": cfg.board.uboot.offset},
            "sizes": {"image": out.img.stat().st_size, "mapped": mapped, "xz": out.xz.stat().st_size},
            "sha256": sums,
            "packages": meta["packages"],
            "steps": dict(log.durations), "total_seconds": round(time.monotonic() - start, 1),
        }
        write_atomic(out.manifest, (json.dumps(manifest, indent=1) + "\n").encode())
    log.info(f"built {out.img} ({out.img.stat().st_size >> 20} MiB, {mapped >> 20} MiB of data; "
             f"{out.xz.name} {out.xz.stat().st_size >> 20} MiB) in {time.monotonic() - start:.0f} s")


def _mapped_bytes(bmap_path: Path) -> int:
    from . import bmap

    bm = bmap.parse(bmap_path)
    return int(bm.mapped_blocks * bm.block_size)


def clean(everything: bool = False, root: Path = ROOT) -> None:
    with step("Dropping caches" + (" and outputs" if everything else "")):
        rootfs.clean(root)
        shutil.rmtree(root / "build" / ".work", ignore_errors=True)
        tag = hashlib.sha256(str(root).encode()).hexdigest()[:8]
        shutil.rmtree(Path("/dev/shm") / f"appliance-{tag}", ignore_errors=True)
        if everything:
            shutil.rmtree(root / "build", ignore_errors=True)
