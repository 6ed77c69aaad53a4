"""Write an image to an SD card: refuse every disk that is not plainly a card, write only the mapped blocks,
then read them back past the page cache and compare with the block map's checksums.

Every refusal (and the confirmation) comes before the first write, so a refused disk has zero bytes written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import re
import shlex
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pyudev

from . import ROOT, log
from .bmap import BlockMap, parse
from .errors import FlashError

BUILD = ROOT / "build"
CHUNK = 4 << 20
SYNC_EVERY = 64 << 20        # start writeback this often: bounds dirty memory, keeps the progress honest
ALIGN = 4096                 # O_DIRECT reads: offset, length and buffer aligned to this
BLKFLSBUF = 0x1261
MiB = 1 << 20
SYSTEM_MOUNTS = ("/", "/boot", "/boot/efi", "/usr", "swap")
DECOMPRESSORS = {".xz": ["xz", "-dc", "-T0"], ".gz": ["gzip", "-dc"], ".zst": ["zstd", "-dcq"]}
_SKIP_DISKS = re.compile(r"^(loop|ram|zram|dm-|md|sr|fd|nbd)|^mmcblk\d+(boot\d+|rpmb)$")

Ask = Callable[[str], str]
Hook = Callable[[int], None]


@dataclass(frozen=True)
class Disk:
    node: Path
    model: str
    size: int
    bus: str                    # usb, mmc, virtio, loop, …
    removable: bool             # as the kernel says, or behind a USB or MMC reader
    read_only: bool
    mounted: tuple[str, ...]    # mount points (and "swap") on the disk or its partitions

    def __str__(self) -> str:
        where = f", mounted on {' '.join(self.mounted)}" if self.mounted else ""
        return f"{self.node} ({self.model}, {self.size / 1e9:.1f} GB, {self.bus}{where})"


@dataclass(frozen=True)
class Result:
    target: Path
    bytes_written: int
    seconds: float


# ---------------------------------------------------------------- disks


def _read(directory: str | Path, name: str) -> str:
    try:
        return Path(directory, name).read_text().strip()
    except OSError:
        return ""


def _unescape(field: str) -> str:
    """Mount points in /proc are octal-escaped (a space is \\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _whole_disks(devnum: int) -> set[int]:
    """The whole disks a block device lives on: its own disk, and those under a dm or md device."""
    sysdir = Path(f"/sys/dev/block/{os.major(devnum)}:{os.minor(devnum)}")
    if not sysdir.exists():              # an anonymous device (overlay, tmpfs, nfs): no disk behind it
        return set()
    real = sysdir.resolve()
    if (real / "partition").exists():
        real = real.parent
    disks = {_devnum(_read(real, "dev"))}
    for slave in (real / "slaves").glob("*"):
        disks |= _whole_disks(_devnum(_read(slave, "dev")))
    return disks


def _devnum(majmin: str) -> int:
    major, minor = majmin.split(":")
    return os.makedev(int(major), int(minor))


def _in_use() -> dict[int, list[str]]:
    """What uses each whole disk: mount points from /proc/self/mountinfo and "swap" from /proc/swaps."""
    uses: dict[int, list[str]] = {}

    def note(devnum: int, what: str) -> None:
        for disk in _whole_disks(devnum):
            if what not in uses.setdefault(disk, []):
                uses[disk].append(what)

    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        mount_point, source = _unescape(fields[4]), _unescape(fields[fields.index("-") + 2])
        note(_devnum(fields[2]), mount_point)
        # btrfs and friends report an anonymous st_dev; the source names the real device
        if source.startswith("/dev/"):
            try:
                st = os.stat(source)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode):
                note(st.st_rdev, mount_point)
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        try:
            st = os.stat(_unescape(line.split()[0]))
        except OSError:
            continue
        note(st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev, "swap")
    return uses


def _bus(dev: pyudev.Device) -> str:
    for bus in ("usb", "mmc"):
        if dev.find_parent(bus) is not None:
            return bus
    if dev.sys_name.startswith("loop"):
        return "loop"
    parent = next((p.subsystem for p in dev.ancestors if p.subsystem), "unknown")
    return str(dev.properties.get("ID_BUS") or parent)


