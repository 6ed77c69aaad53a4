"""On-demand sites, the pure parts: the wake-on-DNS answers, the idle and memory decisions, the settings and the
recipe key, the rendered dnsmasq and nftables lines. The network side runs in test_demand_double.py."""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
from test_manager import FakeNet, sites_json

from appliance import config, errors
from appliance.build import configure
from appliance.identity import derive
from appliance.manager import demand, dns
from appliance.manager.context import Context
from appliance.manager.errors import Error
from appliance.manager.settings import load as load_settings

pytestmark = pytest.mark.unit

NAMES = {"demo.booth": "10.42.0.2", "about.booth": "10.42.0.3"}


def query(name: str, qtype: int = dns.A, qid: int = 0x1234, flags: int = 0x0100) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!6H", qid, flags, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!2H", qtype, dns.IN)


def decode(reply: bytes) -> tuple[int, int, int, list[str]]:
    """id, rcode, answer count, the A records' addresses."""
    qid, flags, _, an, _, _ = struct.unpack("!6H", reply[:12])
    addresses = [socket.inet_ntoa(reply[-4 * (i + 1):len(reply) - 4 * i]) for i in range(an)]
    return qid, flags & 0xF, an, addresses


@pytest.mark.parametrize("name, qtype, want, woken", [
    ("demo.booth", dns.A, (0, 1, ["10.42.0.2"]), "demo.booth"),
    ("DeMo.Booth", dns.A, (0, 1, ["10.42.0.2"]), "demo.booth"),
    ("www.about.booth", dns.A, (0, 1, ["10.42.0.3"]), "about.booth"),
    ("demo.booth", dns.AAAA, (0, 0, []), "demo.booth"),          # no address, no error: phones do not stall
    ("demo.booth", 16, (0, 0, []), "demo.booth"),                 # TXT likewise
    ("other.example", dns.A, (dns.REFUSED, 0, []), None),
    ("booth", dns.A, (dns.REFUSED, 0, []), None),
])
def test_dns_answers(name: str, qtype: int, want: tuple[int, int, list[str]], woken: str | None):
    reply, asked = dns.respond(query(name, qtype), NAMES)
    assert reply is not None
    qid, rcode, an, addresses = decode(reply)
    assert (qid, rcode, an, addresses) == (0x1234, *want)
    assert asked == woken
    assert reply[12:12 + len(query(name, qtype)) - 12] == query(name, qtype)[12:], "the question is echoed"
    if an:
        assert struct.unpack("!I", reply[-10:-6])[0] == dns.TTL


@pytest.mark.parametrize("packet, rcode", [
    (b"\x12\x34\x01", None),                                      # not even a header: dropped
    (query("demo.booth", flags=0x8100), None),                    # an answer, not a query: dropped
    (query("demo.booth", flags=0x2900), dns.FORMERR),             # an UPDATE
    (query("demo.booth")[:-3], dns.FORMERR),                      # cut short
    (query("demo.booth")[:12] + b"\xc0\x0c" + b"\0\x01\0\x01", dns.FORMERR),   # a pointer in the question
    (query("demo.booth").replace(b"demo", b"d\xe9mo"), dns.FORMERR),
])
def test_dns_malformed(packet: bytes, rcode: int | None):
    reply, asked = dns.respond(packet, NAMES)
    assert asked is None
    if rcode is None:
        assert reply is None
    else:
        assert reply is not None and decode(reply)[:2] == (0x1234, rcode)


def test_dns_server_answers_first_and_wakes():
    asked: list[str] = []
    got = threading.Event()

    def on_query(name: str) -> None:
        asked.append(name)
        got.set()

    server = dns.Server(("127.0.0.1", 0), NAMES, on_query).start()
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.sendto(query("about.booth"), server.address)
        assert decode(s.recv(512))[3] == ["10.42.0.3"]
        assert got.wait(5) and asked == ["about.booth"]
        with pytest.raises(Error, match=r"^dns: cannot listen on 127\.0\.0\.1:\d+/udp: "):
            dns.Server(server.address, NAMES, on_query)
    finally:
        server.close()


