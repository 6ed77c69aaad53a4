"""Cards for the bmap and flash tests: a small card image made in a second, and loop devices that are always
detached (and unmounted) afterwards, even when a test fails. The fixtures (`card`, `loops`) are in conftest.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from appliance import bmap, log
from appliance.loop import attached

MiB = 1 << 20
SPL_OFFSET = 8192
# (start sector, sectors, label): a small boot partition and a root filling the rest, as on the real card
PARTITIONS = ((2048, 16384, "BOOT"), (18432, 79872, "ROOT"))
CARD_SIZE = 48 * MiB


@dataclass(frozen=True)
class Card:
    img: Path
    bmap: Path
    spl: bytes                 # random bytes at 8 KiB, where the Allwinner boot ROM looks for the SPL
    files: dict[str, bytes]    # what each partition's filesystem holds, by path


def make_card(directory: Path, name: str = "card") -> Card:
    """An MBR-partitioned sparse image: SPL bytes at 8 KiB and two ext4 filesystems made with `mke2fs -d`."""
    directory.mkdir(parents=True, exist_ok=True)
    img = directory / f"{name}.img"
    img.write_bytes(b"")
    os.truncate(img, CARD_SIZE)
    table = "label: dos\nlabel-id: 0x12345678\n" + "".join(
        f"start={start}, size={size}, type=83\n" for start, size, _ in PARTITIONS)
    log.run(["sfdisk", "--quiet", str(img)], input=table.encode())
    spl = os.urandom(24 * 1024)
    with img.open("r+b") as f:
        f.seek(SPL_OFFSET)
        f.write(spl)
    files = {"/hello.txt": b"hello from the card\n", "/boot/blob.bin": os.urandom(300_000)}
    tree = directory / f"{name}-tree"
    for rel, data in files.items():
        (tree / rel.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel.lstrip("/")).write_bytes(data)
    for start, size, label in PARTITIONS:
        # no lazy init: a mounted test filesystem must not write behind our back
        log.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", label, "-d", tree,
                 "-E", f"offset={start * 512},lazy_itable_init=0,lazy_journal_init=0", img, f"{size // 2}k"])
    bmap.create(img, directory / f"{name}.bmap")
    return Card(img, directory / f"{name}.bmap", spl, files)


def digest(path: Path) -> str:
    """The sha256 of a file; of a device, only its first KiB (what a flash writes first; a live
    filesystem changes its superblock at 1 KiB on its own)."""
    if stat.S_ISBLK(os.stat(path).st_mode):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read(1024)).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_bytes(a: Path, b: Path, length: int) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while length > 0:
            n = min(length, 4 * MiB)
            if fa.read(n) != fb.read(n):
                return False
            length -= n
    return True


@dataclass(frozen=True)
class Loop:
    node: Path
    backing: Path

    def partition(self, n: int) -> Path:
        return self.node.with_name(f"{self.node.name}p{n}")


class Loops:
    """Makes loop devices over files in a temporary directory; close() unmounts and detaches them all."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.stack, self.count = directory, contextlib.ExitStack(), 0

    def new(self, size: int = CARD_SIZE, *, content: Path | None = None, read_only: bool = False,
            partscan: bool = False) -> Loop:
        self.count += 1
        backing = self.directory / f"loop{self.count}.img"
        if content is not None:
            shutil.copyfile(content, backing)
        else:
            backing.write_bytes(b"")
            os.truncate(backing, size)
        node = self.stack.enter_context(attached(backing, read_only=read_only, partscan=partscan))
        return Loop(node, backing)

    def scan(self, loop: Loop) -> None:
        """Make the partition nodes (of a loop made with partscan); some kernels lack MBR support, so
        partx reads the table itself."""
        if not loop.partition(1).exists():
            log.run(["partx", "--add", loop.node])
            self.stack.callback(log.run, ["partx", "--delete", loop.node], check=False)

    def mount(self, device: Path) -> Path:
        where = self.directory / f"mnt-{device.name}"
        where.mkdir()
        # read-only: a mounted filesystem that writes would change the bytes the test compares
        log.run(["mount", "-o", "ro", device, where])
        self.stack.callback(log.run, ["umount", "--lazy", where], check=False)
        return where

    def close(self) -> None:
        self.stack.close()
