"""Unit tier: the system tier's harness (appliance.emulate) without QEMU: the command line never lets QEMU
write the image, an SD card copy has a size QEMU accepts, console milestones and fatal lines are noticed.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from appliance import emulate
from appliance.config import load_board
from appliance.errors import EmulateError

pytestmark = pytest.mark.unit


@pytest.fixture
def no_firmware(monkeypatch):
    monkeypatch.setattr(emulate.qemu, "bios", lambda spec: None if spec.uboot.offset else Path("/fw/u-boot.bin"))


def _opts(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_virt_boots_the_image_read_only_through_u_boot(no_firmware, tmp_path):
    img = tmp_path / "x.img"
    argv = emulate.qemu_argv(load_board("qemu-virt"), img, 2222, serial="stdio")
    assert argv[:3] == ["qemu-system-arm", "-M", "virt,virtualization=on,gic-version=2,highmem=off"]
    assert _opts(argv, "-bios") == ["/fw/u-boot.bin"]
    drives = _opts(argv, "-drive")
    assert drives == [f"if=none,file={img},format=raw,id=hd0,snapshot=on"]
    assert "virtio-blk-device,drive=hd0" in _opts(argv, "-device")
    assert not any(a in argv for a in ("-kernel", "-initrd", "-append")), "U-Boot and boot.scr must load Xen"
    assert _opts(argv, "-netdev") == ["user,hostfwd=tcp:127.0.0.1:2222-:22,id=net0"]


def test_a_comma_in_the_path_is_escaped_for_qemu(no_firmware, tmp_path):
    argv = emulate.qemu_argv(load_board("qemu-virt"), tmp_path / "a,b.img", 2222, serial="stdio")
    assert f"file={tmp_path}/a,,b.img," in _opts(argv, "-drive")[0]


def test_orangepi_pc_boots_its_spl_from_the_sd_card(no_firmware, tmp_path):
    argv = emulate.qemu_argv(load_board("orangepi-pc"), tmp_path / "card.img", 2222, serial="stdio")
    assert _opts(argv, "-M") == ["orangepi-pc"] and _opts(argv, "-smp") == ["4"] and _opts(argv, "-m") == ["1024"]
    assert _opts(argv, "-cpu") == ["cortex-a7,cntfrq=24000000"], "the counter must tick at the 24 MHz U-Boot states"
    assert _opts(argv, "-bios") == []
    assert _opts(argv, "-drive") == [f"if=sd,file={tmp_path}/card.img,format=raw"]
    # the uplink is a USB Ethernet adapter: bookworm's dwmac-sun8i oopses on QEMU's EMAC model
    assert _opts(argv, "-nic") == []
    assert _opts(argv, "-netdev") == ["user,hostfwd=tcp:127.0.0.1:2222-:22,id=net0"]
    assert _opts(argv, "-device") == ["usb-net,netdev=net0"]


def test_sd_card_is_a_power_of_two_copy_and_the_image_is_untouched(tmp_path):
    img = tmp_path / "x.img"
    with open(img, "wb") as f:
        f.write(b"\xeb" * 4096)
        f.seek(3 * 2**20)
        f.write(b"end")
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    work = tmp_path / "work"
    work.mkdir()
    card = emulate.sd_card(img, work)
    assert card.stat().st_size == 4 * 2**20
    assert card.read_bytes()[: img.stat().st_size] == img.read_bytes()
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before


def _console(tmp_path: Path, chunks: list[bytes]) -> emulate.Console:
    r, w = os.pipe()
    console = emulate.Console(os.fdopen(r, "rb"), tmp_path / "console.log", time.monotonic())

    def feed() -> None:
        for c in chunks:
            os.write(w, c)
        os.close(w)

    threading.Thread(target=feed).start()
    console.join()
    return console


def test_console_notes_milestones_in_order_and_logs_everything(tmp_path):
    chunks = [b"\r\nU-Boot 2023.01+dfsg-2 (Jan 1 2024)\r\n", b"appliance: booting Xen on qemu-virt\r\n",
              b"(XEN) Xen version 4.17.5\r\n[    0.000000] Booting Linux on physical CPU 0x0\r\n",
              b"[    3.172450] Run /init as init process\r\n", b"Welcome to Debian GNU/Linux 12 (bookworm)!\r\n",
              b"[   73.9] appliance-guest[225]: appliance-guest: starting demo 1.0-e365b6bcda (96 MiB, 1 vcpu)\r\n",
              b"[   90.6] appliance-guest[225]: appliance-guest: demo 1.0-e365b6bcda answers at http://10.42.0.2:80/\r\n",
              b"booth-0a1b2c log", b"in: "]
    c = _console(tmp_path, chunks)
    assert list(c.milestones) == ["u-boot", "boot.scr", "xen", "dom0 kernel", "dom0 initramfs", "dom0 systemd",
                                  "guest started", "guest HTTP 200 on the bridge", "login prompt"]
    assert c.fatal is None
    assert (tmp_path / "console.log").read_bytes() == b"".join(chunks)


@pytest.mark.parametrize("line, why", [
    (b"BOOTP broadcast 1", "fell back to network boot"),
    (b"[   12.3] Kernel panic - not syncing: VFS: Unable to mount root fs", "dom0 kernel panicked"),
    (b"ALERT!  PARTUUID=f366c921-02 does not exist.  Dropping to a shell!", "did not find the root filesystem"),
    (b"appliance-initramfs: root=PARTUUID=f366c921-02 not found within 30 s; block devices: vda vda1",
     "did not find the root filesystem"),
    (b"appliance-initramfs: cannot mount /dev/vda2 (PARTUUID=f366c921-02); a shell on the console",
     "could not mount the root filesystem"),
    (b"-- Press any key to proceed --", "waits for a key on the console"),
])
def test_console_recognises_a_boot_that_cannot_go_on(tmp_path, line, why):
    c = _console(tmp_path, [b"U-Boot 2023.01\r\n", line + b"\r\n"])
    assert c.fatal is not None and why in c.fatal[0]


def test_wait_for_returns_the_first_true_value_and_times_out_with_the_name():
    values = iter([None, False, "up"])
    assert emulate.wait_for("x", lambda: next(values), timeout=5, interval=0.01) == "up"
    with pytest.raises(EmulateError, match="^the guest serving: not within 0 s$"):
        emulate.wait_for("the guest serving", lambda: None, timeout=0.05, interval=0.01)


@pytest.mark.parametrize("manifest, board", [
    ({"board": "cubieboard2", "also_boots": ["qemu-virt"]}, "qemu-virt"),
    ({"board": "orangepi-pc", "also_boots": []}, "orangepi-pc"),
    (None, "qemu-virt"),
])
def test_the_emulated_board_follows_the_image_manifest(tmp_path, manifest, board):
    img = tmp_path / "x.img"
    img.write_bytes(b"")
    if manifest is not None:
        img.with_suffix(".manifest.json").write_text(json.dumps(manifest))
    assert emulate.board_for(img) == board
