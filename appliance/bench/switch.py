"""Benchmark: switching a site between two versions on a running board, blue-green against destroy-then-create.

A steady visitor fetches the site's status page in a loop (each request a new TCP connection through dom0's
DNAT) while the guest manager switches; each mode reports its switch time and failed requests out of the total.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import bundles, log, manager_client
from ..build import guest as demo_guest
from ..config import Config
from ..emulate import Board, wait_for
from ..errors import DeployError
from ..manager.store import ROOT as BOARD_STORE

STORE = BOARD_STORE
ANSWERS_S = 300

# The steady visitor, run on the board (in dom0 or in a visitor's network namespace) until the stop file appears:
# a request every PACE seconds at most, a visitor clicking on, not a flood (dom0 has one CPU, and under emulation
# its wifi, bridge and DNAT work for every packet is slow).
PACE_S = 0.25
VISITOR = """import json, os, sys, time, urllib.request
url, out, stop, pace = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
n = {"ok": 0, "failed": 0, "versions": [], "errors": [], "seen": {}}
while not os.path.exists(stop):
    next_at = time.monotonic() + pace
    try:
        with urllib.request.urlopen(url, timeout=15) as r:
            v = json.loads(r.read()).get("version")
        n["ok"] += 1
        if not n["versions"] or n["versions"][-1] != v:
            n["versions"].append(v)
        n["seen"].setdefault(v, time.time())      # the board's clock: a version's first answer
    except Exception as exc:
        n["failed"] += 1
        n["errors"] = (n["errors"] + [f"{time.time():.3f} {repr(exc)[:160]}"])[-5:]
    with open(out + ".tmp", "w") as f:
        json.dump(n, f)
    os.replace(out + ".tmp", out)
    time.sleep(max(0.0, next_at - time.monotonic()))
