"""Loop devices over files, always detached afterwards: the flash tests' cards and the flash benchmark's targets.

A loop device is a real block device (O_EXCL, O_DIRECT, sysfs statistics), so nothing mocks the block layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from . import log


@contextlib.contextmanager
def attached(backing: Path, *, read_only: bool = False, partscan: bool = False) -> Iterator[Path]:
    """A loop device over `backing`, detached afterwards whatever happens."""
    argv = ["losetup", "--find", "--show", *(["--read-only"] if read_only else []),
            *(["--partscan"] if partscan else []), str(backing)]
    node = Path(log.run(argv, what="losetup").stdout.decode().strip())
    try:
        yield node
    finally:
        log.run(["losetup", "--detach", str(node)], check=False)


def written_bytes(loop: Path) -> int:
    """Bytes written to a block device since it appeared, as the kernel counts them."""
    # field 7 of /sys/block/X/stat: 512-byte sectors written
    return int(Path(f"/sys/block/{loop.name}/stat").read_text().split()[6]) * 512
