"""The system tier: the very image file `invoke build` wrote, booted under QEMU and checked as a live board.

Wifi is simulated inside dom0 at test time (mac80211_hwsim with two radios: hostapd takes one, a visitor in
its own network namespace uses the other), so the shipped image stays as built. Every wait polls with a
deadline; none sleeps a fixed time.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import re
import shlex
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import testinfra
from conftest import AWAKE_S

from appliance import config
from appliance.bench.switch import STORE, manager, steady_visitor, upload
from appliance.emulate import Board, EmulateError, wait_for
from appliance.emulate import visitor as emulate_visitor

pytestmark = pytest.mark.system

# Deadlines are generous: TCG on a loaded 2-core machine is slow, and a deadline only costs time on failure.
BOOT_DONE_S = 300
GUEST_S = 240
RADIO_S = 120
REBOOT_S = 600
NETNS = "visitor"


@pytest.fixture(scope="module")
def recipe() -> config.Recipe:
    return config.load("booth").recipe


@pytest.fixture(scope="module")
def board(booted_board: Board) -> Board:
    return booted_board


@pytest.fixture(autouse=True)
def console_on_failure(request: pytest.FixtureRequest, booted_board: Board) -> Iterator[None]:
    """When a test fails, show the end of the board's serial console beside it (the whole log stays in
    build/test/console.log as the run's artifact)."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        sys.stderr.write(f"--- the end of {booted_board.console} ---\n{booted_board.tail(40)}\n")


@pytest.fixture(scope="module")
def dom0(board: Board):
    """testinfra over the board's SSH forward."""
    return testinfra.get_host(board.testinfra_url, ssh_identity_file=str(board.key))


def domains(board: Board) -> dict[str, int]:
    """`xl list`: name -> domain id."""
    out = board.run("xl list", timeout=60).out
    return {f[0]: int(f[1]) for f in (line.split() for line in out.splitlines()[1:]) if len(f) >= 2}


def site_domains(board: Board, site: str) -> dict[str, int]:
    """The site's running domains (<site>.blue, <site>.green): name -> domain id."""
    return {n: d for n, d in domains(board).items() if n.startswith(f"{site}.")}


def always_on(recipe: config.Recipe) -> config.SiteSpec:
    return next(s for s in recipe.sites if s.on_demand is None)


def guest_serving(board: Board, recipe: config.Recipe, site: config.SiteSpec | None = None
                  ) -> tuple[str, int] | None:
    """(guest name, domain id) once the site (default: the first) answers HTTP at its service address and its
    guest runs; else None. The fetch comes first: it wakes an on-demand site."""
    site = site or recipe.sites[0]
    status, _ = board.fetch(f"http://{site.address}:{site.port}{site.health_path}", timeout=60)
    guests = site_domains(board, site.name)
    if status != 200 or not guests:
        return None
    name = next(iter(guests))
    return name, guests[name]


@pytest.fixture(scope="module")
def guest(board: Board, recipe: config.Recipe) -> tuple[str, int]:
    return wait_for("the guest answering HTTP on the bridge", lambda: guest_serving(board, recipe), GUEST_S,
                    interval=2, board=board)


def title(html: str) -> str:
    m = re.search(r"<title>(.*?)</title>", html, re.DOTALL | re.IGNORECASE)
    return m.group(1).strip() if m else ""


# ---------------------------------------------------------------- the board itself


def test_dom0_runs_under_xen(board):
    assert "Domain-0" in domains(board)
    # The hypervisor and dom0 came from the image's own boot.scr, not from QEMU loading kernels.
    log = board.console.read_text(errors="replace")
    assert "appliance: booting Xen on qemu-virt" in log


def test_boot_finishes_with_no_failed_units(board):
    state = board.run("systemctl is-system-running --wait", check=False, timeout=BOOT_DONE_S).out.strip()
    failed = board.run("systemctl --failed --no-legend --plain", timeout=60).out.strip()
    assert failed == "", f"system is {state}; failed units:\n{failed}"
    assert state == "running"


