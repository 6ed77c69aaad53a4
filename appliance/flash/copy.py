"""Copy: the sparse write of the mapped ranges (each hashed as it is read, and checked against the block map),
then the read-back past the page cache, compared range by range.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import log
from ..bmap import BlockMap
from ..errors import FlashError
from .source import CHUNK, Image

SYNC_EVERY = 64 << 20        # start writeback this often: bounds dirty memory, keeps the progress honest
ALIGN = 4096                 # O_DIRECT reads: offset, length and buffer aligned to this
BLKFLSBUF = 0x1261


def open_target(target: Path, to_file: bool, image: Path, size: int, *, force: bool = False) -> int:
    if to_file:
        if target.is_block_device():
            raise FlashError(f"{target} is a block device, not a file", hint="drop --to-file")
        if target.exists() and not target.is_file():
            raise FlashError(f"{target} is not a regular file")
        if target.exists() and target.samefile(image):
            raise FlashError(f"{target} is the image itself")
        if target.exists() and not force:
            raise FlashError(f"{target} already exists", hint="--force overwrites it")
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            os.ftruncate(fd, size)    # unmapped blocks become holes, which read as zeros
        except OSError as exc:
            raise FlashError(f"cannot write {target}: {exc.strerror}") from None
        return fd
    try:
        # O_EXCL on a block device fails if anything (a mount, dm, another flasher) holds it
        return os.open(target, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise FlashError(f"{target} is in use (mounted, or held by another program)") from None
        raise FlashError(f"cannot open {target} for writing: {exc.strerror}") from None


def write(source: Image, fd: int, blocks: BlockMap, target: Path) -> list[str]:
    """Write the mapped ranges; returns each range's checksum, checked against the bmap's when it has one."""
    kind = blocks.checksum_type or "sha256"
    hashes = [hashlib.new(kind) for _ in blocks.ranges]
    plan = [(i, pos, min(CHUNK, end - pos)) for i, (start, end) in enumerate(map(blocks.span, blocks.ranges))
            for pos in range(start, end, CHUNK)]

    def load(n: int) -> bytes:
        i, pos, size = plan[n]
        data = source.read(pos, size)
        hashes[i].update(data)
        return data

    progress = log.Progress(f"Writing {target}", blocks.mapped_bytes)
    unsynced = 0
    # reading and hashing the next chunk on another core while this one is written (both let go of the GIL)
    with ThreadPoolExecutor(max_workers=1) as pool, contextlib.closing(progress):
        ahead = pool.submit(load, 0) if plan else None
        for n, (i, pos, size) in enumerate(plan):
            assert ahead is not None
            data = ahead.result()
            if n + 1 < len(plan):
                ahead = pool.submit(load, n + 1)
            view = memoryview(data)
            while view:
                view = view[os.pwrite(fd, view, pos + size - len(view)):]
            progress.update(size)
            unsynced += size
            if unsynced >= SYNC_EVERY:
                # start writing back what is cached without waiting for it: dirty memory stays bounded
                # and the progress bar honest, and the card never idles while we sync
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                unsynced = 0
            r = blocks.ranges[i]
            if (n + 1 == len(plan) or plan[n + 1][0] != i) and r.checksum \
                    and hashes[i].hexdigest() != r.checksum.lower():
                raise FlashError(f"the image {source.path} does not match its block map in blocks "
                                 f"{r.first}-{r.last} (a corrupt image or the wrong .bmap); "
                                 f"{target} is incomplete")
    return [r.checksum.lower() if r.checksum else h.hexdigest() for r, h in zip(blocks.ranges, hashes, strict=True)]


def _open_uncached(target: Path) -> int:
    """A read-only descriptor whose reads come from the device, not from the page cache."""
    try:
        return os.open(target, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.EINVAL:     # EINVAL: this filesystem has no O_DIRECT (tmpfs); drop the cache
            raise
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    if target.is_block_device():
        fcntl.ioctl(fd, BLKFLSBUF)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd


def verify(target: Path, blocks: BlockMap, sums: list[str]) -> None:
    kind = blocks.checksum_type or "sha256"
    fd = _open_uncached(target)
    buf = mmap.mmap(-1, CHUNK)     # page-aligned, as O_DIRECT wants
    progress = log.Progress(f"Verifying {target}", blocks.mapped_bytes)
    try:
        for r, expected in zip(blocks.ranges, sums, strict=True):
            start, end = blocks.span(r)
            h = hashlib.new(kind)
            pos = start - start % ALIGN
            while pos < end:
                want = min(CHUNK, -(-(end - pos) // ALIGN) * ALIGN)
                got = os.preadv(fd, [memoryview(buf)[:want]], pos)
                if got <= 0:
                    raise FlashError(f"verification failed: {target} ends at byte {pos}, inside blocks "
                                     f"{r.first}-{r.last}")
                lo, hi = max(start, pos), min(end, pos + got)
                h.update(memoryview(buf)[lo - pos:hi - pos])
                progress.update(hi - lo)
                pos += got
            if h.hexdigest() != expected:
                raise FlashError(f"verification failed: {target} blocks {r.first}-{r.last} "
                                 f"(bytes {start}-{end - 1}) differ from the image")
    finally:
        progress.close()
        buf.close()
        os.close(fd)


