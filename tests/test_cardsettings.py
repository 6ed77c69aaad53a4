"""A card of its own: `invoke flash --hostname/--ssid/--passphrase-file/--authorized-keys` writes appliance.txt onto
the boot partition (FAT, with mtools) after the verified write and reads it back; the board's first boot applies it
once (appliance-card-settings, run here against a tree with the module the build ships). One set of rules for all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cards import Loops

from appliance import ROOT, bmap, cardsettings, config, flash, log
from appliance.build import configure
from appliance.bundles import MANAGER, install_manager
from appliance.cardsettings import Settings
from appliance.errors import FlashError, RecipeError
from appliance.flash import settings as card_settings
from appliance.identity import derive

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@laptop"
KEY2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBzsbQnV7lhrGWWFmxCl0VKc8fWuqV6ubj0cWFWq2Rjt other@desk"
SCRIPT = ROOT / "overlays/booth/usr/local/sbin/appliance-card-settings"
MiB = 1 << 20


# ---------------------------------------------------------------- unit: the rules and the file


@pytest.mark.unit
@pytest.mark.parametrize(("text", "message"), [
    (b"hostname=Booth_1\n", "appliance.txt:1: 'Booth_1' is not a valid host name (up to 63 lower-case letters, "
                            "digits and '-', not starting or ending with '-')"),
    (b"# mine\nhostname=booth-\n", "appliance.txt:2: 'booth-' is not a valid host name (up to 63 lower-case "
                                   "letters, digits and '-', not starting or ending with '-')"),
    (b"ssid=" + b"x" * 33 + b"\n", "appliance.txt:1: '" + "x" * 33 + "' must be 1 to 32 bytes long"),
    (b"ssid=\n", "appliance.txt:1: '' must be 1 to 32 bytes long"),
    (b"ssid=" + b"y" * 5000 + b"\n", "appliance.txt:1: '" + "y" * 77 + "...' must be 1 to 32 bytes long"),
    (b"ssid=a\tb\n", "appliance.txt:1: 'a\\tb' must not hold control characters"),
    (b"passphrase=short\n", "appliance.txt:1: the passphrase in passphrase= must be 8 to 63 printable ASCII "
                            "characters (it has 5)"),
    (b"passphrase=" + "\u00e9t\u00e9-\u00e9t\u00e9-\u00e9t\u00e9".encode() + b"\n",
     "appliance.txt:1: the passphrase in passphrase= must be 8 to 63 printable ASCII characters (it has 11)"),
    (b"authorized_key=-----BEGIN OPENSSH PRIVATE KEY-----\n",
     "appliance.txt:1: not an SSH public key (a private key or a typo?)"),
    (b"hostnme=booth\n", "appliance.txt:1: unknown key 'hostnme' (known: hostname, ssid, passphrase, "
                         "authorized_key)"),
    (b"hostname=a\nhostname=b\n", "appliance.txt:2: hostname is given twice"),
    (b"just words\n", "appliance.txt:1: expected key=value, got 'just words'"),
    (b"ssid=\xff\n", "appliance.txt: not UTF-8 text (byte 5)"),
    (b"#" * (65 << 10), f"appliance.txt: {65 << 10} bytes, more than a settings file has (65536)"),
    (b"".join(f"authorized_key={KEY}\n".encode() for _ in range(65)),
     "appliance.txt:65: more than 64 authorized_key lines"),
])
def test_a_bad_settings_file_is_one_line(text: bytes, message: str) -> None:
    with pytest.raises(cardsettings.Error) as err:
        cardsettings.parse(text, "appliance.txt")
    assert str(err.value) == message


@pytest.mark.unit
def test_a_hand_edited_file_reads_as_written() -> None:
    """Windows' line ends and byte-order mark, comments, blank lines; an SSID keeps its spaces."""
    text = (f"\ufeff# booth at hall A\r\nhostname = hall-a \r\n\r\nssid=Hall A \u2615\r\n"
            f"passphrase=correct horse battery\r\nauthorized_key={KEY}\r\nauthorized_key={KEY2}\r\n")
    s = cardsettings.parse(text.encode(), "appliance.txt")
    assert s == Settings("hall-a", "Hall A \u2615", "correct horse battery", (KEY, KEY2))
    assert cardsettings.parse(s.render().encode(), "x") == s