def test_root_filesystem_found_by_partuuid(board):
    cmdline = board.run("cat /proc/cmdline").out
    assert "root=PARTUUID=" in cmdline
    assert board.run("findmnt -no SOURCE /").out.strip() == "/dev/vda2"


def test_the_root_is_checked_in_the_initramfs_and_not_again(board):
    """dom0's initramfs runs the tree's e2fsck on the root before it mounts it (the console shows its preen
    line), and systemd-fsck-root, seeing /run/initramfs/fsck-root, skips a second check."""
    assert "root: clean" in board.console.read_text(errors="replace").split("Run /init as init process", 1)[-1]
    assert board.run("test -e /run/initramfs/fsck-root", check=False).rc == 0
    show = board.run("systemctl show -p ConditionResult -p ActiveState systemd-fsck-root.service").out.split()
    assert "ConditionResult=no" in show, show


def test_the_guest_path_comes_first_and_the_rest_of_the_boot_after_it(board):
    """appliance-guest tells systemd it is ready once the always-on sites served; udev's coldplug and SSH's host
    keys started after that, and the manager did not wait for them. What a visitor needs did not wait for the
    guests or the coldplug: DHCP and DNS (dnsmasq), networkd (the visitors' bridge) and the wifi dongle's early
    coldplug started beside the guest path, and neither they nor the access point are ordered after sysinit.target (the whole coldplug),
    which waits for the access point."""
    def t(unit: str, prop: str) -> int:
        return int(board.run(f"systemctl show -P {prop} {unit}").out.strip())

    ready = t("appliance-guest.service", "ActiveEnterTimestampMonotonic")
    assert ready > t("appliance-guest.service", "ExecMainStartTimestampMonotonic") > 0
    for unit in ("systemd-udev-trigger.service", "appliance-ssh-hostkeys.service"):
        assert t(unit, "InactiveExitTimestampMonotonic") >= ready, f"{unit} started before the guests were up"
    # what each unit waited for this boot: its After= units, and theirs, among the units that ran (one query)
    waits_for: dict[str, set[str]] = {}
    ran: set[str] = set()
    for block in board.run("systemctl show -p Id -p After -p InactiveExitTimestampMonotonic '*'").out.split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if "Id" in props:
            waits_for[props["Id"]] = set(props.get("After", "").split())
            if props.get("InactiveExitTimestampMonotonic", "0") not in ("", "0"):
                ran.add(props["Id"])
    for unit in ("dnsmasq.service", "systemd-networkd.service", "appliance-coldplug-wifi.service", "hostapd.service"):
        # hostapd starts once a wifi radio exists: in this test's boot there may be none yet
        assert unit in ran or unit == "hostapd.service", f"{unit} did not start"
        waited, todo = set(), [unit]
        while todo:
            for u in waits_for.get(todo.pop(), set()) & ran - waited:
                waited.add(u)
                todo.append(u)
        assert not {"appliance-guest.service", "systemd-udev-trigger.service"} & waited, f"{unit} waited for the guests"
    for unit in ("dnsmasq.service", "hostapd.service", "systemd-networkd.service"):
        after = board.run(f"systemctl show -P After {unit}").out.split()
        assert not {"sysinit.target", "basic.target", "systemd-udev-trigger.service"} & set(after), (unit, after)
    # and the whole coldplug waits for the access point too (its CPU goes to the visitors' path first)
    assert "hostapd.service" in board.run("systemctl show -P After systemd-udev-trigger.service").out.split()
    # dom0's SSH waits for its host keys and the firewall, not for the network or the rest of the boot
    after = set(board.run("systemctl show -P After ssh.service").out.split())
    assert {"appliance-ssh-hostkeys.service", "nftables.service"} <= after, after
    assert not {"network.target", "basic.target", "sysinit.target"} & after, after
    journal = board.run("journalctl -b -u appliance-guest --no-pager -o cat").out
    assert "every always-on site started; the rest of the boot goes on" in journal


def test_guest_is_listed_by_xl(board, guest):
    name, domid = guest
    assert domains(board).get(name) == domid and domid > 0


def test_guest_answers_at_the_service_address(board, guest, recipe):
    status, body = board.fetch(f"http://{recipe.sites[0].address}:{recipe.sites[0].port}/")
    assert status == 200
    assert title(body), "the demo page has no <title>"