@pytest.mark.parametrize("need, free, others, want", [
    (64, 100, [("a", 1.0, 64)], []),
    (64, 10, [("new", 9.0, 64), ("old", 1.0, 64)], ["old"]),
    (128, 10, [("new", 9.0, 64), ("old", 1.0, 64), ("mid", 5.0, 64)], ["old", "mid"]),
    (100, 10, [("new", 9.0, 64), ("old", 1.0, 32)], ["old", "new"]),
    (512, 10, [("new", 9.0, 64), ("old", 1.0, 64)], None),
    (64, 10, [], None),
])
def test_who_makes_room(need: int, free: int, others: list[tuple[str, float, int]], want: list[str] | None):
    assert demand.victims(need, free, others) == want


def test_idle_counts_only_without_connections():
    assert demand.idle_for(100.0, 40.0, 0, 0) == 60.0
    assert demand.idle_for(100.0, 40.0, 1, 0) == 0.0
    assert demand.idle_for(100.0, 40.0, 0, 1) == 0.0
    assert demand.idle_for(100.0, 140.0, 0, 0) == 0.0


class RoomXl:
    """xl's memory as the sites hold it: free is what is left of total."""

    def __init__(self, total: int, sites: list[demand.DemandSite]) -> None:
        self.total, self.sites, self.destroyed = total, sites, []

    def free_memory(self) -> int:
        return self.total - sum(d.memory for d in self.sites)

    def destroy(self, name: str) -> None:
        self.destroyed.append(name)

    def domid(self, name: str) -> int | None:
        return None


def test_make_room_stops_the_longest_idle_and_never_a_busy_one(tmp_path: Path):
    (tmp_path / "sites.json").write_text(json.dumps(sites_json(on_demand={"idle": 30, "stop": "destroy"})))
    ctx = Context.from_env({"APPLIANCE_SITES": str(tmp_path / "sites.json"), "APPLIANCE_RUN": str(tmp_path / "run"),
                            "APPLIANCE_STORE": str(tmp_path / "store")})
    ctx.net = FakeNet()
    site = ctx.settings.site("demo")
    stop = threading.Event()
    registry: list[demand.DemandSite] = []
    me, busy, idle = (demand.DemandSite(ctx, site, stop, registry) for _ in range(3))
    others = {"busy": busy, "idle": idle}
    for name, d in others.items():
        d.site = type(site)(**{**site.__dict__, "name": name})
        d.state, d.memory, d.slot = "serving", 300, dataclasses.replace(site.slots[0], domain=f"{name}.blue")
        d.write()                                      # as a serving site's state says
    busy.held, busy.last, idle.last = 1, 0.0, 5.0      # the busy one has idled longer, but holds a visitor
    registry += [me, busy, idle]
    ctx.xl = RoomXl(700, registry)                     # type: ignore[assignment]
    me.make_room(200)                                  # 100 free: idle must go
    assert ctx.xl.destroyed == ["idle.blue"] and idle.state == "asleep" and busy.state == "serving"
    with pytest.raises(demand.NoRoom, match=r"^site demo: needs 500 MiB and Xen has 400 MiB free, even with every "
                                            r"idle on-demand site stopped; nothing was stopped$"):
        me.make_room(500)
    assert ctx.xl.destroyed == ["idle.blue"] and busy.state == "serving"


class SwitchingNet(FakeNet):
    """The map and conntrack of a serving on-demand site; `during_look` runs inside the manager's conntrack look,
    as a switch in another process may (each look is a process of its own on the board: hundreds of ms)."""

    def __init__(self) -> None:
        super().__init__()
        self.during_look: list[Any] = []
        self.removed: list[tuple[str, int]] = []
        self.next_id = 0

    def remove(self, address: str, port: int) -> None:
        self.removed.append((address, port))
        self.map.pop((address, port), None)

    def connections(self, service: str, backend: str, background: bool = True) -> tuple[set[int], int]:
        while self.during_look:
            self.during_look.pop(0)()
        self.next_id += 1                   # a steady visitor: a new connection every look
        return {self.next_id}, 0


