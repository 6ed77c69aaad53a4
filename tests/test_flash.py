"""`invoke flash`: every refusal leaves the target's bytes alone; a flash writes the mapped blocks and
proves it.

Targets are real loop devices (image tier, root) or regular files (unit tier); nothing mocks the block layer.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cards import CARD_SIZE, SPL_OFFSET, Card, Loop, Loops, MiB, digest, same_bytes

import appliance
from appliance import ROOT, bmap, flash, log
from appliance.bench.flash import bench
from appliance.errors import FlashError
from appliance.loop import written_bytes


def never_ask(question: str) -> str:
    raise AssertionError(f"asked {question!r} although --yes was given")


def range_of(card: Card, offset: int) -> str:
    blocks = bmap.parse(card.bmap)
    r = next(r for r in blocks.ranges if r.first * 4096 <= offset <= r.last * 4096 + 4095)
    return f"blocks {r.first}-{r.last}"


# ---------------------------------------------------------------- unit: files as targets


@pytest.mark.unit
def test_a_missing_device_is_refused(card: Card, tmp_path: Path) -> None:
    with pytest.raises(FlashError, match=f"^{tmp_path}/sdz does not exist$"):
        flash.flash(card.img, tmp_path / "sdz", yes=True, force=True)
    assert not (tmp_path / "sdz").exists()


@pytest.mark.unit
def test_a_regular_file_named_as_device_is_refused(card: Card, tmp_path: Path) -> None:
    target = tmp_path / "sdz"
    target.write_bytes(b"precious" * 1000)
    with pytest.raises(FlashError, match=f"^{target} is not a block device "):
        flash.flash(card.img, target, yes=True, force=True)
    assert target.read_bytes() == b"precious" * 1000


@pytest.mark.unit
@pytest.mark.parametrize("codec", [None, "xz", "gzip", "zstd"])
@pytest.mark.parametrize("with_bmap", [True, False])
def test_flash_to_a_file_gives_the_image(card: Card, tmp_path: Path, codec: str | None, with_bmap: bool,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "card.img"
    shutil.copyfile(card.img, image)
    if with_bmap:
        shutil.copyfile(card.bmap, tmp_path / "card.bmap")    # found by name, as after a build
    if codec:
        log.run([codec, "-q", *(["--rm"] if codec == "zstd" else []), image])
        image = next(tmp_path.glob("card.img.*"))
    result = flash.flash(image, tmp_path / "out.img", to_file=True, ask=never_ask)
    assert (tmp_path / "out.img").read_bytes() == card.img.read_bytes()
    err = capsys.readouterr().err
    assert re.search(r"^written [\d.]+ MiB in [\d.]+ s \([\d.]+ MiB/s\), verified$", err, re.MULTILINE)
    assert ("no .bmap next to" in err) is not with_bmap
    assert result.bytes_written == (bmap.parse(card.bmap).mapped_bytes if with_bmap else CARD_SIZE)


@pytest.mark.unit
def test_a_corrupted_write_is_caught_and_names_the_range(card: Card, tmp_path: Path) -> None:
    offset = SPL_OFFSET + 100
    def corrupt(fd: int) -> None:
        os.pwrite(fd, bytes([card.spl[100] ^ 0xFF]), offset)

    expected = f"^verification failed: {tmp_path}/out.img {range_of(card, offset)} "
    with pytest.raises(FlashError, match=expected):
        flash.flash(card.img, tmp_path / "out.img", to_file=True, after_write=corrupt)


@pytest.mark.unit
def test_ctrl_c_says_the_target_is_incomplete(card: Card, tmp_path: Path) -> None:
    def interrupt(fd: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(FlashError, match=f"^interrupted: {tmp_path}/out.img is incomplete"):
        flash.flash(card.img, tmp_path / "out.img", to_file=True, after_write=interrupt)


@pytest.mark.unit
def test_an_image_that_differs_from_its_bmap_is_caught(card: Card, tmp_path: Path) -> None:
    image = tmp_path / "card.img"
    shutil.copyfile(card.img, image)
    with image.open("r+b") as f:
        f.seek(SPL_OFFSET + 5)
        f.write(bytes([card.spl[5] ^ 1]))
    with pytest.raises(FlashError, match=f"^the image {image} does not match its block map in "
                                         f"{range_of(card, SPL_OFFSET)} "):
        flash.flash(image, tmp_path / "out.img", bmap=card.bmap, to_file=True)


@pytest.mark.unit
def test_a_bmap_for_another_size_is_refused(card: Card, tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    shutil.copyfile(card.img, other)
    os.truncate(other, CARD_SIZE + 4096)
    with pytest.raises(FlashError, match=f"is for a {CARD_SIZE}-byte image, but {other} has"):
        flash.flash(other, tmp_path / "out.img", bmap=card.bmap, to_file=True)
    assert not (tmp_path / "out.img").exists()


@pytest.mark.unit
def test_a_corrupt_compressed_image_is_named(card: Card, tmp_path: Path) -> None:
    image = tmp_path / "card.img.xz"
    image.write_bytes(b"\xfd7zXZ\x00 this is not xz data")
    with pytest.raises(FlashError, match=f"^cannot decompress {image}: "):
        flash.flash(image, tmp_path / "out.img", bmap=card.bmap, to_file=True)


@pytest.mark.unit
@pytest.mark.parametrize(("name", "message"), [("card.img.bz2", "is not an image: expected .img"),
                                               ("missing.img", "does not exist")])
def test_a_bad_image_name_is_refused(card: Card, tmp_path: Path, name: str, message: str) -> None:
    if name != "missing.img":
        shutil.copyfile(card.img, tmp_path / name)
    with pytest.raises(FlashError, match=message):
        flash.flash(tmp_path / name, tmp_path / "out.img", to_file=True)


@pytest.mark.unit
@pytest.mark.parametrize(("target", "message"), [("card", "is the image itself"),
                                                 ("/dev/null", "is not a regular file"),
                                                 ("/", "is not a regular file")])
def test_a_file_target_must_be_a_new_or_regular_file(card: Card, target: str, message: str) -> None:
    with pytest.raises(FlashError, match=message):
        flash.flash(card.img, card.img if target == "card" else Path(target), to_file=True)


@pytest.mark.unit
@pytest.mark.parametrize("bmap_name", ["card.img.xz.bmap", "card.img.bmap", "card.bmap"])
def test_the_bmap_is_found_next_to_the_image(tmp_path: Path, bmap_name: str) -> None:
    (tmp_path / "card.img.xz").write_bytes(b"")
    (tmp_path / bmap_name).write_bytes(b"")
    assert flash.find_bmap(tmp_path / "card.img.xz") == tmp_path / bmap_name


@pytest.mark.unit
def test_the_default_image_is_build_latest_of_the_booth_folder_else_the_checkouts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)                        # a booth folder of one's own, before its first build
    assert appliance.latest_image() == ROOT / "build" / "latest"
    monkeypatch.setattr(appliance, "ROOT", tmp_path / "elsewhere")     # a checkout with no image either
    monkeypatch.setattr(appliance, "checkout", lambda root=None: True)
    with pytest.raises(FlashError, match=r"no image has been built yet \(.*elsewhere/build/latest is missing\)"):
        flash.default_image()
    out = tmp_path / "build"
    out.mkdir()
    (out / "cubieboard2-booth.img").write_bytes(b"")
    (out / "cubieboard2-booth.bmap").write_bytes(b"")
    (out / "latest").symlink_to("cubieboard2-booth.img")
    assert flash.default_image() == out / "latest"
    assert flash.find_bmap(out / "latest") == out / "cubieboard2-booth.bmap"


READERS = [flash.Disk(Path("/dev/sdb"), "Generic SD reader", 15_931_539_456, "usb", True, False, ()),
           flash.Disk(Path("/dev/mmcblk0"), "SC16G", 15_931_539_456, "mmc", True, False, ("/media/card",))]


@pytest.mark.unit
def test_choosing_lists_the_removable_disks(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(flash.disks, "candidates", lambda: READERS)
    assert flash.choose(ask=lambda question: "2") == READERS[1]
    assert "1) /dev/sdb (Generic SD reader, 15.9 GB, usb)\n" in capsys.readouterr().err
    with pytest.raises(FlashError, match=r"no disk chosen \(answer '3'\)"):
        flash.choose(ask=lambda question: "3")
    monkeypatch.setattr("sys.stdin", io.StringIO())
    with pytest.raises(FlashError, match=r"no terminal to ask on; removable disks: /dev/sdb .*"
                                         r"/dev/mmcblk0 \(SC16G, 15.9 GB, mmc, mounted on /media/card\)$"):
        flash.choose()
    monkeypatch.setattr(flash.disks, "candidates", list)
    with pytest.raises(FlashError, match="no removable disk found"):
        flash.choose(ask=never_ask)


@pytest.mark.unit
@pytest.mark.parametrize("sysfs, bus, removable", [
    ({"sdb/removable": "1"}, "usb", True),
    ({"sdb/removable": "0"}, "usb", True),                                  # a USB reader that says otherwise
    ({"mmcblk1/removable": "0", "mmcblk1/device/type": "SD"}, "mmc", True),  # a card in a laptop's own slot
    ({"mmcblk0/removable": "0", "mmcblk0/device/type": "MMC", "mmcblk0boot0/size": "8192",
      "mmcblk0boot1/size": "8192"}, "mmc", False),                          # the laptop's soldered eMMC
    ({"mmcblk0/removable": "0", "mmcblk0boot0/size": "8192"}, "mmc", False),  # eMMC without device/type
    ({"nvme0n1/removable": "0"}, "nvme", False),
], ids=["usb", "usb-says-fixed", "sd-slot", "emmc", "emmc-boot0", "nvme"])
def test_internal_emmc_is_not_removable(tmp_path: Path, sysfs: dict[str, str], bus: str, removable: bool) -> None:
    for rel, text in sysfs.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text + "\n")
    disk = tmp_path / next(iter(sysfs)).split("/")[0]
    assert flash.disks.removable(disk, bus) is removable


@pytest.mark.unit
@pytest.mark.parametrize("card_size, image_size, sizes", [
    (16 * MiB - 512, 16 * MiB, "16776704 bytes < 16777216 bytes"),   # rounded, both would say 16.0 MiB
    (15 * MiB, 16 * MiB, "15.0 MiB < 16.0 MiB"),
])
def test_the_too_small_message_tells_the_sizes_apart(card_size: int, image_size: int, sizes: str) -> None:
    disk = flash.Disk(Path("/dev/sdz"), "Generic SD reader", card_size, "usb", True, False, ())
    with pytest.raises(FlashError, match=re.escape(f"/dev/sdz is smaller than the image ({sizes})")):
        flash.check(disk, image_size)
    flash.check(disk, card_size)       # the same size fits


@pytest.mark.unit
def test_candidates_are_removable_whole_disks() -> None:
    for disk in flash.candidates():   # often none here; the listing itself must not fail
        assert disk.removable and disk.size > 0 and disk.node.exists()


# ---------------------------------------------------------------- image tier: loop devices


@dataclass(frozen=True)
class Case:
    target: Path
    watch: list[Path]          # whose bytes must not change
    message: str
    force: bool = True


def _root_disk() -> Path:
    """The whole disk that holds this machine's /, found without the code under test."""
    dev = os.stat("/").st_dev
    sysdir = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not sysdir.exists():
        pytest.skip("/ is not on a block device here (overlay, tmpfs or network)")
    sysdir = sysdir.resolve()
    if (sysdir / "partition").exists():
        sysdir = sysdir.parent
    name = dict(line.split("=", 1) for line in (sysdir / "uevent").read_text().split())["DEVNAME"]
    return Path("/dev") / name