def test_guest_answers_through_the_forwarded_port(board, guest):
    status, body = board.http_get("/")
    assert status == 200, body
    assert title(body)


def test_guest_manager_is_active(dom0, guest):
    assert dom0.service("appliance-guest").is_running


def test_dom0_keeps_to_one_physical_cpu(board):
    """dom0_vcpus_pin took effect: unpinned, dom0's virtio disk hung under TCG when a second guest started."""
    rows = [line.split() for line in board.run("xl vcpu-list Domain-0").out.splitlines()[1:]]
    assert rows and all(r[6] == "0" for r in rows), rows   # the hard affinity column


# ---------------------------------------------------------------- simulated wifi


@dataclass(frozen=True)
class Radios:
    ap: str          # the interface hostapd serves on
    visitor: str     # the other radio's interface
    visitor_phy: str


def hostapd_iface(board: Board) -> str | None:
    """The interface hostapd serves on, once it is running; else None."""
    if board.run("systemctl is-active hostapd.service", check=False).out.strip() != "active":
        return None
    exec_start = board.run("systemctl show -p ExecStart --value hostapd.service").out
    conf = re.findall(r"(/\S+\.conf)\b", exec_start)
    assert conf, f"hostapd.service names no configuration file: {exec_start}"
    m = re.search(r"^interface=(\S+)", board.run(f"cat {shlex.quote(conf[-1])}").out, re.MULTILINE)
    assert m, f"{conf[-1]} names no interface"
    return m.group(1)


@pytest.fixture(scope="module")
def radios(board: Board) -> Radios:
    """Two simulated radios in dom0 (a test drop-in, not the shipped default), plugged in after boot as a
    dongle would be: the booth's udev rule starts hostapd on one of them."""
    board.run("modprobe mac80211_hwsim radios=2")
    ifaces = wait_for("two mac80211_hwsim interfaces", lambda: _wlan(board) if len(_wlan(board)) >= 2 else None,
                      RADIO_S, board=board)
    ap = wait_for("hostapd started on a hot-plugged radio", lambda: hostapd_iface(board), RADIO_S, interval=2,
                  board=board)
    assert ap in ifaces, f"hostapd serves on {ap}, the radios are {ifaces}"
    wait_for(f"{ap} in AP mode", lambda: "type AP" in board.run(f"iw dev {ap} info", check=False).out, RADIO_S,
             board=board)
    other = next(i for i in ifaces if i != ap)
    phy = board.run(f"basename $(readlink /sys/class/net/{other}/phy80211)").out.strip()
    return Radios(ap, other, phy)


def _wlan(board: Board) -> list[str]:
    out = board.run("ls -d /sys/class/net/*/phy80211 2>/dev/null | cut -d/ -f5", check=False).out
    return sorted(out.split())


@dataclass(frozen=True)
class Visitor:
    iface: str
    address: str
    dns: str


@pytest.fixture(scope="module")
def visitor(board: Board, radios: Radios, recipe: config.Recipe) -> Iterator[Visitor]:
    """The second radio in its own network namespace, associated with the AP and holding a DHCP lease: the same
    simulated phone the bench image runs from power-on (appliance/emulate/visitor.py)."""
    ns, i = NETNS, radios.visitor
    with board.connection().sftp() as sftp:
        sftp.put(str(Path(emulate_visitor.__file__)), "/run/appliance-visitor")
    args = f"--ssid {shlex.quote(recipe.wifi.ssid)} --iface {i} --netns {ns} --deadline {RADIO_S}"
    try:
        if not recipe.wifi.open:
            psk = config.wifi_passphrase(recipe, config.recipe_path("booth"))
            board.run(f"umask 077; printf %s {shlex.quote(psk)} > /run/visitor-psk")
            args += " --psk-file /run/visitor-psk"
        r = board.run(f"python3 /run/appliance-visitor {args}", check=False, timeout=RADIO_S + 60)
        m = re.search(r"^appliance-visitor: lease (\S+) dns (\S+) on ", r.out, re.MULTILINE)
        assert r.rc == 0 and m, f"the visitor took no lease:\n{r.out}{r.err}"
        yield Visitor(i, m.group(1), m.group(2))
    finally:
        board.run(f"[ -f /run/visitor-wpa.pid ] && kill $(cat /run/visitor-wpa.pid); rm -f /run/visitor-wpa.* "
                  f"/run/visitor-psk /run/appliance-visitor;"
                  f" ip netns del {ns}; rm -rf /etc/netns/{ns}", check=False)


