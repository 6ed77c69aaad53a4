"""Image tier: the built image file checked against the real packaged files (no board is in reach).

SPL bytes and eGON header, partition layout, boot.scr decoded and every file and device-tree path it
names, load addresses in the A20's RAM without overlaps, the initramfs modules, bmap compatibility
with bmaptool, checksums, the manifest, and bit-identical rebuilds.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import itertools
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import pytest
from imagediff import differences

from appliance import ROOT, config
from appliance.build import bootfiles, rootfs

pytestmark = pytest.mark.image
BOARD = config.load_board("cubieboard2")


def sfdisk(img: Path) -> dict:
    return json.loads(subprocess.run(["sfdisk", "-J", str(img)], check=True, capture_output=True,
                                     text=True).stdout)["partitiontable"]


def fat_read(img: Path, name: str) -> bytes:
    start = sfdisk(img)["partitions"][0]["start"] * 512
    return subprocess.run(["mtype", "-i", f"{img}@@{start}", f"::/{name}"], check=True, capture_output=True,
                          env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}).stdout


def fat_list(img: Path) -> set[str]:
    start = sfdisk(img)["partitions"][0]["start"] * 512
    out = subprocess.run(["mdir", "-/", "-b", "-i", f"{img}@@{start}", "::/"], check=True, capture_output=True,
                         text=True, env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}).stdout
    return {line.strip().removeprefix("::").lstrip("/") for line in out.splitlines() if line.strip()}


def decode_script(data: bytes) -> str:
    """A legacy U-Boot script image: 64-byte header, a table of part lengths, then the script."""
    magic, hcrc, _time, size, _load, _ep, dcrc, _os, _arch, itype, comp = struct.unpack(">7I4B", data[:32])
    assert magic == 0x27051956, "not a U-Boot legacy image"
    header = data[:4] + b"\0\0\0\0" + data[8:64]
    assert zlib.crc32(header) == hcrc, "header CRC mismatch"
    body = data[64:64 + size]
    assert zlib.crc32(body) == dcrc, "data CRC mismatch"
    assert itype == 6 and comp == 0, "not an uncompressed script"
    first_len = struct.unpack(">I", body[:4])[0]
    assert struct.unpack(">I", body[4:8])[0] == 0
    return body[8:8 + first_len].decode()


@pytest.fixture(scope="module")
def spl_packaged(built_image) -> bytes:
    cfg = config.load("booth")
    base = rootfs.cached(cfg)
    assert base is not None
    deb = base.deb("u-boot-sunxi")
    return subprocess.run(f"dpkg-deb --fsys-tarfile {deb} | tar -xOf - ./{BOARD.uboot.file}", shell=True,
                          check=True, capture_output=True).stdout


@pytest.fixture(scope="module")
def script(built_image) -> str:
    return decode_script(fat_read(built_image.img, "boot.scr"))


def branch(script: str, board: str) -> str:
    m = re.search(rf'echo "appliance: booting Xen on {board}"\n(.*?)bootz[^\n]*\n', script, re.S)
    assert m, f"boot.scr has no branch for {board}"
    return m.group(0)


def test_spl_at_8k_is_the_packaged_one_with_a_valid_egon_header(built_image, spl_packaged):
    with open(built_image.img, "rb") as f:
        f.seek(BOARD.uboot.offset)
        on_card = f.read(len(spl_packaged))
    assert on_card == spl_packaged
    assert on_card[4:12] == b"eGON.BT0"
    checksum, length = struct.unpack("<II", on_card[12:20])
    assert length % 4 == 0 and 0 < length <= len(on_card)
    words = list(struct.unpack(f"<{length // 4}I", on_card[:length]))
    words[3] = 0x5F0A6C39  # the checksum field counts as the stamp
    assert sum(words) & 0xFFFFFFFF == checksum


def test_mbr_partitions_clear_of_the_spl(built_image, spl_packaged):
    table = sfdisk(built_image.img)
    assert table["label"] == "dos"
    parts = table["partitions"]
    assert len(parts) == 2
    assert parts[0]["start"] * 512 >= 1 << 20
    assert parts[0]["start"] * 512 >= BOARD.uboot.offset + len(spl_packaged)
    assert parts[0]["type"] == "c" and parts[1]["type"] == "83"
    assert parts[1]["start"] >= parts[0]["start"] + parts[0]["size"]


def test_boot_scr_decodes_and_matches_its_source(built_image, script):
    assert script == fat_read(built_image.img, "boot.cmd").decode()
    assert 'test "${board_name}" = "qemu-arm"' in script


def test_every_file_boot_scr_loads_is_on_the_boot_partition(built_image, script):
    loaded = set(re.findall(r"^\s*load \S+ \S+ \S+ /(\S+)$", script, re.M))
    assert {"xen", "vmlinuz", "initrd.img", f"dtbs/{BOARD.dtb}"} <= loaded
    present = fat_list(built_image.img)
    for name in loaded:
        assert name in present, f"boot.scr loads /{name}, which is not on the boot partition"


def test_device_tree_paths_named_exist_in_the_board_dtb(built_image, script, tmp_path):
    dtb = tmp_path / BOARD.dtb
    dtb.write_bytes(fat_read(built_image.img, f"dtbs/{BOARD.dtb}"))
    part = branch(script, BOARD.name)
    xen_args = re.search(r'xen,xen-bootargs "([^"]*)"', part).group(1)
    paths = set(re.findall(r"dtuart=(\S+)", xen_args)) | set(re.findall(r"fdt (?:set|mknod) (/\S*)", part))
    assert "/soc/serial@1c28000" in paths
    for path in paths:
        node = path if path.startswith("/") else None
        if node is None:  # an alias
            node = subprocess.run(["fdtget", "-t", "s", str(dtb), "/aliases", path], check=True,
                                  capture_output=True, text=True).stdout.strip()
        # /chosen/dom0 and /chosen/dom0-ramdisk are made by boot.scr itself; their parent must exist
        check = node if not node.startswith("/chosen/") else "/chosen"
        subprocess.run(["fdtget", "-l", str(dtb), check], check=True, capture_output=True)
    # console=dtuart falls back to stdout-path: prove both DTB facts the fallback relies on
    stdout = subprocess.run(["fdtget", "-t", "s", str(dtb), "/chosen", "stdout-path"], check=True,
                            capture_output=True, text=True).stdout.strip()
    alias = stdout.split(":")[0]
    target = subprocess.run(["fdtget", "-t", "s", str(dtb), "/aliases", alias], check=True,
                            capture_output=True, text=True).stdout.strip()
    assert target == "/soc/serial@1c28000"


def test_load_addresses_in_ram_and_loaded_files_do_not_overlap(built_image, script):
    part = branch(script, BOARD.name)
    addr = {name: int(a, 16) for a, name in re.findall(r"^\s*load \S+ \S+ (0x[0-9a-f]+) /(\S+)$", part, re.M)}
    sizes = {name: len(fat_read(built_image.img, name)) for name in addr}
    dtb_addr = int(re.search(r"bootz 0x[0-9a-f]+ - (0x[0-9a-f]+)", part).group(1), 16)
    assert dtb_addr == addr[f"dtbs/{BOARD.dtb}"]  # the DTB is used in place (fdt_high=0xffffffff)
    assert "setenv fdt_high 0xffffffff" in part
    spans = sorted((a, a + sizes[n] + (8192 if n.startswith("dtbs/") else 0), n) for n, a in addr.items())
    ram_end = BOARD.ram.base + BOARD.ram.size
    for start, end, name in spans:
        assert BOARD.ram.base <= start and end <= ram_end, f"{name} outside RAM"
    for (_s1, e1, n1), (s2, _e2, n2) in itertools.pairwise(spans):
        assert e1 <= s2, f"{n1} overlaps {n2}"
    # U-Boot's own script buffer (scriptaddr 0x43100000) must survive while the script runs
    for start, end, name in spans:
        assert not (start < 0x43100000 + 0x100000 and end > 0x43100000), f"{name} overwrites boot.scr"
    # and the layout checker the build uses agrees
    bootfiles.check_layout(BOARD, {"xen": sizes["xen"], "vmlinuz": sizes["vmlinuz"],
                                   "initrd.img": sizes["initrd.img"], f"dtbs/{BOARD.dtb}": sizes[f"dtbs/{BOARD.dtb}"]})


def test_initramfs_has_the_boards_modules(built_image):
    data = gzip.decompress(fat_read(built_image.img, "initrd.img"))
    names = subprocess.run(["cpio", "-it", "--quiet"], input=data, check=True, capture_output=True).stdout.decode()
    for module in ("sunxi-mmc.ko", "ext4.ko", "sun4i-emac.ko", "dwmac-sunxi.ko", "virtio_blk.ko", "virtio_mmio.ko"):
        assert re.search(rf"/{re.escape(module)}$", names, re.M), f"{module} missing from the initramfs"
    # a short list, not MODULES=most
    assert len(re.findall(r"\.ko$", names, re.M)) < 80
    # each board loads its own list (boot.scr names the board to the init), then the modules-load.d ones
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["cpio", "-id", "--quiet", "etc/modules*"], input=data, cwd=d, check=True)
        lists = {p.name: p.read_text().split() for p in Path(d, "etc").iterdir()}
    # the USB host too: the wifi dongle comes with the early coldplug of USB devices, not the whole coldplug
    assert lists["modules.cubieboard2"] == ["sunxi-mmc", "ext4", "sun4i-emac", "dwmac-sunxi", "phy-sun4i-usb",
                                            "ehci-platform", "ohci-platform"]
    assert lists["modules.qemu-virt"] == ["virtio_blk", "virtio_mmio", "ext4", "virtio_net"]
    assert "crc32c_generic" in lists["modules.soft"]           # ext4's soft dependency, loaded first
    assert {"xen-netback", "bridge", "nf_tables"} <= set(lists["modules"])
    # the root's check: the tree's e2fsck and every library it loads, where the loader looks for them
    for path in ("sbin/e2fsck", "lib/ld-linux-armhf.so.3", "lib/arm-linux-gnueabihf/libext2fs.so.2",
                 "lib/arm-linux-gnueabihf/libc.so.6", "etc/e2fsck.conf"):
        assert re.search(rf"^{re.escape(path)}$", names, re.M), f"{path} missing from the initramfs"
    script = fat_read(built_image.img, "boot.scr").decode(errors="replace")
    assert "appliance.board=cubieboard2" in script and "appliance.board=qemu-virt" in script


def test_bmaptool_accepts_our_bmap(built_image, tmp_path):
    target = tmp_path / "card.img"
    subprocess.run(["bmaptool", "copy", "--bmap", str(built_image.bmap), str(built_image.img), str(target)],
                   check=True, capture_output=True)
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(built_image.img.read_bytes()).digest()


def test_checksums_and_manifest(built_image, test_key):
    sums = dict(reversed(line.split("  ")) for line in built_image.sums.read_text().splitlines())
    for name in (built_image.img.name, built_image.bmap.name, built_image.xz.name):
        assert hashlib.sha256((built_image.img.parent / name).read_bytes()).hexdigest() == sums[name]
    m = json.loads(built_image.manifest.read_text())
    assert m["board"] == "cubieboard2" and m["recipe"] == "booth"
    assert len(m["recipe_sha256"]) == 64
    assert m["packages"]["xen-hypervisor-4.17-armhf"] and m["packages"]["openssh-server"]
    assert set(m["steps"]) and all(v >= 0 for v in m["steps"].values())
    assert m["sizes"]["mapped"] < m["sizes"]["image"]
    assert (built_image.img.parent / "latest").resolve() == built_image.img.resolve()
    listed = subprocess.run(["ssh-keygen", "-lf", f"{test_key}.pub"], check=True, capture_output=True, text=True)
    assert m["authorized_keys"] == [listed.stdout.split()[1]]        # the one key it trusts, as ssh-keygen -l


def test_the_suite_leaves_the_users_image_alone(built_image, users_outputs):
    assert built_image.img.parent != ROOT / "build"
    assert users_outputs.now() == users_outputs.before     # build/latest and the user's image as they were


def test_xz_decompresses_to_the_image(built_image):
    h = hashlib.sha256()
    with subprocess.Popen(["xz", "-dc", str(built_image.xz)], stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        while chunk := p.stdout.read(1 << 20):
            h.update(chunk)
    assert h.hexdigest() == hashlib.sha256(built_image.img.read_bytes()).hexdigest()


def test_rebuild_is_bit_identical(built_image, test_key, tmp_path):
    from appliance import build

    if os.environ.get("APPLIANCE_TEST_REUSE"):
        pytest.skip("the reused image may come from other inputs")

    before = built_image.img.with_name(".before-rebuild.img")
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(built_image.img), str(before)], check=True)
    try:
        out = build.build("booth", authorized_keys=str(test_key.with_suffix(".pub")), out_dir=built_image.img.parent)
        # on a difference, say where: the files and inodes that differ, not only two hashes
        assert not (diff := differences(before, out.img, tmp_path)), "\n".join(diff)
    finally:
        before.unlink()


def test_the_workspaces_filesystem_does_not_change_the_image(built_image, test_key, tmp_path, monkeypatch):
    """The build's workspace is tmpfs when /dev/shm has room, else build/.work on disk: the image must not show
    which (mke2fs's count of the bytes it wrote differed between the two, in the superblock)."""
    import appliance.build as b

    if os.environ.get("APPLIANCE_TEST_REUSE"):
        pytest.skip("the reused image may come from other inputs")
    on_disk = built_image.img.parent / "disk-workspace"
    monkeypatch.setattr(b, "workspace", lambda cfg: cfg.root / "build" / ".work" / cfg.image_name)
    try:
        out = b.build("booth", authorized_keys=str(test_key.with_suffix(".pub")), out_dir=on_disk)
        assert not (diff := differences(built_image.img, out.img, tmp_path)), "\n".join(diff)
    finally:
        shutil.rmtree(on_disk, ignore_errors=True)


def test_the_base_tree_does_not_depend_on_the_day_it_was_made(image_rootfs):
    """What differed between two cold builds on different days: every account's last-change day in /etc/shadow
    (the day mmdebstrap ran) and the header of every .pyc (timestamp-based, or checked by hash when
    SOURCE_DATE_EPOCH reached mmdebstrap). Both follow the base tree's own epoch now."""
    day = rootfs.BASE_EPOCH // 86400
    changed = {f[0]: f[2] for f in (line.split(":") for line in (image_rootfs / "etc/shadow").read_text().splitlines())}
    assert len(changed) > 10 and {n: d for n, d in changed.items() if d != str(day)} == {}
    pycs = [*(image_rootfs / "usr/lib").rglob("*.pyc"), *(image_rootfs / "usr/share").rglob("*.pyc")]
    flags = {p.relative_to(image_rootfs): int.from_bytes(p.read_bytes()[4:8], "little") for p in pycs}
    assert len(pycs) > 100
    assert {p: f for p, f in flags.items() if f != 0b11} == {}      # checked-hash: the source's mtime is clamped later


# What two makings of the base tree may differ in, whichever way each is made, and why (nothing now: the host keys and
# the saved clock, which did, are left out of the fast tree, and the image's configure step makes its own).
BASE_TREE_VARIES: dict[str, str] = {}
# What the slow path makes and the fast one leaves out (rootfs.SKIPPED), and why.
NOT_IN_FAST_TREE = {
    "etc/ssh/ssh_host_*": "openssh-server's postinst makes host keys at random with ssh-keygen, stubbed in the fast "
                          "path; the image drops them, each board makes its own at first boot",
    "etc/fake-hwclock.data": "fake-hwclock's postinst saves the clock of the hour, stubbed in the fast path; the "
                             "image writes its own epoch",
}


def tree_manifest(root: Path) -> dict[str, tuple]:
    """Every entry of a tree: its kind and content (a file's sha256, a link's target, a device's number), mode and
    owner."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                what = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                what = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                what = (stat.S_IFMT(st.st_mode), st.st_rdev)
            out[str(p.relative_to(root))] = (*what, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return out


def test_the_base_tree_made_natively_is_the_one_made_under_qemu(built_image, image_rootfs):
    """The certificate store made on the host (rootfs.NATIVE) and the work skipped (rootfs.SKIPPED) against the slow
    path, every maintainer script's work under qemu-user: the same entries, kinds, contents, modes and owners, but
    for BASE_TREE_VARIES and NOT_IN_FAST_TREE; and none of the build's stubs or apt setting is left in the tree."""
    native = rootfs.cached(config.load("booth"))
    assert native is not None
    with tempfile.TemporaryDirectory(dir=ROOT / "build" / "test", prefix="slow-cache-") as slow_cache:
        os.chmod(slow_cache, 0o755)   # as reachable by apt's _apt user as the suite's own cache
        if not native.meta.get("native"):    # a cache made the slow way before: make the native one too
            native = rootfs.ensure(config.load("booth", cache=Path(slow_cache) / "native"))
        slow = rootfs.ensure(config.load("booth", cache=Path(slow_cache) / "slow"), native=False)
        assert slow.meta["native"] is False and native.meta["native"] is True
        assert slow.meta["packages"] == native.meta["packages"], "the archive changed between the two makings"
        fast, emulated = tree_manifest(native.tree), tree_manifest(slow.tree)
        shutil.rmtree(Path(slow_cache) / "slow")
    left_out = sorted(p for p in emulated if any(fnmatch.fnmatch(p, pattern) for pattern in NOT_IN_FAST_TREE))
    assert len(left_out) >= 7       # the slow path made them (RSA, ECDSA, Ed25519 and their .pub; the clock)
    assert len(fast) > 10000 and sorted(fast) == sorted(p for p in emulated if p not in left_out)
    differ = sorted(p for p in fast if fast[p] != emulated[p])
    assert [p for p in differ if not any(fnmatch.fnmatch(p, pattern) for pattern in BASE_TREE_VARIES)] == []
    assert len([p for p in fast if p.startswith("etc/ssl/certs/")]) > 250     # links, hash links and the bundle
    assert rootfs.NATIVE_APT not in fast
    assert [c for c in rootfs.STUBS if f"usr/local/sbin/{c}" in fast] == []
    # what varies does not reach the image: no host key, and the saved clock is the build's epoch
    assert list((image_rootfs / "etc/ssh").glob("ssh_host_*")) == []
    sde = json.loads(built_image.manifest.read_text())["source_date_epoch"]
    assert (image_rootfs / "etc/fake-hwclock.data").read_text() == time.strftime("%Y-%m-%d %H:%M:%S\n",
                                                                                 time.gmtime(sde))


def test_a_failed_build_leaves_the_finished_image_alone_and_no_workspace(built_image, test_key, monkeypatch):
    from appliance import bmap, build
    from appliance.build.context import workspace
    from appliance.errors import BuildError

    before = hashlib.sha256(built_image.img.read_bytes()).hexdigest()
    made = []

    def broken(image, out):
        made.append(workspace(config.load("booth")))
        assert (made[0] / "rootfs/etc/os-release").exists()    # the tree was there when the build failed
        raise BuildError("simulated failure while writing the block map")

    monkeypatch.setattr(bmap, "create", broken)
    with pytest.raises(BuildError, match="simulated failure"):
        build.build("booth", authorized_keys=str(test_key.with_suffix(".pub")), out_dir=built_image.img.parent)
    assert hashlib.sha256(built_image.img.read_bytes()).hexdigest() == before
    assert not list(built_image.img.parent.glob(".*.partial"))
    assert made and not made[0].exists()     # 868 MiB of tree no longer stays in /dev/shm
