"""Benchmark: our sparse, verified flash against `dd bs=4M conv=fsync`, each onto a fresh loop device throttled to
an SD card's speed (a loop device over the page cache runs at memory speed, which says nothing about a card).

Bytes written are what the loop device's own statistics count, not what either writer claims.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import MiB, log
from ..bmap import parse
from ..errors import FlashError
from ..flash import flash
from ..loop import attached, written_bytes

MB = 1000 * 1000
BLKIO = Path("/sys/fs/cgroup/blkio")          # cgroup v1's block controller: its root group throttles any device
UNIFIED = Path("/sys/fs/cgroup")              # cgroup v2: io.max, in a child group the writers run in


@dataclass(frozen=True)
class Throttle:
    """A card's speed in bytes a second."""

    write: int
    read: int

    def __str__(self) -> str:
        return f"{self.write / MB:g} MB/s write, {self.read / MB:g} MB/s read"


SD_CARD = Throttle(20 * MB, 40 * MB)           # a class 10 / U1 card's sustained figures


def _devno(dev: Path) -> str:
    st = os.stat(dev)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


@contextlib.contextmanager
def throttled(dev: Path, speed: Throttle, *, blkio: Path = BLKIO, unified: Path = UNIFIED) -> Iterator[None]:
    """Every read and write of block device `dev` (buffered writeback included) held to `speed` meanwhile: by cgroup
    v1's blkio throttle on its root group where the host has it, else by cgroup v2's io.max on a child group that this
    process joins meanwhile (dd, its child, too); the limit is lifted afterwards whatever happens."""
    devno = _devno(dev)
    if (blkio / "blkio.throttle.write_bps_device").exists():
        files = {blkio / "blkio.throttle.write_bps_device": speed.write,
                 blkio / "blkio.throttle.read_bps_device": speed.read}
        try:
            for f, bps in files.items():
                f.write_text(f"{devno} {bps}\n")
            yield
        finally:
            for f in files:
                with contextlib.suppress(OSError):
                    f.write_text(f"{devno} 0\n")
        return
    controllers = unified / "cgroup.controllers"
    if not controllers.exists() or "io" not in controllers.read_text().split():
        raise FlashError("this host has no block I/O throttling (neither cgroup v1's blkio nor v2's io controller), "
                         "so the flash benchmark cannot hold a loop device to a card's speed",
                         hint="run it on a host with cgroups' block I/O controller")
    group, pid = unified / "appliance-bench-io", f"{os.getpid()}\n"
    back = unified / Path(f"/proc/{os.getpid()}/cgroup").read_text().strip().rsplit(":", 1)[-1].lstrip("/")
    (unified / "cgroup.subtree_control").write_text("+io\n")
    group.mkdir(exist_ok=True)
    try:
        (group / "io.max").write_text(f"{devno} wbps={speed.write} rbps={speed.read}\n")
        (group / "cgroup.procs").write_text(pid)
        yield
    finally:
        with contextlib.suppress(OSError):
            (back / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            group.rmdir()


def _uncache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench(image: Path, bmap: Path, speed: Throttle | None = SD_CARD) -> dict[str, float]:
    """Flash `image` with our writer (sparse write, then read-back verify) and with dd in the same run, each onto a
    fresh loop device held to `speed` (None: unthrottled); returns bytes, seconds and ratios."""
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
            with attached(backing) as loop, throttled(loop, speed) if speed else contextlib.nullcontext():
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
             f"{results['speedup']:.1f} x faster than dd (goal >= 1.8) with its verification, "
             f"{results['speedup_without_verify']:.1f} x without, on a card of {speed or 'unthrottled speed'}")
    return results
