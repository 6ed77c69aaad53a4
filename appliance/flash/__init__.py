"""Write an image to an SD card, in bmaptool's layers: `disks` refuses every disk that is not plainly a card,
`source` reads the image (decompressing) by its block map, and `copy` writes only the mapped blocks, then reads
them back past the page cache and compares them with the block map's checksums.

Every refusal (and the confirmation) comes before the first write, so a refused disk has zero bytes written.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import log
from ..cardsettings import Settings
from ..errors import FlashError, FlashInterrupted
from .copy import open_target, verify, write
from .disks import Ask, Disk, MiB, candidates, check, choose, confirm, inspect
from .settings import check_image
from .settings import write as write_settings
from .source import Image, default_image, find_bmap, open_image

__all__ = ["Disk", "Result", "candidates", "check", "choose", "default_image", "find_bmap", "flash", "inspect"]

Hook = Callable[[int], None]


@dataclass(frozen=True)
class Result:
    target: Path
    bytes_written: int
    seconds: float



def flash(
    image: Path,
    target: Path | None = None,
    *,
    bmap: Path | None = None,
    yes: bool = False,
    force: bool = False,
    to_file: bool = False,
    ask: Ask | None = None,
    after_write: Hook | None = None,
    settings: Settings | None = None,
) -> Result:
    """Check `target` (or let the user choose a card), write the image's mapped blocks and verify them.

    `ask` replaces the terminal prompt; `after_write(fd)` runs between writing and verifying, so tests can
    corrupt the target the way a failing card would. `settings` (checked already, flash.settings.from_options) go
    onto the boot partition after the verified write, while the card is still held open exclusively.
    """
    image, blocks, mapped = open_image(image, bmap)
    if settings is not None:
        check_image(image)
    disk = None
    if to_file:
        if target is None:
            raise FlashError("--to-file needs a target file name")
    else:
        disk = inspect(target) if target is not None else choose(ask)
        check(disk, blocks.image_size, force=force)
        target = disk.node
    fd = open_target(target, to_file, image, blocks.image_size, force=force)
    source = None
    try:
        if disk is not None and not yes:
            confirm(disk, image, ask)
        if not mapped:
            log.warn(f"no .bmap next to {image.name}: writing all {blocks.image_size / MiB:.1f} MiB")
        source = Image(image)
        start = time.monotonic()
        try:
            sums = write(source, fd, blocks, target)
            os.fsync(fd)
            if after_write is not None:
                after_write(fd)
                os.fsync(fd)
            verify(target, blocks, sums)
            took = time.monotonic() - start
            rate = blocks.mapped_bytes / MiB / max(took, 1e-6)
            log.info(f"written {blocks.mapped_bytes / MiB:.1f} MiB in {took:.1f} s ({rate:.1f} MiB/s), verified")
            if settings is not None:
                write_settings(target, settings)
        except KeyboardInterrupt:
            raise FlashInterrupted(f"interrupted: {target} is incomplete and will not boot",
                             hint="flash it again before use") from None
        except OSError as exc:
            raise FlashError(f"writing {target} failed: {exc.strerror}; it is incomplete") from None
    finally:
        os.close(fd)
        if source is not None:
            source.close()
    return Result(target, blocks.mapped_bytes, took)
