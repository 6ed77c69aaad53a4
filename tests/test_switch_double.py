"""The fast double of the board for the blue-green switch: a dom0 network namespace with the visitors' bridge
(br0, the service address) and the guests' bridge, the nftables ruleset loaded, a visitor namespace on br0, and
tests/xl_standin.py for xl (each "domain" a namespace on the guests' bridge running a tiny guest). The manager
runs inside dom0's namespace, as on the board, while the visitor fetches the service address in a loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from appliance import ROOT

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(c) for c in ("ip", "nft", "conntrack")),
                                 reason="needs root, ip, nft and conntrack (network namespaces)")]

ENTRY = ROOT / "overlays/booth/usr/local/sbin/appliance-guest"
STANDIN = ROOT / "tests/xl_standin.py"
SERVICE = "10.42.0.2"
TEMPLATE = ROOT / "overlays/booth/etc/nftables.conf.j2"
LEASE = ROOT / "overlays/booth/usr/local/sbin/appliance-lease"

# The contract's names (table inet appliance, map svc, nat prerouting and output chains, table bridge appliance
# with dom0_macs), until the booth's own ruleset has them.
MINIMAL_RULES = """
table inet appliance {
	map svc { type ipv4_addr . inet_service : ipv4_addr . inet_service; }
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		iifname "br0" meta l4proto tcp dnat ip to ip daddr . tcp dport map @svc
	}
	chain output {
		type nat hook output priority -100; policy accept;
		meta l4proto tcp dnat ip to ip daddr . tcp dport map @svc
	}
	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state established,related accept
		iifname "br0" oifname "brg0" ct status dnat accept
	}
}
table bridge appliance {
	set dom0_macs { type ether_addr; }
}
"""

VISITOR = r"""
import http.client, sys, time
stop = sys.argv[1]
import os
while not os.path.exists(stop):
    t = time.monotonic()
    try:
        c = http.client.HTTPConnection("10.42.0.2", 80, timeout=1.5)
        c.request("GET", "/")
        r = c.getresponse()
        body = r.read().decode()
        c.close()
        print(f"ok {r.status} {body}" if r.status == 200 else f"fail HTTP {r.status}", flush=True)
    except Exception as e:
        print(f"fail {type(e).__name__}", flush=True)
    time.sleep(max(0, 0.01 - (time.monotonic() - t)))
"""


def ruleset(on_demand: dict[str, Any] | None = None) -> str:
    """The booth's rendered nftables.conf; with on_demand, its one site sleeps until asked (the activator's
    accept rule is in the ruleset then)."""
    if "map svc" not in TEMPLATE.read_text():
        return MINIMAL_RULES
    from appliance import config
    from appliance.build import configure
    from appliance.identity import derive

    cfg = config.load("booth", sites=[{"on_demand": on_demand}] if on_demand else None)
    files = {f.rel: f.data for f in configure.render_overlays(cfg, configure.context(cfg, derive(cfg.digest)))
             if f.data}
    return files["etc/nftables.conf"].decode()


def sh(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, check=False, input=input)
    if check and p.returncode:
        raise AssertionError(f"{' '.join(argv)}: {p.stderr.strip()}")
    return p


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def zimage(behaviour: str) -> bytes:
    head = bytearray(0x30)
    head[0x24:0x28] = (0x016F2818).to_bytes(4, "little")
    return bytes(head) + behaviour.encode()


@dataclass
class Board:
    tmp: Path
    dom0: str
    visitor: str
    prefix: str
    env: dict[str, str]
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def version(self, version: str, behaviour: str, deadline: int = 5, memory: int = 64) -> None:
        import hashlib

        d = self.tmp / "store/demo" / version
        d.mkdir(parents=True)
        kernel = zimage(behaviour)
        (d / "vmlinuz").write_bytes(kernel)
        (d / "manifest.json").write_text(json.dumps({
            "name": "demo", "version": version, "kernel": "vmlinuz",
            "sha256": {"vmlinuz": hashlib.sha256(kernel).hexdigest()}, "memory": memory, "vcpus": 1, "port": 80,
            "cmdline": "console=hvc0 ip={address}::{gateway}:{netmask}:{domain}:eth0:off appliance.port={port}",
            "health": {"path": "/", "deadline": deadline}}))

    def manager(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", self.dom0, sys.executable, str(ENTRY), *args],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, *args: str, timeout: float = 60) -> tuple[int, dict[str, Any]]:
        p = self.manager(*args)
        out, err = p.communicate(timeout=timeout)
        assert "Traceback" not in err, err
        return p.returncode, json.loads(out)

    def state(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.tmp / "run/demo/state.json").read_text()))
        except (OSError, ValueError):
            return {}

    def supervise(self, current: str) -> subprocess.Popen[str]:
        os.symlink(current, self.tmp / "store/demo/current")
        sup = self.manager("run")
        self.procs.append(sup)
        wait_for(lambda: self.state().get("state") == "serving", 30, "the supervisor to serve the site")
        return sup

    def visit(self) -> Visitor:
        return Visitor(self)

    def another_visitor(self, n: int, address: str) -> str:
        """A second station on the visitors' bridge (its own namespace, MAC and wifi port), with the address
        dnsmasq would have leased it put in the firewall by the board's lease script; its namespace goes with the
        board's."""
        ns, port = f"{self.prefix}v{n}", f"wlan{n}"
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", self.dom0, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", self.dom0, "link", "set", port, "master", "br0", "up")
        v = ["ip", "-n", ns]
        sh(*v, "link", "set", "lo", "up")
        sh(*v, "addr", "add", f"{address}/22", "dev", "eth0")
        sh(*v, "link", "set", "eth0", "up")
        sh(*v, "route", "add", "default", "via", "10.42.0.1")
        mac = json.loads(sh(*v, "-j", "link", "show", "eth0").stdout)[0]["address"]
        sh("ip", "netns", "exec", self.dom0, "env", "DNSMASQ_TIME_REMAINING=3600", str(LEASE), "add", mac, address)
        return ns