def _model(dev: pyudev.Device) -> str:
    # udev writes spaces as underscores ("Mass_Storage")
    parts = [str(dev.properties.get(key, "")).replace("_", " ") for key in ("ID_VENDOR", "ID_MODEL")]
    if not any(parts):   # no udev database (containers, early boot): ask sysfs directly
        parts = [_read(dev.sys_path, "device/vendor"), _read(dev.sys_path, "device/model")
                 or _read(dev.sys_path, "device/name") or _read(dev.sys_path, "loop/backing_file")]
    return " ".join(p for p in parts if p) or "unknown model"


def _disk(dev: pyudev.Device, uses: dict[int, list[str]]) -> Disk:
    bus = _bus(dev)
    return Disk(
        node=Path(dev.device_node or f"/dev/{dev.sys_name}"),
        model=_model(dev),
        size=int(_read(dev.sys_path, "size") or 0) * 512,     # sysfs counts 512-byte sectors on every disk
        bus=bus,
        # many USB and MMC readers say "not removable" although the card in them is
        removable=_read(dev.sys_path, "removable") == "1" or bus in ("usb", "mmc"),
        read_only=_read(dev.sys_path, "ro") == "1",
        mounted=tuple(uses.get(dev.device_number, ())),
    )


def candidates() -> list[Disk]:
    """The removable disks a card could be in, with what is mounted from them."""
    uses = _in_use()
    disks = [_disk(dev, uses) for dev in pyudev.Context().list_devices(subsystem="block", DEVTYPE="disk")
             if not _SKIP_DISKS.match(dev.sys_name)]
    return sorted((d for d in disks if d.removable and d.size > 0), key=lambda d: str(d.node))