@pytest.mark.unit
def test_recipes_use_the_same_rules(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nboard: cubieboard2\nhostname: -bad\n")
    with pytest.raises(RecipeError) as err:
        config.load(str(recipe))
    assert str(err.value).endswith("r.yaml: hostname: '-bad' is not a valid host name (up to 63 lower-case "
                                   "letters, digits and '-', not starting or ending with '-')")


@pytest.mark.unit
@pytest.mark.parametrize(("options", "message"), [
    ({"hostname": "UPPER"}, "--hostname: 'UPPER' is not a valid host name (up to 63 lower-case letters, digits "
                            "and '-', not starting or ending with '-')"),
    ({"ssid": "x" * 40}, "--ssid: '" + "x" * 40 + "' must be 1 to 32 bytes long"),
    ({"passphrase_file": "pass"}, "--passphrase-file: the passphrase in {d}/pass must be 8 to 63 printable ASCII "
                                  "characters (it has 4)"),
    ({"passphrase_file": "missing"}, "--passphrase-file: cannot read {d}/missing: No such file or directory"),
    ({"authorized_keys": "keys"}, "--authorized-keys: {d}/keys:3: not an SSH public key (a private key or a typo?)"),
    ({"authorized_keys": "empty"}, "--authorized-keys: {d}/empty holds no SSH public key"),
])
def test_bad_flash_options_are_one_line(tmp_path: Path, options: dict[str, str], message: str) -> None:
    (tmp_path / "pass").write_text("abcd\n")
    (tmp_path / "keys").write_text(f"# mine\n{KEY}\nssh-ed25519\n")
    (tmp_path / "empty").write_text("# none yet\n")
    opts = {k: tmp_path / v if k.endswith(("_file", "_keys")) else v for k, v in options.items()}
    with pytest.raises(FlashError) as err:
        card_settings.from_options(**opts)  # type: ignore[arg-type]
    assert str(err.value) == message.format(d=tmp_path)


@pytest.mark.unit
def test_no_options_no_settings(tmp_path: Path) -> None:
    assert card_settings.from_options() is None
    (tmp_path / "pass").write_text("correct horse battery\r\n")
    (tmp_path / "keys").write_text(f"{KEY}\n\n# old\n{KEY2}\n")
    assert card_settings.from_options("b1", "Booth 1", tmp_path / "pass", tmp_path / "keys") == \
        Settings("b1", "Booth 1", "correct horse battery", (KEY, KEY2))


# ---------------------------------------------------------------- root: written onto a card, read back


def fat_card(directory: Path) -> tuple[Path, Path]:
    """An image laid out as ours (MBR, a FAT boot partition at 1 MiB, an ext4 root) and its block map."""
    img, boot = directory / "fat.img", directory / "boot.vfat"
    img.write_bytes(b"")
    os.truncate(img, 24 * MiB)
    log.run(["sfdisk", "--quiet", img], input=b"label: dos\nstart=2048, size=16384, type=c, bootable\n"
                                              b"start=18432, type=83\n")
    log.run(["mkfs.vfat", "-n", "BOOT", "-C", boot, str(8 * 1024)])
    (directory / "boot.scr").write_bytes(b"a boot script\n")
    log.run(["mcopy", "-i", boot, directory / "boot.scr", "::/boot.scr"])
    with open(img, "r+b") as f:
        f.seek(MiB)
        f.write(boot.read_bytes())
    log.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={18432 * 512}", img, "7M"])
    bmap.create(img, directory / "fat.bmap")
    return img, directory / "fat.bmap"


def read_back(target: Path) -> Settings:
    data = card_settings.read(target)
    assert data is not None
    return cardsettings.parse(data, str(target))


@pytest.mark.root
def test_flash_to_a_file_writes_the_settings_on_the_boot_partition(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    img, bm = fat_card(tmp_path)
    s = Settings("hall-a", "Hall A", "correct horse battery", (KEY,))
    out = tmp_path / "card.img"
    flash.flash(img, out, bmap=bm, to_file=True, settings=s)
    assert read_back(out) == s
    # the rest of the boot partition is the image's: only appliance.txt was added
    files = log.run(["mdir", "-b", "-i", f"{out}@@{MiB}", "::/"], env=card_settings.ENV).stdout.decode().split()
    assert sorted(files) == ["::/appliance.txt", "::/boot.scr"]
    with open(out, "rb") as f, open(tmp_path / "boot-out.vfat", "wb") as b:
        f.seek(MiB)
        b.write(f.read(8 * MiB))
    log.run(["fsck.vfat", "-n", tmp_path / "boot-out.vfat"])   # a clean FAT, as the board will mount it
    err = capsys.readouterr().err
    assert "card settings written to appliance.txt on the boot partition (host name hall-a, SSID Hall A, WPA2 " \
           "passphrase, 1 SSH key(s)), verified" in err


@pytest.mark.root
def test_an_image_without_a_fat_partition_is_refused_before_writing(tmp_path: Path) -> None:
    img = tmp_path / "nofat.img"
    img.write_bytes(b"")
    os.truncate(img, 4 * MiB)
    log.run(["sfdisk", "--quiet", img], input=b"label: dos\nstart=2048, type=83\n")
    out = tmp_path / "out.img"
    with pytest.raises(FlashError) as err:
        flash.flash(img, out, to_file=True, settings=Settings("b1"))
    assert str(err.value) == f"{img} has no FAT partition for the card's settings (the image's boot partition)"
    assert not out.exists()


@pytest.mark.root
def test_flash_to_a_loop_device_writes_the_settings(tmp_path: Path, loops: Loops) -> None:
    img, bm = fat_card(tmp_path)
    loop = loops.new(size=32 * MiB)
    s = Settings(hostname="hall-b", authorized_keys=(KEY, KEY2))
    flash.flash(img, loop.node, bmap=bm, yes=True, force=True, settings=s,
                ask=lambda q: pytest.fail(f"asked {q!r}"))
    assert read_back(loop.node) == s
    log.run(["sync"])
    assert read_back(loop.backing) == s            # on the card itself, not only in the page cache


# ---------------------------------------------------------------- the board's first boot, on a tree


def booth_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A root with the booth's rendered hostapd config, the shipped module and the unit's wants link, and a boot
    folder: what appliance-card-settings sees at first boot."""
    cfg = config.load("booth")
    files = {f.rel: f for f in configure.render_overlays(cfg, configure.context(cfg, derive(cfg.digest),
                                                                                need_secrets=False))}
    root, boot = tmp_path / "root", tmp_path / "boot"
    boot.mkdir()
    configure.lay(root, [f for rel, f in files.items() if rel.startswith(("etc/hostapd", "etc/systemd"))])
    (root / "etc/hostname").write_text("booth\n")
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tbooth\n")
    (root / "root/.ssh").mkdir(parents=True)
    (root / "root/.ssh/authorized_keys").write_text(KEY + "\n")
    install_manager(cfg, root)
    assert (root / cardsettings.UNIT).is_symlink()
    return root, boot


def run_board_script(root: Path, boot: Path) -> subprocess.CompletedProcess[str]:
    """The board's script with the board's python3 (the system's, not this venv) and the module the build laid in."""
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    return subprocess.run([python, "-S", SCRIPT, boot, root], capture_output=True, text=True, check=False,
                          env={"PYTHONPATH": str(root / MANAGER), "PATH": os.environ.get("PATH", "")})


@pytest.mark.unit
def test_a_card_without_settings_skips_the_unit_after_a_shells_look(tmp_path: Path) -> None:
    """The unit's condition (no Python start): no appliance.txt, the unit is skipped and later boots do not run it;
    one, and appliance-card-settings runs."""
    root, boot = booth_tree(tmp_path)
    check = [str(SCRIPT.with_name("appliance-card-check")), str(boot), str(root)]
    (boot / "appliance.txt").write_text(Settings("hall-a").render())
    assert subprocess.run(check, check=False).returncode == 0
    assert (root / cardsettings.UNIT).is_symlink()
    (boot / "appliance.txt").unlink()
    assert subprocess.run(check, check=False).returncode == 1
    assert not (root / cardsettings.UNIT).is_symlink()


@pytest.mark.unit
def test_the_first_boot_applies_the_settings_once(tmp_path: Path) -> None:
    root, boot = booth_tree(tmp_path)
    s = Settings("hall-a", "Hall A", "correct horse battery", (KEY, KEY2))
    (boot / "appliance.txt").write_text(s.render())
    r = run_board_script(root, boot)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"appliance-card-settings: {boot}/appliance.txt: host name hall-a",
                                     f"appliance-card-settings: {boot}/appliance.txt: wifi SSID Hall A",
                                     f"appliance-card-settings: {boot}/appliance.txt: wifi WPA2 passphrase",
                                     f"appliance-card-settings: {boot}/appliance.txt: 1 SSH key(s) trusted for root"]
    assert (root / "etc/hostname").read_text() == "hall-a\n"
    assert "127.0.1.1\thall-a\n" in (root / "etc/hosts").read_text()
    assert (root / "var/lib/appliance/hostname-set").read_text() == "hall-a\n"   # appliance-hostname keeps it
    conf = root / "etc/hostapd/appliance.conf"
    lines = conf.read_text().splitlines()
    assert "ssid=Hall A" in lines and "wpa=2" in lines and "wpa_passphrase=correct horse battery" in lines
    assert "wpa=0" not in lines and sum(ln.startswith("ssid=") for ln in lines) == 1
    assert conf.stat().st_mode & 0o777 == 0o600
    assert (root / "root/.ssh/authorized_keys").read_text() == f"{KEY}\n{KEY2}\n"
    assert (root / "root/.ssh/authorized_keys").stat().st_mode & 0o777 == 0o600
    # recorded: the file renamed without its passphrase, and the unit no longer wanted
    assert not (boot / "appliance.txt").exists()
    assert "correct horse" not in (boot / "appliance.txt.done").read_text()
    assert "hostname=hall-a" in (boot / "appliance.txt.done").read_text()
    assert not (root / cardsettings.UNIT).is_symlink()
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    (root / cardsettings.UNIT).parent.mkdir(parents=True, exist_ok=True)
    again = run_board_script(root, boot)          # even if run again: nothing left to apply
    assert again.returncode == 0 and again.stdout == ""
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


@pytest.mark.unit
def test_a_refused_file_stays_for_the_next_boot(tmp_path: Path) -> None:
    root, boot = booth_tree(tmp_path)
    (boot / "appliance.txt").write_text("hostname=hall-a\nssid=\n")
    hostapd = (root / "etc/hostapd/appliance.conf").read_bytes()
    r = run_board_script(root, boot)
    assert r.returncode == 1
    assert r.stderr == (f"appliance-card-settings: ERROR: {boot}/appliance.txt:2: '' must be 1 to 32 bytes long; "
                        f"nothing applied\n")
    assert (root / "etc/hostname").read_text() == "booth\n"          # nothing half applied
    assert (root / "etc/hostapd/appliance.conf").read_bytes() == hostapd
    assert (boot / "appliance.txt").exists() and (root / cardsettings.UNIT).is_symlink()


@pytest.mark.unit
def test_wifi_settings_on_an_image_without_an_access_point_apply_nothing(tmp_path: Path) -> None:
    root, boot = booth_tree(tmp_path)
    (root / "etc/hostapd/appliance.conf").unlink()
    (boot / "appliance.txt").write_text("hostname=hall-e\nssid=Hall E\n")
    r = run_board_script(root, boot)
    assert (r.returncode, r.stderr) == (1, "appliance-card-settings: ERROR: ssid= and passphrase= need the booth's "
                                           f"access point, and this image has none ({root}/etc/hostapd/appliance.conf)"
                                           "; nothing applied\n")
    assert (root / "etc/hostname").read_text() == "booth\n"


@pytest.mark.unit
def test_a_power_cut_before_the_rename_does_not_apply_twice(tmp_path: Path) -> None:
    """Applied and recorded, but the file not yet renamed: the next boot only renames it (keys are not doubled)."""
    root, boot = booth_tree(tmp_path)
    text = Settings(ssid="Hall C", authorized_keys=(KEY2,)).render()
    (boot / "appliance.txt").write_text(text)
    assert run_board_script(root, boot).returncode == 0
    (boot / "appliance.txt.done").rename(boot / "appliance.txt")
    (root / cardsettings.UNIT).symlink_to("../appliance-card-settings.service")
    r = run_board_script(root, boot)
    assert r.returncode == 0 and r.stdout == ""
    assert (root / "root/.ssh/authorized_keys").read_text() == f"{KEY}\n{KEY2}\n"
    assert not (root / cardsettings.UNIT).is_symlink()


@pytest.mark.root
def test_the_board_finds_and_mounts_its_own_boot_partition(tmp_path: Path, loops: Loops) -> None:
    """As at boot (no BOOT argument): the first partition of the disk holding the root, mounted by the script itself,
    the file renamed on the card's FAT."""
    if "\tvfat\n" not in Path("/proc/filesystems").read_text():
        pytest.skip("the host's kernel has no vfat (the board's has: the system tier applies a card's settings)")
    img, _ = fat_card(tmp_path)
    log.run(["mcopy", "-i", f"{img}@@{MiB}", "-", "::/appliance.txt"], input=Settings("hall-f").render().encode(),
            env=card_settings.ENV)
    loop = loops.new(content=img, partscan=True)
    loops.scan(loop)
    root = tmp_path / "root"
    root.mkdir()
    log.run(["mount", loop.partition(2), root])
    loops.stack.callback(log.run, ["umount", "--lazy", root], check=False)
    (tmp_path / "t").mkdir()
    tree, _ = booth_tree(tmp_path / "t")
    shutil.copytree(tree, root, dirs_exist_ok=True, symlinks=True)
    r = subprocess.run(["/usr/bin/python3", "-S", SCRIPT, root], capture_output=True, text=True, check=False,
                       env={"PYTHONPATH": str(root / MANAGER), "PATH": os.environ.get("PATH", "")})
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"appliance-card-settings: {loop.partition(1)}:/appliance.txt: host name hall-f\n"
    assert (root / "etc/hostname").read_text() == "hall-f\n"
    files = log.run(["mdir", "-b", "-i", loop.partition(1), "::/"], env=card_settings.ENV).stdout.decode().split()
    assert sorted(files) == ["::/appliance.txt.done", "::/boot.scr"]
    log.run(["fsck.vfat", "-n", loop.partition(1)])


@pytest.mark.image
def test_the_board_applies_card_settings_in_its_own_rootfs(image_rootfs: Path) -> None:
    """The built rootfs's own python3 (armhf, through qemu-user) and the module the build laid in, in a chroot."""
    work = image_rootfs / "tmp/card-test"
    shutil.rmtree(work, ignore_errors=True)
    try:
        (work / "boot").mkdir(parents=True)
        root = work / "root"
        for rel in ("etc/hostapd/appliance.conf", "etc/hostname", "etc/hosts"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(image_rootfs / rel, root / rel)
        (work / "boot/appliance.txt").write_text(Settings("hall-d", "Hall D", None, (KEY,)).render())
        r = subprocess.run(["chroot", image_rootfs, "/usr/local/sbin/appliance-card-settings", "/tmp/card-test/boot",
                            "/tmp/card-test/root"], capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr
        assert (root / "etc/hostname").read_text() == "hall-d\n"
        assert "ssid=Hall D" in (root / "etc/hostapd/appliance.conf").read_text().splitlines()
        assert (root / "root/.ssh/authorized_keys").read_text() == KEY + "\n"
        assert not (work / "boot/appliance.txt").exists()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_the_image_ships_the_first_boot_parts(host) -> None:
    """The rules laid in beside the guest manager, the scripts, and what the board announces about its image."""
    assert host.file(f"/{MANAGER}/appliance/cardsettings.py").is_file
    for script in ("appliance-card-settings", "appliance-ssh-hostkeys"):
        assert host.file(f"/usr/local/sbin/{script}").mode == 0o755
    image = host.file("/etc/appliance/image").content_string.splitlines()
    assert image[0] == "NAME=cubieboard2-booth" and image[1].startswith("VERSION=")
    wanted = host.run("systemctl is-enabled appliance-card-settings.service").stdout.strip()
    # in the image: wanted at first boot; on a booted board with no appliance.txt: done, and no longer wanted
    assert wanted == ("enabled" if host.backend_name == "chroot" else "disabled")
