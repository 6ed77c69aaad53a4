"""Pull mode in the namespace double of the board: the manager with the xl stand-in and a steady visitor, a release
channel as a real git repository (a local bare one, or served by `git daemon` on dom0's loopback), commits signed
with ed25519 keys made here. What the board takes, what it refuses and why, and a power cut at each step of a take.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.test_switch_double import ENTRY, Board, failures, make_board, pages, sh, wait_for, zimage

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0 or not all(os.path.exists(p) for p in ("/usr/bin/git",
                                                                                        "/usr/bin/ssh-keygen")),
                                 reason="needs root (network namespaces), git and ssh-keygen")]

GIT = ["git", "-c", "user.name=CI", "-c", "user.email=ci@example.invalid", "-c", "init.defaultBranch=stable"]


@dataclass
class Channel:
    """A release channel: a bare repository, and a work tree the tests publish from."""

    tmp: Path
    bare: Path
    work: Path
    keys: dict[str, Path]

    def git(self, *args: str) -> str:
        return sh(*GIT, "-C", str(self.work), *args).stdout.strip()

    def release(self, serial: Any, version: str, behaviour: str, key: str | None = "alice", deadline: int = 5,
                push: bool = True, lie: bool = False, tamper: Callable[[Path], object] | None = None,
                ramdisk: int = 0) -> str:
        """One commit that replaces demo/ with a release: release.json, manifest.json, vmlinuz."""
        d = self.work / "demo"
        sh("rm", "-rf", str(d))
        d.mkdir()
        kernel = zimage(behaviour)
        (d / "vmlinuz").write_bytes(kernel)
        sums = {"vmlinuz": hashlib.sha256(kernel + (b"x" if lie else b"")).hexdigest()}
        if ramdisk:
            (d / "initrd.gz").write_bytes(os.urandom(ramdisk))
            sums["initrd.gz"] = hashlib.sha256((d / "initrd.gz").read_bytes()).hexdigest()
        (d / "manifest.json").write_text(json.dumps({
            "version": version, "kernel": "vmlinuz", **({"ramdisk": "initrd.gz"} if ramdisk else {}),
            "sha256": sums, "memory": 64, "vcpus": 1, "port": 80, "health": {"path": "/", "deadline": deadline}}))
        (d / "release.json").write_text(json.dumps({"serial": serial}))
        if tamper:
            tamper(d)
        self.git("add", "-A", "demo")
        sign = ["-c", "gpg.format=ssh", "-c", f"user.signingkey={self.keys[key]}"] if key else []
        sh(*GIT, *sign, "-C", str(self.work), "commit", "-q", *(["-S"] if key else []), "--allow-empty", "-m",
           f"demo {version} (serial {serial})")
        if push:
            self.git("push", "-q", "--force", "origin", "HEAD:stable")
        return self.git("rev-parse", "HEAD")


@dataclass
class Pull:
    board: Board
    channel: Channel

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 90) -> tuple[int, dict[str, Any]]:
        p = subprocess.run(["ip", "netns", "exec", self.board.dom0, sys.executable, str(ENTRY), *args],
                           env={**self.board.env, **(env or {})}, capture_output=True, text=True, timeout=timeout,
                           check=False)
        assert "Traceback" not in p.stderr, p.stderr
        return p.returncode, json.loads(p.stdout) if p.stdout else {"killed": p.returncode}

    def pull(self, **kw: Any) -> dict[str, Any]:   # env=: more environment for this one command
        return self.run("pull", "demo", **kw)[1]

    def status(self) -> dict[str, Any]:
        return self.run("status", "demo")[1]

    def state(self) -> dict[str, Any]:
        return dict(json.loads((self.board.tmp / "store/demo/.pull/state.json").read_text()))


def keypair(tmp: Path, name: str) -> Path:
    key = tmp / f"key-{name}"
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key))
    return key


def setup_channel(tmp: Path, board: Board, url: str | None = None, every: int = 60) -> Pull:
    keys = {n: keypair(tmp, n) for n in ("alice", "mallory")}
    signers = tmp / "allowed_signers"
    signers.write_text("alice@ci namespaces=\"git\" " + " ".join(
        (tmp / "key-alice.pub").read_text().split()[:2]) + "\n")
    bare, work = tmp / "channel.git", tmp / "work"
    sh(*GIT, "init", "-q", "--bare", str(bare))
    sh(*GIT, "init", "-q", str(work))
    ch = Channel(tmp, bare, work, keys)
    ch.git("remote", "add", "origin", str(bare))
    (tmp / "pull.json").write_text(json.dumps({"sites": {"demo": {
        "url": url or str(bare), "branch": "stable", "every": every,
        "signers": ["# who may publish", *signers.read_text().splitlines()]}}}))
    board.env["APPLIANCE_PULL"] = str(tmp / "pull.json")
    board.env["APPLIANCE_STAGING"] = str(tmp / "staging")     # a take stages as a deploy does: never the host's
    return Pull(board, ch)


@pytest.fixture
def pulled(tmp_path: Path) -> Iterator[Pull]:
    with make_board(tmp_path) as b:
        b.version("1.0", "serve:page one")
        b.supervise("1.0")
        yield setup_channel(tmp_path, b)


def serving(p: Pull) -> tuple[str, str]:
    st = p.status()
    return st["version"], st["current"]


def test_a_signed_release_is_taken_with_no_failed_request(pulled: Pull):
    visitor = pulled.board.visit()
    wait_for(lambda: len(visitor.lines()) >= 20, 10, "the visitor's first pages")
    commit = pulled.channel.release(1, "2.0", "serve:page two")
    t0 = time.monotonic()
    out = pulled.pull()
    took = time.monotonic() - t0
    lines = visitor.finish()
    assert out["ok"] and out["result"].startswith(f"took 2.0 (serial 1) from {commit[:12]}, signed by alice@ci"), out
    assert failures(lines) == [], failures(lines)[:5]
    assert pages(lines) == ["ok 200 page one", "ok 200 page two"]
    assert serving(pulled) == ("2.0", "2.0")
    st = pulled.status()["pull"]
    assert st["following"] == f"{pulled.channel.bare}@stable"
    assert (st["serving"]["commit"], st["serving"]["signer"], st["highest"]) == (commit, "alice@ci", 1)
    assert st["last_check"]["ok"] and st["last_signed"]["commit"] == commit and 0 <= st["last_signed"]["age_s"] < 60
    assert pulled.pull()["result"] == f"up to date at {commit[:12]}"
    t0 = time.monotonic()
    pulled.pull()
    print(f"\npull: {len(lines)} requests, {len(failures(lines))} failed; the check that took the release "
          f"{took:.2f} s (its switch's drain included), a check with nothing new {time.monotonic() - t0:.2f} s")


@pytest.mark.parametrize("key, why", [(None, "it is not signed"),
                                      ("mallory", "it is signed by a key not in the allowed signers")])
def test_a_commit_not_signed_by_an_allowed_signer_is_refused(pulled: Pull, key: str | None, why: str):
    commit = pulled.channel.release(1, "2.0", "serve:page two", key=key)
    out = pulled.pull()
    assert out["result"] == f"refused: commit {commit[:12]}: {why}", out
    assert serving(pulled) == ("1.0", "1.0")
    st = pulled.status()["pull"]
    assert st["highest"] == 0 and st["refused"][-1]["commit"] == commit and st["serving"] is None
    assert not (pulled.board.tmp / "store/demo/2.0").exists() and not (pulled.board.tmp / "staging").exists()


def test_a_rewritten_history_and_a_replayed_release_are_refused(pulled: Pull):
    first = pulled.channel.release(1, "2.0", "serve:page two")
    assert pulled.pull()["result"].startswith("took 2.0")
    second = pulled.channel.release(2, "3.0", "serve:page three")
    assert pulled.pull()["result"].startswith("took 3.0")
    # the channel forced back to the first release: an older history
    pulled.channel.git("reset", "-q", "--hard", first)
    pulled.channel.git("push", "-q", "--force", "origin", "HEAD:stable")
    out = pulled.pull()
    assert out["result"] == (f"refused: commit {first[:12]} is not a fast-forward of {second[:12]}, which the board "
                             f"has (the channel's history was rewritten)"), out
    # the first release signed again on top of the history the board has: a replay
    pulled.channel.git("reset", "-q", "--hard", second)
    replay = pulled.channel.release(1, "2.0", "serve:page two")
    out = pulled.pull()
    assert out["result"] == (f"refused: commit {replay[:12]}: demo: serial 1 (2.0) is not higher than 2, the "
                             f"highest this board has tried (an older release replayed)"), out
    # a serial that is not a number cannot pass for a higher one
    crafted = pulled.channel.release("99", "9.0", "serve:page nine")
    assert pulled.pull()["result"] == (f"refused: commit {crafted[:12]}: demo: release.json: serial: '99' must be "
                                       f"a whole number from 1 to {1 << 53}")
    assert serving(pulled) == ("3.0", "3.0")
    assert [r["commit"] for r in pulled.status()["pull"]["refused"]] == [first, replay, crafted]


def _big(d: Path) -> None:
    (d / "manifest.json").write_text((d / "manifest.json").read_text() + " " * 70000)


@pytest.mark.parametrize("tamper, why", [
    (lambda d: (d / "vmlinuz").unlink() or (d / "vmlinuz").symlink_to("/etc/shadow"),
     "demo/vmlinuz: a site's folder holds plain files only"),
    (lambda d: (d / "sub").mkdir() or (d / "sub/x").write_text("x"), "demo/sub: a site's folder holds plain files only"),
    (lambda d: (d / "extra.txt").write_text("x"),
     "demo: holds extra.txt, manifest.json, release.json, vmlinuz; a release is release.json, manifest.json and vmlinuz"),
    (_big, "demo: manifest.json: 70XXX bytes, more than 65536"),
    (lambda d: (d / "release.json").write_text('{"serial": 1, "serial2": 2}'), 'demo: release.json: must be {"serial": N}'),
    (lambda d: (d / "release.json").unlink(), "demo/ has no release.json and manifest.json"),
])
def test_a_signed_release_of_the_wrong_shape_is_refused_before_it_is_staged(pulled: Pull, tamper: Any, why: str):
    commit = pulled.channel.release(1, "2.0", "serve:page two", tamper=tamper)
    out = pulled.pull()
    pattern = re.escape(f"refused: commit {commit[:12]}: {why}").replace("XXX", r"\d{3}")
    assert re.fullmatch(pattern, out["result"]), out
    assert serving(pulled) == ("1.0", "1.0") and not (pulled.board.tmp / "staging").exists()
    assert pulled.state()["highest"] == 0 and pulled.state()["job"] is None


def test_a_version_that_never_answers_is_marked_bad_and_never_retried(pulled: Pull):
    visitor = pulled.board.visit()
    wait_for(lambda: len(visitor.lines()) >= 20, 10, "the visitor's first pages")
    commit = pulled.channel.release(1, "2.0", "never-answer", deadline=5)
    out = pulled.pull()
    assert out["result"].startswith("refused: version 2.0 (serial 1) failed its health check and is marked bad: "
                                    "site demo: version 2.0 in demo.green did not answer"), out
    assert pulled.pull()["result"] == f"up to date at {commit[:12]}", "not retried"
    again = pulled.channel.release(2, "2.0", "never-answer")
    assert pulled.pull()["result"].startswith(f"refused: commit {again[:12]}: demo: version 2.0 failed on this board "
                                              f"before: ")
    lines = visitor.finish()
    assert failures(lines) == [] and pages(lines) == ["ok 200 page one"]
    assert serving(pulled) == ("1.0", "1.0")
    assert list(pulled.status()["pull"]["bad"]) == ["2.0"]
    pulled.channel.release(3, "3.0", "serve:page three")
    assert pulled.pull()["result"].startswith("took 3.0 (serial 3)")


def test_a_signed_release_whose_files_do_not_match_its_manifest_is_marked_bad(pulled: Pull):
    commit = pulled.channel.release(1, "2.0", "serve:page two", lie=True)
    why = (f"{pulled.board.tmp}/staging/demo/2.0/manifest.json: vmlinuz: sha256 does not match the manifest (a broken "
           f"or changed copy)")
    for n in (1, 2):
        out = pulled.pull()
        assert (out["ok"], out["result"], out["failures"]) == (False, f"failed: {why}", n), out
    out = pulled.pull()
    assert out["result"] == f"refused: version 2.0 (serial 1) failed 3 times at its stage step and is marked bad: {why}"
    assert pulled.pull()["result"] == f"up to date at {commit[:12]}"
    assert serving(pulled) == ("1.0", "1.0") and pulled.status()["pull"]["bad"] == {"2.0": why}


def objects_bytes(repo: Path) -> int:
    return sum(f.stat().st_size for f in (repo / "objects").rglob("*") if f.is_file())


@pytest.mark.parametrize("server_filters", [True, False])
def test_the_board_fetches_only_the_release_it_takes(pulled: Pull, server_filters: bool):
    """A channel keeps every release in its history; the board downloads the files of the tip it takes (when the
    server allows git's partial fetch, as GitHub's and GitLab's do) and every release when it does not."""
    MiB = 1 << 20
    pulled.channel.git("--git-dir", str(pulled.channel.bare), "config", "uploadpack.allowFilter",
                       "true" if server_filters else "false")
    for serial in (1, 2, 3):
        pulled.channel.release(serial, f"{serial + 1}.0", "serve:page new", ramdisk=MiB)
    channel = objects_bytes(pulled.channel.bare)
    assert pulled.pull()["result"].startswith("took 4.0 (serial 3)")
    fetched = objects_bytes(pulled.board.tmp / "store/demo/.pull/channel.git")
    assert (MiB < fetched < 2 * MiB) if server_filters else fetched > 3 * MiB, (fetched, channel)
    pulled.channel.release(4, "5.0", "serve:page newer", ramdisk=MiB)
    assert pulled.pull()["result"].startswith("took 5.0 (serial 4)")
    more = objects_bytes(pulled.board.tmp / "store/demo/.pull/channel.git") - fetched
    assert MiB < more < 2 * MiB, more
    print(f"\nchannel of 3 releases {channel} bytes; the board fetched {fetched} bytes for the third, {more} for "
          f"the next (server filters: {server_filters})")


def test_a_channel_that_sends_more_than_a_file_may_hold_is_refused(pulled: Pull):
    """The bound on what a hostile channel (or anyone between) can write: each file git writes is capped (1 GiB on
    the board; 256 KiB here), and the fetch that reaches it fails as one line, before any signature is looked at."""
    pulled.channel.release(1, "2.0", "serve:page two", ramdisk=1 << 20)
    out = pulled.pull(env={"APPLIANCE_PULL_FILE_MAX": str(256 << 10)})
    assert out["result"] == f"failed: git fetch: a file it wrote reached {256 << 10} bytes, the limit of one file; " \
                            f"refused", out
    assert serving(pulled) == ("1.0", "1.0")
    assert pulled.pull()["result"].startswith("took 2.0"), "under the board's own limit it is taken"


HOLD = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(8); print("listening", flush=True)
held = []
while True:
    held.append(s.accept()[0])
"""


def test_a_channel_that_never_answers_is_given_up_in_time(tmp_path: Path):
    """The bound on time: a server that accepts and says nothing; git and all it started are killed at the limit."""
    with make_board(tmp_path) as b:
        b.version("1.0", "serve:page one")
        b.supervise("1.0")
        port = free_port()
        p = setup_channel(tmp_path, b, url=f"git://127.0.0.1:{port}/channel.git")
        hold = subprocess.Popen(["ip", "netns", "exec", b.dom0, sys.executable, "-c", HOLD, str(port)],
                                stdout=subprocess.PIPE, text=True)
        b.procs.append(hold)
        assert hold.stdout and hold.stdout.readline().strip() == "listening"
        t0 = time.monotonic()
        out = p.pull(env={"APPLIANCE_PULL_FETCH_S": "3"})
        assert out["result"] == "failed: git fetch: took more than 3 s", out
        assert time.monotonic() - t0 < 30
        left = sh("pgrep", "-f", f"--git-dir={tmp_path}", check=False).stdout.split()
        assert left == [], "no git left behind"
        assert serving(p) == ("1.0", "1.0")


def test_an_unreachable_channel_backs_off_and_status_says_so(tmp_path: Path):
    with make_board(tmp_path) as b:
        b.version("1.0", "serve:page one")
        b.supervise("1.0")
        p = setup_channel(tmp_path, b, url=str(tmp_path / "nowhere.git"), every=60)
        out = p.pull()
        assert not out["ok"] and out["result"].startswith("failed: git fetch: "), out
        assert (out["failures"], out["next_in_s"]) == (1, 120)
        out = p.pull()
        assert (out["failures"], out["next_in_s"]) == (2, 240)
        rc, out = p.run("pull", "--timer")
        assert rc == 0 and out["sites"]["demo"]["result"].startswith("not due for "), out
        st = p.status()["pull"]
        assert st["failures"] == 2 and st["last_check"]["result"].startswith("failed: git fetch: ")
        assert not st["last_check"]["ok"] and 200 < st["next_in_s"] <= 264
        assert serving(p) == ("1.0", "1.0")
        # the channel comes back: the next check takes its release and the interval is the plain one again
        conf = json.loads((tmp_path / "pull.json").read_text())
        conf["sites"]["demo"]["url"] = str(p.channel.bare)
        (tmp_path / "pull.json").write_text(json.dumps(conf))
        p.channel.release(1, "2.0", "serve:page two")
        out = p.pull()
        assert out["result"].startswith("took 2.0") and (out["failures"], out["next_in_s"]) == (0, 60), out
        rc, out = p.run("pull", "--timer")
        assert out["sites"]["demo"]["result"].startswith("not due for "), out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_channel_served_by_git_daemon(tmp_path: Path):
    with make_board(tmp_path) as b:
        b.version("1.0", "serve:page one")
        b.supervise("1.0")
        port = free_port()
        p = setup_channel(tmp_path, b, url=f"git://127.0.0.1:{port}/channel.git")
        daemon = subprocess.Popen(["ip", "netns", "exec", b.dom0, "git", "daemon", "--reuseaddr", "--export-all",
                                   f"--base-path={tmp_path}", "--listen=127.0.0.1", f"--port={port}",
                                   str(tmp_path)], stderr=subprocess.DEVNULL)
        b.procs.append(daemon)   # type: ignore[arg-type]
        commit = p.channel.release(1, "2.0", "serve:page two")
        wait_for(lambda: p.pull()["result"] != "failed", 10, "git daemon")
        assert serving(p) == ("2.0", "2.0")
        assert p.status()["pull"]["serving"]["commit"] == commit
        forged = p.channel.release(2, "3.0", "serve:page three", key="mallory")
        assert p.pull()["result"].startswith(f"refused: commit {forged[:12]}: it is signed by a key not in the "
                                             f"allowed signers")


HTTP = """
import http.server, os, sys
class Handler(http.server.CGIHTTPRequestHandler):
    have_fork = False       # run the CGI as this user (forked, it would become nobody)
    def log_message(self, *args): pass
os.chdir(sys.argv[1])
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler)
print("listening", flush=True)
server.serve_forever()
"""


def test_a_channel_served_over_http_by_git_http_backend(tmp_path: Path):
    with make_board(tmp_path) as b:
        b.version("1.0", "serve:page one")
        b.supervise("1.0")
        port = free_port()
        p = setup_channel(tmp_path, b, url=f"http://127.0.0.1:{port}/cgi-bin/git/channel.git")
        cgi = tmp_path / "www/cgi-bin/git"
        cgi.parent.mkdir(parents=True)
        cgi.write_text(f"#!/bin/sh\nexport GIT_PROJECT_ROOT={tmp_path} GIT_HTTP_EXPORT_ALL=1\nexec git http-backend\n")
        cgi.chmod(0o755)
        server = subprocess.Popen(["ip", "netns", "exec", b.dom0, sys.executable, "-c", HTTP, str(tmp_path / "www"),
                                   str(port)], stdout=subprocess.PIPE, text=True)
        b.procs.append(server)
        assert server.stdout and server.stdout.readline().strip() == "listening"
        commit = p.channel.release(1, "2.0", "serve:page two")
        assert p.pull()["result"] == f"took 2.0 (serial 1) from {commit[:12]}, signed by alice@ci"
        forged = p.channel.release(2, "3.0", "serve:page three", key="mallory")
        assert p.pull()["result"] == f"refused: commit {forged[:12]}: it is signed by a key not in the allowed signers"
        assert serving(p) == ("2.0", "2.0")


@pytest.mark.parametrize("step", ["verified", "staged", "committed", "in-switch", "switched"])
def test_a_power_cut_at_each_step_of_a_take(pulled: Pull, step: str):
    visitor = pulled.board.visit()
    wait_for(lambda: len(visitor.lines()) >= 20, 10, "the visitor's first pages")
    commit = pulled.channel.release(1, "2.0", "slow-start:1:page two")
    if step == "in-switch":    # killed while the new guest boots: the take is in the switch
        p = subprocess.Popen(["ip", "netns", "exec", pulled.board.dom0, sys.executable, str(ENTRY), "pull", "demo"],
                             env=pulled.board.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        wait_for(lambda: (pulled.board.tmp / "xl/demo.green.json").exists(), 30, "the new guest's domain")
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    else:
        rc, out = pulled.run("pull", "demo", env={"APPLIANCE_PULL_CRASH": step})
        assert rc == -9, out
    assert serving(pulled)[0] in ("1.0", "2.0")
    job = pulled.state()["job"]
    assert pulled.state()["highest"] == 1 and job["commit"] == commit
    out = pulled.pull()
    assert out["ok"] and out["result"] == (f"took 2.0 (serial 1) from {commit[:12]}, signed by alice@ci"), out
    lines = visitor.finish()
    assert failures(lines) == [], failures(lines)[:5]
    assert pages(lines)[-1] == "ok 200 page two"
    assert serving(pulled) == ("2.0", "2.0") and pulled.state()["job"] is None
    assert pulled.pull()["result"] == f"up to date at {commit[:12]}"


def test_a_push_deploy_to_a_following_site_is_refused_unless_forced(pulled: Pull):
    rc, out = pulled.run("session", "demo")
    assert rc == 1 and out["error"] == (f"site demo follows {pulled.channel.bare}@stable (pull mode): a push deploy "
                                        f"is refused; give --force to deploy anyway (the site then stops following "
                                        f"until `appliance-guest follow demo`)")
    rc, out = pulled.run("session", "--force", "demo")
    assert rc == 0 and out["site"] == "demo", out          # the session's hello; stdin ends it
    st = pulled.status()["pull"]
    assert st["following"] is None and st["last_check"]["result"] == "stopped following: a push deploy with --force"
    pulled.channel.release(1, "2.0", "serve:page two")
    assert pulled.pull()["result"] == "not following"
    rc, out = pulled.run("follow", "demo")
    assert rc == 0 and out["following"] == f"{pulled.channel.bare}@stable"
    assert pulled.pull()["result"].startswith("took 2.0")


def test_invoke_release_then_the_board_takes_it(pulled: Pull):
    from appliance import release

    d = pulled.board.tmp / "bundle"
    d.mkdir()
    kernel = zimage("serve:page released")
    (d / "vmlinuz").write_bytes(kernel)
    (d / "guest.yaml").write_text(json.dumps({"version": "2.0", "kernel": "vmlinuz", "memory": 64,
                                              "sha256": {"vmlinuz": hashlib.sha256(kernel).hexdigest()}}))
    visitor = pulled.board.visit()
    wait_for(lambda: len(visitor.lines()) >= 20, 10, "the visitor's first pages")
    out = release.publish(str(pulled.channel.bare), d, site="demo", key=pulled.channel.keys["alice"],
                          signers=pulled.board.tmp / "allowed_signers")
    assert (out["serial"], out["version"]) == (1, "2.0")
    took = pulled.pull()
    lines = visitor.finish()
    assert took["result"] == f"took 2.0 (serial 1) from {out['commit'][:12]}, signed by alice@ci", took
    assert failures(lines) == [] and pages(lines) == ["ok 200 page one", "ok 200 page released"]


def test_a_canary_board_follows_another_branch_and_comes_back(pulled: Pull):
    ch = pulled.channel
    ch.release(1, "2.0", "serve:page two")
    assert pulled.pull()["result"].startswith("took 2.0 (serial 1)")
    rc, out = pulled.run("follow", "demo", "--branch", "canary")
    assert rc == 0 and out["following"] == f"{ch.bare}@canary", out
    assert pulled.pull()["result"].startswith("failed: git fetch: "), "no canary branch yet"
    canary = ch.release(2, "3.0", "serve:page three", push=False)
    ch.git("push", "-q", "origin", "HEAD:canary")
    assert pulled.pull()["result"].startswith(f"took 3.0 (serial 2) from {canary[:12]}")
    assert pulled.status()["pull"]["following"] == f"{ch.bare}@canary"
    ch.git("push", "-q", "origin", "HEAD:stable")          # the canary release merged into stable
    rc, out = pulled.run("follow", "demo", "--branch", "stable")
    assert rc == 0 and out["following"] == f"{ch.bare}@stable"
    assert pulled.pull()["result"] == f"up to date at {canary[:12]} (serial 2, 3.0)"
    assert serving(pulled) == ("3.0", "3.0")
