"""System tier: pull mode on the emulated booth. A release channel on the host (a bare repository served by
`git daemon` on the host's loopback, which the board reaches as 10.0.2.2 through QEMU's user network) is set as the
demo site's channel on the board; a signed release is taken by the board's own appliance-pull.service while a
steady visitor loads the site (zero failed), and a release signed by a key not in the allowed signers is refused.

Run (root, after `invoke build`; the lead's one QEMU at a time):
    flock /tmp/appliance-heavy.lock env APPLIANCE_TEST_REUSE=1 .venv/bin/pytest -m system tests/test_pull_system.py
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import config, release
from appliance.bench import pull as bench_pull
from appliance.bench.pull import Channel
from appliance.bench.switch import manager, steady_visitor
from appliance.build import guest
from appliance.emulate import Board, wait_for

pytestmark = pytest.mark.system
SERVING_S = 300


@pytest.fixture(scope="module")
def cfg() -> config.Config:
    return config.load("booth")


@pytest.fixture(scope="module")
def board(booted_board: Board) -> Board:
    return booted_board


@pytest.fixture(scope="module")
def site(cfg: config.Config) -> config.SiteSpec:
    return cfg.recipe.sites[0]


def status_url(site: config.SiteSpec) -> str:
    return f"http://{site.address}:{site.port}/cgi-bin/status"


def serving(board: Board, site: config.SiteSpec) -> str | None:
    code, body = board.fetch(status_url(site))
    try:
        return str(json.loads(body)["version"]) if code == 200 else None
    except (ValueError, KeyError):
        return None


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory, board: Board, site: config.SiteSpec) -> Iterator[Channel]:
    """The benchmark's channel (`git daemon` on the host), which the board's site follows for this module."""
    with bench_pull.channel(board, site, tmp_path_factory.mktemp("channel")) as ch:
        yield ch


def test_the_board_takes_a_signed_release_while_a_visitor_loads_it(board, cfg, site, channel):
    first = wait_for("the site serving", lambda: serving(board, site), SERVING_S, interval=2, board=board)
    bundle = guest.bundle(cfg, release="3.0-pull")
    t0 = time.monotonic()
    out = release.publish(str(channel.bare), bundle.path, site=site.name, key=channel.keys["alice"],
                          signers=channel.signers)
    with steady_visitor(board, status_url(site)) as v:
        board.run("systemctl start appliance-pull.service", timeout=900)     # the timer's unit, run now
        took = time.monotonic() - t0
    seen = v.counts()
    rc, st = manager(board, f"status {site.name}")
    p = st["pull"]
    assert p["serving"] and (p["serving"]["commit"], p["serving"]["version"]) == (out["commit"], bundle.version), p
    assert p["last_check"]["result"].startswith(f"took {bundle.version} (serial {out['serial']})"), p
    assert seen["failed"] == 0, seen
    assert seen["versions"] == [first, bundle.version], seen
    print(f"\npull on the emulated board: release to serving {took:.1f} s, {seen}")


def test_a_forged_release_is_refused(board, site, channel):
    before = serving(board, site)
    bundle_dir = Path(channel.bare).parent / "forged"
    bundle_dir.mkdir()
    head = bytearray(0x30)
    head[0x24:0x28] = (0x016F2818).to_bytes(4, "little")
    (bundle_dir / "vmlinuz").write_bytes(bytes(head))
    import hashlib

    (bundle_dir / "guest.yaml").write_text(json.dumps({
        "version": "6.6-forged", "kernel": "vmlinuz", "memory": 64,
        "sha256": {"vmlinuz": hashlib.sha256(bytes(head)).hexdigest()}}))
    out = release.publish(str(channel.bare), bundle_dir, site=site.name, key=channel.keys["mallory"])
    rc, res = manager(board, f"pull {site.name}")
    assert res["result"] == (f"refused: commit {out['commit'][:12]}: it is signed by a key not in the allowed "
                             f"signers"), res
    assert serving(board, site) == before