def test_hostapd_serves_on_a_simulated_radio(board, radios, recipe):
    info = board.run(f"iw dev {radios.ap} info").out
    assert "type AP" in info
    assert f"ssid {recipe.wifi.ssid}" in info


def test_visitor_gets_a_lease_from_dnsmasq(visitor, recipe):
    ip = ipaddress.IPv4Address(visitor.address)
    assert ipaddress.IPv4Address(recipe.network.dhcp_start) <= ip <= ipaddress.IPv4Address(recipe.network.dhcp_end)
    assert visitor.dns == str(ipaddress.IPv4Interface(recipe.network.address).ip)


@pytest.mark.parametrize("name", ["demo.booth", "example.com", "any-name.at.all"])
def test_visitor_resolves_names_to_the_guest(board, visitor, recipe, name):
    if not recipe.network.captive and name not in recipe.sites[0].names:
        pytest.skip("not a captive booth: only the recipe's names point at the guest")
    out = board.run(f"ip netns exec {NETNS} getent ahostsv4 {name}", check=False).out
    assert out.split()[:1] == [recipe.sites[0].address], out


def test_visitor_fetches_the_demo_page(board, visitor, guest, recipe):
    site = recipe.sites[0]
    name = site.names[0] if site.names else site.address
    status, body = board.fetch(f"http://{name}/", netns=NETNS)
    assert status == 200, body
    direct = board.fetch(f"http://{site.address}:{site.port}/")[1]
    assert title(body) and title(body) == title(direct)


def test_visitor_cannot_reach_dom0_ssh(board, visitor, guest, recipe):
    dom0_ips = board.run("ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1").out.split()
    probe = ("import socket, sys\ns = socket.socket(); s.settimeout(5)\n"
             "print(s.connect_ex((sys.argv[1], int(sys.argv[2]))))")

    def reach(ip: str, port: int) -> bool:
        r = board.run(f"ip netns exec {NETNS} python3 -c {shlex.quote(probe)} {ip} {port}", check=False, timeout=60)
        return r.out.strip() == "0"

    # The same path reaches the guest, so a refusal below is the rules at work, not a dead link.
    assert reach(recipe.sites[0].address, recipe.sites[0].port)
    for ip in dom0_ips:
        assert not reach(ip, 22), f"a visitor reaches dom0's SSH at {ip}"


def test_visitor_resolves_over_tcp(board, visitor, recipe):
    """The board's dnsmasq takes the rendered max-tcp-connections (a child for each DNS connection over TCP the
    stations hostapd admits may hold) and answers a visitor's query over TCP through the per-station bound."""
    conf = board.run("cat /etc/dnsmasq.d/appliance.conf").out
    assert re.search(r"^max-tcp-connections=\d+$", conf, re.MULTILINE), conf
    probe = ("import socket, struct, sys\n"
             "q = struct.pack('!6H', 7, 256, 1, 0, 0, 0) + b''.join(bytes([len(p)]) + p.encode() for p in "
             "sys.argv[2].split('.')) + b'\\0' + struct.pack('!HH', 1, 1)\n"
             "c = socket.create_connection((sys.argv[1], 53), timeout=30)\n"
             "c.sendall(struct.pack('!H', len(q)) + q)\n"
             "n = struct.unpack('!H', c.recv(2))[0]\nr = b''\n"
             "while len(r) < n:\n    r += c.recv(n - len(r))\n"
             "print(socket.inet_ntoa(r[-4:]))")
    name = recipe.sites[0].names[0]
    r = board.run(f"ip netns exec {NETNS} python3 -c {shlex.quote(probe)} {visitor.dns} {name}", timeout=60)
    assert r.out.strip() == recipe.sites[0].address, r.out


