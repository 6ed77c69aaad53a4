"""Deterministic initramfs archives, made on the host with no emulation: the demo guest's and dom0's.

An archive is a list of entries packed as cpio "newc", sorted, owned by root, with one fixed mtime. Which kernel
modules go in, and their index, is kmod.py's.
"""

from __future__ import annotations

import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError
from .log import run


@dataclass(frozen=True)
class Entry:
    path: str                  # inside the archive, no leading slash
    mode: int                  # with the file type bits
    data: bytes = b""          # file contents, or a symlink's target
    rdev: tuple[int, int] = (0, 0)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def pack(entries: list[Entry], mtime: int = 0) -> bytes:
    """A cpio "newc" archive: entries sorted, owned by root, with one fixed mtime and inode numbers in order.
    Missing parent directories are added: the kernel's unpacker does not make them, it drops the file."""
    have = {e.path for e in entries}
    parents = {str(p) for e in entries for p in Path(e.path).parents if str(p) != "."}
    entries = [*entries, *(directory(d) for d in sorted(parents - have))]
    out = bytearray()
    for ino, e in enumerate(sorted(entries, key=lambda e: e.path), 1):
        name = e.path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        fields = (ino, e.mode, 0, 0, nlink, mtime, len(e.data), 0, 0, e.rdev[0], e.rdev[1], len(name), 0)
        out += b"070701" + "".join(f"{v:08x}" for v in fields).encode() + name
        out += _pad(110 + len(name))
        out += e.data + _pad(len(e.data))
    trailer = b"TRAILER!!!\0"
    out += b"070701" + "".join(f"{v:08x}" for v in (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(trailer), 0)).encode()
    out += trailer + _pad(110 + len(trailer))
    return bytes(out)


def directory(path: str) -> Entry:
    return Entry(path, stat.S_IFDIR | 0o755)


def file(path: str, data: bytes, mode: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | mode, data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


CONSOLE = Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))  # the kernel opens it before /init runs


def busybox(deb: Path, work: Path) -> bytes:
    """The static busybox binary of a busybox-static .deb."""
    dest = work / "busybox"
    run(["dpkg-deb", "-x", deb, dest], what=f"dpkg-deb -x {deb.name}")
    binary = dest / "bin/busybox"
    if not binary.exists():
        raise BuildError(f"{deb.name} holds no bin/busybox")
    data = binary.read_bytes()
    shutil.rmtree(dest)
    return data
