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
from ..errors import RecipeError
from . import timeline
from .report import combine

# A phone on the booth's wifi from power-on, on the bench image's second simulated radio (mac80211_hwsim makes two;
# the access point takes the first), timed by its console lines (emulate/visitor.py). Only in the bench's image.
# The radios appear once the booth's early coldplug of USB devices has run (overlays/booth's
# appliance-coldplug-wifi.service): a USB dongle's driver is loaded then (by its modalias), so the simulated dongle
# comes no earlier than a real one would.
VISITOR_UNIT = """[Unit]
Description=A simulated phone on the booth's wifi from power-on (invoke bench's image only)
DefaultDependencies=no
After=appliance-coldplug-wifi.service

[Service]
# a real phone has a CPU of its own: here it shares dom0's, at the visitors' path's priority
Nice=-8
ExecStartPre=/sbin/modprobe mac80211_hwsim
ExecStart=/usr/bin/python3 /usr/local/sbin/appliance-visitor --console --deadline 900 --ssid "{ssid}" --url {url}
"""


def visitor_overlay(overlay: Path, data: dict[str, Any]) -> None:
    """The simulated radios and the visitor that uses one of them, into the bench overlay."""
    if not data["wifi"].get("open", True):
        raise RecipeError("the boot benchmark's visitor joins an open network: recipes/booth.yaml's "
                                 "wifi.open is false")
    site = data["sites"][0]
    port = site.get("port", 80)
    url = f"http://{site['names'][0]}{'' if port == 80 else f':{port}'}{site.get('health_path', '/')}"
    files = {"usr/local/sbin/appliance-visitor": (ROOT / "appliance/emulate/visitor.py").read_text(),
             "etc/systemd/system/appliance-bench-visitor.service": VISITOR_UNIT.format(ssid=data["wifi"]["ssid"],
                                                                                       url=url)}
    for rel, text in files.items():
        (overlay / rel).parent.mkdir(parents=True, exist_ok=True)
        (overlay / rel).write_text(text)
    (overlay / "usr/local/sbin/appliance-visitor").chmod(0o755)
    wants = overlay / "etc/systemd/system/sysinit.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "appliance-bench-visitor.service"
    link.unlink(missing_ok=True)
    link.symlink_to("../appliance-bench-visitor.service")


def recipe(work: Path) -> tuple[Path, Path]:
    """The booth recipe as `bench`, with an overlay of its own whose one file the warm rebuild edits, and the
    simulated wifi visitor."""
    overlay = work / "overlays" / "bench"     # the recipe folder's own overlay, named as a shipped one is
    (overlay / "etc").mkdir(parents=True, exist_ok=True)
    stamp = overlay / "etc" / "bench-stamp"
    stamp.write_text("0\n")
    data = config.read_yaml(ROOT / "recipes/booth.yaml")
    visitor_overlay(overlay, data)
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


def split(steps: dict[str, float], total: float) -> dict[str, float]:
    """A cold build's time as mmdebstrap's part (its one step, from the manifest) and the rest of it."""
    mmdebstrap = sum(t for name, t in steps.items() if "(mmdebstrap" in name)
    return {"cold build: mmdebstrap, s": mmdebstrap, "cold build: the rest, s": total - mmdebstrap,
            "cold build: mmdebstrap's share, %": 100 * mmdebstrap / total if total else 0.0}


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
            row: dict[str, Any] = {}
            for native, name in ((True, "cold build (empty caches), s"), (False, "baseline: all under qemu-user, s")):
                with tempfile.TemporaryDirectory(dir=ROOT / "build", prefix="bench-cache-") as cache:
                    row[name], cold_out = timed(path, keys, out_dir, Path(cache), native)
                if native:
                    row.update(split(json.loads(cold_out.manifest.read_text())["steps"], row[name]))
            times.append(row)
        figures.update(combine(times))
        figures["before: cold build, s"] = ("309 (mmdebstrap 276): recorded in issue 14 on a fresh 2-core host; "
                                            "167 in issue 28")
        figures["goal: cold build on a quiet host, s"] = "<= 120 (issue 28)"
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