@pytest.mark.parametrize("url, open_answer", [
    ("http://captive.apple.com/hotspot-detect.html", "Success"),                      # Apple
    ("http://connectivitycheck.gstatic.com/generate_204", ""),                        # Android (204)
    ("http://www.msftconnecttest.com/connecttest.txt", "Microsoft Connect Test"),     # Windows
    ("http://detectportal.firefox.com/success.txt", "success"),                       # Firefox
    ("http://nmcheck.gnome.org/check_network_status.txt", "NetworkManager is online"),  # NetworkManager
])
def test_each_platforms_portal_probe_opens_the_portal(board, visitor, guest, recipe, url, open_answer):
    """Through the simulated wifi, as the visitor's device asks: not the open network's answer (so the device
    opens its portal sheet), and a page that leads to the default site."""
    if not recipe.network.captive:
        pytest.skip("network.captive: false")
    status, body = board.fetch(url, netns=NETNS, timeout=60)
    assert status == 200 and body.strip() != open_answer, (status, body[:200])
    assert '<meta http-equiv="refresh" content="0; url=/">' in body, body[:200]


def test_https_is_refused_at_once(board, visitor, guest, recipe):
    probe = ("import socket, sys, time\ns = socket.socket(); s.settimeout(5); t = time.monotonic()\n"
             "print(s.connect_ex((sys.argv[1], 443)), round(time.monotonic() - t, 2))")
    for ip in [visitor.dns, *(s.address for s in recipe.sites)]:
        r = board.run(f"ip netns exec {NETNS} python3 -c {shlex.quote(probe)} {ip}", check=False, timeout=60)
        code, took = r.out.split()
        assert int(code) == errno.ECONNREFUSED and float(took) < 2, (ip, r.out)


# ---------------------------------------------------------------- on demand: the game sleeps, a visitor wakes it

IDLE_S = 10
SLEEP_S = 180


def site_status(board: Board, site: str) -> dict:
    rc, out = manager(board, f"status {site}")
    assert "sites" not in out and out.get("site") == site, out
    return out


@pytest.fixture
def short_idle(board: Board, recipe: config.Recipe) -> Iterator[config.SiteSpec]:
    """The on-demand site with a short idle while a test looks at it; then awake for the tests after it."""
    game = recipe.sites[0]
    assert game.on_demand, "the booth's first site (the game) is on demand"
    yield game
    rc, out = manager(board, f"on-demand {game.name} --idle {AWAKE_S} --stop {game.on_demand.stop}")
    assert rc == 0, out
    wait_for("the game awake again", lambda: guest_serving(board, recipe), GUEST_S, interval=2, board=board)


@pytest.mark.parametrize("stop", ["destroy", "pause"])
def test_an_idle_game_sleeps_and_the_next_visitor_wakes_it(board, visitor, guest, recipe, short_idle, stop):
    game, about = short_idle, always_on(recipe)
    rc, out = manager(board, f"on-demand {game.name} --idle {IDLE_S} --stop {stop}")
    assert rc == 0 and out["on_demand"] == {"idle": IDLE_S, "stop": stop}, out
    want = "asleep" if stop == "destroy" else "paused"
    wait_for(f"{game.name} {want} after {IDLE_S} s without a visitor",
             lambda: site_status(board, game.name)["state"] == want or None, SLEEP_S, interval=2, board=board)
    listed = board.run("xl list").out
    if stop == "destroy":
        assert site_domains(board, game.name) == {}, listed
    else:
        rows = [line.split() for line in listed.splitlines() if line.startswith(f"{game.name}.")]
        assert len(rows) == 1 and "p" in rows[0][4], listed
    assert site_domains(board, about.name), "the always-on site keeps running"
    code, body = board.fetch(f"http://{about.names[0]}/", netns=NETNS, timeout=60)
    assert code == 200 and title(body) == "About this booth", (code, body[:300])
    before = site_status(board, game.name)["wakes_today"] or 0
    # destroy: by name, so the DNS query wakes it and the connection is held while it boots; pause: at the
    # address a device had cached, so the connection alone wakes it
    where = game.names[0] if stop == "destroy" else game.address
    code, body = board.fetch(f"http://{where}:{game.port}/cgi-bin/status", netns=NETNS, timeout=GUEST_S)
    assert code == 200, body
    page, st = json.loads(body), site_status(board, game.name)
    assert st["state"] == "serving" and st["wakes_today"] == before + 1, st
    assert st["trigger"] == ("dns query" if stop == "destroy" else "connection"), st
    if stop == "pause":
        said = board.run("journalctl -b -u appliance-guest -o cat --no-pager | grep ': unpaused ' | tail -1").out
        assert f"unpaused {game.name}." in said and "by libxenctrl)" in said, said
    assert isinstance(st["wake_ms"], int) and st["wake_ms"] > 0, st
    told = {k: page.get(k) for k in ("woken", "wake_ms", "trigger", "wakes_today")}
    assert told == {k: st[k] for k in told}, "the page's figures are dom0's: the guest was told before it answered"
    assert set(page["sites"]) == {s.name for s in recipe.sites} and page["sites"][about.name]["on_demand"] is None
    print(f"\n{game.name} woken ({stop}, by a {st['trigger']}) in {st['wake_ms']} ms")


