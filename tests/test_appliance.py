"""What every appliance image must be, checked on its rootfs (chroot, image tier) and live (SSH, system tier).

The same checklist runs on both backends; the few checks that differ between a rootfs at rest and a
running board branch on `host.backend_name`.
"""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("package", ["xen-hypervisor-4.17-armhf", "xen-utils-4.17", "linux-image-armmp",
                                     "openssh-server", "systemd-sysv", "initramfs-tools"])
def test_package_installed(host, package):
    assert host.package(package).is_installed


def test_root_has_no_password(host):
    shadow = host.file("/etc/shadow").content_string
    root = next(line for line in shadow.splitlines() if line.startswith("root:"))
    assert root.split(":")[1] in ("*", "!", "!*")


def test_no_account_has_a_password(host):
    for line in host.file("/etc/shadow").content_string.splitlines():
        field = line.split(":")[1]
        assert field == "" or field[0] in "*!", f"{line.split(':')[0]} has a password hash"
        assert field != "", f"{line.split(':')[0]} has an empty password"


def test_sshd_refuses_passwords(host):
    # sshd -T needs a host key; a throwaway one in /tmp keeps the image's /etc/ssh untouched.
    host.run_test("mkdir -p /run/sshd && rm -f /tmp/hk && ssh-keygen -q -t ed25519 -N '' -f /tmp/hk")
    conf = host.check_output("sshd -T -h /tmp/hk -C user=root,host=x,addr=10.0.0.9")
    settings = dict(line.split(" ", 1) for line in conf.splitlines() if " " in line)
    assert settings["passwordauthentication"] == "no"
    assert settings["kbdinteractiveauthentication"] == "no"
    assert settings["permitemptypasswords"] == "no"
    assert settings["permitrootlogin"] in ("without-password", "prohibit-password")
    assert (settings["clientaliveinterval"], settings["clientalivecountmax"]) == ("15", "4"), \
        "a dead client's session (and its deploy lock) ends within 60 s"


def test_ssh_host_keys_are_made_on_the_board(host):
    keys = host.run("ls /etc/ssh/ | grep ^ssh_host_ || true").stdout.split()
    if host.backend_name == "chroot":
        assert keys == [], "the image must not carry SSH host keys"
    else:
        assert "ssh_host_ed25519_key" in keys


def test_first_boot_units_enabled(host):
    out = host.run("systemctl is-enabled appliance-ssh-hostkeys.service")
    assert out.stdout.strip() == "enabled", out.stdout + out.stderr


def test_machine_id_is_made_at_first_boot(host):
    mid = host.file("/etc/machine-id").content_string.strip()
    if host.backend_name == "chroot":
        assert mid == "", "an empty machine id: made at first boot, without systemd's preset-all on a read-only root"
    else:
        assert len(mid) == 32


def test_fstab_matches_the_image(host, request, built_image):
    fstab = [line.split() for line in host.file("/etc/fstab").content_string.splitlines()
             if line.strip() and not line.startswith("#")]
    mounts = {f[1]: f[0] for f in fstab}
    manifest = json.loads(built_image.manifest.read_text())
    ident = manifest["identity"]
    assert mounts["/"] == f"UUID={ident['root_uuid']}"
    assert mounts["/boot/firmware"] == f"UUID={ident['boot_uuid']}"
    if host.backend_name == "chroot":
        img = request.getfixturevalue("built_image").img
        import subprocess

        table = json.loads(subprocess.run(["sfdisk", "-J", str(img)], capture_output=True, text=True,
                                          check=True).stdout)["partitiontable"]["partitions"]
        seen = {}
        for part in table:
            out = subprocess.run(["blkid", "-p", "-O", str(part["start"] * 512), "-o", "export", str(img)],
                                 capture_output=True, text=True, check=True).stdout
            fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
            seen[fields["TYPE"]] = fields["UUID"]
        assert seen["ext4"] == ident["root_uuid"]
        assert seen["vfat"] == ident["boot_uuid"]
    else:
        assert host.mount_point("/").exists


def test_initramfs_settings_are_short(host):
    assert host.file("/etc/initramfs-tools/conf.d/appliance.conf").contains("MODULES=list")
    assert host.file("/usr/sbin/update-initramfs").contains("mkinitramfs")  # the real one is back
    assert "update-initramfs" not in host.run("dpkg-divert --list").stdout


def test_authorized_key_is_the_test_key(host, test_key):
    assert host.file("/root/.ssh/authorized_keys").content_string.strip() == \
        test_key.with_suffix(".pub").read_text().strip()
    assert host.file("/root/.ssh/authorized_keys").mode == 0o600
