"""Benchmark: an on-demand site's wake on a running board, for each stop mode: from a DNS query for its name
(asked of the guest manager, as dnsmasq forwards it) or a connection to its service address, to the first byte
of its page; the always-on site's first byte beside them; and Xen's free memory with the site asleep against
serving. Anchors (Jitsu, NSDI 2015, on a real Cubieboard2): 350-400 ms for a MirageOS unikernel, 3-4 s for a
Linux VM.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from .. import log
from ..config import Config
from ..emulate import Board, wait_for
from ..manager.settings import WAKE_DNS
from .switch import manager

IDLE_S = 5
SLEEP_S = 180

# On dom0: optionally a DNS query for the name first (to the manager's wake DNS), then a GET of the address;
# the seconds from the first packet to the first byte of the answer.
_FIRST_BYTE = """import json, socket, struct, sys, time
address, port, name, dns_host, dns_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
t0 = time.monotonic()
if name:
    q = struct.pack("!6H", 1, 0x0100, 1, 0, 0, 0) + b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    u.sendto(q + b"\\0" + struct.pack("!2H", 1, 1), (dns_host, dns_port))
    address = socket.inet_ntoa(u.recv(512)[-4:])
s = socket.create_connection((address, port), timeout=300)
s.sendall(b"GET / HTTP/1.0\\r\\nHost: bench\\r\\n\\r\\n")
first = s.recv(1)
t = time.monotonic() - t0
print(json.dumps({"s": t, "ok": first == b"H"}))
"""


# On dom0: a destroyed site woken by a connection, each part of the way stamped on dom0's monotonic clock (the
# journal's too): the manager's "starting" line (xl create begins), the guest's console lines (its init runs; httpd
# is started), the manager's "answers at" line (its health check passed), and the first byte of the page.
_PARTS = """import glob, json, os, socket, subprocess, sys, threading, time
address, port, site = sys.argv[1], int(sys.argv[2]), sys.argv[3]
logs = "/var/log/xen/console/guest-%s.*.log" % site
seen, done = {}, threading.Event()
sizes = {p: os.path.getsize(p) for p in glob.glob(logs)}
def watch():
    while not done.is_set():
        for p in glob.glob(logs):
            with open(p, "rb") as f:
                f.seek(sizes.get(p, 0))
                text = f.read().decode(errors="replace")
            for key, pattern in (("init", ": starting"), ("httpd", "serving http")):
                if pattern in text and key not in seen:
                    seen[key] = time.monotonic()
        time.sleep(0.02)
threading.Thread(target=watch, daemon=True).start()
t0 = time.monotonic()
s = socket.create_connection((address, port), timeout=300)
s.sendall(b"GET / HTTP/1.0\\r\\nHost: bench\\r\\n\\r\\n")
ok = s.recv(1) == b"H"
seen["first byte"] = time.monotonic()
time.sleep(0.1)
done.set()
since = "--since=-%ds" % (int(time.monotonic() - t0) + 5)
out = subprocess.run(["journalctl", "-u", "appliance-guest", "-o", "json", since, "--no-pager"],
                     capture_output=True, text=True).stdout
for line in out.splitlines():
    e = json.loads(line)
    # the manager's lines start with its name ("appliance-guest: starting demo ...")
    t, msg = int(e["__MONOTONIC_TIMESTAMP"]) / 1e6, str(e.get("MESSAGE", "")).split("appliance-guest: ", 1)[-1]
    if t < t0:
        continue
    if msg.startswith("starting %s " % site):
        seen.setdefault("xl create", t)
    elif msg.startswith("%s " % site) and " answers at " in msg:
        seen.setdefault("health", t)
