"""Benchmarks: cold build (empty caches), warm rebuild after an overlay edit, image sizes, and the flash
and boot figures of their own modules. Wall-clock seconds, printed as one table; nothing is asserted.

The cold build uses a fresh cache directory (APPLIANCE_CACHE), so the user's cache is left alone.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from . import ROOT, build, log


def _recipe(out: Path, overlay: Path) -> Path:
    data = yaml.safe_load((ROOT / "recipes/booth.yaml").read_text())
    data["name"] = "bench"
    data["overlays"] = [*data["overlays"], str(overlay)]
    path = out / "bench.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _timed(recipe: Path, keys: str | None, cache: Path | None = None) -> tuple[float, build.Outputs]:
    start = time.monotonic()
    out = build.build(str(recipe), authorized_keys=keys, cache=cache)
    assert out is not None
    return time.monotonic() - start, out


def run(*, cold: bool = True, flash: bool = True, boot: bool = True, keys: str | None = None) -> dict[str, Any]:
    work = ROOT / "build" / "bench"
    overlay = work / "overlay"
    (overlay / "etc").mkdir(parents=True, exist_ok=True)
    stamp = overlay / "etc" / "bench-stamp"
    stamp.write_text("0\n")
    recipe = _recipe(work, overlay)
    figures: dict[str, Any] = {}
    if cold:
        with tempfile.TemporaryDirectory(dir=ROOT / "build", prefix="bench-cache-") as cache:
            figures["cold build (empty caches), s"], out = _timed(recipe, keys, Path(cache))
    _timed(recipe, keys)  # primes the user's cache for this recipe
    stamp.write_text(f"{time.time()}\n")
    figures["warm rebuild after an overlay edit, s"], out = _timed(recipe, keys)
    manifest = json.loads(out.manifest.read_text())
    figures["image size, MiB"] = manifest["sizes"]["image"] / 2**20
    figures["image.xz size, MiB"] = manifest["sizes"]["xz"] / 2**20
    figures["real data in the image (bmap mapped), MiB"] = manifest["sizes"]["mapped"] / 2**20
    figures["warm rebuild steps, s"] = manifest["steps"]
    if flash:
        from . import bench_flash

        figures["flash"] = bench_flash.bench(out.img, out.bmap)
    if boot:
        from . import bench_boot

        # the image trusts keys (a .pub); its private half, beside it, logs in
        key = Path(keys).with_suffix("") if keys and keys.endswith(".pub") else None
        figures["boot"] = bench_boot.bench(out.img, key)
    return figures


def report(figures: dict[str, Any], indent: int = 0) -> None:
    for key, value in figures.items():
        if isinstance(value, dict):
            log.info(f"{'  ' * indent}{key}:")
            report(value, indent + 1)
        elif isinstance(value, float):
            log.info(f"{'  ' * indent}{key:<48} {value:10.1f}")
        else:
            log.info(f"{'  ' * indent}{key:<48} {value!s:>10}")
