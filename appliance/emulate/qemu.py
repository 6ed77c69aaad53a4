"""The QEMU command line that boots an image on an emulated board (the disk read-only under a throw-away overlay,
dom0's SSH forwarded to a host port), the firmware it starts, and the scratch card copy an SD board needs.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .. import log, proc
from ..config import BoardSpec
from ..errors import EmulateError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bios(spec: BoardSpec) -> Path | None:
    """The U-Boot QEMU starts as firmware; None when the board boots U-Boot from the card itself."""
    if spec.uboot.offset is not None:
        return None
    path = Path("/") / spec.uboot.file
    if not path.exists():
        raise EmulateError(f"board/{spec.name}.yaml: uboot.file: {path} is not on this machine",
                           hint=f"apt-get install {spec.uboot.package}")
    return path


def _escape(value: Path | str) -> str:
    return str(value).replace(",", ",,")  # QEMU's option syntax doubles a literal comma


def qemu_argv(spec: BoardSpec, img: Path, ssh_port: int, serial: str, *, persistent: bool = False) -> list[str]:
    """The QEMU command line that boots img on the board, disk read-only underneath a throw-away overlay
    (persistent: img is a scratch copy that keeps the board's writes, across a power cut too)."""
    q = spec.qemu
    if q is None:
        raise EmulateError(f"board/{spec.name}.yaml has no qemu: section, so QEMU cannot boot it")
    # The counter must tick at the rate the firmware writes to CNTFRQ (what Xen and Linux go by), or time runs
    # fast or slow on the board; QEMU ticks at its cntfrq property, whatever CNTFRQ says.
    cpu = q.cpu if q.cntfrq is None else f"{q.cpu},cntfrq={q.cntfrq}"
    argv = [q.binary, "-M", q.machine, "-cpu", cpu, "-smp", str(q.smp), "-m", str(q.memory_mib),
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", serial]
    fw = bios(spec)
    if fw is not None:
        argv += ["-bios", str(fw)]
    if q.disk == "virtio":
        overlay = "" if persistent else ",snapshot=on"
        argv += ["-drive", f"if=none,file={_escape(img)},format=raw,id=hd0{overlay}",
                 "-device", "virtio-blk-device,drive=hd0"]
    elif q.disk == "sd":
        # img is already the card-sized scratch copy (see sd_card); the boot ROM model reads the SPL from it.
        argv += ["-drive", f"if=sd,file={_escape(img)},format=raw"]
    else:
        raise EmulateError(f"board/{spec.name}.yaml: qemu.disk: '{q.disk}' must be virtio or sd")
    fwd = f"user,hostfwd=tcp:127.0.0.1:{ssh_port}-:22"
    if q.nic == "builtin":
        argv += ["-nic", fwd]  # the SoC's own Ethernet
    else:
        argv += ["-netdev", f"{fwd},id=net0", "-device", f"{q.nic},netdev=net0"]
    return argv


def scratch_copy(img: Path, work: Path, suffix: str = "scratch") -> Path:
    """A copy of img for QEMU to write to; the image itself stays untouched. The copy is sparse, so only the
    image's data is copied."""
    copy = work / f"{img.stem}.{suffix}.img"
    work.mkdir(parents=True, exist_ok=True)       # an installed tool's work folder may not exist yet
    copy.unlink(missing_ok=True)
    log.run(["cp", "--sparse=always", "--reflink=auto", img, copy], what=f"copying {img.name} to a scratch disk")
    return copy


def sd_card(img: Path, work: Path) -> Path:
    """A scratch copy of img the size of a real card (QEMU's SD model takes only powers of two)."""
    card = scratch_copy(img, work, "sd-card")
    os.truncate(card, 1 << (img.stat().st_size - 1).bit_length())
    return card


def spawn(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start QEMU with its serial console on a pipe (stdin too, so that keys can be typed on it), in a process
    group of its own, that dies with this process however it ends (call it from the main thread)."""
    log.debug(f"+ {' '.join(map(str, argv))}")
    try:
        return subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=log.clean_env(), start_new_session=True,
                                preexec_fn=proc.die_with_parent())
    except FileNotFoundError:
        raise EmulateError(f"{argv[0]} is not installed on this machine", hint="apt-get install qemu-system-arm") \
            from None


