# ruff: noqa: F811 - the tests take the namespace double's `board` and test_deploy's `sshd` fixtures
"""ssh tier: deploys as they go in the field, against loopback sshds and the namespace double with a steady
visitor. A link that dies mid-upload (silence, no FIN) frees the board after the session's idle time, or sshd's
ClientAlive; a holder gone silent is taken over, and --break-lock ends one that is not; a disk that fills in the
last megabytes of a file never yields a file under its final name. The old version serves throughout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sshd_fixtures import Link, Sshd, keygen, needs_sshd, start
from test_deploy import MiB, bundle, current, slow_bundle, sshd, target  # noqa: F401
from test_switch_double import Board, board, failures, pages, sh, wait_for, zimage  # noqa: F401

from appliance import ROOT
from appliance import deploy as d
from appliance.errors import DeployError

pytestmark = [pytest.mark.ssh, needs_sshd,
              pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/sbin/nft"),
                                 reason="needs root and nft (the namespace double)")]


def manager_env(board: Board, **more: str) -> dict[str, str]:
    env = {k: v for k, v in board.env.items() if k.startswith(("APPLIANCE_", "XL_STANDIN_"))}
    return {**env, "APPLIANCE_STAGING": str(board.tmp / "staging"), **more}


def via(sshd: Sshd, link: Link, tmp: Path) -> d.Target:
    """The board reached through link (its sshd seen from 127.0.0.2)."""
    kind, b64 = (sshd.dir / "host_key.pub").read_text().split()[:2]
    kh = tmp / "link_known_hosts"
    kh.write_text(f"[127.0.0.1]:{link.port} {kind} {b64}\n")
    return d.Target("via-link", ssh_config=sshd.ssh_config("via-link", tmp / "link_config", Port=str(link.port),
                                                            UserKnownHostsFile=str(kh)))


def deploy_dying(t: d.Target, g: d.Guest, link: Link, staging: Path, at: int = 3 * MiB) -> None:
    """`invoke deploy` through link, which dies once at bytes have arrived; the client is killed (its laptop
    went to sleep): the board's session hears nothing more, not even a FIN."""
    client = subprocess.Popen([sys.executable, "-m", "invoke", "deploy", "--host", t.host, "--ssh-config",
                               str(t.ssh_config), str(g.folder)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        part = staging / "initrd.gz.part"
        wait_for(lambda: part.exists() and part.stat().st_size >= at, 60, f"{at} bytes in {part}")
        link.cut()
    finally:
        client.kill()
        client.wait()


def lock_info(board: Board) -> dict[str, object]:
    text = (board.tmp / "run/demo/deploy.lock").read_text()
    return json.loads(text) if text else {}


def test_a_link_dead_for_longer_than_the_idle_time_frees_the_board(board: Board, sshd: Sshd, tmp_path: Path):
    sshd.manager(manager_env(board, APPLIANCE_SESSION_IDLE="6"), board.dom0)
    board.version("1.0", "serve:page one")
    board.supervise("1.0")
    g = bundle(tmp_path, "2.0", "page two", ramdisk=8 * MiB)
    total = 8 * MiB + (g.folder / "vmlinuz").stat().st_size
    visitor = board.visit()
    wait_for(lambda: len(visitor.lines()) >= 20, 10, "the visitor's first pages")
    link = Link(sshd.port)
    try:
        deploy_dying(via(sshd, link, tmp_path), g, link, board.tmp / "staging/demo/2.0")
        died = time.monotonic()
        with pytest.raises(DeployError, match=r"busy: .*deploy\.lock is held by pid \d+ \(deploy from 127\.0\.0\.2 "
                                              r".*run yours with --break-lock"):
            d.deploy(target(sshd), g)        # the client back at once, from another address: still held
        wait_for(lambda: not lock_info(board), 30, "the silent session's end")
        freed = time.monotonic() - died
        row = d.deploy(target(sshd), g)
    finally:
        link.close()
    lines = visitor.finish()
    assert freed >= 5, f"freed after {freed:.1f} s: by the idle time (6 s), not earlier"
    assert row.ok and current(board) == "2.0" and 0 < row.sent < total, "the upload resumes where it stopped"
    assert failures(lines) == [] and pages(lines) == ["ok 200 page one", "ok 200 page two"]
    print(f"\nlink cut mid-upload: the board was free {freed:.1f} s later (idle 6 s); resumed with {row.sent} "
          f"of {total} bytes")


def test_sshd_client_alive_ends_a_dead_links_session(board: Board, tmp_path: Path):
    alive = start(tmp_path / "alive", keygen(tmp_path / "id_alive"), extra="ClientAliveInterval 1\n"
                                                                         "ClientAliveCountMax 2\n")
    link = Link(alive.port)
    try:
        alive.manager(manager_env(board, APPLIANCE_SESSION_IDLE="600"), board.dom0)
        board.version("1.0", "serve:page one")
        board.supervise("1.0")
        deploy_dying(via(alive, link, tmp_path), bundle(tmp_path, "2.0", "page two", ramdisk=8 * MiB), link,
                     board.tmp / "staging/demo/2.0")
        t0 = time.monotonic()
        wait_for(lambda: not lock_info(board), 30, "sshd to end the dead link's session")
        assert time.monotonic() - t0 < 30
        assert "Timeout, client not responding" in alive.log()
        assert d.deploy(target(alive), bundle(tmp_path, "3.0", "page three")).ok
    finally:
        link.close()
        alive.stop()


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_stuck_holder_is_taken_over_with_a_line_that_says_so(board: Board, sshd: Sshd, tmp_path: Path):
    sshd.manager(manager_env(board, APPLIANCE_SESSION_IDLE="3"), board.dom0)
    board.version("1.0", "serve:page one")
    board.supervise("1.0")
    conn = target(sshd).connect()
    held = d.Session(conn, None)
    pid = int(lock_info(board)["pid"])     # type: ignore[call-overload]
    os.kill(pid, signal.SIGSTOP)           # alive, holding the lock, and never going to end by itself
    try:
        notes: list[str] = []

        def takes_over() -> bool:
            c = target(sshd).connect()
            try:
                s = d.Session(c, None)
            except DeployError as exc:
                assert "busy" in str(exc)
                return False
            notes.extend(s.hello["notes"])
            s.close()
            c.close()
            return True

        wait_for(takes_over, 40, "the stuck session to be taken over")
    finally:
        end = time.monotonic() + 10
        while not (with_pid_gone := gone(pid)) and time.monotonic() < end:
            time.sleep(0.05)
        if not with_pid_gone:
            os.kill(pid, signal.SIGKILL)
        held.close()
        conn.close()
    assert with_pid_gone, "the stuck holder was ended"
    (note,) = notes
    assert note.startswith(f"site demo: took over {board.tmp}/run/demo/deploy.lock from pid {pid} (deploy from "
                           f"127.0.0.1 of version None, since 20"), note
    assert note.endswith(", more than its 3 s"), note


def test_break_lock_ends_a_live_holder_naming_it(board: Board, sshd: Sshd, tmp_path: Path):
    board.version("1.0", "serve:page one")
    board.supervise("1.0")
    conn = target(sshd).connect()
    held = d.Session(conn, None)
    pid = lock_info(board)["pid"]
    g = bundle(tmp_path, "2.0", "page two")
    try:
        with pytest.raises(DeployError, match="if that deploy is gone, run yours with --break-lock"):
            d.deploy(target(sshd), g)
        c = target(sshd).connect()
        s = d.Session(c, None, break_lock=True)
        (note,) = s.hello["notes"]
        assert re.fullmatch(rf"site demo: took over {board.tmp}/run/demo/deploy\.lock from pid {pid} \(deploy from "
                            rf"127\.0\.0\.1 of version None, since 20[0-9: -]+\): broken with --break-lock", note), note
        s.close()
        c.close()
    finally:
        held.close()
        conn.close()
    assert d.deploy(target(sshd), g).ok


def test_a_disk_that_fills_in_the_last_megabytes_never_gives_a_whole_looking_file(board: Board, sshd: Sshd,
                                                                                   tmp_path: Path):
    small = tmp_path / "small"
    small.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(small))
    try:
        sshd.manager(manager_env(board, APPLIANCE_STAGING=str(small / "staging"), APPLIANCE_MARGIN_MIB="1"),
                     board.dom0)
        board.version("1.0", "serve:page one")
        board.supervise("1.0")
        g = bundle(tmp_path, "2.0", "page two", ramdisk=6 * MiB)
        visitor = board.visit()
        wait_for(lambda: len(visitor.lines()) >= 20, 10, "the visitor's first pages")
        filler = small / "filler"

        def fill(sent: int) -> None:        # something else on the board takes the space the upload counted on
            if sent >= 5 * MiB and not filler.exists():
                with open(filler, "wb") as f, contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * (64 << 10))
                        f.flush()

        with pytest.raises(DeployError) as err:
            d.deploy(target(sshd), g, progress=fill)
        msg = str(err.value)
        staged = small / "staging/demo/2.0"
        assert "\n" not in msg
        # the board's check of the file, whether SFTP's pipelining lost the write's error or paramiko read it
        assert re.fullmatch(rf"booth-test: {staged}/initrd\.gz\.part: the board holds \d+ of its {6 * MiB} bytes "
                            rf"\(its disk has 0\.\d MiB free: a write failed there\); not renamed, the old version "
                            rf"keeps serving", msg), msg
        assert not (staged / "initrd.gz").exists() and not (board.tmp / "store/demo/2.0").exists()
        assert current(board) == "1.0"
        filler.unlink()
        row = d.deploy(target(sshd), g)
        lines = visitor.finish()
        assert row.ok and current(board) == "2.0"
        assert failures(lines) == [] and pages(lines) == ["ok 200 page one", "ok 200 page two"]
        print(f"\ndisk full mid-file: refused with {msg!r}")
    finally:
        sh("umount", "-l", str(small), check=False)


