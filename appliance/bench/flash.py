"""Benchmark: our sparse, verified flash against `dd bs=4M conv=fsync`, each onto a fresh loop device.

Bytes written are what the loop device's own statistics count, not what either writer claims.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from .. import MiB, log
from ..bmap import parse
from ..errors import FlashError
from ..flash import flash
from ..loop import attached, written_bytes


def _uncache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench(image: Path, bmap: Path) -> dict[str, float]:
    """Flash `image` with our writer and with dd in the same run; returns bytes, seconds and ratios."""
    image = image.resolve()
    if image.suffix != ".img":
        raise FlashError(f"the benchmark needs a raw .img, not {image.name}")
    mapped = parse(bmap).mapped_bytes
    size = image.stat().st_size
    # the backing files live next to the image, not in /tmp, which may be RAM
    with tempfile.TemporaryDirectory(dir=image.parent, prefix=".bench-") as tmp:
        results: dict[str, float] = {"image_bytes": size, "mapped_bytes": mapped}
        for name in ("sparse", "dd"):
            backing = Path(tmp, f"{name}.img")
            backing.touch()
            os.truncate(backing, size)
            with attached(backing) as loop:
                _uncache(image)      # both start cold: neither reads the image from the other's cache
                before, start = written_bytes(loop), time.monotonic()
                if name == "sparse":
                    def written(fd: int, start: float = start) -> None:    # runs between write and verify
                        results["sparse_write_seconds"] = round(time.monotonic() - start, 3)

                    flash(image, loop, bmap=bmap, yes=True, force=True, after_write=written)
                else:
                    log.run(["dd", f"if={image}", f"of={loop}", "bs=4M", "conv=fsync", "status=none"])
                results[f"{name}_seconds"] = round(time.monotonic() - start, 3)
                results[f"{name}_bytes"] = written_bytes(loop) - before
    results["bytes_ratio"] = round(results["sparse_bytes"] / max(mapped, 1), 3)
    results["speedup"] = round(results["dd_seconds"] / max(results["sparse_seconds"], 1e-6), 2)
    results["speedup_without_verify"] = round(results["dd_seconds"] / max(results["sparse_write_seconds"], 1e-6),
                                              2)
    for name in ("sparse", "dd"):
        log.info(f"{name:>6}: {results[f'{name}_bytes'] / MiB:9.1f} MiB written in "
                 f"{results[f'{name}_seconds']:6.1f} s")
    log.info(f"sparse writes {results['bytes_ratio']:.3f} x the mapped data (goal <= 1.05) and is "
             f"{results['speedup']:.1f} x faster than dd (goal >= 3) with its verification, "
             f"{results['speedup_without_verify']:.1f} x without")
    return results