class Domains:
    """xl's domains by name."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)

    def domid(self, name: str) -> int | None:
        return 1 if name in self.names else None


@pytest.fixture
def serving_demo(tmp_path: Path) -> tuple[Context, demand.DemandSite]:
    """The on-demand site demo serving 1.0 from its blue slot, as the manager's thread for it sees it."""
    (tmp_path / "sites.json").write_text(json.dumps(sites_json(on_demand={"idle": 3600, "stop": "destroy"})))
    ctx = Context.from_env({"APPLIANCE_SITES": str(tmp_path / "sites.json"), "APPLIANCE_RUN": str(tmp_path / "run"),
                            "APPLIANCE_STORE": str(tmp_path / "store")})
    ctx.net, ctx.xl = SwitchingNet(), Domains("demo.blue")          # type: ignore[assignment]
    site = ctx.settings.site("demo")
    blue = site.slot("blue")
    ctx.net.point(site.address, site.port, blue.address, 80)
    d = demand.DemandSite(ctx, site, threading.Event())
    d.state, d.slot, d.version, d.port = "serving", blue, "1.0", 80
    d.write()
    return ctx, d


def switch_to_green(ctx: Context, d: demand.DemandSite) -> None:
    """What `appliance-guest switch demo 2.0` does in its own process, under the site's lock: green starts, the
    map moves to it, the state says so, blue drains and stops."""
    site, green = d.site, d.site.slot("green")
    with ctx.lock(site, "switch", "2.0"):
        ctx.xl.names.add(green.domain)                                # type: ignore[attr-defined]
        ctx.net.point(site.address, site.port, green.address, 80)
        ctx.write_state(site, state="serving", slot="green", domain=green.domain, version="2.0",
                        backend=green.address, port=80)
        ctx.xl.names.discard(site.slot("blue").domain)               # type: ignore[attr-defined]


def test_a_switch_during_a_look_is_followed_not_undone(serving_demo):
    """A switch that lands while the manager counts the old guest's connections: the manager's figures must not
    put the old slot back in the state, and the old guest, stopped by the switch, is not a crash (the new guest's
    map element stayed; before, it went, and the next visitor waited for a wake of a site that was serving)."""
    ctx, d = serving_demo
    ctx.net.during_look.append(lambda: switch_to_green(ctx, d))
    for _ in range(3):
        d._next_look = 0.0                # look for the domain on every tick
        d.tick(1000.0)
    site = d.site
    st = ctx.read_state(site)
    assert ctx.net.active(site.address, site.port) == ("127.0.0.2", 80) and ctx.net.removed == []
    assert (st["slot"], st["version"], st["state"]) == ("green", "2.0", "serving")
    assert (d.state, d.slot.name, d.version) == ("serving", "green", "2.0")


def test_a_gone_guest_waits_for_a_switch_at_work(serving_demo):
    """The serving domain gone while a switch holds the lock: nothing is removed until the switch is done (then it
    is followed); gone with nobody at work: its map element goes, and the site sleeps until a visitor comes."""
    ctx, d = serving_demo
    site = d.site
    ctx.xl.names.clear()
    with ctx.lock(site, "switch", "2.0"):
        d.tick(1000.0)
    assert ctx.net.removed == [] and d.state == "serving"
    d._next_look = 0.0
    d.tick(1001.0)
    assert ctx.net.removed == [(site.address, site.port)] and d.state == "asleep"
    assert ctx.read_state(site)["error"] == "demo.blue was gone"


def test_status_page_says_why():
    page = demand.status_page(type("S", (), {"name": "game"})(), "No memory free.")  # type: ignore[arg-type]
    head, body = page.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"Retry-After: 30" in head
    assert f"Content-Length: {len(body)}".encode() in head and b"No memory free." in body


@pytest.mark.parametrize("on_demand, message", [
    ({"idle": 30}, "sites.demo.on_demand: stop is missing"),
    ({"idle": 30, "stop": "sleep"}, "sites.demo.on_demand.stop: 'sleep' must be destroy or pause"),
    ({"idle": 1, "stop": "pause"}, "sites.demo.on_demand.idle: 1 must be a number of seconds from 2 to 86400"),
    ({"idle": 30, "stop": "pause", "ttl": 3},
     "sites.demo.on_demand: unknown key 'ttl' (known: idle, stop, wake_at_boot)"),
    ({"idle": 30, "stop": "pause", "wake_at_boot": "yes"}, "sites.demo.on_demand.wake_at_boot: 'yes' must be true or false"),
])
def test_bad_on_demand_in_sites_json(tmp_path: Path, on_demand: dict[str, Any], message: str):
    p = tmp_path / "sites.json"
    p.write_text(json.dumps(sites_json(on_demand=on_demand)))
    with pytest.raises(Error) as err:
        load_settings(p)
    assert str(err.value) == f"{p}: {message}"


