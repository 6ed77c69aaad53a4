"""The system tier: the very image file `invoke build` wrote, booted under QEMU and checked as a live board.

Wifi is simulated inside dom0 at test time (mac80211_hwsim with two radios: hostapd takes one, a visitor in
its own network namespace uses the other), so the shipped image stays as built. Every wait polls with a
deadline; none sleeps a fixed time.
"""

from __future__ import annotations

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

from appliance import config
from appliance.bench.switch import STORE, manager, steady_visitor, upload
from appliance.emulate import Board, EmulateError, wait_for

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


def guest_serving(board: Board, recipe: config.Recipe) -> tuple[str, int] | None:
    """(guest name, domain id) once a guest runs and answers HTTP at the site's service address; else None."""
    guests = {n: d for n, d in domains(board).items() if n != "Domain-0"}
    if not guests:
        return None
    site = recipe.sites[0]
    status, _ = board.fetch(f"http://{site.address}:{site.port}{site.health_path}")
    if status != 200:
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
    """The second radio in its own network namespace, associated with the AP and holding a DHCP lease."""
    ns, i = NETNS, radios.visitor
    board.run(f"ip netns del {ns} 2>/dev/null; ip netns add {ns} && iw phy {radios.visitor_phy} set netns name {ns}"
              f" && ip -n {ns} link set lo up && ip -n {ns} link set {i} up")
    try:
        if recipe.wifi.open:
            board.run(f"ip netns exec {ns} iw dev {i} connect {shlex.quote(recipe.wifi.ssid)}")
        else:
            psk = config.wifi_passphrase(recipe, config.recipe_path("booth"))
            conf = f'network={{\n ssid="{recipe.wifi.ssid}"\n psk="{psk}"\n key_mgmt=WPA-PSK\n}}\n'
            board.run(f"printf %s {shlex.quote(conf)} > /run/visitor-wpa.conf && ip netns exec {ns} wpa_supplicant"
                      f" -B -i {i} -c /run/visitor-wpa.conf -P /run/visitor-wpa.pid")
        wait_for(f"the visitor associated with '{recipe.wifi.ssid}'",
                 lambda: "Connected to" in board.run(f"ip netns exec {ns} iw dev {i} link", check=False).out,
                 RADIO_S, board=board)
        # klibc's ipconfig is the DHCP client dom0 has (initramfs-tools depends on it).
        board.run(f"rm -f /run/net-{i}.conf; ip netns exec {ns} /usr/lib/klibc/bin/ipconfig -t 30 -c dhcp -d {i}",
                  timeout=90)
        lease = dict(re.findall(r"^(\w+)='?([^'\n]*)'?$", board.run(f"cat /run/net-{i}.conf").out, re.MULTILINE))
        dns = lease.get("IPV4DNS0", "")
        board.run(f"mkdir -p /etc/netns/{ns} && echo 'nameserver {dns}' > /etc/netns/{ns}/resolv.conf")
        yield Visitor(i, lease.get("IPV4ADDR", ""), dns)
    finally:
        board.run(f"[ -f /run/visitor-wpa.pid ] && kill $(cat /run/visitor-wpa.pid); rm -f /run/visitor-wpa.*;"
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
    demo = g.build(cfg).path
    made = {"one": current(board, cfg.recipe.sites[0].name),
            "two": upload(board, cfg, g.build(cfg, release="2.0").path, work)}
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
    assert len([n for n in domains(board) if n != "Domain-0"]) == 1, "the old guest was stopped after draining"


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
    assert len([n for n in domains(board) if n != "Domain-0"]) == 1, "the failed guest was destroyed"


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
    name, domid = wait_for("the site serving", lambda: guest_serving(board, recipe), GUEST_S, interval=2,
                           board=board)   # after the switches, the serving domain may be the other slot's
    board.run(f"xl destroy {name}")

    def back() -> int | None:
        serving = guest_serving(board, recipe)
        return serving[1] if serving and serving[1] != domid else None

    new = wait_for(f"the guest manager restarting {name} and it serving again", back, GUEST_S, interval=2, board=board)
    assert new != domid


# The appliance's own units (files, not the packages' aliases) that run only until their work is done.
FIRST_BOOT_UNITS = ("find /etc/systemd/system -maxdepth 1 -type f -name '*.service' "
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


def _domains_besides_dom0(board: Board) -> int:
    return len([n for n in domains(board) if n != "Domain-0"])


@pytest.mark.parametrize("moment", ["the new guest booting", "the service address moved"])
def test_a_power_cut_during_a_switch_boots_into_a_serving_version(board, versions, recipe, moment):
    site = recipe.sites[0]
    before = wait_for("the site serving", lambda: current(board, site.name) if guest_serving(board, recipe) else None,
                      GUEST_S, interval=2, board=board)
    target = versions["two"] if before != versions["two"] else versions["one"]
    board.run(f"nohup appliance-guest switch {site.name} {target} </dev/null >/dev/null 2>&1 &")
    if moment == "the new guest booting":
        wait_for("the new version's guest created beside the old one",
                 lambda: _domains_besides_dom0(board) >= 2 or None, SWITCH_S, interval=1, board=board)
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
