"""Benchmark: pull mode on the emulated board beside a push deploy of the same kind of release. The board follows a
channel on the host (`git daemon` on the host's loopback, 10.0.2.2 through QEMU's user network); each figure is
timed from the release (or the deploy) to the new version's first answer to a steady visitor on the board.
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import log, release
from ..build import guest as demo_guest
from ..config import Config, SiteSpec
from ..emulate import Board
from .switch import STORE, board_time, manager, serving_after, steady_visitor

HOST = "10.0.2.2"          # the host, as QEMU's user network shows it to the board
PULL_JSON = "/etc/appliance/pull.json"


@dataclass
class Channel:
    bare: Path             # the channel's repository on the host
    url: str               # as the board fetches it
    keys: dict[str, Path]  # signing keys: alice (an allowed signer), mallory (not)
    signers: Path          # the allowed_signers file


@contextmanager
def channel(board: Board, site: SiteSpec, tmp: Path, every: int = 10) -> Iterator[Channel]:
    """A release channel in tmp served by `git daemon` on the host, followed by the board's site (its pull.json
    written on the board) until the block ends; then the board follows nothing again, as built."""
    tmp.mkdir(parents=True, exist_ok=True)
    keys = {}
    for name in ("alice", "mallory"):
        keys[name] = tmp / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(keys[name])],
                       check=True, stdin=subprocess.DEVNULL)
    line = "alice@ci namespaces=\"git\" " + " ".join((tmp / "alice.pub").read_text().split()[:2])
    (tmp / "allowed_signers").write_text(line + "\n")
    bare = tmp / "channel.git"
    subprocess.run(["git", "init", "-q", "--bare", "--initial-branch=stable", str(bare)], check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon = subprocess.Popen(["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={tmp}",
                               "--listen=127.0.0.1", f"--port={port}", str(tmp)], stderr=subprocess.DEVNULL)
    url = f"git://{HOST}:{port}/channel.git"
    conf = {"sites": {site.name: {"url": url, "branch": "stable", "every": every, "signers": [line]}}}
    try:
        board.run(f"printf '%s\\n' {shlex.quote(json.dumps(conf))} > {PULL_JSON}")
        yield Channel(bare, url, keys, tmp / "allowed_signers")
    finally:
        board.run(f": > {PULL_JSON}", check=False)
        daemon.terminate()
        daemon.wait(10)


def fetched_bytes(board: Board, site: str) -> int:
    """What the site's channel repository on the board holds: every byte it ever fetched."""
    r = board.run(f"du -sb {STORE}/{site}/.pull/channel.git/objects 2>/dev/null", check=False)
    return int(r.out.split()[0]) if r.out.strip() else 0


def bundle_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name != "guest.yaml")


def static_site(tmp: Path, name: str, text: str) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "index.html").write_text(f"<!doctype html><title>bench</title><p>{text}</p>\n")
    (d / "about.html").write_text("<!doctype html><title>about</title><p>the same in every release</p>\n")
    return d


def bench(board: Board, cfg: Config) -> dict[str, Any]:
    """A push deploy of a static site, then the board following a channel: a release of another static site
    (its first take: the whole bundle fetched), then one whose static files alone changed (the kernel is not
    fetched again)."""
    from .. import deploy as d

    site = cfg.recipe.sites[0]
    url = f"http://{site.address}:{site.port}/cgi-bin/status"
    target = d.Target(f"root@127.0.0.1:{board.ssh_port}", ssh_config=board.ssh_config, key=board.key, timeout=60)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-pull-") as t:
        tmp = Path(t)
        pushed, first, second = (demo_guest.bundle(cfg, site=static_site(tmp, n, n)) for n in ("push", "one", "two"))
        with log.step(f"Deploying static site {pushed.version} (push) under a steady visitor"):
            with steady_visitor(board, url) as v, d.source(pushed.path) as g:
                t0 = board_time(board)
                row = d.deploy(target, g, site.name, tty=False)
            seen = v.counts()
        figures["push: deploy -> serving, s"] = serving_after(seen, pushed.version, t0)
        figures["push: deploy -> its end (drain, prune), s"] = row.seconds
        figures["push: uploaded / bundle bytes"] = f"{row.sent} / {bundle_bytes(pushed.path)}"
        figures["push: failed / total requests"] = f"{seen['failed']} / {seen['ok'] + seen['failed']}"
        with channel(board, site, tmp / "channel") as ch:
            for label, b in (("new site", first), ("static change", second)):
                with log.step(f"Releasing static site {b.version} ({label}) to a channel the board follows"):
                    before = fetched_bytes(board, site.name)
                    with steady_visitor(board, url) as v:
                        t0 = board_time(board)
                        release.publish(str(ch.bare), b.path, site=site.name, key=ch.keys["alice"],
                                        signers=ch.signers)
                        # one check at once, as the timer's unit runs it (the timer would wait for the site's turn)
                        rc, out = manager(board, f"pull {site.name}", timeout=900)
                        done = board_time(board) - t0
                    seen = v.counts()
                if not str(out.get("result", "")).startswith(f"took {b.version}"):
                    figures[f"pull, {label}"] = f"failed: the board did not take {b.version}: {out}"
                    break
                figures[f"pull, {label}: release -> serving, s"] = serving_after(seen, b.version, t0)
                figures[f"pull, {label}: release -> check done, s"] = round(done, 1)
                figures[f"pull, {label}: fetched / bundle bytes"] = (
                    f"{fetched_bytes(board, site.name) - before} / {bundle_bytes(b.path)}")
                figures[f"pull, {label}: failed / total requests"] = f"{seen['failed']} / {seen['ok'] + seen['failed']}"
    figures["pull: the timer adds to -> serving"] = "up to its interval + a quarter"
    return figures

