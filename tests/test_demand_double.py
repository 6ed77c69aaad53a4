"""On-demand sites on the fast double of the board (test_switch_double's namespaces, the booth's rendered
nftables rules with the activator's accept rule, tests/xl_standin.py for xl): a visitor's connection to a
sleeping site is held by dom0 until a guest that takes 5 s to come up answers; the guest stops after idle and
the next visitor wakes it again; a DNS query for the site's name wakes it without any connection.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_switch_double import SERVICE, STANDIN, Board, failures, make_board, wait_for

from appliance.manager import demand

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")]

IDLE = 3

FETCH = r"""
import http.client, json, sys, time
t = time.monotonic()
try:
    c = http.client.HTTPConnection(sys.argv[1], 80, timeout=60)
    c.request("GET", sys.argv[2])
    r = c.getresponse()
    print(json.dumps({"status": r.status, "body": r.read().decode(), "s": time.monotonic() - t}))
except Exception as e:
    print(json.dumps({"status": None, "body": type(e).__name__, "s": time.monotonic() - t}))
"""

ASK = r"""
import socket, struct, sys
name, qtype = sys.argv[1], int(sys.argv[2])
q = struct.pack("!6H", 7, 0x0100, 1, 0, 0, 0) + b"".join(bytes([len(l)]) + l.encode() for l in name.split("."))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(q + b"\0" + struct.pack("!2H", qtype, 1), ("127.0.0.1", 5354))
sys.stdout.buffer.write(s.recv(512))
"""


@pytest.fixture(params=["destroy", "pause"])
def sleepy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Board]:
    with make_board(tmp_path, {"idle": IDLE, "stop": request.param}) as b:
        b.version("1.0", "slow-start:5:page one", deadline=30)
        os.symlink("1.0", tmp_path / "store/demo/current")
        b.procs.append(b.manager("run"))
        wait_for(lambda: b.state().get("state") == "asleep", 30, "the on-demand site to be asleep")
        yield b


def fetch(board: Board, path: str = "/") -> dict[str, Any]:
    p = subprocess.run(["ip", "netns", "exec", board.visitor, sys.executable, "-c", FETCH, SERVICE, path],
                       capture_output=True, text=True, timeout=90, check=True)
    return dict(json.loads(p.stdout))


def domain(board: Board, *args: str) -> subprocess.CompletedProcess[str]:
    """The xl stand-in's answer about demo.blue (with the board's environment: its state directory)."""
    p = subprocess.run(["ip", "netns", "exec", board.dom0, sys.executable, str(STANDIN), *args, "demo.blue"],
                       capture_output=True, text=True, env=board.env, check=False)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def test_a_held_connection_is_answered_once_the_guest_is_up(sleepy: Board):
    stop = sleepy.state()["on_demand"]["stop"]
    assert domain(sleepy, "domid").returncode != 0, "nothing runs before a visitor asks"
    first = fetch(sleepy)
    assert (first["status"], first["body"]) == (200, "page one"), first
    assert first["s"] >= 5, f"the guest takes 5 s to come up; the answer came after {first['s']:.1f} s"
    st = sleepy.state()
    assert (st["state"], st["trigger"], st["wakes_today"], st["version"]) == ("serving", "connection", 1, "1.0")
    assert 5000 <= st["wake_ms"] <= first["s"] * 1000 + 500, (st["wake_ms"], first["s"])
    told = json.loads(fetch(sleepy, "/cgi-bin/status")["body"])
    assert {k: told.get(k) for k in ("site", "woken", "wake_ms", "trigger", "wakes_today", "version")} == {
        "site": "demo", "woken": st["woken"], "wake_ms": st["wake_ms"], "trigger": "connection", "wakes_today": 1,
        "version": "1.0"}, "the guest was told its wake before the held connection went on"
    assert told["sites"]["demo"]["on_demand"] == {"idle": IDLE, "stop": stop}
    domid = domain(sleepy, "domid").stdout.strip()
    visitor = sleepy.visit()                      # once awake, connections go straight to the guest
    lines = visitor.finish(30)
    assert failures(lines) == [] and len(lines) >= 30, failures(lines)[:5]
    wait_for(lambda: (sleepy.state().get("requests") or 0) >= 30, 10, "the connections counted")
    want = "paused" if stop == "pause" else "asleep"
    wait_for(lambda: sleepy.state().get("state") == want, IDLE + 15, f"the idle guest to be {want}")
    if stop == "pause":
        assert "--p---" in domain(sleepy, "list").stdout, "paused, not destroyed"
    else:
        assert domain(sleepy, "domid").returncode != 0, "destroyed after idle"
    again = fetch(sleepy)
    assert (again["status"], again["body"]) == (200, "page one"), again
    st = sleepy.state()
    assert (st["state"], st["wakes_today"], st["trigger"]) == ("serving", 2, "connection")
    if stop == "pause":
        assert domain(sleepy, "domid").stdout.strip() == domid, "unpaused: the same domain"
        assert again["s"] < first["s"], "an unpause is quicker than a boot"
    print(f"\nwake ({stop}): first answer {first['s']:.2f} s (wake {st['wake_ms']} ms), again {again['s']:.2f} s")


def test_a_dns_query_wakes_the_site_and_aaaa_gets_no_address(sleepy: Board):
    def ask(name: str, qtype: int) -> tuple[int, int, bytes]:
        p = subprocess.run(["ip", "netns", "exec", sleepy.dom0, sys.executable, "-c", ASK, name, str(qtype)],
                           capture_output=True, timeout=30, check=True)
        r = p.stdout
        return r[3] & 0xF, struct.unpack("!H", r[6:8])[0], r[-4:]

    rcode, answers, _ = ask("demo.booth", 28)
    assert (rcode, answers) == (0, 0), "AAAA: no address, no error"
    rcode, answers, address = ask("DEMO.booth", 1)
    assert (rcode, answers, socket.inet_ntoa(address)) == (0, 1, SERVICE)
    # the visitor connects at once, while the query's wake boots the guest: held, and the page has the figures
    first = fetch(sleepy, "/cgi-bin/status")
    assert first["status"] == 200 and first["s"] >= 3, first
    st = sleepy.state()
    assert st["state"] == "serving" and st["trigger"] == "dns query" and st["wakes_today"] == 1, st
    told = json.loads(first["body"])
    assert (told.get("trigger"), told.get("woken")) == ("dns query", st["woken"]), told
    assert ask("other.example", 1)[0] == 5, "a name that is no site's is refused"



def test_a_switch_while_the_site_sleeps_serves_the_new_version_then_idles(sleepy: Board):
    stop = sleepy.state()["on_demand"]["stop"]
    first = fetch(sleepy)                          # woken once, then left to idle
    assert first["body"] == "page one"
    want = "paused" if stop == "pause" else "asleep"
    wait_for(lambda: sleepy.state().get("state") == want, IDLE + 15, f"the idle guest to be {want}")
    sleepy.version("2.0", "serve:page two")
    rc, out = sleepy.run("switch", "demo", "2.0")
    assert rc == 0 and out["ok"], out
    wait_for(lambda: (sleepy.state().get("state"), sleepy.state().get("version")) == ("serving", "2.0"), 10,
             "the on-demand site to take the switch's guest as serving")
    again = fetch(sleepy)
    assert (again["status"], again["body"]) == (200, "page two") and again["s"] < 5, again
    assert sleepy.state()["trigger"] == "switch"
    wait_for(lambda: sleepy.state().get("state") == want, IDLE + 15, f"the switched guest to be {want} when idle")
    rc, running = sleepy.run("status", "demo")
    assert rc == 0 and running["current"] == "2.0" and running["ok"], running


def test_a_site_that_wakes_at_boot_serves_before_any_visitor_then_idles(tmp_path: Path):
    """`wake_at_boot` (the booth's captive site): the manager wakes it as it starts, with no visitor and no query;
    the page says the boot woke it; then it idles and sleeps as any on-demand site does."""
    idle = 10      # long enough that the look below comes before the idle stop
    with make_board(tmp_path, {"idle": idle, "stop": "destroy", "wake_at_boot": True}) as b:
        b.version("1.0", "slow-start:2:page one", deadline=30)
        os.symlink("1.0", tmp_path / "store/demo/current")
        b.procs.append(b.manager("run"))
        wait_for(lambda: b.state().get("state") == "serving", 60, "the site woken at boot")
        st = b.state()
        assert (st["trigger"], st["wakes_today"], st["version"]) == ("boot", 1, "1.0"), st
        assert domain(b, "domid").returncode == 0, "its guest runs before any visitor asked"
        made = json.loads((tmp_path / "xl/demo.blue.json").read_text())
        assert made["nice"] == demand.BOOT_WAKE_NICE, "xl create ran below the visitors' path's priority"
        wait_for(lambda: b.state().get("state") == "asleep", idle + 15, "the site asleep after idle")
        first = fetch(b)
        assert (first["status"], first["body"]) == (200, "page one"), first
        st = b.state()
        assert (st["state"], st["trigger"], st["wakes_today"]) == ("serving", "connection", 2), st
