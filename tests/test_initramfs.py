"""The initramfs on the host: cpio archives packed deterministically, with the parents the kernel would not make;
kernel modules resolved with what they depend on and want first; and the early modules modules-load.d names.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from appliance import cpio, kmod
from appliance.errors import BuildError

pytestmark = pytest.mark.unit


def test_cpio_is_deterministic_and_readable(tmp_path: Path):
    entries = [cpio.directory("www"), cpio.file("init", b"#!/bin/sh\n", 0o755), cpio.file("www/index.html", b"<p>hi</p>"),
               cpio.symlink("bin/sh", "busybox"), cpio.directory("bin")]
    a, b = cpio.pack(entries), cpio.pack(list(reversed(entries)))
    assert a == b
    if shutil.which("cpio"):
        listing = subprocess.run(["cpio", "-t"], input=a, capture_output=True, check=True).stdout.decode().split()
        assert listing == ["bin", "bin/sh", "init", "www", "www/index.html"]


def test_cpio_adds_the_parent_directories_the_kernel_would_not_make():
    archive = cpio.pack([cpio.file("lib/modules/6.1/kernel/ext4.ko", b"\x7fELF")])
    if not shutil.which("cpio"):
        pytest.skip("no cpio on this host")
    listing = subprocess.run(["cpio", "-t"], input=archive, capture_output=True, check=True).stdout.decode().split()
    assert listing == ["lib", "lib/modules", "lib/modules/6.1", "lib/modules/6.1/kernel",
                       "lib/modules/6.1/kernel/ext4.ko"]

def test_modules_come_with_what_they_depend_on_and_want_first(tmp_path: Path):
    (tmp_path / "modules.dep").write_text("kernel/fs/ext4/ext4.ko: kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n"
                                          "kernel/fs/mbcache.ko:\nkernel/fs/jbd2/jbd2.ko:\n"
                                          "kernel/crypto/crc32c_generic.ko:\nkernel/net/xen-netfront.ko:\n")
    (tmp_path / "modules.alias").write_text("alias crypto-crc32c crc32c_generic\n")
    (tmp_path / "modules.softdep").write_text("softdep ext4 pre: crypto-crc32c\n")
    paths = kmod.module_paths(tmp_path, ["ext4", "xen_netfront"])
    assert paths == ["kernel/fs/mbcache.ko", "kernel/fs/jbd2/jbd2.ko", "kernel/fs/ext4/ext4.ko",
                     "kernel/net/xen-netfront.ko"]
    assert kmod.softdeps(tmp_path, paths) == ["crc32c_generic"]
    with pytest.raises(BuildError, match="no module btrfs"):
        kmod.module_paths(tmp_path, ["btrfs"])


def test_the_initramfs_loads_what_modules_load_d_names(tmp_path: Path):
    from appliance.build import initramfs

    conf = tmp_path / "etc/modules-load.d"
    conf.mkdir(parents=True)
    (conf / "b.conf").write_text("# the firewall\nnf_tables\n\n; old style comment\n  nft_ct  \n")
    (conf / "a.conf").write_text("xenfs\nxen-evtchn\n")
    (conf / "README").write_text("not a .conf\n")
    assert initramfs.early_modules(tmp_path) == ["xenfs", "xen-evtchn", "nf_tables", "nft_ct"]
    assert initramfs.early_modules(tmp_path / "nothing") == []
