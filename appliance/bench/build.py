"""Build benchmarks: a cold build (an empty cache of its own, so the user's is left alone) and a warm rebuild after an
overlay edit, each timed over a few runs, with the image's sizes and the warm rebuild's steps from its manifest.

The images go to the benchmark's own folder (build/bench/), never to build/ or its `latest`.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from .. import ROOT, MiB, config
from .. import build as builder
from . import timeline
from .report import combine


def recipe(work: Path) -> tuple[Path, Path]:
    """The booth recipe as `bench`, with an overlay of its own whose one file the warm rebuild edits."""
    overlay = work / "overlays" / "bench"     # the recipe folder's own overlay, named as a shipped one is
    (overlay / "etc").mkdir(parents=True, exist_ok=True)
    stamp = overlay / "etc" / "bench-stamp"
    stamp.write_text("0\n")
    data = config.read_yaml(ROOT / "recipes/booth.yaml")
    data["name"] = "bench"
    data["overlays"] = [*data["overlays"], "bench"]
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, stamp


def timed(recipe: Path, keys: str, out_dir: Path, cache: Path | None = None,
          native: bool = True) -> tuple[float, builder.Outputs]:
    start = time.monotonic()
    out = builder.build(str(recipe), authorized_keys=keys, out_dir=out_dir, cache=cache, native=native)
    assert out is not None
    return time.monotonic() - start, out


def bench(work: Path, keys: str, *, runs: int = 3, cold: bool = True) -> tuple[dict[str, Any], builder.Outputs]:
    """The build figures, and the outputs of the last warm rebuild (for the flash and boot benchmarks)."""
    path, stamp = recipe(work)
    out_dir = work / "images"
    figures: dict[str, Any] = {}
    if cold:
        # side by side in the same run: the base tree's CPU-independent work done on the host (what `invoke
        # build` does), and the baseline with every maintainer script's work under qemu-user; the tree is the same
        times = []
        for _ in range(runs):
            row = {}
            for native, name in ((True, "cold build (empty caches), s"), (False, "baseline: all under qemu-user, s")):
                with tempfile.TemporaryDirectory(dir=ROOT / "build", prefix="bench-cache-") as cache:
                    row[name] = timed(path, keys, out_dir, Path(cache), native)[0]
            times.append(row)
        figures.update(combine(times))
        figures["before: cold build, s"] = "309 (mmdebstrap 276): recorded in issue 14 on a fresh 2-core host"
    timed(path, keys, out_dir)  # primes the user's cache for this recipe
    warm: list[dict[str, Any]] = []
    for _ in range(runs):
        stamp.write_text(f"{time.time()}\n")
        took, out = timed(path, keys, out_dir)
        manifest = json.loads(out.manifest.read_text())
        warm.append({
            "warm rebuild after an overlay edit, s": took,
            "image size, MiB": manifest["sizes"]["image"] / MiB,
            "image.xz size, MiB": manifest["sizes"]["xz"] / MiB,
            "real data in the image (bmap mapped), MiB": manifest["sizes"]["mapped"] / MiB,
            "warm rebuild steps, s": manifest["steps"],
        })
    figures.update(combine(warm))
    figures["warm rebuild steps, picture"] = str(timeline.build_svg(
        manifest["steps"], work / "build.svg", title="Warm rebuild after an overlay edit"))
    return figures, out
