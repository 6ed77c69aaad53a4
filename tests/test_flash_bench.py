"""The flash benchmark's card: a loop device held to an SD card's speed by the kernel's block throttle, lifted after.

Real loop devices and the host's real cgroup files (root tier); the refusal on a host without either controller is
checked against made-up cgroup folders (unit tier).
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import pytest
from cards import Loops, MiB

from appliance.bench.flash import BLKIO, SD_CARD, Throttle, throttled
from appliance.errors import FlashError


def _limits(dev: Path) -> dict[str, str]:
    st = os.stat(dev)
    devno = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    found = {}
    for kind in ("write", "read"):
        for line in (BLKIO / f"blkio.throttle.{kind}_bps_device").read_text().splitlines():
            if line.split()[0] == devno:
                found[kind] = line.split()[1]
    return found


@pytest.mark.root
def test_a_throttled_loop_device_is_held_to_the_speed_and_freed_after(loops: Loops) -> None:
    if not (BLKIO / "blkio.throttle.write_bps_device").exists():
        pytest.skip("this host throttles with cgroup v2's io.max (a child group), not v1's blkio")
    card = loops.new(8 * MiB)
    slow = Throttle(write=2_000_000, read=4_000_000)
    with throttled(card.node, slow):
        assert _limits(card.node) == {"write": "2000000", "read": "4000000"}
        start = time.monotonic()
        fd, block = os.open(card.node, os.O_WRONLY | os.O_DIRECT), mmap.mmap(-1, MiB)   # page-aligned, as O_DIRECT wants
        try:
            for _ in range(4):
                os.write(fd, block)
        finally:
            os.close(fd)
        took = time.monotonic() - start
    # a lower bound only: 4 MiB at 2 MB/s cannot take less than about 2 s whatever else the host is doing
    assert took >= 4 * MiB / slow.write * 0.75
    assert _limits(card.node) == {}
    assert str(SD_CARD) == "20 MB/s write, 40 MB/s read"


@pytest.mark.unit
def test_a_host_without_block_throttling_is_told_so(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu memory pids\n")
    with pytest.raises(FlashError, match=r"^this host has no block I/O throttling \(neither cgroup v1's blkio nor "
                                         r"v2's io controller\), so the flash benchmark cannot hold a loop device "
                                         r"to a card's speed \(run it on a host with cgroups' block I/O controller\)$"):
        with throttled(Path("/dev/null"), SD_CARD, blkio=tmp_path / "none", unified=tmp_path):
            pass