"""


class Visiting:
    """The counts of a steady visitor running on the board."""

    def __init__(self, board: Board, out: str) -> None:
        self.board, self.out = board, out

    def counts(self) -> dict[str, Any]:
        r = self.board.run(f"cat {self.out} 2>/dev/null", check=False)
        return dict(json.loads(r.out)) if r.out.strip() else {"ok": 0, "failed": 0, "versions": [], "errors": [],
                                                              "seen": {}}

    def wait_answers(self, more: int) -> dict[str, Any]:
        start = self.counts()["ok"]

        def probe() -> dict[str, Any] | None:
            c = self.counts()
            return c if c["ok"] >= start + more else None

        return wait_for(f"{more} more answers to the steady visitor", probe, ANSWERS_S, board=self.board)


@contextmanager
def steady_visitor(board: Board, url: str, netns: str | None = None) -> Iterator[Visiting]:
    """Run the visitor until the block ends; it has had answers before the block starts and after it ends."""
    out, stop = "/run/appliance-visit.json", "/run/appliance-visit.stop"
    prefix = f"ip netns exec {shlex.quote(netns)} " if netns else ""
    board.run(f"rm -f {out} {stop}; printf %s {shlex.quote(VISITOR)} > /run/appliance-visit.py")
    board.run(f"{prefix}nohup python3 /run/appliance-visit.py {shlex.quote(url)} {out} {stop} {PACE_S} "
              f">/dev/null 2>&1 &")
    v = Visiting(board, out)
    try:
        v.wait_answers(3)
        yield v
        v.wait_answers(3)
    finally:
        board.run(f"touch {stop}", check=False)


def board_time(board: Board) -> float:
    """The board's clock now, read just before an operation starts (the visitor's times are the board's; the
    reading is late by about half an SSH round trip)."""
    return float(board.run("date +%s.%N").out.strip())


def serving_after(seen: dict[str, Any], version: str, t0: float) -> float | str:
    """Seconds from t0 (the board's clock) to the steady visitor's first answer from version."""
    at = (seen.get("seen") or {}).get(version)
    return round(at - t0, 1) if at else f"never served {version}"


def manager(board: Board, args: str, timeout: float = 600) -> tuple[int, dict[str, Any]]:
    """Run `appliance-guest ARGS` on the board: its exit status and the JSON it printed."""
    return manager_client.ask(lambda cmd, t: board.run(cmd, check=False, timeout=t), shlex.split(args), timeout)


def upload(board: Board, cfg: Config, bundle: Path, work: Path) -> str:
    """Lay a bundle into a scratch store on the host (checked as the build checks it) and copy it to the
    board's store of the recipe's first site; its version."""
    site = cfg.recipe.sites[0]
    version = bundles.store(work, bundle, site, current=False)
    board.put(work / bundles.STORE / site.name / version, f"{STORE}/{site.name}/{version}")
    return version


def bench(board: Board, cfg: Config) -> dict[str, Any]:
    """Switch the first site to a second demo release blue-green, then back destroy-then-create."""
    site = cfg.recipe.sites[0]
    url = f"http://{site.address}:{site.port}/cgi-bin/status"
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-switch-") as tmp:
        one = board.run(f"readlink {STORE}/{site.name}/current").out.strip()
        two = upload(board, cfg, demo_guest.bundle(cfg, release="2.0").path, Path(tmp))
    for mode, flag, target in (("blue-green", "", two), ("destroy-then-create", "--cold ", one)):
        with log.step(f"Switching {site.name} to {target} ({mode}) under a steady visitor"):
            with steady_visitor(board, url) as v:
                start = time.monotonic()
                rc, out = manager(board, f"switch {flag}{site.name} {target}")
                took = time.monotonic() - start
            seen = v.counts()
        figures[f"{mode} switch, s"] = round(took, 1) if rc == 0 else f"failed: {out.get('error')}"
        figures[f"{mode}: failed / total requests"] = f"{seen['failed']} / {seen['ok'] + seen['failed']}"
    return figures


class _Drop(Exception):
    """The benchmark's cut of an upload midway (the client gives up; the board keeps what arrived)."""


def deploys(board: Board, cfg: Config) -> dict[str, Any]:
    """`invoke deploy` of new demo releases over the board's SSH, under a steady visitor: blue-green against
    destroy-then-create (upload, verify, switch), and an upload cut halfway then resumed."""
    from .. import deploy as d

    site = cfg.recipe.sites[0]
    url = f"http://{site.address}:{site.port}/cgi-bin/status"
    target = d.Target(f"root@127.0.0.1:{board.ssh_port}", ssh_config=board.ssh_config, key=board.key, timeout=60)
    figures: dict[str, Any] = {}
    for mode, release, cold in (("blue-green", "3.0", False), ("destroy-then-create", "4.0", True)):
        bundle = demo_guest.bundle(cfg, release=release)
        with log.step(f"Deploying demo {release} ({mode}) under a steady visitor"):
            with steady_visitor(board, url) as v, d.source(bundle.path) as g:
                t0 = board_time(board)
                try:
                    row = d.deploy(target, g, site.name, cold=cold, tty=False)
                    figures[f"{mode} deploy (upload, verify, switch), s"] = row.seconds
                except DeployError as exc:
                    figures[f"{mode} deploy (upload, verify, switch), s"] = f"failed: {exc}"
            seen = v.counts()
        figures[f"{mode} deploy -> new version serving, s"] = serving_after(seen, bundle.version, t0)
        figures[f"{mode} deploy: failed / total requests"] = f"{seen['failed']} / {seen['ok'] + seen['failed']}"
    resumed = demo_guest.bundle(cfg, release="5.0").path
    with log.step("Deploying demo 5.0 with its upload cut halfway, then again"), d.source(resumed) as g:
        total = sum(p.stat().st_size for p in resumed.iterdir() if p.name != "guest.yaml")

        def cut(sent: int) -> None:
            if sent >= total // 2:
                raise _Drop()

        with contextlib.suppress(_Drop):
            d.deploy(target, g, site.name, progress=cut, tty=False)
        row = d.deploy(target, g, site.name, tty=False)
    figures["resumed upload: bytes sent the second time / the bundle's bytes"] = f"{row.sent} / {total}"
    return figures
