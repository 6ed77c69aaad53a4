"""Shared fixtures: the built image (built once per session), its rootfs, and testinfra hosts.

One testinfra suite describes what the appliance must be; the `host` fixture runs it against the rootfs
inside the built image (chroot backend, `image` tier) and against the image booted under QEMU
(paramiko backend, `system` tier).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import testinfra
from cards import Card, Loops, make_card

from appliance import ROOT, config

TEST_DIR = ROOT / "build" / "test"


def _root_required() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (mmdebstrap, chroot)")


@pytest.fixture(scope="session")
def test_key() -> Path:
    """An SSH key made for the test run; its public half is the image's only way in."""
    TEST_DIR.mkdir(parents=True, exist_ok=True)
    key = TEST_DIR / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "appliance-test", "-f", str(key)],
                       check=True)
    return key


@dataclass(frozen=True)
class Snapshot:
    """What a folder of outputs holds: each file's size and mtime, and where `latest` points; then and now
    (not the build's lock and partial files, which any build touches)."""

    folder: Path
    before: dict[str, tuple[int, int] | str]

    @staticmethod
    def of(folder: Path) -> dict[str, tuple[int, int] | str]:
        if not folder.is_dir():
            return {}
        return {p.name: os.readlink(p) if p.is_symlink() else (p.stat().st_size, p.stat().st_mtime_ns)
                for p in folder.iterdir() if not p.name.startswith(".") and (p.is_symlink() or p.is_file())}

    def now(self) -> dict[str, tuple[int, int] | str]:
        return self.of(self.folder)


@pytest.fixture(scope="session")
def users_outputs() -> Snapshot:
    """The user's build/ before the suite builds anything: the suite builds into build/test/ and leaves it alone."""
    return Snapshot(ROOT / "build", Snapshot.of(ROOT / "build"))


@pytest.fixture(scope="session")
def built_image(test_key: Path, users_outputs):
    """The default recipe's image, built for real into build/test/ (the rootfs cache makes later runs fast); it
    trusts the suite's key, so it is never the user's build/latest."""
    _root_required()
    from appliance import build

    if os.environ.get("APPLIANCE_TEST_REUSE"):  # a developer's shortcut: test the suite's last build as it is
        last = build.verify("booth", out_dir=TEST_DIR).outputs()
        if last.img.exists():
            return last
    out = build.build("booth", authorized_keys=str(test_key.with_suffix(".pub")), out_dir=TEST_DIR)
    assert out is not None and out.img.exists()
    return out


def extract_root(img: Path, dest: Path) -> Path:
    """Copy the image's root filesystem out of the image file, without mounting it."""
    out = subprocess.run(["sfdisk", "-J", str(img)], check=True, capture_output=True, text=True).stdout
    part = json.loads(out)["partitiontable"]["partitions"][1]
    fs = dest.with_suffix(".ext4")
    with open(img, "rb") as src, open(fs, "wb") as dst:
        dst.truncate(part["size"] * 512)
        start, done, size = part["start"] * 512, 0, part["size"] * 512
        while done < size:
            n = os.copy_file_range(src.fileno(), dst.fileno(), size - done, start + done, done)
            if n == 0:
                break
            done += n
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    subprocess.run(["debugfs", "-R", f"rdump / {dest}", str(fs)], check=True, capture_output=True)
    fs.unlink()
    # rdump copies no device nodes; commands run in the chroot need the basic ones.
    for name, minor in (("null", 3), ("zero", 5), ("random", 8), ("urandom", 9)):
        node = dest / "dev" / name
        if not node.exists():
            os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    return dest


@pytest.fixture(scope="session")
def image_rootfs(built_image) -> Path:
    """The root filesystem inside the built image, copied out of the image file."""
    return extract_root(built_image.img, TEST_DIR / "rootfs")


AWAKE_S = 3600


@pytest.fixture(scope="session")
def booted_board(built_image, test_key):
    """The built image booted under QEMU (system tier): an appliance.emulate.Board with ssh/http ports. It runs
    on a scratch copy of the image (the image itself is never written), so a power cut can boot it again."""
    _root_required()
    from appliance import emulate

    with emulate.boot(built_image.img, log_path=TEST_DIR / "console.log", key=test_key, persistent=True,
                      settled=True) as board:
        # The on-demand sites stay awake an hour once woken (changed on the board, kept across its reboots), so
        # that no test finds a site gone to sleep between two of its steps; test_system's on-demand tests make
        # the idle short while they look at it, and put it back.
        for site in config.load("booth").recipe.sites:
            if site.on_demand:
                board.run(f"appliance-guest on-demand {site.name} --idle {AWAKE_S}")
        yield board


@pytest.fixture(scope="module", params=[pytest.param("chroot", marks=pytest.mark.image),
                                        pytest.param("ssh", marks=pytest.mark.system)])
def host(request):
    """The appliance as testinfra sees it: its rootfs (chroot) or the live emulated board (ssh)."""
    if request.param == "chroot":
        rootfs = request.getfixturevalue("image_rootfs")
        assert (rootfs / "etc/os-release").exists(), f"{rootfs} is not a rootfs"
        h = testinfra.get_host(str(rootfs), connection="chroot")
    else:
        board = request.getfixturevalue("booted_board")
        h = testinfra.get_host(board.testinfra_url, ssh_identity_file=str(board.key))
    h.backend_name = request.param  # tests that only make sense live or offline check this
    return h


@pytest.fixture(scope="module")
def card(tmp_path_factory: pytest.TempPathFactory) -> Card:
    """A small card image (SPL bytes, two ext4 partitions) and its block map, one per test file: reading a whole
    card (dd, the benchmark) caches zero pages over mke2fs's unwritten extents, which SEEK_DATA then reports as
    data, so a card read by test_flash would map differently for test_bmap's determinism test."""
    return make_card(tmp_path_factory.mktemp("card"))


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Loops]:
    """Loop devices over files in tmp_path, unmounted and detached after the test (root only)."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    made = Loops(tmp_path)
    try:
        yield made
    finally:
        made.close()
