"""Deterministic initramfs archives, made on the host with no emulation: the demo guest's and dom0's.

An archive is a list of entries packed as cpio "newc", sorted, owned by root, with one fixed mtime; kernel
modules come from the base tree with what they depend on, indexed by the host's depmod (it reads armhf
modules), so busybox modprobe finds them.
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


def _name(path: str) -> str:
    """A module's name as modprobe and modules.softdep spell it: kernel/fs/ext4/ext4.ko -> ext4, - as _."""
    return Path(path).name.split(".ko")[0].replace("-", "_")


def module_paths(moddir: Path, names: list[str]) -> list[str]:
    """The named modules (file names like `ext4` or paths like `kernel/fs/ext4/ext4.ko`) and what they depend
    on, from the tree's modules.dep, as paths relative to moddir in load order (dependencies first)."""
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        name, _, rest = line.partition(":")
        deps[name] = rest.split()
    by_name = {_name(p): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path not in order:
            for d in deps.get(path, []):
                visit(d)
            order.append(path)

    for name in names:
        path = name if name in deps else by_name.get(name.replace("-", "_"))
        if path is None:
            raise BuildError(f"{moddir}/modules.dep: no module {name} (is it built into this kernel?)")
        visit(path)
    return order


def softdeps(moddir: Path, paths: list[str]) -> list[str]:
    """Module names the given modules want loaded before them (modules.softdep's `pre:`, aliases resolved
    by modules.alias): ext4 asks the kernel for crypto-crc32c, which only a modprobe run could resolve."""
    names = {_name(p) for p in paths}
    aliases: dict[str, list[str]] = {}
    for line in (moddir / "modules.alias").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "alias":
            aliases.setdefault(parts[1], []).append(parts[2])
    wanted: list[str] = []
    for line in (moddir / "modules.softdep").read_text().splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[0] == "softdep" and parts[2] == "pre:" and parts[1].replace("-", "_") in names:
            pre = parts[3:parts.index("post:")] if "post:" in parts else parts[3:]
            wanted += [m for a in pre for m in aliases.get(a, [a]) if m not in wanted]
    return wanted


def modules(kver: str, sources: dict[str, Path], work: Path) -> list[Entry]:
    """Entries for lib/modules/KVER with these modules (path under it -> the file) and their modules.dep,
    made by the host's depmod; pack() adds the directories."""
    root = work / "modules"
    lib = root / "lib/modules" / kver
    for rel, src in sources.items():
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, lib / rel)
    run(["depmod", "-b", root, kver], what=f"depmod for {len(sources)} modules")
    out = [file(str(p.relative_to(root)), p.read_bytes()) for p in sorted(lib.rglob("*")) if p.is_file()]
    shutil.rmtree(root)
    return out


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
