"""Lifetime figures only from dom0, on the fast double of the board (tests/test_switch_double.py) with the demo
guest's own busybox httpds and CGIs (xl stand-in behaviour `busybox`): a visitor's POST of made-up figures through
a sleeping site's activator, and the same POST from the uplink, are refused; the page's figures stay dom0's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_switch_double import SERVICE, Board, make_board, sh, wait_for

from appliance.manager import lifetime

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")]

UPLINK, UPLINK_PEER = "192.168.77.1", "192.168.77.2"
MADE_UP = {"site": "demo", "trigger": "made up", "wakes_today": 999, "requests": 999}

CALL = r"""
import http.client, json, sys
host, port, method, path, body = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
try:
    c = http.client.HTTPConnection(host, port, timeout=float(sys.argv[6]))
    c.request(method, path, body=body.encode() or None, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    print(json.dumps({"status": r.status, "body": r.read(65536).decode(errors="replace")}))
except Exception as e:
    print(json.dumps({"status": None, "body": type(e).__name__}))
"""


@pytest.fixture
def sleepy(tmp_path: Path) -> Iterator[tuple[Board, str]]:
    with make_board(tmp_path, {"idle": 60, "stop": "pause"}) as b:
        up = f"{b.prefix}up"
        sh("ip", "netns", "add", up)
        try:
            sh("ip", "link", "add", "eth0", "netns", b.dom0, "type", "veth", "peer", "name", "eth0", "netns", up)
            sh("ip", "-n", b.dom0, "addr", "add", f"{UPLINK}/24", "dev", "eth0")
            sh("ip", "-n", b.dom0, "link", "set", "eth0", "up")
            sh("ip", "-n", up, "addr", "add", f"{UPLINK_PEER}/24", "dev", "eth0")
            sh("ip", "-n", up, "link", "set", "eth0", "up")
            sh("ip", "-n", up, "route", "add", "default", "via", UPLINK)   # the venue's router knows the booth
            b.version("1.0", "busybox", deadline=30)
            os.symlink("1.0", tmp_path / "store/demo/current")
            b.procs.append(b.manager("run"))
            wait_for(lambda: b.state().get("state") == "asleep", 30, "the on-demand site to be asleep")
            yield b, up
        finally:
            sh("ip", "netns", "del", up, check=False)


def call(ns: str, host: str, port: int, method: str, path: str, body: str = "", timeout: float = 30) -> dict[str, Any]:
    p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CALL, host, str(port), method, path, body,
                        str(timeout)], capture_output=True, text=True, timeout=timeout + 30, check=True)
    return dict(json.loads(p.stdout))


def test_only_dom0_writes_a_sites_figures(sleepy: tuple[Board, str]):
    board, up = sleepy
    made_up = json.dumps(MADE_UP)
    # a visitor's POST wakes the sleeping site: the activator holds it and passes it on, from dom0's address
    through = call(board.visitor, SERVICE, 80, "POST", lifetime.PATH, made_up)
    st = board.state()
    assert st["state"] == "serving" and st["trigger"] == "connection", st
    status = json.loads(call(board.visitor, SERVICE, 80, "GET", "/cgi-bin/status")["body"])
    backend = st["backend"]
    # the uplink: the service address (dom0's own, the activator's while it slept) and the guest's figures port
    uplink = {"service": call(up, SERVICE, 80, "POST", lifetime.PATH, made_up, timeout=5),
              "figures": call(up, backend, lifetime.PORT, "POST", lifetime.PATH, made_up, timeout=3)}
    visitor_figures = call(board.visitor, backend, lifetime.PORT, "POST", lifetime.PATH, made_up, timeout=3)
    after = json.loads(call(board.visitor, SERVICE, 80, "GET", "/cgi-bin/status")["body"])
    print(f"\nvisitor's POST through the activator: {through['status']}; from the uplink: service address "
          f"{uplink['service']['status']} {uplink['service']['body'][:20]!r}, figures port "
          f"{uplink['figures']['status']} {uplink['figures']['body']}; visitor to the figures port "
          f"{visitor_figures['status']} {visitor_figures['body']}; the page's figures {after.get('trigger')!r}, "
          f"wakes today {after.get('wakes_today')}")
    assert through["status"] != 200 and "kept" not in through["body"], through
    for r in (*uplink.values(), visitor_figures):
        assert r["status"] != 200 and "kept" not in r["body"], r
    for told in (status, after):
        assert (told.get("trigger"), told.get("wakes_today"), told.get("version")) == ("connection", 1, "1.0"), told
        assert told.get("requests") != 999, told
