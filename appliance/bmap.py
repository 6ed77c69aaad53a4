"""Block maps in bmaptool's format: which 4 KiB blocks of a sparse image hold data, with a checksum each.

`create` finds the data with SEEK_DATA/SEEK_HOLE and writes a version 2.0 file that `bmaptool copy` accepts;
`parse` reads ours and bmaptool's (versions 1.x and 2.x, sha1 or sha256) and checks the file's own checksum.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import FlashError
from .files import write_atomic

BLOCK_SIZE = 4096
CHUNK = 1 << 20


@dataclass(frozen=True)
class Range:
    first: int               # first block
    last: int                # last block, inclusive as in the file
    checksum: str | None     # of the range's bytes (clipped to the image's end); None in old bmaps


@dataclass(frozen=True)
class BlockMap:
    image_size: int
    block_size: int
    ranges: tuple[Range, ...]     # sorted and disjoint, so a decompressed stream can be read once
    checksum_type: str | None = "sha256"
    version: str = "2.0"

    @property
    def blocks_count(self) -> int:
        return -(-self.image_size // self.block_size)

    @property
    def mapped_blocks(self) -> int:
        return sum(r.last - r.first + 1 for r in self.ranges)

    @property
    def mapped_bytes(self) -> int:
        return sum(end - start for start, end in map(self.span, self.ranges))

    def span(self, r: Range) -> tuple[int, int]:
        """The byte range [start, end) a block range covers; the last block may stop at the image's end."""
        return r.first * self.block_size, min((r.last + 1) * self.block_size, self.image_size)

    @classmethod
    def full(cls, image_size: int, blocks_per_range: int = 4096) -> BlockMap:
        """Every block, in 16 MiB ranges so a verification mismatch names a small range; no checksums."""
        count = -(-image_size // BLOCK_SIZE)
        ranges = tuple(Range(first, min(first + blocks_per_range, count) - 1, None)
                       for first in range(0, count, blocks_per_range))
        return cls(image_size, BLOCK_SIZE, ranges, checksum_type=None)


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Byte ranges [start, end) holding data, as the filesystem reports them."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:    # no data after pos: the rest is a hole
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size)
        pos = end


def _mapped_blocks(fd: int, size: int) -> list[tuple[int, int]]:
    """Data extents widened to whole blocks, overlapping or touching ones merged."""
    blocks: list[tuple[int, int]] = []
    for start, end in _data_extents(fd, size):
        first, last = start // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        if blocks and first <= blocks[-1][1] + 1:
            first = blocks[-1][0]
            last = max(last, blocks.pop()[1])
        blocks.append((first, last))
    return blocks


def _hash(fd: int, start: int, end: int, kind: str) -> str:
    h = hashlib.new(kind)
    for pos in range(start, end, CHUNK):
        h.update(os.pread(fd, min(CHUNK, end - pos), pos))
    return h.hexdigest()


