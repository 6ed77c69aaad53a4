"""Benchmarks: the build (cold, and warm after an overlay edit), the image's sizes, the flash against dd, and the
boot and switch on the emulated board. Wall-clock seconds; every figure is the median of a few runs, printed with
its spread (report.py); nothing is asserted.

`invoke bench` needs nothing from the user: its images trust a throwaway SSH key it makes (the boot benchmark logs
in with it), and they go to build/bench/, never to build/ or its `latest`.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import ROOT
from ..errors import EmulateError
from .report import Figure, combine, report

__all__ = ["SECTIONS", "Figure", "combine", "report", "run", "sections"]

WORK = ROOT / "build" / "bench"
SECTIONS = ("switch", "deploy", "pull", "wake")     # the emulated board's benchmarks, after its boot


@contextlib.contextmanager
def throwaway_key(keys: str | None) -> Iterator[tuple[str, Path | None]]:
    """(public key file, private key) for the images: the user's `keys` (its private half beside it, if there),
    else a key made for this run and gone after it."""
    if keys:
        private = Path(keys).with_suffix("") if keys.endswith(".pub") else None
        yield keys, private if private is not None and private.is_file() else None
        return
    with tempfile.TemporaryDirectory(prefix="appliance-bench-key-") as d:
        key = Path(d) / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "appliance-bench", "-f", str(key)],
                       check=True, stdin=subprocess.DEVNULL)
        yield str(key.with_suffix(".pub")), key


def run(*, cold: bool = True, flash: bool = True, boot: bool = True, keys: str | None = None,
        runs: int = 3) -> dict[str, Any]:
    from . import build

    WORK.mkdir(parents=True, exist_ok=True)
    with throwaway_key(keys) as (public, private):
        figures, out = build.bench(WORK, public, runs=runs, cold=cold)
        if flash:
            from . import flash as flash_bench

            figures["flash"] = combine([flash_bench.bench(out.img, out.bmap) for _ in range(runs)])
        if boot:
            from . import boot as boot_bench

            if private is None:
                raise EmulateError("the boot benchmark needs the private half of --authorized-keys beside it",
                                   hint="KEY for KEY.pub, or no --authorized-keys: the benchmark makes a key")
            figures["boot"] = combine([boot_bench.bench(out.img, private, log_path=WORK / "boot-console.log")
                                       for _ in range(runs)])
    return figures


def sections(img: Path, key: Path, names: list[str], runs: int = 3) -> dict[str, Any]:
    """`bench --only`: the named sections of the emulated board's benchmark on an image already built (each run
    one boot), without the build, flash, boot and `xl create` figures."""
    from . import boot as boot_bench

    WORK.mkdir(parents=True, exist_ok=True)
    return combine([boot_bench.bench(img, key, log_path=WORK / "boot-console.log", only=names)
                    for _ in range(runs)])