def test_an_abandoned_upload_never_holds_the_disk(board: Board, sshd: Sshd, tmp_path: Path):
    small = tmp_path / "small"
    small.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small))
    try:
        sshd.manager(manager_env(board, APPLIANCE_STAGING=str(small / "staging"), APPLIANCE_MARGIN_MIB="1"),
                     board.dom0)
        board.version("1.0", "serve:page one")
        board.supervise("1.0")
        abandoned = small / "staging/demo/9.9"
        abandoned.mkdir(parents=True)
        (abandoned / "initrd.gz.part").write_bytes(os.urandom(5 * MiB))
        row = d.deploy(target(sshd), bundle(tmp_path, "2.0", "page two", ramdisk=2 * MiB))
        assert row.ok and current(board) == "2.0", "the 5 MiB of 9.9's .part would have left too little space"
        assert not abandoned.exists() and list((small / "staging/demo").iterdir()) == []
        abandoned.mkdir()
        (abandoned / "vmlinuz.part").write_bytes(b"x")
        conn = target(sshd).connect()
        try:
            s = d.Session(conn, None)
            assert s.ask("prune")["cleared"] == ["9.9"] and not abandoned.exists()
            s.close()
        finally:
            conn.close()
    finally:
        sh("umount", "-l", str(small), check=False)