def _ext4(loops: Loops) -> Loop:
    fs = loops.directory / "plain.ext4"
    log.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", "lazy_itable_init=0,lazy_journal_init=0", fs, "8M"])
    return loops.new(content=fs)


def _partition(loops: Loops, card: Card) -> Case:
    loop = loops.new(content=card.img, partscan=True)
    loops.scan(loop)
    return Case(loop.partition(1), [loop.backing], f"is a partition of {loop.node}; name the whole disk")


def _mounted_disk(loops: Loops, card: Card) -> Case:
    loop = _ext4(loops)
    where = loops.mount(loop.node)
    return Case(loop.node, [loop.backing], f"has mounted filesystems ({where})")


def _mounted_partition(loops: Loops, card: Card) -> Case:
    loop = loops.new(content=card.img, partscan=True)
    loops.scan(loop)
    where = loops.mount(loop.partition(2))
    return Case(loop.node, [loop.backing], f"has mounted filesystems ({where})")


def _read_only(loops: Loops, card: Card) -> Case:
    loop = loops.new(read_only=True)
    return Case(loop.node, [loop.backing], "is read-only")


def _too_small(loops: Loops, card: Card) -> Case:
    loop = loops.new(CARD_SIZE // 2)
    return Case(loop.node, [loop.backing], "is smaller than the image (24.0 MiB < 48.0 MiB)")


def _not_removable(loops: Loops, card: Card) -> Case:
    loop = loops.new()
    return Case(loop.node, [loop.backing], "is not a removable disk", force=False)


def _held_open(loops: Loops, card: Card) -> Case:
    loop = loops.new()
    fd = os.open(loop.node, os.O_RDONLY | os.O_EXCL)   # as another flasher or a mount would
    loops.stack.callback(os.close, fd)
    return Case(loop.node, [loop.backing], "is in use (mounted, or held by another program)")


def _system_disk(loops: Loops, card: Card) -> Case:
    root = _root_disk()
    try:
        root.open("rb").close()
    except PermissionError:    # a sandbox may deny even root the disk; then there is nothing to compare
        return Case(root, [], "holds this machine's /")
    return Case(root, [root], "holds this machine's /")


def _no_terminal(loops: Loops, card: Card) -> Case:
    loop = loops.new()
    return Case(loop.node, [loop.backing], "without confirmation: no terminal to ask on (pass --yes)")


REFUSALS: dict[str, Callable[[Loops, Card], Case]] = {
    "partition": _partition, "mounted-disk": _mounted_disk, "mounted-partition": _mounted_partition,
    "read-only": _read_only, "too-small": _too_small, "not-removable": _not_removable,
    "held-open": _held_open, "system-disk": _system_disk, "no-terminal": _no_terminal,
}


@pytest.mark.image
@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_leave_the_target_untouched(card: Card, loops: Loops, case: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO())     # never a terminal, even under pytest -s
    c = REFUSALS[case](loops, card)
    log.run(["sync"])
    before = [digest(p) for p in c.watch]
    with pytest.raises(FlashError) as err:
        flash.flash(card.img, c.target, yes=case != "no-terminal", force=c.force)
    message = str(err.value)
    assert message.startswith(f"{c.target} ") or f" {c.target} " in message
    assert c.message in message and "\n" not in message
    assert [digest(p) for p in c.watch] == before


@pytest.mark.image
def test_declining_the_confirmation_writes_nothing(card: Card, loops: Loops) -> None:
    loop = loops.new()
    asked: list[str] = []

    def decline(question: str) -> str:
        asked.append(question)
        return "n"

    with pytest.raises(FlashError, match=f"not writing {loop.node}: not confirmed"):
        flash.flash(card.img, loop.node, force=True, ask=decline)
    assert len(asked) == 1 and str(loop.node) in asked[0] and str(loop.backing) in asked[0]   # node, model
    assert " GB" in asked[0]
    assert not loop.backing.read_bytes().strip(b"\0")


def _table(node: Path) -> tuple[str, list[tuple[int, int, str]]]:
    table = json.loads(log.run(["sfdisk", "--json", node]).stdout)["partitiontable"]
    return table["id"], [(p["start"], p["size"], p["type"]) for p in table["partitions"]]


@pytest.mark.image
def test_a_flash_to_a_used_card_gives_the_image(card: Card, loops: Loops) -> None:
    # a used card: old bytes everywhere, which the unmapped blocks keep
    used = loops.directory / "used.img"
    used.write_bytes(os.urandom(CARD_SIZE))
    loop = loops.new(content=used, partscan=True)
    before = written_bytes(loop.node)
    flash.flash(card.img, loop.node, yes=True, force=True, ask=never_ask)
    assert written_bytes(loop.node) - before == bmap.parse(card.bmap).mapped_bytes   # sparse: nothing more
    assert _table(loop.node) == _table(card.img)
    with open(loop.node, "rb") as f:
        f.seek(SPL_OFFSET)
        assert f.read(len(card.spl)) == card.spl
    loops.scan(loop)
    for n in (1, 2):
        log.run(["e2fsck", "-fn", loop.partition(n)])
        for path, data in card.files.items():
            assert log.run(["debugfs", "-R", f"cat {path}", loop.partition(n)]).stdout == data


@pytest.mark.image
def test_a_corrupted_card_is_caught_and_names_the_range(card: Card, loops: Loops) -> None:
    loop = loops.new()
    offset = SPL_OFFSET + 4000

    def corrupt(fd: int) -> None:
        os.pwrite(fd, bytes([card.spl[4000] ^ 0x5A]), offset)

    with pytest.raises(FlashError, match=f"^verification failed: {loop.node} {range_of(card, offset)} "):
        flash.flash(card.img, loop.node, yes=True, force=True, after_write=corrupt)


@pytest.mark.image
@pytest.mark.skipif(shutil.which("bmaptool") is None, reason="bmaptool is not installed")
def test_bmaptool_and_we_write_the_same_card(card: Card, loops: Loops) -> None:
    theirs_bmap = loops.directory / "theirs.bmap"
    log.run(["bmaptool", "create", "-o", theirs_bmap, card.img])
    a, b = loops.new(), loops.new()
    log.run(["bmaptool", "copy", "--bmap", card.bmap, card.img, a.node])     # bmaptool with our bmap
    flash.flash(card.img, b.node, bmap=theirs_bmap, yes=True, force=True)   # we with bmaptool's
    assert digest(a.backing) == digest(b.backing) == digest(card.img)


@pytest.mark.image
def test_bench_counts_what_reaches_the_device(card: Card) -> None:
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    got = bench(card.img, card.bmap)
    assert got["sparse_bytes"] == got["mapped_bytes"] and got["dd_bytes"] == CARD_SIZE
    assert got["bytes_ratio"] == 1.0 and got["speedup"] > 0


# ---------------------------------------------------------------- image tier: the real image


@pytest.mark.image
def test_the_built_image_flashes_and_verifies(built_image: Any, loops: Loops) -> None:
    size = built_image.img.stat().st_size
    ours, theirs = loops.new(size, partscan=True), loops.new(size)
    flash.flash(built_image.img, ours.node, bmap=built_image.bmap, yes=True, force=True)
    assert _table(ours.node) == _table(built_image.img)
    with open(ours.node, "rb") as card_, open(built_image.img, "rb") as img:
        card_.seek(SPL_OFFSET)
        img.seek(SPL_OFFSET)
        assert card_.read(32 * 1024) == img.read(32 * 1024)
    assert same_bytes(ours.backing, built_image.img, size)
    if shutil.which("bmaptool"):
        log.run(["bmaptool", "copy", "--bmap", built_image.bmap, built_image.img, theirs.node])
        assert same_bytes(ours.backing, theirs.backing, size)


@pytest.mark.image
def test_the_built_image_meets_the_benchmark_goals(built_image: Any) -> None:
    got = bench(built_image.img, built_image.bmap, speed=None)   # bytes only: at a card's speed dd alone takes ~50 s
    assert got["sparse_bytes"] <= 1.05 * got["mapped_bytes"]
    # speed is reported, not asserted (invoke bench measures it on a throttled device); the small card's bench test
    # runs through the throttle
    log.info(f"bench: {got}")
