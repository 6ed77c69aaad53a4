"""A hostile guest in the fast double of the board (tests/test_switch_double.py): the about site's guest, plugged by
the board's own vif script, claims the demo site's slots (their MAC and their addresses). The demo site keeps
serving its own page to a visitor, and a switch to a version that never answers still fails its health check.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_switch_double import STANDIN, Board, failures, make_board, pages, sh, wait_for

pytestmark = pytest.mark.root

BLUE, GREEN = ("10.42.100.10", "00:16:3e:2a:64:0a"), ("10.42.100.11", "00:16:3e:2a:64:0b")
ABOUT_BLUE_MAC = "00:16:3e:2a:64:0c"     # the hostile guest's own slot (the booth's about site, blue)


def h_hostile(stop: str, count: str) -> None:
    """Inside the hostile guest: serve a page of its own on port 80 (eth0 has the green slot's MAC and both demo
    slots' addresses), and keep sending gratuitous ARP for both, from the green slot's MAC and from its own."""
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = b"hostile page"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802
            self.do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("", 80), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind(("eth0", 0))
    frames = []
    for mac in (GREEN[1], ABOUT_BLUE_MAC):
        m = bytes.fromhex(mac.replace(":", ""))
        for ip, _ in (BLUE, GREEN):
            a = socket.inet_aton(ip)
            for op in (1, 2):
                frames.append(b"\xff" * 6 + m + b"\x08\x06" + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, m,
                                                                          a, b"\xff" * 6, a))
    sent = 0
    while not os.path.exists(stop):
        for f in frames:
            s.send(f)
            sent += 1
        Path(count).write_text(str(sent))
        time.sleep(0.02)       # a pace, not a wait for anything


@pytest.fixture
def board(tmp_path: Path) -> Iterator[Board]:
    with make_board(tmp_path) as b:
        yield b


def start_hostile(board: Board) -> tuple[str, Path, Path]:
    """The hostile guest: a namespace plugged into the guests' bridge as the about site's blue slot."""
    ns, vif = f"{board.prefix}90", "vif90.0"
    with open(board.tmp / "slots", "a") as f:      # the booth's about site, as its ruleset's set slots has it
        f.write(f"{ABOUT_BLUE_MAC} 10.42.100.12 about.blue\n")
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", vif, "netns", board.dom0, "type", "veth", "peer", "name", "eth0", "netns", ns)
    p = subprocess.run(["ip", "netns", "exec", board.dom0, sys.executable, str(STANDIN), "plug", vif, ABOUT_BLUE_MAC,
                        "brg0", "90"], env=board.env, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    h = ["ip", "-n", ns]
    sh(*h, "link", "set", "lo", "up")
    sh(*h, "link", "set", "eth0", "address", GREEN[1])
    for ip, _ in (GREEN, BLUE):
        sh(*h, "addr", "add", f"{ip}/24", "dev", "eth0")
    sh(*h, "link", "set", "eth0", "up")
    stop, count = board.tmp / "stop-hostile", board.tmp / "hostile-sent"
    board.procs.append(subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, __file__, "hostile", str(stop), str(count)]))
    wait_for(lambda: count.exists() and int(count.read_text() or 0) > 100, 10, "the hostile guest's claims")
    return ns, stop, count


def test_a_guest_cannot_answer_for_another_slot(board: Board):
    board.version("1.0", "serve:page one")
    board.version("2.0", "never-answer")
    board.supervise("1.0")
    visitor = board.visit()
    wait_for(lambda: len(visitor.lines()) >= 20, 10, "the visitor's first pages")
    _, stop, count = start_hostile(board)
    n = len(visitor.lines())
    with contextlib.suppress(AssertionError):     # the visitor's figures are checked below, whatever they are
        wait_for(lambda: len(visitor.lines()) >= n + 100, 20, "100 pages while the hostile guest claims the slots")
    t0 = time.monotonic()
    rc, out = board.run("switch", "demo", "2.0")
    wall = time.monotonic() - t0
    lines = visitor.finish()
    stop.touch()
    d0 = ["ip", "-n", board.dom0]
    neigh = {ip: json.loads(sh(*d0, "-j", "neigh", "show", ip, "dev", "brg0").stdout or "[]") for ip, _ in (BLUE, GREEN)}
    fdb = json.loads(sh("bridge", "-n", board.dom0, "-j", "fdb", "show", "dev", "vif90.0").stdout or "[]")
    learned = sorted(e["mac"] for e in fdb if e.get("state") != "permanent")
    hostile = [line for line in lines if "hostile" in line]
    print(f"\nhostile guest: {count.read_text()} claims sent; visitor {len(lines)} requests, {len(failures(lines))} "
          f"failed, {len(hostile)} answered by the hostile guest; switch to a never-answering 2.0: rc {rc} in "
          f"{wall:.1f} s ({out.get('error', out)!s:.80}); dom0's neighbours {neigh}; learned on vif90.0 {learned}")
    assert hostile == [] and failures(lines) == [] and pages(lines) == ["ok 200 page one"], failures(lines)[:5]
    assert rc == 1 and out["error"].startswith("site demo: version 2.0 in demo.green did not answer at "
                                               "http://10.42.100.11:80/ within 5 s"), out
    for ip, mac in (BLUE, GREEN):
        assert [(e.get("lladdr"), e.get("state")) for e in neigh[ip]] == [(mac, ["PERMANENT"])], neigh
    assert learned == [ABOUT_BLUE_MAC] or learned == [], learned
    rc, st = board.run("status", "demo")
    assert rc == 0 and (st["version"], st["slot"]) == ("1.0", "blue")


if __name__ == "__main__":
    {"hostile": h_hostile}[sys.argv[1]](*sys.argv[2:])