def _human(size: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "bytes" else f"{int(size)} bytes"
        size /= 1024
    raise AssertionError("unreachable")


def render(bmap: BlockMap) -> bytes:
    """The bmap file, laid out as `bmaptool create` does (comments included), with its checksum filled in."""
    assert bmap.checksum_type is not None, "we only write bmaps with checksums"
    cs_zero = "0" * len(hashlib.new(bmap.checksum_type).hexdigest())
    percent = bmap.mapped_blocks * 100.0 / max(bmap.blocks_count, 1)
    lines = [
        '<?xml version="1.0" ?>',
        "<!-- This file contains the block map for an image file: the blocks which hold",
        "     data (boot loader, partition table, file-system metadata, files). Only these",
        "     have to be copied to the card; the others are holes. The format is bmaptool's. -->",
        "",
        f'<bmap version="{bmap.version}">',
        f"    <!-- Image size in bytes: {_human(bmap.image_size)} -->",
        f"    <ImageSize> {bmap.image_size} </ImageSize>",
        "",
        "    <!-- Size of a block in bytes -->",
        f"    <BlockSize> {bmap.block_size} </BlockSize>",
        "",
        "    <!-- Count of blocks in the image file -->",
        f"    <BlocksCount> {bmap.blocks_count} </BlocksCount>",
        "",
        (f"    <!-- Count of mapped blocks: {_human(bmap.mapped_blocks * bmap.block_size)} "
         f"or {percent:.1f}% -->"),
        f"    <MappedBlocksCount> {bmap.mapped_blocks} </MappedBlocksCount>",
        "",
        "    <!-- Type of checksum used in this file -->",
        f"    <ChecksumType> {bmap.checksum_type} </ChecksumType>",
        "",
        "    <!-- The checksum of this bmap file. When it is calculated, the value of",
        '         the checksum has be zero (all ASCII "0" symbols).  -->',
        f"    <BmapFileChecksum> {cs_zero} </BmapFileChecksum>",
        "",
        "    <!-- The block map which consists of elements which may either be a",
        "         range of blocks or a single block. The 'chksum' attribute",
        "         (if present) is the checksum of this blocks range. -->",
        "    <BlockMap>",
        *(f'        <Range chksum="{r.checksum}"> {r.first}-{r.last} </Range>' for r in bmap.ranges),
        "    </BlockMap>",
        "</bmap>",
        "",
    ]
    text = "\n".join(lines).encode()
    digest = hashlib.new(bmap.checksum_type, text).hexdigest()
    # bmaptool checks the file by zeroing the first occurrence of the checksum: it must be this field.
    return text.replace(cs_zero.encode(), digest.encode(), 1)


def scan(image: Path) -> BlockMap:
    """The block map of a sparse image file, with a sha256 of each mapped range."""
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise FlashError(f"cannot read the image {image}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise FlashError(f"cannot make a bmap of {image}: it is empty")
        ranges = []
        for first, last in _mapped_blocks(fd, size):
            start, end = first * BLOCK_SIZE, min((last + 1) * BLOCK_SIZE, size)
            ranges.append(Range(first, last, _hash(fd, start, end, "sha256")))
        return BlockMap(size, BLOCK_SIZE, tuple(ranges))
    finally:
        os.close(fd)


def create(image: Path, out: Path) -> None:
    """Write the bmap of `image` to `out`; the same image always gives the same bytes."""
    data = render(scan(image))
    try:
        write_atomic(out, data)  # never leave a half-written bmap for a flasher to trust
    except OSError as exc:
        raise FlashError(f"cannot write the bmap {out}: {exc.strerror}") from None


# ---------------------------------------------------------------- reading


def _text(root: ET.Element, tag: str, path: Path) -> str:
    node = root.find(tag)
    if node is None or not (node.text or "").strip():
        raise FlashError(f"the bmap {path} has no <{tag}>")
    return (node.text or "").strip()


def _number(root: ET.Element, tag: str, path: Path) -> int:
    text = _text(root, tag, path)
    if not text.isdigit():
        raise FlashError(f"the bmap {path} has <{tag}> {text!r}, not a number")
    return int(text)


def _check_file_checksum(raw: bytes, tag: str, kind: str, path: Path) -> None:
    match = re.search(rb"<%s>\s*([0-9A-Fa-f]+)\s*</%s>" % (tag.encode(), tag.encode()), raw)
    if match is None:
        raise FlashError(f"the bmap {path} has no <{tag}>")
    stored = match.group(1)
    zeroed = raw[:match.start(1)] + b"0" * len(stored) + raw[match.end(1):]
    if hashlib.new(kind, zeroed).hexdigest() != stored.decode().lower():
        raise FlashError(f"the bmap {path} is corrupt: its {tag} does not match its contents")


def _range(node: ET.Element, attr: str | None, blocks: int, path: Path) -> Range:
    text = (node.text or "").strip()
    match = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", text)
    if match is None:
        raise FlashError(f"the bmap {path} has a bad range {text!r}")
    first = int(match.group(1))
    last = int(match.group(2) or first)
    if first > last or last >= blocks:
        raise FlashError(f"the bmap {path} has a range {text!r} outside the image's {blocks} blocks")
    return Range(first, last, node.get(attr) if attr else None)


def parse(path: Path) -> BlockMap:
    """Read a bmap (ours or bmaptool's, format 1.x or 2.x) and check it is whole and consistent."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FlashError(f"cannot read the bmap {path}: {exc.strerror}") from None
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as exc:
        raise FlashError(f"the bmap {path} is not valid XML: {exc}") from None
    version = root.get("version", "")
    match = re.fullmatch(r"(\d+)\.(\d+)", version)
    if root.tag != "bmap" or match is None:
        raise FlashError(f"{path} is not a bmap file (no <bmap version=...>)")
    major, minor = int(match.group(1)), int(match.group(2))
    if major > 2:
        raise FlashError(f"the bmap {path} has format version {version}; only 1.x and 2.x are supported")

    # 1.4 was 2.0 released under the wrong number; 1.3 knew only sha1; older ones had no checksums.
    kind: str | None
    if (major, minor) >= (1, 4):
        kind, attr, file_tag = _text(root, "ChecksumType", path).lower(), "chksum", "BmapFileChecksum"
    elif (major, minor) == (1, 3):
        kind, attr, file_tag = "sha1", "sha1", "BmapFileSHA1"
    else:
        kind, attr, file_tag = None, None, ""
    if kind is not None:
        if kind not in hashlib.algorithms_available:
            raise FlashError(f"the bmap {path} uses an unknown checksum type {kind!r}")
        _check_file_checksum(raw, file_tag, kind, path)

    image_size = _number(root, "ImageSize", path)
    block_size = _number(root, "BlockSize", path)
    if block_size == 0:
        raise FlashError(f"the bmap {path} has a block size of 0")
    blocks = _number(root, "BlocksCount", path)
    if blocks != -(-image_size // block_size):
        raise FlashError(f"the bmap {path} is inconsistent: {blocks} blocks of {block_size} bytes "
                         f"do not make {image_size} bytes")
    block_map = root.find("BlockMap")
    if block_map is None:
        raise FlashError(f"the bmap {path} has no <BlockMap>")
    ranges = tuple(_range(node, attr, blocks, path) for node in block_map.findall("Range"))
    for before, after in itertools.pairwise(ranges):
        if after.first <= before.last:
            raise FlashError(f"the bmap {path} has ranges out of order or overlapping at block {after.first}")
    result = BlockMap(image_size, block_size, ranges, kind, version)
    mapped = _number(root, "MappedBlocksCount", path)
    if mapped != result.mapped_blocks:
        raise FlashError(f"the bmap {path} is inconsistent: it says {mapped} mapped blocks, "
                         f"its ranges hold {result.mapped_blocks}")
    return result