def test_prune_follows_the_order_the_board_recorded_not_mtimes(board: Board, sshd: Sshd, tmp_path: Path):
    board.version("1.0", "serve:page one")
    board.supervise("1.0")
    t = target(sshd)
    for v in ("2.0", "3.0", "4.0"):
        d.deploy(t, bundle(tmp_path, v, f"page {v}"))
    store = board.tmp / "store/demo"
    year = 365 * 86400
    os.utime(store / "2.0", (time.time() + year,) * 2)        # a board whose clock was a year ahead, then set back
    os.utime(store / "3.0", (time.time() - year,) * 2)
    row = d.deploy(t, bundle(tmp_path, "5.0", "page 5.0"))
    assert row.detail["pruned"] == ["2.0"], "3.0 was committed after 2.0, whatever their mtimes say"
    assert (store / ".committed").read_text().split() == ["2.0", "3.0", "4.0", "5.0"]


def test_status_shows_every_site_and_fails_when_one_is_failing(board: Board, sshd: Sshd, tmp_path: Path):
    board.version("1.0", "serve:page one")
    os.symlink("1.0", board.tmp / "store/demo/current")          # current, but no guest runs: failing
    cfg = sshd.ssh_config("booth-test")
    base = [sys.executable, "-m", "invoke", "status", "--host", "booth-test", "--ssh-config", str(cfg)]
    p = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    rows = [line.split() for line in p.stdout.splitlines()]
    assert rows[0] == ["host", "site", "state", "version", "health", "up", "previous", "kept", "free"]
    assert rows[1][:5] == ["booth-test", "demo", "FAILING", "1.0", "unknown"]
    assert p.stdout.splitlines()[2].startswith("booth-test demo: ")
    assert p.stderr.strip() == "appliance: ERROR: 1 of 1 boards have a failing site: booth-test"
    p = subprocess.run([*base, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    out = json.loads(p.stdout)
    assert p.returncode == 1 and out["ok"] is False and out["sites"]["demo"]["current"] == "1.0"


def test_a_connection_cut_during_the_switch_asks_the_board(board: Board, sshd: Sshd, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]):
    board.version("1.0", "serve:page one")
    board.supervise("1.0")
    g = slow_bundle(tmp_path, "2.0", "page two")
    with d.source(g.folder) as g:
        visitor = board.visit()
        wait_for(lambda: len(visitor.lines()) >= 20, 10, "the visitor's first pages")
        lock = board.tmp / "run/demo/lock"

        def cut() -> None:
            wait_for(lambda: lock.exists() and '"switch"' in lock.read_text(), 60, "the switch to begin")
            sshd.drop()

        cutter = threading.Thread(target=cut)
        cutter.start()
        row = d.deploy(target(sshd), g)
        cutter.join()
        lines = visitor.finish()
    err = capsys.readouterr().err
    assert (row.ok, row.result) == (True, "deployed") and current(board) == "2.0"
    assert "the connection broke during the switch" in err and "the board finished the switch: 2.0 is current" in err
    assert failures(lines) == [] and pages(lines) == ["ok 200 page one", "ok 200 page two"]


def test_a_client_on_a_dead_link_gives_up_in_one_line_and_comes_back(board: Board, sshd: Sshd, tmp_path: Path):
    sshd.manager(manager_env(board, APPLIANCE_SESSION_IDLE="5"), board.dom0)
    board.version("1.0", "serve:page one")
    board.supervise("1.0")
    g = bundle(tmp_path, "2.0", "page two", ramdisk=8 * MiB)
    link = Link(sshd.port)
    try:
        t = via(sshd, link, tmp_path)
        t.timeout = 15

        def cut(sent: int) -> None:
            if sent >= 3 * MiB:
                link.cut()

        t0 = time.monotonic()
        with pytest.raises(DeployError, match=r"^via-link: the upload broke off after \d+ of \d+ bytes \(no progress "
                                              r"for 15 s: the link is down\); run "
                                              r"the deploy again to resume$"):
            d.deploy(t, g, progress=cut)
        gave_up = time.monotonic() - t0
    finally:
        link.close()
    wait_for(lambda: not lock_info(board), 30, "the silent session's end")
    assert d.deploy(target(sshd), g).ok and current(board) == "2.0"
    print(f"\nthe client on a dead link gave up after {gave_up:.1f} s (timeout 15 s)")
    assert gave_up < 60, "within a few of its timeouts, not hung"


def test_a_link_that_dies_during_the_switch_is_noticed_and_the_board_finishes_alone(board: Board, sshd: Sshd,
                                                                                    tmp_path: Path):
    sshd.manager(manager_env(board, APPLIANCE_SESSION_IDLE="5"), board.dom0)
    board.version("1.0", "serve:page one")
    board.supervise("1.0")
    folder = slow_bundle(tmp_path, "2.0", "page two", seconds=8).folder
    visitor = board.visit()
    wait_for(lambda: len(visitor.lines()) >= 20, 10, "the visitor's first pages")
    link, lock, out = Link(sshd.port), board.tmp / "run/demo/lock", []
    t = via(sshd, link, tmp_path)
    t.timeout = 5

    def run() -> None:
        try:
            with d.source(folder) as g:
                d.deploy(t, g)
            out.append("deployed")
        except Exception as exc:
            out.append(str(exc))

    client = threading.Thread(target=run, daemon=True)
    try:
        client.start()
        wait_for(lambda: lock.exists() and '"switch"' in lock.read_text(), 60, "the switch to begin")
        link.cut()
        t0 = time.monotonic()
        client.join(120)
        gave_up = time.monotonic() - t0
        assert not client.is_alive(), "the client noticed the dead link (it waited for the switch's 900 s before)"
    finally:
        link.close()
    assert len(out) == 1 and re.fullmatch(
        r"via-link: the link went down during the switch \(via-link: no answer to a keepalive for 5 s: the link is "
        r"down\) and the board has not answered since \(.+\); it finishes the switch to 2\.0, or keeps the old "
        r"version serving, on its own: `appliance status --host via-link` says which", out[0]), out
    wait_for(lambda: current(board) == "2.0" and not lock_info(board), 60, "the board to finish the switch alone")
    lines = visitor.finish()
    assert failures(lines) == [] and pages(lines) == ["ok 200 page one", "ok 200 page two"]
    assert d.status(target(sshd))["sites"]["demo"]["current"] == "2.0"
    print(f"\nthe link died as the switch began: the client gave up in one line {gave_up:.1f} s later "
          f"(timeout 5 s; it waited up to the switch's 900 s before); the board finished the switch alone")
    assert gave_up < 3 * 5 + 3 * 10, "a keepalive's timeout, then three of asking again, each about a timeout"
