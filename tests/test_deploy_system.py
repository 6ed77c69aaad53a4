"""System tier: `invoke deploy` against the emulated board (the image booted under QEMU), over the same SSH
layer as everything else. A second demo release is deployed and rolled back while a steady visitor fetches the
site's status page through dom0's DNAT (zero failed requests is the pass mark); a kernel that is not a zImage and
a guest that never answers leave the old version serving; `--static` serves a folder of our own.

Run (root, after `invoke build`; the lead's one QEMU at a time):
    APPLIANCE_TEST_REUSE=1 .venv/bin/pytest -m system tests/test_deploy_system.py -v
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from appliance import config
from appliance import deploy as d
from appliance.bench.switch import steady_visitor
from appliance.build import guest
from appliance.emulate import Board, wait_for
from appliance.errors import DeployError, GuestError

pytestmark = pytest.mark.system
SERVING_S = 300


@pytest.fixture(scope="module")
def cfg() -> config.Config:
    return config.load("booth")


@pytest.fixture(scope="module")
def board(booted_board: Board) -> Board:
    return booted_board


@pytest.fixture(scope="module")
def target(board: Board) -> d.Target:
    """The emulated board as deploy reaches it: its forwarded SSH port, the test key, host keys unchecked (each
    first boot makes new ones; the board's ssh_config says so)."""
    return d.Target(f"root@127.0.0.1:{board.ssh_port}", ssh_config=board.ssh_config, key=board.key, timeout=60)


@pytest.fixture(scope="module")
def site(cfg: config.Config) -> config.SiteSpec:
    return cfg.recipe.sites[0]


def status_url(site: config.SiteSpec) -> str:
    return f"http://{site.address}:{site.port}/cgi-bin/status"


def serving(board: Board, site: config.SiteSpec) -> str | None:
    """The version the site serves now (from the guest's own status page), or None."""
    code, body = board.fetch(status_url(site))
    if code != 200:
        return None
    try:
        return str(json.loads(body)["version"])
    except (ValueError, KeyError):
        return None


@pytest.fixture(scope="module")
def first(board: Board, site: config.SiteSpec) -> str:
    return wait_for("the site serving", lambda: serving(board, site), SERVING_S, interval=2, board=board)


@pytest.fixture(scope="module")
def second(cfg: config.Config) -> guest.Bundle:
    """A second demo release: the same guest, another version serving another page footer."""
    return guest.bundle(cfg, release="2.0")


def deploy_with_visitor(board: Board, site: config.SiteSpec, target: d.Target, bundle: Path,
                        **kw: object) -> tuple[d.Row | Exception, dict[str, object]]:
    with steady_visitor(board, status_url(site)) as v:
        try:
            with d.source(bundle, **kw) as g:     # type: ignore[arg-type]
                out: d.Row | Exception = d.deploy(target, g, site.name)
        except (DeployError, GuestError) as exc:
            out = exc
    return out, v.counts()


def test_deploy_a_second_version_drops_no_request(board, site, target, first, second):
    row, seen = deploy_with_visitor(board, site, target, second.path)
    assert isinstance(row, d.Row) and row.ok, row
    assert (row.old, row.new, row.result) == (first, second.version, "deployed")
    assert seen["failed"] == 0, seen
    assert seen["versions"] == [first, second.version], seen
    assert serving(board, site) == second.version
    st = d.status(target)["sites"][site.name]
    assert (st["current"], st["previous"], st["healthy"]) == (second.version, first, True)
    assert second.version in st["versions"] and st["free_bytes"] > 0


def test_rollback_drops_no_request(board, site, target, first, second):
    with steady_visitor(board, status_url(site)) as v:
        out = d.rollback(target, site.name)
    seen = v.counts()
    assert (out["from"], out["version"]) == (second.version, first)
    assert seen["failed"] == 0 and seen["versions"][-1] == first, seen
    assert serving(board, site) == first


def test_a_kernel_that_is_not_a_zimage_is_refused(board, site, target, first, tmp_path):
    bad = tmp_path / "vmlinux"
    bad.write_bytes(b"\x7fELF" + bytes(4096))
    row, seen = deploy_with_visitor(board, site, target, bad, memory=64)
    assert isinstance(row, GuestError) and "is not an ARM zImage" in str(row), row
    assert seen["failed"] == 0 and serving(board, site) == first


def test_a_guest_that_never_answers_leaves_the_old_one_serving(board, site, target, first, second, tmp_path):
    silent = tmp_path / "silent"
    shutil.copytree(second.path, silent)
    m = json.loads((silent / "guest.yaml").read_text())
    # no ip= on its command line: the guest boots with no address, so its health check never passes
    m.update(version="2.0-silent", cmdline="console=hvc0 appliance.port={port}", health={"path": "/", "deadline": 30})
    (silent / "guest.yaml").write_text(json.dumps(m))
    row, seen = deploy_with_visitor(board, site, target, silent)
    assert isinstance(row, DeployError), row
    assert "did not answer" in str(row) and f"{first} keeps serving" in str(row), row
    assert seen["failed"] == 0, seen
    assert serving(board, site) == first


def test_a_guest_that_crashes_after_start_leaves_the_old_one_serving(board, site, target, first, second, tmp_path):
    crash = tmp_path / "crash"
    shutil.copytree(second.path, crash)
    m = json.loads((crash / "guest.yaml").read_text())
    # its kernel boots, finds no init and panics: the domain dies while the health check waits
    m.update(version="2.0-crash", cmdline=guest.DEMO_CMDLINE + " rdinit=/no-such-init", health={"path": "/", "deadline": 60})
    (crash / "guest.yaml").write_text(json.dumps(m))
    row, seen = deploy_with_visitor(board, site, target, crash)
    assert isinstance(row, DeployError), row
    assert f"{first} keeps serving" in str(row), row
    assert seen["failed"] == 0, seen
    assert serving(board, site) == first
    assert len([line for line in board.run("xl list").out.splitlines()[1:]
                if line.startswith(f"{site.name}.")]) == 1, "the crashed guest is gone, the old one serves"


def test_a_board_with_too_little_space_refuses_before_sending(board, site, target, first, cfg):
    third = guest.bundle(cfg, release="3.0")          # not on the board yet: the whole bundle must be sent
    need = sum(p.stat().st_size for p in third.path.iterdir())
    avail = int(board.run("df --output=avail -B1 /var/lib/appliance | tail -1").out)
    filler = "/var/lib/appliance/test-filler"
    board.run(f"fallocate -l {max(avail - need // 2, 0)} {filler}")
    try:
        row, seen = deploy_with_visitor(board, site, target, third.path)
        assert isinstance(row, DeployError), row
        assert "refused before any byte is sent" in str(row), row
        assert seen["failed"] == 0 and serving(board, site) == first
    finally:
        board.run(f"rm -f {filler}", check=False)
    staged = board.run("find /var/lib/appliance/staging -name '*.part' -size +0", check=False).out.strip()
    assert staged == "", f"bytes were sent: {staged}"


def test_a_static_site_is_served(board, site, target, first, tmp_path):
    www = tmp_path / "www"
    (www / "img").mkdir(parents=True)
    (www / "index.html").write_text("<html><head><title>static booth</title></head><body>deployed by a test"
                                    "<img src=img/dot.gif></body></html>\n")
    (www / "img/dot.gif").write_bytes(b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01"
                                      b"\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
    with d.source(Path("."), static=www) as g:
        row = d.deploy(target, g, site.name)
    assert row.ok and row.new and row.new.startswith("site-")
    code, body = board.fetch(f"http://{site.address}:{site.port}/")
    assert code == 200 and "deployed by a test" in body
    code, _ = board.fetch(f"http://{site.address}:{site.port}/img/dot.gif")
    assert code == 200
    back = d.rollback(target, site.name, first)           # leave the board as the other system tests expect
    assert back["version"] == first
