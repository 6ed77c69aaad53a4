"""Source: the image to write, its block map, and its bytes at increasing offsets, read from the file or streamed
through a decompressor (.img.xz, .img.gz, .img.zst).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import IO

from .. import invoked_as, latest_image, log
from ..bmap import BlockMap, parse
from ..errors import FlashError

CHUNK = 4 << 20
DECOMPRESSORS = {".xz": ["xz", "-dc", "-T0"], ".gz": ["gzip", "-dc"], ".zst": ["zstd", "-dcq"]}


def default_image() -> Path:
    """The image the last build wrote (appliance.latest_image)."""
    latest = latest_image()
    if not latest.exists():
        raise FlashError(f"no image has been built yet ({latest} is missing)",
                         hint=f"run {invoked_as()} build, or pass --image")
    return latest


def _compression(image: Path) -> str | None:
    return image.suffix if image.suffix in DECOMPRESSORS else None


def _raw_name(image: Path) -> str:
    return image.name[: -len(image.suffix)] if _compression(image) else image.name


def find_bmap(image: Path) -> Path | None:
    """The bmap next to an image: x.img.xz.bmap, x.img.bmap or x.bmap (also for build/latest's target)."""
    for path in dict.fromkeys((image, image.resolve())):
        raw = _raw_name(path)
        for name in (path.name + ".bmap", raw + ".bmap", raw.removesuffix(".img") + ".bmap"):
            if (path.parent / name).is_file():
                return path.parent / name
    return None


class Image:
    """The image's bytes at increasing offsets, from the file or streamed from a decompressor."""

    def __init__(self, path: Path) -> None:
        self.path, self.pos = path, 0
        self.proc: subprocess.Popen[bytes] | None = None
        codec = _compression(path)
        if codec is None:
            self.stream: IO[bytes] = open(path, "rb")  # noqa: SIM115 - closed in close()
            return
        # Not log.run(): that waits for the command, and we consume its output as it comes.
        cmd = [*DECOMPRESSORS[codec], str(path)]
        log.debug(f"+ {shlex.join(cmd)}")
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=log.clean_env(), bufsize=CHUNK)
        except FileNotFoundError:
            raise FlashError(f"cannot decompress {path}: {cmd[0]} is not installed") from None
        assert self.proc.stdout is not None
        self.stream = self.proc.stdout

    def read(self, offset: int, size: int) -> bytes:
        if self.proc is None:
            self.pos = self.stream.seek(offset)
        while self.pos < offset:         # a pipe cannot seek: read the hole and drop it
            self._take(min(CHUNK, offset - self.pos), offset)
        return self._take(size, offset + size)

    def _take(self, size: int, needed: int) -> bytes:
        data = self.stream.read(size)
        self.pos += len(data)
        if len(data) < size:
            self._check_decompressor()
            raise FlashError(f"the image {self.path} ends at byte {self.pos}, before byte {needed} "
                             f"that its block map needs (a truncated image or the wrong .bmap?)")
        return data

    def _check_decompressor(self) -> None:
        if self.proc is not None and self.proc.wait() != 0:
            assert self.proc.stderr is not None
            detail = self.proc.stderr.read().decode(errors="replace").strip().splitlines()[-1:]
            raise FlashError(f"cannot decompress {self.path}: {' '.join(detail) or 'it is corrupt'}")

    def size(self) -> int:
        """The decompressed size; streams must be read through once to know it."""
        if self.proc is None:
            return os.fstat(self.stream.fileno()).st_size
        while chunk := self.stream.read(CHUNK):
            self.pos += len(chunk)
        self._check_decompressor()
        return self.pos

    def close(self) -> None:
        self.stream.close()
        if self.proc is not None:
            self.proc.kill()      # the tail after the last mapped block is not needed
            self.proc.wait()
            assert self.proc.stderr is not None
            self.proc.stderr.close()


def open_image(image: Path, bmap: Path | None) -> tuple[Path, BlockMap, bool]:
    """The resolved image, its block map (or a full one), and whether that came from a .bmap."""
    if not image.exists():
        raise FlashError(f"the image {image} does not exist", hint=f"run {invoked_as()} build, or pass --image")
    real = image.resolve()
    if not _raw_name(real).endswith(".img"):
        raise FlashError(f"{image} is not an image: expected .img, .img.xz, .img.gz or .img.zst")
    bmap = bmap or find_bmap(image)
    if bmap is not None:
        blocks = parse(bmap)
        if _compression(real) is None and real.stat().st_size != blocks.image_size:
            raise FlashError(f"the bmap {bmap} is for a {blocks.image_size}-byte image, but {image} has "
                             f"{real.stat().st_size} bytes", hint="rebuild, or name the right --bmap")
        return real, blocks, True
    source = Image(real)
    try:
        return real, BlockMap.full(source.size()), False
    finally:
        source.close()


