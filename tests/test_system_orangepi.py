"""System tier, the sunxi boot flow: an image for the Orange Pi PC (H3) booted by QEMU from its SD card the way a
sunxi board boots (boot ROM -> the SPL at 8 KiB -> sunxi U-Boot -> boot.scr -> Xen -> dom0), up to the guest serving.

It runs when recipes/ has a recipe for board orangepi-pc (booth-orangepi-pc.yaml), and is skipped otherwise. The
board is slower under QEMU than `virt`, so only the boot flow, the clock and serving are checked here; the rest
of the live checks run on `virt` (test_system.py).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import ROOT, config
from appliance.emulate import Board, boot, wait_for

pytestmark = pytest.mark.system

BOARD = "orangepi-pc"
SSH_S = 900      # power-on to dom0's SSH: about 4-6 minutes on a loaded 2-core machine
GUEST_S = 600    # then to the guest answering
ARTIFACTS = ROOT / "build" / "test"


def _recipe() -> str | None:
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        if config.read_yaml(path).get("board") == BOARD:
            return path.stem
    return None


@pytest.fixture(scope="module")
def opi(test_key: Path) -> Iterator[tuple[Board, config.Recipe]]:
    recipe = _recipe()
    if recipe is None:
        pytest.skip(f"no recipe in recipes/ has board: {BOARD}")
    if os.geteuid() != 0:
        pytest.skip("needs root (mmdebstrap, chroot)")
    from appliance import build

    assert recipe is not None
    # into the suite's own folder: build/latest and the user's images stay as they are
    out = build.build(recipe, authorized_keys=str(test_key.with_suffix(".pub")), out_dir=ARTIFACTS)
    assert out is not None
    with boot(out.img, log_path=ARTIFACTS / f"console-{BOARD}.log", key=test_key, board=BOARD,
              timeout=SSH_S) as b:
        yield b, config.load(recipe).recipe
        (ARTIFACTS / f"milestones-{BOARD}.json").write_text(json.dumps(b.milestones, indent=1) + "\n")


def test_sunxi_boot_flow_from_the_sd_card(opi):
    board, _ = opi
    log = board.console.read_text(errors="replace")
    assert "U-Boot SPL" in log, "the boot ROM did not start the SPL at 8 KiB"
    assert "Found U-Boot script /boot.scr" in log
    assert f"appliance: booting Xen on {BOARD}" in log
    assert "(XEN) Xen version" in log
    assert "Booting Linux on physical CPU" in log, "Xen did not start dom0's kernel"


def test_the_clock_keeps_wall_time(opi):
    """dom0 has been up as long as the host has seen it running: its uptime starts at the dom0 kernel's first
    console line. (With QEMU's counter at 62.5 MHz and CNTFRQ at 24 MHz it ran 2.6 times fast.)"""
    board, _ = opi
    started = board.milestones["dom0 kernel"]
    before = time.monotonic() - board.started
    uptime = float(board.run("cut -d' ' -f1 /proc/uptime", timeout=120).out)
    after = time.monotonic() - board.started
    low, high = before - started, after - started
    slack = 5 + 0.05 * high
    assert low - slack <= uptime <= high + slack, (
        f"dom0's uptime is {uptime:.0f} s, but its kernel started {low:.0f}-{high:.0f} s ago by the host's clock")


def test_guest_serves(opi):
    board, recipe = opi
    g = recipe.sites[0]

    def serving() -> bool:
        names = board.run("xl list", timeout=120).out
        return len(names.splitlines()) > 2 and board.fetch(f"http://{g.address}:{g.port}/")[0] == 200

    wait_for(f"the guest on {BOARD} answering HTTP", serving, GUEST_S, interval=5, board=board)
    board.mark("guest http")
    status, body = board.http_get("/")
    assert status == 200, body[:200]
