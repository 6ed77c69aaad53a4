"""The bmap module: what `create` maps and writes, what `parse` accepts and refuses, and agreement
with bmaptool."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from cards import Card

from appliance import bmap, log
from appliance.errors import FlashError

needs_bmaptool = pytest.mark.skipif(shutil.which("bmaptool") is None, reason="bmaptool is not installed")


def sparse(path: Path, size: int, pieces: dict[int, bytes]) -> Path:
    path.write_bytes(b"")
    os.truncate(path, size)
    with path.open("r+b") as f:
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
    return path


def signed(xml: str, kind: str = "sha256") -> bytes:
    """Fill the @CS@ placeholder with the file's checksum, computed as bmaptool does (field zeroed)."""
    zero = "0" * len(hashlib.new(kind).hexdigest())
    raw = xml.replace("@CS@", zero).encode()
    return raw.replace(zero.encode(), hashlib.new(kind, raw).hexdigest().encode(), 1)


def handmade(version: str, kind: str | None, ranges: Sequence[tuple[str, str | None]], size: int = 40960,
             mapped: int | None = None, extra: str = "") -> str:
    """A bmap as other bmaptool versions wrote them: 1.3 with sha1 attributes, 1.2 without checksums."""
    if kind is None:
        head, attr = "", ""
    elif version == "1.3":
        head, attr = "<BmapFileSHA1> @CS@ </BmapFileSHA1>", "sha1"
    else:
        head = f"<ChecksumType> {kind} </ChecksumType> <BmapFileChecksum> @CS@ </BmapFileChecksum>"
        attr = "chksum"
    body = "".join(f'<Range {attr}="{cs}"> {text} </Range>' if cs and attr else f"<Range> {text} </Range>"
                   for text, cs in ranges)
    if mapped is None:
        mapped = sum(int(t.split("-")[-1]) - int(t.split("-")[0]) + 1 for t, _ in ranges)
    return (f'<?xml version="1.0" ?>\n<bmap version="{version}"> <ImageSize> {size} </ImageSize> '
            f"<BlockSize> 4096 </BlockSize> <BlocksCount> {-(-size // 4096)} </BlocksCount> "
            f"<MappedBlocksCount> {mapped} </MappedBlocksCount> {head} {extra}"
            f"<BlockMap> {body} </BlockMap> </bmap>\n")


@pytest.mark.unit
def test_create_maps_the_data_blocks_with_their_checksums(tmp_path: Path) -> None:
    # data inside blocks 2-6, across blocks 732-733, and a last block only 2 bytes long
    size = 2560 * 4096 + 2
    pieces = {8192: os.urandom(20000), 3_000_000: os.urandom(5000), size - 6: b"tail!!"}
    img = sparse(tmp_path / "a.img", size, pieces)
    bmap.create(img, tmp_path / "a.bmap")
    got = bmap.parse(tmp_path / "a.bmap")
    assert [(r.first, r.last) for r in got.ranges] == [(2, 6), (732, 733), (2559, 2560)]
    data = img.read_bytes()
    assert [r.checksum for r in got.ranges] == [
        hashlib.sha256(data[r.first * 4096:(r.last + 1) * 4096]).hexdigest() for r in got.ranges]
    assert (got.image_size, got.block_size, got.blocks_count) == (size, 4096, 2561)
    assert got.checksum_type == "sha256"
    assert got.mapped_bytes == 9 * 4096 - 4094
    text = (tmp_path / "a.bmap").read_text()
    assert '<bmap version="2.0">' in text and "<MappedBlocksCount> 9 </MappedBlocksCount>" in text


@pytest.mark.unit
def test_create_is_deterministic(tmp_path: Path, card: Card) -> None:
    bmap.create(card.img, tmp_path / "again.bmap")
    assert (tmp_path / "again.bmap").read_bytes() == card.bmap.read_bytes()


@pytest.mark.unit
def test_create_refuses_an_empty_image(tmp_path: Path) -> None:
    (tmp_path / "empty.img").write_bytes(b"")
    with pytest.raises(FlashError, match="it is empty"):
        bmap.create(tmp_path / "empty.img", tmp_path / "empty.bmap")
    assert not (tmp_path / "empty.bmap").exists()


