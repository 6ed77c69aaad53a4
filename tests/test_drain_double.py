"""A drain that ends well, on the fast double of the board (test_switch_double's namespaces): across a switch with
a 3 s drain, a visitor's idle connections and a long download to an old guest that never closes them (or that
is destroyed without a word) are reset at the drain's end, never left hanging, and a download that fits in the
drain finishes intact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from test_switch_double import STANDIN, Board, board, wait_for  # noqa: F401 - board is a fixture

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")]

IDLE = 5
LONG, SHORT = (4_000_000, 20.0), (200_000, 0.5)     # bytes, seconds: past the 3 s drain, and well within it

# Opens IDLE silent connections and two downloads, prints "ready", then reports how each ended (JSON): "reset",
# "closed" (FIN), "timeout", or for a download the bytes it got, all with the time since "ready".
VISITOR = r"""
import json, selectors, socket, sys, time
idle, long, short = int(sys.argv[1]), sys.argv[2], sys.argv[3]
sel, socks = selectors.DefaultSelector(), {}
def conn(name, path=None):
    s = socket.create_connection(("10.42.0.2", 80), timeout=5)
    if path:
        s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    s.setblocking(False)
    socks[s] = {"name": name, "bytes": 0}
    sel.register(s, selectors.EVENT_READ)
for i in range(idle):
    conn(f"idle{i}")
conn("long", long)
conn("short", short)
time.sleep(0.3)                      # the downloads are under way before the switch
t0 = time.monotonic()
print("ready", flush=True)
end = t0 + 40
while sel.get_map() and time.monotonic() < end:
    for key, _ in sel.select(0.2):
        s, d = key.fileobj, socks[key.fileobj]
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            d.update(end="reset", t=round(time.monotonic() - t0, 2))
            sel.unregister(s)
            continue
        if not data:
            d.update(end="closed", t=round(time.monotonic() - t0, 2))
            sel.unregister(s)
            s.close()
        else:
            d["bytes"] += len(data)
for s in sel.get_map().values():
    socks[s.fileobj].update(end="timeout", t=round(time.monotonic() - t0, 2))
print(json.dumps({d.pop("name"): d for d in socks.values()}), flush=True)
"""


def body_bytes(got: dict[str, object], size: int) -> bool:
    """A download's whole answer arrived: its header and exactly size bytes of body."""
    return int(got["bytes"]) > size and int(got["bytes"]) - size < 200     # type: ignore[call-overload]


@pytest.mark.parametrize("old", ["stubborn", "destroyed"])
def test_a_drain_resets_what_is_left_and_lets_what_fits_finish(board: Board, old: str):  # noqa: F811
    board.version("1.0", "stubborn:page one" if old == "stubborn" else "serve:page one")
    board.version("2.0", "serve:page two")
    board.supervise("1.0")
    v = subprocess.Popen(["ip", "netns", "exec", board.visitor, sys.executable, "-c", VISITOR, str(IDLE),
                          f"/slow/{LONG[0]}/{LONG[1]}", f"/slow/{SHORT[0]}/{SHORT[1]}"], stdout=subprocess.PIPE, text=True)
    board.procs.append(v)
    assert v.stdout is not None and v.stdout.readline() == "ready\n"
    t0 = time.monotonic()
    switch = board.manager("switch", "demo", "2.0")
    if old == "destroyed":                 # the old guest dies without closing anything, during the drain
        wait_for(lambda: board.state().get("slot") == "green", 30, "the switch to green")
        domid = subprocess.run(["ip", "netns", "exec", board.dom0, sys.executable, str(STANDIN), "domid", "demo.blue"],
                               env=board.env, check=True, capture_output=True, text=True).stdout.strip()
        # as Xen's destroy: its link goes first, so that its sockets cannot say goodbye
        subprocess.run(["ip", "-n", board.dom0, "link", "del", f"vif{domid}.0"], check=True)
        subprocess.run(["ip", "netns", "exec", board.dom0, sys.executable, str(STANDIN), "destroy", "demo.blue"],
                       env=board.env, check=True, capture_output=True)
    out_text, err = switch.communicate(timeout=60)
    wall = time.monotonic() - t0
    out = json.loads(out_text)
    assert switch.returncode == 0 and out["ok"], (out, err)
    got = json.loads(v.communicate(timeout=60)[0])
    short = got.pop("short")
    assert short["end"] == "closed" and body_bytes(short, SHORT[0]), f"the download that fits finished: {short}"
    assert all(g["end"] == "reset" for g in got.values()), f"each connection left is reset, none hangs: {got}"
    assert all(g["t"] <= wall + 1 for g in got.values()), (wall, got)
    assert got["long"]["bytes"] < LONG[0], got["long"]
    if old == "stubborn":
        assert out["cut_connections"] == IDLE + 1 and out["drain_ms"] >= 3000, out
    else:
        assert out["cut_connections"] <= IDLE + 1 and out["drain_ms"] < 3000, out
    print(f"\ndrain ({old}): {out['drain_ms']} ms, cut {out['cut_connections']}; switch {wall:.2f} s; "
          f"visitor: {json.dumps(got)}; short {short}")