def test_only_the_sites_asked_for_run(board, visitor, guest, recipe):
    """The booth lists three sites; one on-demand site that no visitor has asked for has no domain at all until a
    visitor asks for it by name, while the game and the always-on site run."""
    game, about = recipe.sites[0], always_on(recipe)
    unasked = [s for s in recipe.sites if s.on_demand and s is not game]
    assert len(recipe.sites) >= 3 and unasked, "the booth ships a second on-demand site besides the game"
    site = unasked[0]
    st = site_status(board, site.name)
    assert st["state"] == "asleep" and not st.get("wakes_today"), st
    running = domains(board)
    assert site_domains(board, site.name) == {}, running
    assert site_domains(board, game.name) and site_domains(board, about.name), running
    code, body = board.fetch(f"http://{site.names[0]}/", netns=NETNS, timeout=GUEST_S)
    assert code == 200 and title(body) == "Make a booth like this", (code, body[:300])
    st = site_status(board, site.name)
    assert st["state"] == "serving" and st["trigger"] == "dns query" and st["wakes_today"] == 1, st
    assert len(site_domains(board, site.name)) == 1, board.run("xl list").out
    print(f"\n{site.name} woken by the visitor's DNS query in {st['wake_ms']} ms")


def test_the_about_site_shows_every_sites_figures(board, visitor, guest, recipe):
    about, game = always_on(recipe), recipe.sites[0]

    def told() -> dict | None:
        code, body = board.fetch(f"http://{about.names[0]}/cgi-bin/status", netns=NETNS, timeout=60)
        return (json.loads(body).get("sites") or None) if code == 200 else None

    figures = wait_for("dom0's figures told to the about site", told, 60, interval=3, board=board)
    assert set(figures) == {s.name for s in recipe.sites}, figures
    assert figures[game.name]["names"] == list(game.names) and figures[game.name]["on_demand"]["stop"]
    assert figures[about.name]["on_demand"] is None and figures[about.name]["trigger"] == "boot", figures
    assert figures[about.name]["state"] == "serving" and figures[about.name]["wakes_today"] >= 1, figures


# ---------------------------------------------------------------- the blue-green switch, seen by a visitor

SWITCH_S = 600


def current(board: Board, site: str) -> str:
    return board.run(f"readlink {STORE}/{site}/current").out.strip()


def visiting(board: Board, recipe: config.Recipe):
    """The steady visitor on the simulated wifi: its own connection for every request, to the site's name
    (captive DNS, then dom0's DNAT of the service address)."""
    site = recipe.sites[0]
    name = site.names[0] if site.names else site.address
    return steady_visitor(board, f"http://{name}:{site.port}/cgi-bin/status", netns=NETNS)