@pytest.mark.unit
@needs_bmaptool
def test_bmaptool_create_maps_what_we_map_plus_only_zeros(tmp_path: Path, card: Card) -> None:
    # bmaptool asks FIEMAP, which also lists unwritten (preallocated) extents; SEEK_DATA calls those holes
    log.run(["bmaptool", "create", "-o", tmp_path / "theirs.bmap", card.img])
    theirs, ours = bmap.parse(tmp_path / "theirs.bmap"), bmap.parse(card.bmap)
    assert (theirs.image_size, theirs.block_size) == (ours.image_size, ours.block_size)
    blocks = {name: {b for r in m.ranges for b in range(r.first, r.last + 1)}
              for name, m in (("theirs", theirs), ("ours", ours))}
    assert blocks["ours"] <= blocks["theirs"]
    data = card.img.read_bytes()
    assert not any(data[b * 4096:(b + 1) * 4096].strip(b"\0") for b in blocks["theirs"] - blocks["ours"])
    same = {(r.first, r.last) for r in theirs.ranges} & {(r.first, r.last) for r in ours.ranges}
    assert same and all(r.checksum == s.checksum for r in ours.ranges for s in theirs.ranges
                        if (r.first, r.last) == (s.first, s.last))


@pytest.mark.unit
@needs_bmaptool
def test_bmaptool_copy_accepts_our_bmap(tmp_path: Path, card: Card) -> None:
    log.run(["bmaptool", "copy", "--bmap", card.bmap, card.img, tmp_path / "copy.img"])
    assert (tmp_path / "copy.img").read_bytes() == card.img.read_bytes()


RANGES = [("0-1", None), ("5", None), ("7-9", None)]


@pytest.mark.unit
@pytest.mark.parametrize(("version", "kind"), [("1.2", None), ("1.3", "sha1"), ("1.4", "sha256"),
                                               ("2.0", "sha1"), ("2.0", "sha256")])
def test_parse_reads_every_format_version(tmp_path: Path, version: str, kind: str | None) -> None:
    sums = [hashlib.new(kind, t.encode()).hexdigest() if kind else None for t, _ in RANGES]
    path = tmp_path / "x.bmap"
    ranges = [(text, s) for (text, _), s in zip(RANGES, sums, strict=True)]
    path.write_bytes(signed(handmade(version, kind, ranges), kind or "sha256"))
    got = bmap.parse(path)
    assert [(r.first, r.last, r.checksum) for r in got.ranges] == [
        (0, 1, sums[0]), (5, 5, sums[1]), (7, 9, sums[2])]
    assert (got.version, got.checksum_type, got.mapped_blocks, got.image_size) == (version, kind, 6, 40960)


@pytest.mark.unit
@pytest.mark.parametrize(("content", "message"), [
    (lambda: b"not xml at all", "is not valid XML"),
    (lambda: b"<html/>", "is not a bmap file"),
    (lambda: signed(handmade("3.0", "sha256", RANGES)), "only 1.x and 2.x are supported"),
    (lambda: signed(handmade("2.0", "sha256", RANGES)).replace(b"7-9", b"7-8"), "is corrupt"),
    (lambda: signed(handmade("2.0", "md42", RANGES)), "unknown checksum type 'md42'"),
    (lambda: signed(handmade("2.0", "sha256", RANGES, mapped=7)),
     "it says 7 mapped blocks, its ranges hold 6"),
    (lambda: signed(handmade("2.0", "sha256", [("0-3", None), ("2-4", None)])), "overlapping at block 2"),
    (lambda: signed(handmade("2.0", "sha256", [("9-10", None)])), "outside the image's 10 blocks"),
    (lambda: signed(handmade("2.0", "sha256", [("x", None)], mapped=1)), "a bad range 'x'"),
    (lambda: signed(handmade("2.0", "sha256", RANGES).replace("<ImageSize> 40960 </ImageSize>", "")),
     "has no <ImageSize>"),
    (lambda: signed(handmade("2.0", "sha256", RANGES).replace("<BlocksCount> 10 ", "<BlocksCount> 12 ")),
     "12 blocks of 4096 bytes do not make 40960 bytes"),
])
def test_parse_refuses_a_bad_bmap(tmp_path: Path, content: Callable[[], bytes], message: str) -> None:
    path = tmp_path / "bad.bmap"
    path.write_bytes(content())
    with pytest.raises(FlashError, match=message) as err:
        bmap.parse(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.unit
def test_parse_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FlashError, match=f"cannot read the bmap {tmp_path}/none.bmap"):
        bmap.parse(tmp_path / "none.bmap")


@pytest.mark.unit
def test_full_map_covers_the_image_in_small_ranges() -> None:
    full = bmap.BlockMap.full(40 << 20 | 3)
    assert full.mapped_bytes == full.image_size and full.checksum_type is None
    assert [(r.first, r.last) for r in full.ranges] == [(0, 4095), (4096, 8191), (8192, 10240)]


@pytest.mark.image
def test_the_built_bmap_is_ours_and_matches_its_image(tmp_path: Path, built_image: Any) -> None:
    got = bmap.parse(built_image.bmap)
    assert got.image_size == built_image.img.stat().st_size
    bmap.create(built_image.img, tmp_path / "again.bmap")
    assert (tmp_path / "again.bmap").read_bytes() == built_image.bmap.read_bytes()