def inspect(node: Path) -> Disk:
    """The whole disk at `node`; refuses a missing path, a non-device and a partition."""
    try:
        st = os.stat(node)
    except FileNotFoundError:
        raise FlashError(f"{node} does not exist") from None
    except OSError as exc:
        raise FlashError(f"cannot examine {node}: {exc.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise FlashError(f"{node} is not a block device", hint="to write an image file, pass --to-file")
    try:
        dev = pyudev.Devices.from_device_number(pyudev.Context(), "block", st.st_rdev)
    except pyudev.DeviceNotFoundError:
        raise FlashError(f"{node} is not known to the kernel's sysfs") from None
    if dev.device_type == "partition":
        parent = dev.find_parent("block", "disk")
        whole = parent.device_node if parent is not None else "its disk"
        raise FlashError(f"{node} is a partition of {whole}; name the whole disk")
    return _disk(dev, _in_use())


def check(disk: Disk, image_size: int, *, force: bool = False) -> None:
    """Refuse a disk that holds this system or anything mounted, is not removable, read-only or too small."""
    system = [m for m in disk.mounted if m in SYSTEM_MOUNTS]
    if system:
        raise FlashError(f"{disk.node} holds this machine's {' and '.join(system)}; "
                         "it will not be overwritten")
    if disk.mounted:
        raise FlashError(f"{disk.node} has mounted filesystems ({', '.join(disk.mounted)})",
                         hint="unmount them first")
    if not disk.removable and not force:
        raise FlashError(f"{disk.node} ({disk.model}, {disk.bus}) is not a removable disk",
                         hint="pass --force if you are sure it is the card")
    if disk.read_only:
        raise FlashError(f"{disk.node} is read-only", hint="check the card's lock switch")
    if disk.size < image_size:
        raise FlashError(f"{disk.node} is smaller than the image "
                         f"({disk.size / MiB:.1f} MiB < {image_size / MiB:.1f} MiB)")


def _ask_tty(question: str) -> str:
    log.info(question)
    return sys.stdin.readline().strip()


def choose(ask: Ask | None = None) -> Disk:
    """List the candidate disks and ask which one to write."""
    disks = candidates()
    if not disks:
        raise FlashError("no removable disk found", hint="insert the card, or name the device")
    if ask is None:
        if not sys.stdin.isatty():
            raise FlashError("no device named and no terminal to ask on; removable disks: "
                             + ", ".join(str(d) for d in disks))
        ask = _ask_tty
    for n, disk in enumerate(disks, 1):
        log.info(f"{n}) {disk}")
    answer = ask(f"Which disk? [1-{len(disks)}]")
    if not answer.isdigit() or not 1 <= int(answer) <= len(disks):
        raise FlashError(f"no disk chosen (answer {answer!r})")
    return disks[int(answer) - 1]


def _confirm(disk: Disk, image: Path, ask: Ask | None) -> None:
    if ask is None:
        if not sys.stdin.isatty():
            raise FlashError(f"refusing to write {disk.node} without confirmation: no terminal to ask on",
                             hint="pass --yes")
        ask = _ask_tty
    answer = ask(f"Write {image.name} to {disk}? Everything on it will be lost. [y/N]")
    if answer.lower() not in ("y", "yes"):
        raise FlashError(f"not writing {disk.node}: not confirmed")


# ---------------------------------------------------------------- images


def default_image() -> Path:
    """The image the last build wrote (build/latest)."""
    latest = BUILD / "latest"
    if not latest.exists():
        raise FlashError(f"no image has been built yet ({latest} is missing)",
                         hint="run invoke build, or pass --image")
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


class _Image:
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


def _open_image(image: Path, bmap: Path | None) -> tuple[Path, BlockMap, bool]:
    """The resolved image, its block map (or a full one), and whether that came from a .bmap."""
    if not image.exists():
        raise FlashError(f"the image {image} does not exist", hint="run invoke build, or pass --image")
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
    source = _Image(real)
    try:
        return real, BlockMap.full(source.size()), False
    finally:
        source.close()


# ---------------------------------------------------------------- writing


def _open_target(target: Path, to_file: bool, image: Path, size: int) -> int:
    if to_file:
        if target.is_block_device():
            raise FlashError(f"{target} is a block device, not a file", hint="drop --to-file")
        if target.exists() and not target.is_file():
            raise FlashError(f"{target} is not a regular file")
        if target.exists() and target.samefile(image):
            raise FlashError(f"{target} is the image itself")
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


def _write(source: _Image, fd: int, blocks: BlockMap, target: Path) -> list[str]:
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


def _verify(target: Path, blocks: BlockMap, sums: list[str]) -> None:
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
) -> Result:
    """Check `target` (or let the user choose a card), write the image's mapped blocks and verify them.

    `ask` replaces the terminal prompt; `after_write(fd)` runs between writing and verifying, so tests can
    corrupt the target the way a failing card would.
    """
    image, blocks, mapped = _open_image(image, bmap)
    disk = None
    if to_file:
        if target is None:
            raise FlashError("--to-file needs a target file name")
    else:
        disk = inspect(target) if target is not None else choose(ask)
        check(disk, blocks.image_size, force=force)
        target = disk.node
    fd = _open_target(target, to_file, image, blocks.image_size)
    source = None
    try:
        if disk is not None and not yes:
            _confirm(disk, image, ask)
        if not mapped:
            log.warn(f"no .bmap next to {image.name}: writing all {blocks.image_size / MiB:.1f} MiB")
        source = _Image(image)
        start = time.monotonic()
        try:
            sums = _write(source, fd, blocks, target)
            os.fsync(fd)
            if after_write is not None:
                after_write(fd)
                os.fsync(fd)
            _verify(target, blocks, sums)
        except KeyboardInterrupt:
            raise FlashError(f"interrupted: {target} is incomplete and will not boot",
                             hint="flash it again before use") from None
        except OSError as exc:
            raise FlashError(f"writing {target} failed: {exc.strerror}; it is incomplete") from None
        took = time.monotonic() - start
    finally:
        os.close(fd)
        if source is not None:
            source.close()
    written = blocks.mapped_bytes
    rate = written / MiB / max(took, 1e-6)
    log.info(f"written {written / MiB:.1f} MiB in {took:.1f} s ({rate:.1f} MiB/s), verified")
    return Result(target, written, took)
