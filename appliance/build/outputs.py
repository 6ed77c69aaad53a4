"""The outputs: the block map, the compressed image and the checksums made from the finished image, then all of
them renamed into place at once, `latest` pointed at the image, and the manifest written.

Until the renames, every output exists only under its partial name, so a failed or interrupted build never
leaves a half image where a finished one belongs.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import bmap, keys, log
from ..files import partial, sha256, write_atomic
from ..log import step
from . import compress
from .step import Step

if TYPE_CHECKING:
    from .context import Context, Outputs


def pack(ctx: Context, out: Outputs) -> dict[str, str]:
    """The block map and the .xz beside the partial image; the checksums of all three."""
    tmp_bmap, tmp_xz = partial(out.bmap), partial(out.xz)
    # xz is the slow part: its chunks are cached (see compress.py) and run while the block map is made. The
    # cache keeps one image's chunks; the tests' and benchmarks' images have their own, so that building
    # them never makes the user's next build compress its image anew.
    chunks_of = ctx.cfg.cache / "xz" / ctx.cfg.image_name
    if ctx.out_dir != ctx.cfg.root / "build":
        chunks_of = ctx.cfg.cache / "xz" / ctx.out_dir.name / ctx.cfg.image_name
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        packed = pool.submit(compress.xz, ctx.tmp_img, tmp_xz, chunks_of)
        img_sum = pool.submit(sha256, ctx.tmp_img)
        bmap.create(ctx.tmp_img, tmp_bmap)
        sums = {out.img.name: img_sum.result()}
        chunks, fresh = packed.result()
    log.info(f"{out.xz.name}: {fresh} of {chunks} chunks compressed anew, the rest from the cache")
    sums[out.bmap.name] = sha256(tmp_bmap)
    sums[out.xz.name] = sha256(tmp_xz)
    return sums


def publish(ctx: Context, out: Outputs, sums: dict[str, str]) -> None:
    """Every output renamed into place, the checksums written, and `latest` pointed at the image."""
    for final in (out.bmap, out.xz, out.img):
        partial(final).rename(final)
    write_atomic(out.sums, "".join(f"{h}  {name}\n" for name, h in sums.items()).encode())
    latest = ctx.out_dir / "latest"
    latest.unlink(missing_ok=True)
    latest.symlink_to(out.img.name)


def manifest(ctx: Context, out: Outputs, sums: dict[str, str], mapped: int) -> dict[str, Any]:
    cfg, meta, lay = ctx.cfg, ctx.base.meta, ctx.layout
    return {
        "image": out.img.name, "recipe": cfg.recipe.name, "recipe_sha256": cfg.digest,
        "recipe_file": str(cfg.recipe_path.relative_to(cfg.root)) if cfg.recipe_path.is_relative_to(cfg.root)
        else str(cfg.recipe_path),
        "board": cfg.board.name, "also_boots": [b.name for b in cfg.also],
        "source_date_epoch": ctx.sde,
        "build_date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "suite": cfg.recipe.suite, "arch": cfg.board.arch, "sources": meta["sources"],
        "suites_missing_at_build": meta["missing_suites"], "base_rootfs": meta["key"],
        "kernel": ctx.kernel.version, "xen": ctx.kernel.xen.name,
        "identity": {"disk_id": ctx.ident.disk_id, "root_uuid": ctx.ident.root_uuid,
                     "root_partuuid": ctx.ident.root_partuuid, "boot_uuid": ctx.ident.boot_uuid},
        "layout": {"boot_start": lay.boot_start, "boot_size": lay.boot_size, "root_start": lay.root_start,
                   "root_size": lay.root_size, "spl_offset": cfg.board.uboot.offset},
        "sizes": {"image": out.img.stat().st_size, "mapped": mapped, "xz": out.xz.stat().st_size},
        "sha256": sums,
        "authorized_keys": keys.fingerprints(ctx.keys or ""),   # SHA256:… of each key root trusts
        "packages": meta["packages"],
        "steps": dict(ctx.durations), "total_seconds": round(time.monotonic() - ctx.start, 1),
    }


def mapped_bytes(bmap_path: Path) -> int:
    bm = bmap.parse(bmap_path)
    return int(bm.mapped_blocks * bm.block_size)


class WriteOutputs(Step):
    name = "outputs"

    def run(self, ctx: Context) -> None:
        out = ctx.outputs()
        with step("Writing the block map, the compressed image, checksums and the manifest"):
            sums = pack(ctx, out)
            publish(ctx, out, sums)
            mapped = mapped_bytes(out.bmap)
            write_atomic(out.manifest, (json.dumps(manifest(ctx, out, sums, mapped), indent=1) + "\n").encode())
        log.info(f"built {out.img} ({out.img.stat().st_size >> 20} MiB, {mapped >> 20} MiB of data; "
                 f"{out.xz.name} {out.xz.stat().st_size >> 20} MiB) in {time.monotonic() - ctx.start:.0f} s")
