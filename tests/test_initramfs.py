"""The initramfs on the host: cpio archives packed deterministically, with the parents the kernel would not make;
kernel modules resolved with what they depend on and want first; and the early modules modules-load.d names.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
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


def test_an_elf_files_interpreter_and_libraries_are_read_from_it(tmp_path: Path):
    from appliance.build import initramfs

    interp, needs = initramfs.elf_needs(Path(sys.executable).resolve().read_bytes(), "python")
    assert interp and interp.startswith("/lib") and "ld-linux" in interp
    assert "libc.so.6" in needs or any(n.startswith("libpython") for n in needs)
    assert initramfs.elf_needs(Path("/bin/ls").read_bytes(), "ls")[1][-1] == "libc.so.6"
    with pytest.raises(BuildError, match="x: not an ELF file"):
        initramfs.elf_needs(b"#!/bin/sh\n", "x")
    # a program and what it loads, from a tree: here the host's own ls, as the tree
    tree = tmp_path / "tree"
    for rel in ("usr/bin/ls", *(f"usr/lib/x86_64-linux-gnu/{n}" for n in ("libselinux.so.1", "libc.so.6",
                                                                          "libpcre2-8.so.0"))):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path("/") / rel, tree / rel)
    (tree / "lib64").mkdir()
    shutil.copyfile("/lib64/ld-linux-x86-64.so.2", tree / "lib64/ld-linux-x86-64.so.2")
    files = initramfs.with_libraries(tree, "usr/bin/ls", "bin/ls")
    assert set(files) == {"bin/ls", "lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/libselinux.so.1",
                          "lib/x86_64-linux-gnu/libc.so.6", "lib/x86_64-linux-gnu/libpcre2-8.so.0"}
    (tree / "usr/lib/x86_64-linux-gnu/libpcre2-8.so.0").unlink()
    with pytest.raises(BuildError, match="needs libpcre2-8.so.0, which the tree does not have"):
        initramfs.with_libraries(tree, "usr/bin/ls", "bin/ls")