class Visitor:
    """A visitor fetching the service address in a loop, one connection per request."""

    def __init__(self, board: Board) -> None:
        self.board, self.stopfile = board, board.tmp / f"stop-visitor-{time.monotonic_ns()}"
        self.out = board.tmp / f"visitor-{time.monotonic_ns()}.log"
        self.f = open(self.out, "w")
        self.proc = subprocess.Popen(["ip", "netns", "exec", board.visitor, sys.executable, "-c", VISITOR,
                                      str(self.stopfile)], stdout=self.f, text=True)
        board.procs.append(self.proc)

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines()

    def finish(self, more: int = 20) -> list[str]:
        n = len(self.lines())
        wait_for(lambda: len(self.lines()) >= n + more, 30, "the visitor's requests after the switch")
        self.stopfile.touch()
        self.proc.wait(10)
        self.f.close()
        return self.lines()


def pages(lines: list[str]) -> list[str]:
    """The distinct pages in the order they came."""
    out: list[str] = []
    for line in lines:
        if line.startswith("ok ") and (not out or out[-1] != line):
            out.append(line)
    return out


@pytest.fixture
def board(tmp_path: Path) -> Iterator[Board]:
    with make_board(tmp_path) as b:
        yield b


@contextlib.contextmanager
def make_board(tmp_path: Path, on_demand: dict[str, Any] | None = None) -> Iterator[Board]:
    tag = f"sd{os.getpid() % 100000}"
    dom0, visitor, prefix = f"{tag}d0", f"{tag}v", f"{tag}g"
    for ns in (dom0, visitor):
        if sh("ip", "netns", "add", ns, check=False).returncode:
            pytest.skip("cannot make network namespaces here")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "APPLIANCE_SITES": str(tmp_path / "sites.json"),
           "APPLIANCE_STORE": str(tmp_path / "store"), "APPLIANCE_RUN": str(tmp_path / "run"),
           "APPLIANCE_CONSOLE": str(tmp_path / "console"), "APPLIANCE_XL": f"{sys.executable} {STANDIN}",
           "XL_STANDIN_DIR": str(tmp_path / "xl"), "XL_STANDIN_PREFIX": prefix,
           "XL_STANDIN_CONSOLE": str(tmp_path / "console"), "XL_STANDIN_MEMORY": "256",
           "APPLIANCE_SLOTS": str(tmp_path / "slots")}
    b = Board(tmp_path, dom0, visitor, prefix, env)
    try:
        d = ["ip", "-n", dom0]
        sh(*d, "link", "set", "lo", "up")
        sh(*d, "link", "add", "br0", "type", "bridge")
        sh(*d, "link", "add", "brg0", "type", "bridge")
        sh(*d, "addr", "add", "10.42.0.1/22", "dev", "br0")
        sh(*d, "addr", "add", f"{SERVICE}/22", "dev", "br0")
        sh(*d, "addr", "add", "10.42.100.1/24", "dev", "brg0")
        sh(*d, "link", "add", "wlan0", "type", "veth", "peer", "name", "eth0", "netns", visitor)
        sh(*d, "link", "set", "wlan0", "master", "br0", "up")
        for br in ("br0", "brg0"):
            sh(*d, "link", "set", br, "up")
        sh("ip", "netns", "exec", dom0, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("ip", "netns", "exec", dom0, "nft", "-f", "-", input=ruleset(on_demand))
        v = ["ip", "-n", visitor]
        sh(*v, "link", "set", "lo", "up")
        sh(*v, "addr", "add", "10.42.0.100/22", "dev", "eth0")
        sh(*v, "link", "set", "eth0", "up")
        sh(*v, "route", "add", "default", "via", "10.42.0.1")
        # the visitor's address as dnsmasq would have leased it: the board's lease script puts it in the firewall
        mac = json.loads(sh(*v, "-j", "link", "show", "eth0").stdout)[0]["address"]
        sh("ip", "netns", "exec", dom0, "env", "DNSMASQ_TIME_REMAINING=3600", str(LEASE), "add", mac, "10.42.0.100")
        (tmp_path / "sites.json").write_text(json.dumps({
            "visitors": {"bridge": "br0", "address": "10.42.0.1", "prefix": 22, "netmask": "255.255.252.0"},
            "guests": {"bridge": "brg0", "address": "10.42.100.1", "prefix": 24, "netmask": "255.255.255.0"},
            "sites": {"demo": {"names": ["demo.booth"], "address": SERVICE, "port": 80, "memory": 64, "vcpus": 1,
                               "health_path": "/", "deadline": 120, "drain": 3,
                               "slots": {"blue": {"address": "10.42.100.10", "mac": "00:16:3e:2a:64:0a"},
                                         "green": {"address": "10.42.100.11", "mac": "00:16:3e:2a:64:0b"}},
                               "probe_interval": 0.3, "probe_failures": 3, "stop_grace": 1,
                               **({"on_demand": on_demand} if on_demand else {})}}}))
        (tmp_path / "slots").write_text("".join(   # /etc/appliance/slots, as the booth's template writes it
            f"{sl['mac']} {sl['address']} {name}.{slot}\n"
            for name, site in json.loads((tmp_path / "sites.json").read_text())["sites"].items()
            for slot, sl in site["slots"].items()))
        (tmp_path / "store/demo").mkdir(parents=True)
        yield b
    finally:
        for p in reversed(b.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for f in (tmp_path / "xl").glob("*.json"):
            try:
                os.killpg(json.loads(f.read_text())["pid"], signal.SIGKILL)
            except (ProcessLookupError, ValueError, KeyError):
                pass
        names = sh("ip", "netns", "list", check=False).stdout.split()
        for ns in [dom0, visitor, *[n for n in names if n.startswith(prefix)]]:
            sh("ip", "netns", "del", ns, check=False)


def failures(lines: list[str]) -> list[str]:
    return [line for line in lines if not line.startswith("ok ")]


def test_blue_green_switch_drops_no_request(board: Board):
    board.version("1.0", "serve:page one")
    board.version("2.0", "serve:page two")
    board.supervise("1.0")
    assert board.run("status", "demo")[1]["map"] == f"{SERVICE}:80 -> 10.42.100.10:80"
    mac = sh("ip", "-n", board.dom0, "-j", "link", "show", "br0").stdout
    macs = sh("ip", "netns", "exec", board.dom0, "nft", "list", "set", "bridge", "appliance", "dom0_macs").stdout
    assert json.loads(mac)[0]["address"] in macs, "the supervisor put br0's MAC in the bridge filter"
    visitor = board.visit()
    wait_for(lambda: len(visitor.lines()) >= 20, 10, "the visitor's first pages")
    t0 = time.monotonic()
    rc, out = board.run("switch", "demo", "2.0")
    wall = time.monotonic() - t0
    lines = visitor.finish()
    assert rc == 0, out
    assert (out["from"], out["slot"], out["backend"], out["stopped"]) == ("1.0", "green", "10.42.100.11:80",
                                                                         "demo.blue")
    assert failures(lines) == [], failures(lines)[:5]
    assert pages(lines) == ["ok 200 page one", "ok 200 page two"]
    print(f"\nblue-green: {len(lines)} requests, {len(failures(lines))} failed; nft {out['switch_ms']} ms, "
          f"start+health {out['start_ms']} ms, drain {out['drain_ms']} ms, switch command {wall:.2f} s")
    rc, st = board.run("status", "demo")
    assert rc == 0 and (st["current"], st["previous"], st["version"], st["slot"]) == ("2.0", "1.0", "2.0", "green")
    wait_for(lambda: board.state().get("slot") == "green", 5, "the supervisor to follow")


@pytest.mark.parametrize("behaviour, reason", [
    ("never-answer", "site demo: version 2.0 in demo.green did not answer at http://10.42.100.11:80/ within 5 s"),
    ("crash-after:0.5", "site demo: version 2.0 in demo.green stopped before it answered at "
                        "http://10.42.100.11:80/ (it crashed or shut down)"),
])
def test_a_failing_version_leaves_the_old_one_serving(board: Board, behaviour: str, reason: str):
    board.version("1.0", "serve:page one")
    board.version("2.0", behaviour)
    board.supervise("1.0")
    visitor = board.visit()
    wait_for(lambda: len(visitor.lines()) >= 20, 10, "the visitor's first pages")
    rc, out = board.run("switch", "demo", "2.0")
    lines = visitor.finish()
    assert rc == 1 and out["error"].startswith(reason), out
    assert "; 1.0 keeps serving from demo.blue; its console ends: " in out["error"], [(p.name, p.read_text()) for p in (board.tmp / "console").iterdir()]
    assert "\n" not in out["error"]
    assert f"stand-in guest: {behaviour}" in out["console"]
    if behaviour.startswith("crash"):
        assert out["console"][-1].startswith("Kernel panic - not syncing")
    assert failures(lines) == [] and pages(lines) == ["ok 200 page one"]
    rc, st = board.run("status", "demo")
    assert rc == 0 and (st["current"], st["version"], st["slot"]) == ("1.0", "1.0", "blue")
    gone = subprocess.run(["ip", "netns", "exec", board.dom0, sys.executable, str(STANDIN), "domid", "demo.green"],
                          capture_output=True, text=True, env=board.env, check=False)
    assert gone.returncode != 0 and "Can't get domid" in gone.stderr, "the failed guest is destroyed"


def test_out_of_memory_is_refused_before_a_start(board: Board):
    board.version("1.0", "serve:page one")
    board.version("2.0", "serve:page two", memory=250)
    board.supervise("1.0")
    rc, out = board.run("switch", "demo", "2.0")
    assert rc == 1 and out["error"] == ("site demo: version 2.0 needs 250 MiB and Xen has 192 MiB free (out of "
                                        "memory); 1.0 keeps serving from demo.blue")


def test_a_second_switch_is_refused_naming_the_first(board: Board):
    board.version("1.0", "serve:page one")
    board.version("2.0", "slow-start:5:page two", deadline=15)
    board.version("3.0", "serve:page three")
    board.supervise("1.0")
    first = board.manager("switch", "demo", "2.0")
    wait_for(lambda: '"switch"' in (board.tmp / "run/demo/lock").read_text(), 10, "the first switch's lock")
    holder = json.loads((board.tmp / "run/demo/lock").read_text())
    rc, out = board.run("switch", "demo", "3.0")
    assert rc == 1 and out["error"].startswith(f"site demo: busy: {board.tmp}/run/demo/lock is held by pid "
                                               f"{holder['pid']} (switch of version 2.0, since "), out
    out1, _ = first.communicate(timeout=60)
    assert first.returncode == 0 and json.loads(out1)["version"] == "2.0"


def test_a_cold_switch_fails_requests(board: Board):
    board.version("1.0", "serve:page one")
    # the new guest takes 2 s to answer (its port closed meanwhile), longer than the visitor's 1.5 s timeout: a
    # request in the gap fails whatever the timing (with an instant guest the gap was 0.5-1 s, and a request whose
    # SYN went unanswered there could come through on its retransmission: 0 failures now and then, a flaky test)
    board.version("2.0", "slow-start:2:page two")
    board.supervise("1.0")
    visitor = board.visit()
    wait_for(lambda: len(visitor.lines()) >= 20, 10, "the visitor's first pages")
    t0 = time.monotonic()
    rc, out = board.run("switch", "--cold", "demo", "2.0")
    wall = time.monotonic() - t0
    lines = visitor.finish()
    assert rc == 0 and out["cold"] and out["slot"] == "blue", out
    assert pages(lines)[-1] == "ok 200 page two"
    assert failures(lines), "destroy-then-create leaves the site without a guest for a while"
    print(f"\ncold: {len(lines)} requests, {len(failures(lines))} failed; switch {out['switch_ms']} ms, "
          f"command {wall:.2f} s")
