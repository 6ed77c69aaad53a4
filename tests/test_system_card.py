"""System tier: a card of its own and a board you can find, on the emulated board. The built image is flashed to a
scratch file with card settings (host name, SSID, WPA2 passphrase, a second key), as `invoke flash --to-file` does,
and booted: the first boot applies them once, and shows and publishes the SSH host key the SSH layer then sees.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TEST_DIR

from appliance import flash
from appliance.cardsettings import Settings
from appliance.emulate import Board, boot, wait_for

pytestmark = pytest.mark.system

NAME, SSID, PASSPHRASE = "hall-a", "Hall A", "correct horse battery"


@pytest.fixture(scope="module")
def card_board(built_image, test_key: Path) -> Iterator[Board]:
    """The image written to a scratch card with settings, booted; it is logged into with the card's key only."""
    key = TEST_DIR / "id_card"
    key.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "card", "-f", str(key)], check=True)
    card = TEST_DIR / "card-settings.img"
    card.unlink(missing_ok=True)
    flash.flash(built_image.img, card, to_file=True,
                settings=Settings(NAME, SSID, PASSPHRASE, (key.with_suffix(".pub").read_text().strip(),)))
    try:
        with boot(card, log_path=TEST_DIR / "console-card.log", key=key, settled=True) as b:
            yield b
    finally:
        card.unlink(missing_ok=True)


def test_the_card_settings_were_applied(card_board: Board) -> None:
    b = card_board      # it let the card's key in: the boot waited for SSH with it
    assert b.run("hostname").out.strip() == NAME
    assert b.run("cat /etc/hostname").out.strip() == NAME
    conf = b.run("cat /etc/hostapd/appliance.conf").out.splitlines()
    assert f"ssid={SSID}" in conf and "wpa=2" in conf and f"wpa_passphrase={PASSPHRASE}" in conf
    assert b.run("stat -c %a /etc/hostapd/appliance.conf").out.strip() == "600"
    # /boot/firmware when fstab's mount came (it waits for udev's coldplug), else the partition mounted here
    boot = b.run("if mountpoint -q /boot/firmware; then d=/boot/firmware; else d=/run/card-test; mkdir -p $d; "
                 "mount -o ro \"$(blkid -t TYPE=vfat -o device | head -n1)\" $d; fi; ls $d && cat $d/appliance.txt.done; "
                 "[ $d = /boot/firmware ] || umount $d").out
    assert "appliance.txt.done" in boot.split() and "appliance.txt" not in boot.split()
    assert "hostname=hall-a" in boot and PASSPHRASE not in boot
    # recorded: the unit is no longer wanted, so the next boot neither waits for the boot partition nor redoes it
    assert b.run("systemctl is-enabled appliance-card-settings.service", check=False).out.strip() == "disabled"
    log = b.console.read_text(errors="replace")
    assert re.search(r"appliance-card-settings: /dev/\w+:/appliance.txt: host name hall-a", log), log[-3000:]
    assert f"appliance-hostname: this board is {NAME}" not in log    # the MAC's name did not run over it


def test_the_console_shows_the_key_the_ssh_layer_sees(card_board: Board) -> None:
    b = card_board
    assert b.host_key is not None
    seen = "SHA256:" + base64.b64encode(hashlib.sha256(base64.b64decode(b.host_key)).digest()).decode().rstrip("=")
    log = b.console.read_text(errors="replace")
    shown = re.findall(r"appliance-ssh-hostkeys: SSH host key (\w+) (SHA256:\S+)", log)
    assert (("ed25519", seen) in shown) or (("ecdsa", seen) in shown), (seen, shown)
    assert seen in b.run("cat /etc/issue.d/appliance-ssh.issue").out
    service = b.run("cat /etc/avahi/services/ssh.service").out
    assert ">fp-ed25519=" in service and re.search(r"<txt-record>image=\S+-booth</txt-record>", service)


def test_avahi_announces_ssh_on_the_uplink_only(card_board: Board) -> None:
    journal = card_board.run("journalctl -b -u avahi-daemon --no-pager", timeout=60).out
    assert re.search(r'Service "hall-a" \((/etc/avahi)?/services/ssh.service\) successfully established', journal), \
        journal[-1500:]
    joined = re.findall(r"Joining mDNS multicast group on interface (\S+)\.IPv4", journal)
    assert joined and not {"br0", "brg0"} & set(joined), joined


def test_the_console_login_prompt_shows_the_fingerprints(card_board: Board) -> None:
    """The getty on dom0's console (hvc0) starts even though udev's coldplug comes late, and shows /etc/issue.d."""
    b = card_board
    wait_for("the console's getty", lambda: b.run("systemctl is-active serial-getty@hvc0.service", check=False)
             .out.strip() == "active" or None, 300, interval=5, board=b)
    assert wait_for("the issue text on the console", lambda: re.search(
        rf"SSH host keys of {NAME} \(check them when ssh asks\):\s+ed25519\s+SHA256:\S+",
        b.console.read_text(errors="replace")), 120, interval=2, board=b)