@pytest.fixture(scope="module")
def versions(board: Board, recipe: config.Recipe, guest, tmp_path_factory) -> dict[str, str]:
    """Versions of the demo site made on the host and copied into the board's store: the image's own (`one`),
    a second release of the demo (`two`), one whose guest never answers its health check (it serves another
    port) and one that crashes at start (its kernel panics: no init)."""
    from appliance.build import guest as g

    cfg = config.load("booth")
    work = tmp_path_factory.mktemp("store")
    demo = g.bundle(cfg).path
    made = {"one": current(board, cfg.recipe.sites[0].name),
            "two": upload(board, cfg, g.bundle(cfg, release="2.0").path, work)}
    base = json.loads((demo / "guest.yaml").read_text())
    for kind, cmdline in (("never", g.DEMO_CMDLINE.replace("appliance.port={port}", "appliance.port=8081")),
                          ("crash", g.DEMO_CMDLINE + " rdinit=/no-such-init")):
        bundle = work / f"bundle-{kind}"
        bundle.mkdir()
        for name in ("vmlinuz", "initrd.gz"):
            shutil.copyfile(demo / name, bundle / name)
        (bundle / "guest.yaml").write_text(json.dumps({**base, "version": f"{kind}-{base['version']}",
                                                       "cmdline": cmdline, "health": {"path": "/", "deadline": 45}}))
        made[kind] = upload(board, cfg, bundle, work)
    return made


def test_blue_green_switch_drops_no_request(board, visitor, versions, recipe):
    site = recipe.sites[0].name
    with visiting(board, recipe) as v:
        rc, out = manager(board, f"switch {site} {versions['two']}")
        assert rc == 0 and out["ok"], out
    seen = v.counts()
    assert seen["failed"] == 0, seen
    assert seen["versions"] == [versions["one"], versions["two"]], seen
    assert current(board, site) == versions["two"]
    assert board.run(f"readlink {STORE}/{site}/previous").out.strip() == versions["one"]
    assert len(site_domains(board, site)) == 1, "the old guest was stopped after draining"


@pytest.mark.parametrize("kind", ["never", "crash"])
def test_a_failing_version_leaves_the_old_one_serving(board, visitor, versions, recipe, kind):
    site = recipe.sites[0].name
    before = current(board, site)
    with visiting(board, recipe) as v:
        rc, out = manager(board, f"switch {site} {versions[kind]}")
        assert rc != 0 and not out["ok"], out
        assert out.get("error"), out
    seen = v.counts()
    assert seen["failed"] == 0, seen
    assert seen["versions"] == [before], seen
    assert current(board, site) == before
    assert len(site_domains(board, site)) == 1, "the failed guest was destroyed"


def test_a_second_switch_is_refused_while_one_runs(board, versions, recipe):
    site = recipe.sites[0].name
    # Both ask for the version that is not current, so each would change the site if it held the lock.
    target = versions["one"] if current(board, site) != versions["one"] else versions["two"]
    # Every descriptor of the background job is redirected, or the SSH command would wait for it to end.
    board.run(f"rm -f /run/switch1.json; (appliance-guest switch {site} {target} > /run/switch1.json.tmp"
              f"; mv /run/switch1.json.tmp /run/switch1.json) </dev/null >/dev/null 2>&1 &")
    # Whichever of the two takes the site's lock first switches (a guest boot, many seconds); the other is refused.
    rc, second = manager(board, f"switch {site} {target}")
    first = json.loads(wait_for("the first switch to finish", lambda: board.run(
        "cat /run/switch1.json 2>/dev/null", check=False).out.strip() or None, SWITCH_S, interval=3, board=board))
    assert sorted([first["ok"], second["ok"]]) == [False, True], (first, second)
    refused = first if second["ok"] else second
    assert "pid" in refused["error"], refused
    assert current(board, site) == target


# ---------------------------------------------------------------- recovery


def test_guest_manager_restarts_a_destroyed_guest(board, guest, recipe):
    site = always_on(recipe)               # an on-demand site's guest is woken by the next visitor instead
    name, domid = wait_for("the site serving", lambda: guest_serving(board, recipe, site), GUEST_S, interval=2,
                           board=board)
    board.run(f"xl destroy {name}")

    def back() -> int | None:
        serving = guest_serving(board, recipe, site)
        return serving[1] if serving and serving[1] != domid else None

    new = wait_for(f"the guest manager restarting {name} and it serving again", back, GUEST_S, interval=2, board=board)
    assert new != domid


