# ruff: noqa: F811 - the tests take the namespace double's `board` fixture, imported from its module
"""ssh tier: `invoke deploy` against real OpenSSH servers on loopback whose `appliance-guest` is the repository's
guest manager running in the namespace double of the board (tests/test_switch_double.py: dom0 with both bridges
and the ruleset, tests/xl_standin.py for xl, a visitor fetching the service address in a loop). Transfer and the
blue-green switch under a steady visitor, resume after a dropped connection (bytes sent the second time), a
hash mismatch, the deploy lock, too little space, prune, rollback, a fleet with one failing board.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sshd_fixtures import Sshd, keygen, needs_sshd, start
from test_switch_double import Board, board, failures, pages, sh, wait_for, zimage  # noqa: F401

from appliance import ROOT
from appliance import deploy as d
from appliance.errors import DeployError, GuestError

pytestmark = [pytest.mark.ssh, needs_sshd,
              pytest.mark.skipif(os.geteuid() != 0 or not all(os.path.exists(p) for p in ("/usr/sbin/nft",)),
                                 reason="needs root and nft (the namespace double)")]
MiB = 1 << 20


@pytest.fixture
def sshd(tmp_path: Path, board: Board) -> Iterator[Sshd]:
    """An sshd whose sessions' appliance-guest is the guest manager in the double's dom0 namespace."""
    s = start(tmp_path / "sshd", keygen(tmp_path / "id_ed25519"))
    env = {k: v for k, v in board.env.items() if k.startswith(("APPLIANCE_", "XL_STANDIN_"))}
    env["APPLIANCE_STAGING"] = str(board.tmp / "staging")
    s.manager(env, board.dom0)
    yield s
    s.stop()


def target(sshd: Sshd) -> d.Target:
    return d.Target("booth-test", ssh_config=sshd.ssh_config("booth-test"))


def bundle(tmp: Path, version: str, page: str, ramdisk: int = 0) -> d.Guest:
    """A guest bundle directory: a stand-in kernel serving page, and a ramdisk of random bytes to make it big."""
    folder = tmp / f"bundle-{version}"
    folder.mkdir()
    (folder / "vmlinuz").write_bytes(zimage(f"serve:{page}"))
    files = ["vmlinuz"]
    if ramdisk:
        (folder / "initrd.gz").write_bytes(os.urandom(ramdisk))
        files.append("initrd.gz")
    sums = {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in files}
    (folder / "guest.yaml").write_text(json.dumps({
        "name": "demo", "version": version, "kernel": "vmlinuz", **({"ramdisk": "initrd.gz"} if ramdisk else {}),
        "sha256": sums, "memory": 64, "health": {"path": "/", "deadline": 10}}))
    with d.source(folder) as g:
        return g


def slow_bundle(tmp: Path, version: str, page: str, seconds: int = 2) -> d.Guest:
    """A bundle whose guest takes `seconds` to serve `page` (a switch is under way that long)."""
    g = bundle(tmp, version, page)
    (g.folder / "vmlinuz").write_bytes(zimage(f"slow-start:{seconds}:{page}"))
    data = json.loads((g.folder / "guest.yaml").read_text())
    data["sha256"]["vmlinuz"] = hashlib.sha256((g.folder / "vmlinuz").read_bytes()).hexdigest()
    (g.folder / "guest.yaml").write_text(json.dumps(data))
    return g


def current(board: Board) -> str:
    return os.readlink(board.tmp / "store/demo/current")


def test_deploy_uploads_switches_and_drops_no_request(board: Board, sshd: Sshd, tmp_path: Path):
    board.version("1.0", "serve:page one")
    board.supervise("1.0")
    g = bundle(tmp_path, "2.0", "page two", ramdisk=MiB)
    visitor = board.visit()
    wait_for(lambda: len(visitor.lines()) >= 20, 10, "the visitor's first pages")
    row = d.deploy(target(sshd), g)
    lines = visitor.finish()
    assert (row.ok, row.site, row.old, row.new, row.result) == (True, "demo", "1.0", "2.0", "deployed")
    assert row.sent == MiB + len(zimage("serve:page two"))
    assert failures(lines) == [] and pages(lines) == ["ok 200 page one", "ok 200 page two"]
    assert current(board) == "2.0" and not (board.tmp / "staging/demo/2.0").exists()
    st = d.status(target(sshd))["sites"]["demo"]
    assert (st["version"], st["previous"], st["domain"], st["healthy"], st["versions"], st["keep"]) == \
        ("2.0", "1.0", "demo.green", True, ["1.0", "2.0"], 3)
    assert st["free_bytes"] > 0 and st["uptime_s"] >= 0
    again = d.deploy(target(sshd), g)
    assert (again.result, again.sent) == ("unchanged", 0), "a version the board has is not sent again"


def test_an_upload_dropped_midway_resumes_with_what_is_missing(board: Board, sshd: Sshd, tmp_path: Path):
    board.version("1.0", "serve:page one")
    board.supervise("1.0")
    g = bundle(tmp_path, "2.0", "page two", ramdisk=8 * MiB)
    total = 8 * MiB + len(zimage("serve:page two"))
    dropped: list[int] = []

    def cut(sent: int) -> None:
        if sent >= 3 * MiB and not dropped:
            dropped.append(sshd.drop())

    with pytest.raises(DeployError, match=r"the upload broke off after \d+ of \d+ bytes .*run the deploy again"):
        d.deploy(target(sshd), g, progress=cut)
    assert dropped and dropped[0] >= 1
    assert current(board) == "1.0"
    staging = board.tmp / "staging/demo/2.0"
    arrived = sum(p.stat().st_size for p in staging.iterdir() if p.name != "manifest.json")
    assert 0 < arrived < total
    wait_for(lambda: (board.tmp / "run/demo/deploy.lock").read_text() == "", 10, "the dropped session's end")
    row = d.deploy(target(sshd), g)
    assert row.ok and current(board) == "2.0"
    assert row.sent == total - arrived, "only what had not arrived is sent again"
    print(f"\nresumed upload: {arrived} of {total} bytes had arrived; sent {row.sent} bytes the second time")


def test_a_file_that_does_not_match_its_hash_is_refused(board: Board, sshd: Sshd, tmp_path: Path):
    board.version("1.0", "serve:page one")
    board.supervise("1.0")
    g = bundle(tmp_path, "2.0", "page two", ramdisk=2 * MiB)

    def corrupt(sent: int) -> None:       # the file changes under the upload, after its sha256 was taken
        with open(g.folder / "initrd.gz", "r+b") as f:
            f.seek(2 * MiB - 1)
            f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")

    with pytest.raises(DeployError, match=r"^booth-test: \S+/staging/demo/2\.0/initrd\.gz\.part: the board holds "
                                          r"2097153 of its 2097152 bytes; not renamed, the old version keeps serving$"):
        d.deploy(target(sshd), g, progress=corrupt)
    assert current(board) == "1.0" and not (board.tmp / "store/demo/2.0").exists()
    rc, st = board.run("status", "demo")
    assert (st["version"], st["ok"]) == ("1.0", True)


def test_a_bundle_that_lies_about_its_hash_is_refused_on_the_host(board: Board, sshd: Sshd, tmp_path: Path):
    board.version("1.0", "serve:page one")
    g = bundle(tmp_path, "2.0", "page two")
    (g.folder / "vmlinuz").write_bytes(zimage("serve:another page"))
    with pytest.raises(GuestError, match=rf"^{g.folder}/guest.yaml: vmlinuz: sha256 does not match the manifest"):
        d.deploy(target(sshd), g)
    assert not (board.tmp / "staging/demo/2.0").exists()


def test_a_second_deploy_is_refused_naming_the_first(board: Board, sshd: Sshd, tmp_path: Path):
    board.version("1.0", "serve:page one")
    conn = target(sshd).connect()
    s = d.Session(conn, None)
    try:
        with pytest.raises(DeployError, match=rf"site demo: busy: {board.tmp}/run/demo/deploy.lock is held by pid "
                                              rf"\d+ \(deploy from 127\.0\.0\.1 of version None, since 20"):
            d.deploy(target(sshd), bundle(tmp_path, "2.0", "page two"))
    finally:
        s.close()
        conn.close()


def test_too_little_space_is_refused_before_a_byte_is_sent(board: Board, sshd: Sshd, tmp_path: Path):
    small = tmp_path / "small"
    small.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small))
    try:
        env = {k: v for k, v in board.env.items() if k.startswith(("APPLIANCE_", "XL_STANDIN_"))}
        sshd.manager({**env, "APPLIANCE_STAGING": str(small / "staging"), "APPLIANCE_MARGIN_MIB": "1"}, board.dom0)
        board.version("1.0", "serve:page one")
        board.supervise("1.0")
        with pytest.raises(DeployError, match=rf"{small}/staging/demo/2.0: [0-3] MiB free; the upload needs 5.0 MiB "
                                              rf"and the store keeps 1 MiB free; refused before any byte is sent"):
            d.deploy(target(sshd), bundle(tmp_path, "2.0", "page two", ramdisk=5 * MiB))
        assert current(board) == "1.0" and board.run("status", "demo")[1]["ok"]
        row = d.deploy(target(sshd), bundle(tmp_path, "3.0", "page three", ramdisk=MiB // 2))
        assert row.ok, "a deploy that fits goes through"
    finally:
        sh("umount", "-l", str(small), check=False)


def test_prune_keeps_current_previous_and_the_newest_and_rollback_goes_back(board: Board, sshd: Sshd,
                                                                             tmp_path: Path):
    board.version("1.0", "serve:page one")
    board.supervise("1.0")
    t = target(sshd)
    removed = [d.deploy(t, bundle(tmp_path, v, f"page {v}")).detail["pruned"] for v in ("2.0", "3.0", "4.0")]
    assert removed == [[], [], ["1.0"]], "keep: 3 leaves 4.0 (current), 3.0 (previous) and 2.0 (the newest other)"
    assert sorted(p.name for p in (board.tmp / "store/demo").iterdir() if p.is_dir() and not p.is_symlink()) == \
        ["2.0", "3.0", "4.0"]
    out = d.rollback(t)
    assert (out["from"], out["version"]) == ("4.0", "3.0") and current(board) == "3.0"
    kept = d.guests(t, "demo")
    assert [(v["version"], v["current"], v["previous"]) for v in kept["versions"]] == \
        [("2.0", False, False), ("3.0", True, False), ("4.0", False, True)]
    with pytest.raises(DeployError, match="no such version of site demo"):
        d.rollback(t, version="1.0")


def test_a_fleet_with_one_failing_board(board: Board, sshd: Sshd, tmp_path: Path):
    board.version("1.0", "serve:page one")
    board.supervise("1.0")
    broken = start(tmp_path / "broken", sshd.client_key)      # a board whose guest manager has no settings
    try:
        broken.manager({"APPLIANCE_SITES": str(tmp_path / "nothing.json"), "APPLIANCE_RUN": str(tmp_path / "r")})
        cfg = sshd.ssh_config("booth-a")
        broken.ssh_config("booth-b", cfg)
        bundle(tmp_path, "2.0", "page two")
        hosts = tmp_path / "inventory.ini"
        hosts.write_text("[booths]\nbooth-a\nbooth-b  # the broken one\n\n[booths:vars]\nansible_user=root\n")
        p = subprocess.run([sys.executable, "-m", "invoke", "deploy", "--hosts", str(hosts), "--ssh-config",
                            str(cfg), str(tmp_path / "bundle-2.0")], check=False, cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 1, p.stdout + p.stderr
        rows = [line.split() for line in p.stdout.splitlines()]
        assert rows[0] == ["host", "site", "old", "new", "result", "seconds"]
        assert rows[1][:5] == ["booth-a", "demo", "1.0", "2.0", "deployed"]
        assert rows[2][:5] == ["booth-b", "?", "-", "-", "failed"]
        assert p.stdout.splitlines()[3].startswith(f"booth-b: {tmp_path}/nothing.json: cannot read the board's "
                                                   f"site settings"), "one line per failure, after the table"
        assert len(p.stdout.splitlines()) == 4 and "FAILED" not in p.stderr
        assert p.stderr.strip().endswith("appliance: ERROR: 1 of 2 boards failed: booth-b")
        assert current(board) == "2.0"
    finally:
        broken.stop()


def test_the_client_killed_as_the_switch_begins(board: Board, sshd: Sshd, tmp_path: Path):
    board.version("1.0", "serve:page one")
    board.supervise("1.0")
    g = slow_bundle(tmp_path, "2.0", "page two")
    cfg = sshd.ssh_config("booth-test")
    client = subprocess.Popen([sys.executable, "-m", "invoke", "deploy", "--host", "booth-test", "--ssh-config",
                               str(cfg), str(g.folder)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    lock = board.tmp / "run/demo/lock"
    wait_for(lambda: lock.exists() and '"switch"' in lock.read_text(), 60, "the switch to begin")
    client.kill()
    client.wait()
    wait_for(lambda: (board.tmp / "run/demo/deploy.lock").read_text() == "" and lock.read_text() == "", 60,
             "the board to finish what it was asked")
    rc, st = board.run("status", "demo")
    assert rc == 0 and st["ok"] and st["version"] == st["current"] == "2.0", st
    assert d.deploy(target(sshd), bundle(tmp_path, "3.0", "page three")).ok, "the next deploy works"
