"""Disks: which disks a card could be in, what each one is (model, size, bus, removable, mounted), and every
refusal before a byte is written: a partition, the system's disk, anything mounted, a disk that is not removable,
read-only or too small. The confirmation is asked here too.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyudev

from .. import MiB, log
from ..errors import FlashError

SYSTEM_MOUNTS = ("/", "/boot", "/boot/efi", "/usr", "swap")
_SKIP_DISKS = re.compile(r"^(loop|ram|zram|dm-|md|sr|fd|nbd)|^mmcblk\d+(boot\d+|rpmb)$")

Ask = Callable[[str], str]


@dataclass(frozen=True)
class Disk:
    node: Path
    model: str
    size: int
    bus: str                    # usb, mmc, virtio, loop, …
    removable: bool             # as the kernel says, or behind a USB reader or in an MMC slot (not eMMC)
    read_only: bool
    mounted: tuple[str, ...]    # mount points (and "swap") on the disk or its partitions

    def __str__(self) -> str:
        where = f", mounted on {' '.join(self.mounted)}" if self.mounted else ""
        return f"{self.node} ({self.model}, {self.size / 1e9:.1f} GB, {self.bus}{where})"



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


def internal_emmc(sys_path: str | Path) -> bool:
    """Whether an MMC disk is soldered-on eMMC, not a card: eMMC has boot0/boot1 hardware partitions (beside it in
    sysfs as NAMEboot0) and reports the type MMC; an SD card reports SD."""
    path = Path(sys_path)
    return (path.parent / f"{path.name}boot0").exists() or _read(path, "device/type") == "MMC"


def removable(sys_path: str | Path, bus: str) -> bool:
    """As the kernel says, or behind a USB reader or in an MMC slot: many readers say "not removable" although
    the card in them is. A laptop's internal eMMC is an MMC disk too, and is not removable."""
    if _read(sys_path, "removable") == "1" or bus == "usb":
        return True
    return bus == "mmc" and not internal_emmc(sys_path)


def _disk(dev: pyudev.Device, uses: dict[int, list[str]]) -> Disk:
    bus = _bus(dev)
    return Disk(
        node=Path(dev.device_node or f"/dev/{dev.sys_name}"),
        model=_model(dev),
        size=int(_read(dev.sys_path, "size") or 0) * 512,     # sysfs counts 512-byte sectors on every disk
        bus=bus,
        removable=removable(dev.sys_path, bus),
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
        have, need = f"{disk.size / MiB:.1f} MiB", f"{image_size / MiB:.1f} MiB"
        if have == need:   # a few sectors short: rounded, both sizes would read the same
            have, need = f"{disk.size} bytes", f"{image_size} bytes"
        raise FlashError(f"{disk.node} is smaller than the image ({have} < {need})")


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


def confirm(disk: Disk, image: Path, ask: Ask | None) -> None:
    if ask is None:
        if not sys.stdin.isatty():
            raise FlashError(f"refusing to write {disk.node} without confirmation: no terminal to ask on",
                             hint="pass --yes")
        ask = _ask_tty
    answer = ask(f"Write {image.name} to {disk}? Everything on it will be lost. [y/N]")
    if answer.lower() not in ("y", "yes"):
        raise FlashError(f"not writing {disk.node}: not confirmed")