def test_the_demo_guest_powers_off_on_xl_shutdown(board, guest, recipe):
    """Xen's shutdown request reaches the demo guest's own poweroff (its init sets the kernel's poweroff_cmd):
    it goes within seconds, saying so on its console, instead of waiting for dom0 to destroy it."""
    site = always_on(recipe)
    name, domid = wait_for("the site serving", lambda: guest_serving(board, recipe, site), GUEST_S, interval=2,
                           board=board)
    board.run(f"xl shutdown {name}")
    wait_for(f"{name} (domain {domid}) powering off", lambda: site_domains(board, site.name).get(name) != domid or None,
             30, interval=1, board=board)
    console = board.run(f"cat /var/log/xen/console/guest-{name}.log", timeout=60).out
    assert "demo guest: asked to shut down" in console and "demo guest: powering off" in console, console[-2000:]


# The appliance's own units (files, not the packages' aliases) that run only until their work is done.
# appliance's own first-boot units (not Debian's ssh.service, overridden in /etc, whose sshd_not_to_be_run condition
# is an off switch, not a first boot's)
FIRST_BOOT_UNITS = ("find /etc/systemd/system -maxdepth 1 -type f -name 'appliance-*.service' "
                    "-exec grep -lE '^Condition(PathExists=!|FirstBoot=yes)' {} +")


def test_reboot_comes_back_serving_without_redoing_first_boot(board, recipe):
    facts = "hostname; cat /etc/machine-id; cat /etc/ssh/ssh_host_*_key.pub"
    before, key_before, boot_before = board.run(facts).out, board.host_key, board.boot_id()
    units = [Path(u).name for u in board.run(FIRST_BOOT_UNITS).out.split()]
    assert units, "no first-boot units found"
    try:
        board.reboot(REBOOT_S)
    except EmulateError as exc:
        pytest.fail(str(exc))
    assert board.boot_id() != boot_before
    assert board.run(facts).out == before, "the first-boot identity (hostname, machine id, host keys) changed"
    assert board.host_key == key_before
    for unit in units:
        result = board.run(f"systemctl show -p ConditionResult --value {unit}").out.strip()
        assert result == "no", f"{unit} ran again on the second boot"
    wait_for("the guest serving after the reboot", lambda: guest_serving(board, recipe), GUEST_S, interval=2,
             board=board)


# ---------------------------------------------------------------- a power cut in the middle of a switch


@pytest.mark.parametrize("moment", ["the new guest booting", "the service address moved"])
def test_a_power_cut_during_a_switch_boots_into_a_serving_version(board, versions, recipe, moment):
    site = recipe.sites[0]
    before = wait_for("the site serving", lambda: current(board, site.name) if guest_serving(board, recipe) else None,
                      GUEST_S, interval=2, board=board)
    target = versions["two"] if before != versions["two"] else versions["one"]
    board.run(f"nohup appliance-guest switch {site.name} {target} </dev/null >/dev/null 2>&1 &")
    if moment == "the new guest booting":
        wait_for("the new version's guest created beside the old one",
                 lambda: len(site_domains(board, site.name)) >= 2 or None, SWITCH_S, interval=1, board=board)
    else:
        wait_for(f"{site.name}'s current version to become {target}",
                 lambda: current(board, site.name) == target or None, SWITCH_S, interval=1, board=board)
    try:
        board.power_cut(REBOOT_S)
    except EmulateError as exc:
        pytest.fail(str(exc))
    wait_for("a version serving after the power cut", lambda: guest_serving(board, recipe), GUEST_S, interval=2,
             board=board)
    now = current(board, site.name)
    assert now in (before, target), now
    status, body = board.fetch(f"http://{site.address}:{site.port}/cgi-bin/status")
    assert status == 200 and json.loads(body)["version"] == now, body
    listed = json.loads(board.run(f"appliance-guest list {site.name}").out)
    assert listed["current"] == now, listed
    kept = {v["version"]: v["ok"] for v in listed["versions"]}
    assert kept.get(before) and kept.get(target), f"a version's files were lost in the power cut: {listed}"