print(json.dumps({"ok": ok, **{k: round(v - t0, 3) for k, v in seen.items()}}))
"""
# the parts, in the order they happen: (figure, from, to)
PARTS = (("trigger -> xl create begins (the manager's own path)", None, "xl create"),
         ("xl create begins -> the guest's init runs (xl, Xen, the guest's kernel)", "xl create", "init"),
         ("init runs -> httpd started (netfront, address)", "init", "httpd"),
         ("httpd started -> the health check passes", "httpd", "health"),
         ("health check -> first byte (pointed, passed on)", "health", "first byte"))


def parts(board: Board, address: str, port: int, site: str) -> dict[str, Any]:
    """A destroyed site's wake by a connection, each part in seconds (None where a stamp is missing)."""
    r = board.run(f"python3 -c {shlex.quote(_PARTS)} {address} {port} {shlex.quote(site)}", check=False,
                  timeout=400)
    try:
        got = json.loads(r.out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        log.warn(f"the wake's parts were not measured: {(r.err or r.out).strip()[-300:]}")
        return {}
    out: dict[str, Any] = {}
    for name, a, b in PARTS:
        start, end = (0.0 if a is None else got.get(a)), got.get(b)
        out[f"{name}, s"] = round(end - start, 2) if start is not None and end is not None else None
    return out


# On dom0: the median time of one `xl` command (the manager runs several on a wake's way) and of one `nft` command.
_CALLS = """import json, statistics, subprocess, time
def took(*argv):
    times = []
    for _ in range(5):
        t = time.monotonic()
        subprocess.run(argv, capture_output=True)
        times.append(time.monotonic() - t)
    return round(statistics.median(times), 3)
print(json.dumps({"xl domid": took("xl", "domid", "Domain-0"), "xl info": took("xl", "info"),
                  "nft list tables": took("nft", "list", "tables")}))
"""


def calls(board: Board) -> dict[str, Any]:
    r = board.run(f"python3 -c {shlex.quote(_CALLS)}", check=False, timeout=120)
    try:
        return {f"one `{k}`, s": v for k, v in json.loads(r.out.strip().splitlines()[-1]).items()}
    except (ValueError, IndexError):
        return {}


def first_byte(board: Board, address: str, port: int, name: str = "") -> float | None:
    r = board.run(f"python3 -c {shlex.quote(_FIRST_BYTE)} {address} {port} {shlex.quote(name)} {WAKE_DNS[0]} "
                  f"{WAKE_DNS[1]}", check=False, timeout=400)
    try:
        out = json.loads(r.out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        log.warn(f"first byte from {address}:{port} failed: {(r.err or r.out).strip()[-300:]}")
        return None
    return round(out["s"], 2) if out["ok"] else None


def free_mib(board: Board) -> int | None:
    out = board.run("xl info | sed -n 's/^free_memory *: *//p'", check=False).out.strip()
    return int(out) if out.isdigit() else None


def memory(board: Board, sites: list) -> dict[str, Any]:
    """Xen's free memory with every on-demand site destroyed against every one serving: what N sleeping sites
    cost against N running ones."""
    for s in sites:
        manager(board, f"on-demand {s.name} --idle {IDLE_S} --stop destroy")
    with log.step(f"Putting {len(sites)} on-demand sites to sleep"):
        for s in sites:
            first_byte(board, s.address, s.port)

            def asleep_now(name: str = s.name) -> bool | None:
                return manager(board, f"status {name}")[1].get("state") == "asleep" or None

            wait_for(f"{s.name} asleep", asleep_now, SLEEP_S, interval=1, board=board)
        asleep = free_mib(board)
    for s in sites:
        manager(board, f"on-demand {s.name} --idle {SLEEP_S * 2} --stop destroy")
    with log.step(f"Waking {len(sites)} on-demand sites"):
        served = [first_byte(board, s.address, s.port) for s in sites]
        serving = free_mib(board)
    names = ", ".join(s.name for s in sites)
    return {f"Xen free memory, {len(sites)} sites ({names}) asleep / serving, MiB": f"{asleep} / {serving}",
            f"memory the {len(sites)} sleeping sites free, MiB": (asleep - serving) if asleep is not None
            and serving is not None and None not in served else None}


def wakes(board: Board, cfg: Config) -> dict[str, Any]:
    """Each stop mode's wake, by a DNS query and by a connection; put the recipe's on_demand back after."""
    sites = cfg.recipe.sites
    game = next((s for s in sites if s.on_demand), None)
    if game is None or game.on_demand is None:
        return {"on-demand site": "none in the recipe"}
    figures: dict[str, Any] = {}
    on = next((s for s in sites if s.on_demand is None), None)
    if on is not None:
        figures[f"always-on {on.name}: first byte, s"] = first_byte(board, on.address, on.port)
    try:
        for stop in ("destroy", "pause"):
            state = "asleep" if stop == "destroy" else "paused"
            manager(board, f"on-demand {game.name} --idle {IDLE_S} --stop {stop}")
            for how in ("a connection", "a DNS query"):
                with log.step(f"Waking {game.name} ({stop}) by {how}"):
                    first_byte(board, game.address, game.port)        # awake, so that it can fall asleep

                    def reached(want: str = state) -> bool | None:
                        return manager(board, f"status {game.name}")[1].get("state") == want or None

                    wait_for(f"{game.name} {state}", reached, SLEEP_S, interval=1, board=board)
                    asleep = free_mib(board)
                    t = first_byte(board, game.address, game.port, game.names[0] if how != "a connection" else "")
                    st = manager(board, f"status {game.name}")[1]
                figures[f"{stop}: wake by {how} -> first byte, s"] = t
                figures[f"{stop}: the manager's wake (trigger -> health check passed), ms"] = st.get("wake_ms")
            if stop == "destroy":       # once more, each part of the way
                first_byte(board, game.address, game.port)
                wait_for(f"{game.name} asleep", lambda: manager(board, f"status {game.name}")[1].get("state")
                         == "asleep" or None, SLEEP_S, interval=1, board=board)
                figures["destroy: the wake by a connection, in parts"] = {
                    **parts(board, game.address, game.port, game.name), **calls(board)}
            if stop == "pause":     # a paused guest keeps its memory; what destroyed ones free is memory()'s
                figures[f"Xen free memory, {game.name} paused / serving, MiB"] = f"{asleep} / {free_mib(board)}"
        figures.update(memory(board, [s for s in sites if s.on_demand]))
    finally:
        for s in sites:
            if s.on_demand:
                manager(board, f"on-demand {s.name} --idle {s.on_demand.idle:g} --stop {s.on_demand.stop}")
    figures["anchors (Jitsu on a Cubieboard2)"] = "MirageOS 0.35-0.4 s, a Linux VM 3-4 s"
    return figures
