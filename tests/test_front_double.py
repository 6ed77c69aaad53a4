"""dom0's front doors against a visitor with bad intent, on the fast double of the board (test_switch_double's
namespaces, the booth's rendered ruleset) with the manager under its unit's real limits (LimitNOFILE, and the
address space of a 32-bit dom0): one visitor tries to hold a thousand connections to a sleeping site while a
second one wakes and loads it. The ruleset lets one address hold a few dozen (the rest are dropped unanswered);
of those the activator holds its per-address bound and answers the rest with its status page.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_switch_double import ENTRY, SERVICE, make_board, wait_for

from appliance import ROOT

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")]

UNIT = ROOT / "overlays/booth/etc/systemd/system/appliance-guest.service"
ADDRESS_SPACE = 3 << 30        # what a 32-bit dom0's process may map, at most
IDLE = 3
HOLD = 1000
SECOND = "10.42.0.101"

# Opens n connections to the service address from the visitor's first address and sends nothing: prints what
# each got once nothing more comes for a second (held open, or the 503 page), then holds them until the stop file appears.
HOLDER = r"""
import json, os, resource, selectors, socket, sys, time
n, stop = int(sys.argv[1]), sys.argv[2]
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 64, n + 64))
sel, socks = selectors.DefaultSelector(), []
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("10.42.0.2", 80))
    socks.append(s)
    sel.register(s, selectors.EVENT_READ)
got, end, quiet = {}, time.monotonic() + 8, time.monotonic() + 1
while time.monotonic() < min(end, quiet) and len(got) < n:
    for key, _ in sel.select(0.2):
        quiet = time.monotonic() + 1
        try:
            data = key.fileobj.recv(4096)
        except OSError as e:
            data = type(e).__name__.encode()
        got[key.fileobj.fileno()] = data.split(b"\r\n")[0].decode(errors="replace") or "closed"
        sel.unregister(key.fileobj)
answers = {}
for v in got.values():
    answers[v] = answers.get(v, 0) + 1
print(json.dumps({"open": n - len(got), "answers": answers}), flush=True)
while not os.path.exists(stop):
    time.sleep(0.1)
for s in socks:
    s.close()
"""

FETCH = r"""
import http.client, json, sys, time
t = time.monotonic()
c = http.client.HTTPConnection("10.42.0.2", 80, timeout=60, source_address=(sys.argv[1], 0))
c.request("GET", "/")
r = c.getresponse()
print(json.dumps({"status": r.status, "body": r.read().decode(), "s": time.monotonic() - t}))
"""


def unit_nofile() -> int:
    m = re.search(r"^LimitNOFILE=(\d+)$", UNIT.read_text(), re.M)
    assert m, f"{UNIT} sets no LimitNOFILE"
    return int(m.group(1))


def ask_tcp(ns: str, name: str) -> bytes:
    """One A query for name over TCP to the wake DNS server, from dom0's namespace (as dnsmasq asks)."""
    q = struct.pack("!6H", 9, 0x0100, 1, 0, 0, 0) + b"".join(bytes([len(x)]) + x.encode() for x in name.split("."))
    q += b"\0" + struct.pack("!2H", 1, 1)
    code = ("import socket, sys; s = socket.create_connection(('127.0.0.1', 5354), timeout=5); "
            f"s.sendall({struct.pack('!H', len(q)) + q!r}); b = b''\n"
            "while len(b) < 2 or len(b) < 2 + int.from_bytes(b[:2], 'big'):\n"
            "    c = s.recv(512)\n    assert c, 'closed'\n    b += c\n"
            "sys.stdout.buffer.write(b[2:])")
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True,
                          timeout=30, check=True).stdout


class Sampler(threading.Thread):
    """The manager's threads and open files, the most seen while it runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.threads, self.fds, self.done = pid, 0, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            try:
                self.threads = max(self.threads, len(os.listdir(f"/proc/{self.pid}/task")))
                self.fds = max(self.fds, len(os.listdir(f"/proc/{self.pid}/fd")))
            except OSError:
                return


def test_a_visitor_holding_a_thousand_connections_starves_no_one(tmp_path: Path):
    nofile = unit_nofile()
    with make_board(tmp_path, {"idle": IDLE, "stop": "destroy"}) as b:
        b.version("1.0", "slow-start:5:page one", deadline=30)
        os.symlink("1.0", tmp_path / "store/demo/current")
        second_ns = b.another_visitor(1, SECOND)
        manager = subprocess.Popen(["ip", "netns", "exec", b.dom0, "prlimit", f"--nofile={nofile}",
                                    f"--as={ADDRESS_SPACE}", sys.executable, str(ENTRY), "run"], env=b.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        b.procs.append(manager)
        wait_for(lambda: b.state().get("state") == "asleep", 30, "the on-demand site to be asleep")
        limits = Path(f"/proc/{manager.pid}/limits").read_text()
        assert re.search(rf"Max open files\s+{nofile}\s", limits), limits
        baseline = len(os.listdir(f"/proc/{manager.pid}/task"))
        files = len(os.listdir(f"/proc/{manager.pid}/fd"))
        sampler = Sampler(manager.pid)
        sampler.start()

        stop = tmp_path / "stop-holder"
        holder = subprocess.Popen(["ip", "netns", "exec", b.visitor, sys.executable, "-c", HOLDER, str(HOLD),
                                   str(stop)], stdout=subprocess.PIPE, text=True)
        b.procs.append(holder)
        assert holder.stdout is not None
        held = json.loads(holder.stdout.readline())
        t0 = time.monotonic()
        p = subprocess.run(["ip", "netns", "exec", second_ns, sys.executable, "-c", FETCH, SECOND],
                           capture_output=True, text=True, timeout=90, check=True)
        second, second_s = json.loads(p.stdout), time.monotonic() - t0
        assert (second["status"], second["body"]) == (200, "page one"), second
        assert manager.poll() is None, manager.communicate()[1][-2000:]
        assert held["open"] + sum(held["answers"].values()) == HOLD, held
        refused = held["answers"].get("HTTP/1.1 503 Service Unavailable", 0)
        assert refused >= 1, f"the visitor's connections over the activator's bound get the status page: {held}"
        assert set(held["answers"]) == {"HTTP/1.1 503 Service Unavailable"}, held
        assert b.state()["state"] == "serving"

        stop.touch()
        holder.wait(30)
        wait_for(lambda: b.state().get("state") == "asleep", IDLE + 20, "the site to sleep once the holder left")
        answer = ask_tcp(b.dom0, "demo.booth")
        assert answer[3] & 0xF == 0 and struct.unpack("!H", answer[6:8])[0] == 1, answer
        assert socket.inet_ntoa(answer[-4:]) == SERVICE
        sampler.done.set()
        sampler.join()
        assert manager.poll() is None, "the manager is alive"
        assert sampler.threads <= baseline + 3, (baseline, sampler.threads)
        assert sampler.fds <= files + 2 * 32 + 64, (files, sampler.fds)
        print(f"\nheld {HOLD}: open {held['open']}, answers {held['answers']}; second visitor {second_s:.2f} s "
              f"(page after {second['s']:.2f} s); manager threads {baseline} -> at most {sampler.threads}, "
              f"files {files} -> at most {sampler.fds} (LimitNOFILE {nofile}, address space {ADDRESS_SPACE >> 30} GiB)")