@pytest.mark.parametrize("on_demand, message", [
    ({"idle": 0}, "sites[0].on_demand.idle: 0 must be 2 to 86400 (seconds)"),
    ({"stop": "sleep"}, "sites[0].on_demand.stop: 'sleep' must be 'destroy' or 'pause'"),
    ({"ttl": 3}, "sites[0].on_demand.ttl: unknown key"),
])
def test_bad_on_demand_in_a_recipe(on_demand: dict[str, Any], message: str):
    with pytest.raises(errors.RecipeError) as err:
        config.load("booth", sites=[{"on_demand": on_demand}])
    assert str(err.value).endswith(message), str(err.value)


def rendered(**overrides: Any) -> dict[str, str]:
    cfg = config.load("booth", **overrides)
    return {f.rel: f.data.decode() for f in configure.render_overlays(cfg, configure.context(cfg, derive(cfg.digest)))
            if f.data and f.rel in ("etc/dnsmasq.d/appliance.conf", "etc/nftables.conf", "etc/appliance/sites.json")}


def test_an_on_demand_site_in_the_rendered_files():
    always = rendered(sites=[{}])
    assert "address=/demo.booth/10.42.0.2" in always["etc/dnsmasq.d/appliance.conf"].splitlines()
    assert "activator" not in always["etc/nftables.conf"]
    assert json.loads(always["etc/appliance/sites.json"])["sites"]["demo"]["on_demand"] is None
    sleepy = rendered()                # the booth as shipped: the game and `make` on demand, about always on
    lines = sleepy["etc/dnsmasq.d/appliance.conf"].splitlines()
    assert "server=/demo.booth/127.0.0.1#5354" in lines and "address=/demo.booth/10.42.0.2" not in lines
    assert "server=/make.booth/127.0.0.1#5354" in lines and "address=/make.booth/10.42.0.4" not in lines
    assert "address=/about.booth/10.42.0.3" in lines and "address=/#/10.42.0.2" in lines
    rule = [line.strip() for line in sleepy["etc/nftables.conf"].splitlines() if "activator" in line]
    assert rule == ['ip daddr . tcp dport { 10.42.0.2 . 80, 10.42.0.4 . 80 } accept comment "an on-demand '
                    'site\'s activator, while it sleeps"']
    board = json.loads(sleepy["etc/appliance/sites.json"])["sites"]
    assert board["demo"]["on_demand"] == {"idle": 120, "stop": "destroy", "wake_at_boot": True}
    assert board["about"]["on_demand"] is None
    assert board["make"]["on_demand"] == {"idle": 120, "stop": "pause"}


def test_on_demand_changed_on_the_board(tmp_path: Path):
    from test_manager import cli

    (tmp_path / "sites.json").write_text(json.dumps(sites_json(on_demand={"idle": 60, "stop": "destroy"})))
    rc, out, _ = cli(tmp_path, "on-demand", "demo", "--idle", "5")
    assert rc == 0 and out == {"ok": True, "site": "demo", "on_demand": {"idle": 5.0, "stop": "destroy"}}
    rc, out, _ = cli(tmp_path, "on-demand", "demo", "--stop", "pause")
    assert rc == 0 and out["on_demand"] == {"idle": 5.0, "stop": "pause"}
    assert cli(tmp_path, "status", "demo")[1]["on_demand"] == {"idle": 5.0, "stop": "pause"}
    rc, out, _ = cli(tmp_path, "on-demand", "demo", "--idle", "1")
    assert rc == 1 and out["error"] == (f"{tmp_path}/store/demo/on_demand.json: on-demand.idle: 1.0 must be a "
                                        f"number of seconds from 2 to 86400")
    assert json.loads((tmp_path / "store/demo/on_demand.json").read_text()) == {"idle": 5.0, "stop": "pause"}
    (tmp_path / "sites.json").write_text(json.dumps(sites_json()))
    rc, out, _ = cli(tmp_path, "on-demand", "demo", "--idle", "5")
    assert rc == 1 and out["error"].endswith("site demo is always on: only a site with on_demand in the recipe can "
                                             "change its idle or stop on the board")
