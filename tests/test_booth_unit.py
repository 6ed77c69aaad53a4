"""Unit tier for the booth: templates rendered for WPA2, open and bridged-uplink recipes; bad values refused;
the launcher (imported from its overlay) rendering, parsing, switching and supervising with a fake `xl`.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from appliance import ROOT, config, configure, guest
from appliance.errors import GuestError, RecipeError
from appliance.identity import derive

pytestmark = pytest.mark.unit

BOOTH = ROOT / "overlays" / "booth"
TEMPLATES = sorted(str(p.relative_to(BOOTH))[:-3] for p in BOOTH.rglob("*.j2"))

RECIPE = """\
name: {name}
board: cubieboard2
overlays: [base, booth]
wifi:
{wifi}
network:
{network}
"""
GUEST_50 = "guest:\n  address: 192.168.50.2\n  mac: 00:16:3e:00:00:50\n  port: 8080\n"
KINDS = {
    "wpa2": (("  ssid: Booth WPA\n  country: FR\n  hw_mode: a\n  channel: 36\n  open: false\n"
              "  passphrase_file: wifi.pass\n  client_isolation: false"),
             ("  address: 192.168.50.1/24\n  dhcp_start: 192.168.50.20\n  dhcp_end: 192.168.50.80\n"
              "  captive: false\n  names: [demo.booth, game.local]")),
    "open": ("  ssid: Xen Booth\n  open: true", "  uplink: dhcp"),
    "bridged": ("  ssid: Bridged\n  open: true\n  channel: 11", "  uplink: bridge\n  unique_hostname: false"),
}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("APPLIANCE_WIFI_PASSPHRASE", raising=False)


def recipe(tmp_path: Path, kind: str) -> config.Config:
    wifi, network = KINDS[kind]
    text = RECIPE.format(name=f"t-{kind}", wifi=wifi, network=network) + (GUEST_50 if kind == "wpa2" else "")
    (tmp_path / "wifi.pass").write_text("correct horse battery\n")
    path = tmp_path / f"{kind}.yaml"
    path.write_text(text)
    return config.load(str(path))


def rendered(cfg: config.Config) -> dict[str, str]:
    ctx = configure.context(cfg, derive(cfg.digest))
    return {f.rel: f.data.decode(errors="replace") for f in configure.render_overlays(cfg, ctx) if f.data is not None}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_template_renders(tmp_path: Path, kind: str):
    files = rendered(recipe(tmp_path, kind))
    for rel in TEMPLATES:
        assert rel in files, rel
        assert "{{" not in files[rel] and "{%" not in files[rel], rel


def test_wpa2_recipe(tmp_path: Path):
    files = rendered(recipe(tmp_path, "wpa2"))
    ap = files["etc/hostapd/appliance.conf"].splitlines()
    for line in ("ssid=Booth WPA", "country_code=FR", "hw_mode=a", "channel=36", "wpa=2", "wpa_key_mgmt=WPA-PSK",
                 "rsn_pairwise=CCMP", "wpa_passphrase=correct horse battery", "ap_isolate=0", "bridge=br0"):
        assert line in ap
    assert not any(line.startswith("interface=") for line in ap), "the interface is found at boot"
    dns = files["etc/dnsmasq.d/appliance.conf"].splitlines()
    assert "dhcp-range=192.168.50.20,192.168.50.80,255.255.255.0,1h" in dns
    assert "dhcp-host=00:16:3e:00:00:50,192.168.50.2,guest,infinite" in dns
    assert "resolv-file=/run/appliance/resolv.conf" in dns
    assert "address=/demo.booth/192.168.50.2" in dns and "address=/game.local/192.168.50.2" in dns
    assert not any(line.startswith("address=/#/") for line in dns)
    site = json.loads(files["etc/appliance/guest.json"])
    assert (site["address"], site["gateway"], site["port"]) == ("192.168.50.2", "192.168.50.1", 8080)


def test_open_recipe(tmp_path: Path):
    cfg = recipe(tmp_path, "open")
    files = rendered(cfg)
    ap = files["etc/hostapd/appliance.conf"].splitlines()
    assert "ssid=Xen Booth" in ap and "wpa=0" in ap and "ap_isolate=1" in ap
    assert not any(line.startswith("wpa_passphrase") for line in ap)
    dns = files["etc/dnsmasq.d/appliance.conf"].splitlines()
    assert "address=/#/10.42.0.2" in dns and "no-resolv" in dns
    assert "dhcp-host=00:16:3e:42:00:02,10.42.0.2,guest,infinite" in dns
    assert "DHCP=ipv4" in files["etc/systemd/network/30-appliance-uplink.network"]
    assert "Address=10.42.0.1/24" in files["etc/systemd/network/20-appliance-bridge.network"]
    assert 'iifname "br0" jump booth' in files["etc/nftables.conf"]
    assert "UNIQUE_HOSTNAME=yes" in files["etc/appliance/booth.env"].splitlines()
    site = json.loads(files["etc/appliance/guest.json"])
    assert site == guest.site(cfg), "the board's guest.json and the host's view of it agree"


def test_bridged_uplink_recipe(tmp_path: Path):
    files = rendered(recipe(tmp_path, "bridged"))
    uplink = files["etc/systemd/network/30-appliance-uplink.network"]
    assert "Bridge=br0" in uplink and "DHCP=" not in uplink
    assert "Name=!vif*" in uplink
    assert 'iifname "br0" jump booth' not in files["etc/nftables.conf"], "wired hosts on the bridge keep SSH"
    assert "UNIQUE_HOSTNAME=no" in files["etc/appliance/booth.env"].splitlines()
    assert "channel=11" in files["etc/hostapd/appliance.conf"].splitlines()


@pytest.mark.skipif(not shutil.which("nft") or os.geteuid() != 0, reason="needs the host's nft and root")
@pytest.mark.parametrize("kind", ["open", "bridged"])
def test_nft_checks_the_ruleset(tmp_path: Path, kind: str):
    (tmp_path / "nftables.conf").write_text(rendered(recipe(tmp_path, kind))["etc/nftables.conf"])
    subprocess.run(["nft", "-c", "-f", str(tmp_path / "nftables.conf")], check=True)


SERVE = """import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("", int(sys.argv[1]))); s.listen()
while True:
    c, _ = s.accept(); c.sendall(b"hi"); c.close()
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("ip"),
                    reason="needs root, the host's nft and ip (network namespaces)")
@pytest.mark.parametrize("kind", ["open", "bridged"])
def test_isolation_between_network_namespaces(tmp_path: Path, kind: str):
    """The ruleset in a namespace standing for dom0: a bridge with a visitor (wlan0), a guest (vif1.0) and a
    wired host (end0) as ports; who reaches whom over TCP."""
    rules = tmp_path / "nftables.conf"
    rules.write_text(rendered(recipe(tmp_path, kind))["etc/nftables.conf"])
    ns = {n: f"booth{os.getpid()}{n}" for n in ("dom0", "vis", "gst", "lan")}
    ip = {"dom0": "10.42.0.1", "gst": "10.42.0.2", "vis": "10.42.0.100", "lan": "10.42.0.101"}
    procs: list[subprocess.Popen[bytes]] = []

    def sh(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True)

    def reaches(src: str, dst: str, port: int) -> bool:
        code = f"import socket; socket.create_connection(('{ip[dst]}', {port}), timeout=1).recv(2)"
        return subprocess.run(["ip", "netns", "exec", ns[src], sys.executable, "-c", code],
                              check=False, capture_output=True).returncode == 0

    try:
        for n in ns.values():
            if subprocess.run(["ip", "netns", "add", n], check=False, capture_output=True).returncode:
                pytest.skip("cannot make network namespaces here")
        d = ns["dom0"]
        sh("ip", "-n", d, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", d, "addr", "add", "10.42.0.1/24", "dev", "br0")
        for port, who in (("wlan0", "vis"), ("vif1.0", "gst"), ("end0", "lan")):
            sh("ip", "-n", d, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns[who])
            sh("ip", "-n", d, "link", "set", port, "master", "br0", "up")
            sh("ip", "-n", ns[who], "addr", "add", f"{ip[who]}/24", "dev", "eth0")
            sh("ip", "-n", ns[who], "link", "set", "eth0", "up")
        sh("ip", "-n", d, "link", "set", "br0", "up")
        sh("ip", "netns", "exec", d, "nft", "-f", str(rules))
        for who, port in (("dom0", 22), ("dom0", 53), ("gst", 80), ("lan", 80)):
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns[who], sys.executable, "-c", SERVE, str(port)]))
        time.sleep(1)
        assert reaches("vis", "gst", 80), "visitors reach the guest"
        assert reaches("vis", "dom0", 53), "and dom0's DNS"
        assert not reaches("vis", "dom0", 22), "but not dom0's SSH"
        assert not reaches("vis", "lan", 80), "nor anything else on the bridge"
        assert not reaches("gst", "dom0", 22), "guests do not reach dom0's SSH"
        assert reaches("dom0", "gst", 80), "dom0 reaches the guest (the launcher's health check)"
        assert reaches("lan", "dom0", 22) == (kind == "bridged"), "a bridged wired port is the trusted side"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for n in ns.values():
            subprocess.run(["ip", "netns", "del", n], check=False, capture_output=True)


@pytest.mark.parametrize("wifi, network, guest_, message", [
    ("  ssid: " + "x" * 33 + "\n  open: true", "  uplink: dhcp", None,
     "wifi.ssid: '" + "x" * 33 + "' must be 1 to 32 bytes long"),
    ("  ssid: \"" + "\\u00e9" * 17 + "\"\n  open: true", "  uplink: dhcp", None,
     "must be 1 to 32 bytes long"),  # 17 characters, 34 bytes
    ("  hw_mode: a\n  channel: 11\n  open: true", "  uplink: dhcp", None,
     "wifi.channel: channel 11 is not allowed in hw_mode 'a'"),
    ("  hw_mode: b\n  channel: 36\n  open: true", "  uplink: dhcp", None,
     "wifi.channel: channel 36 is not allowed in hw_mode 'b'"),
    ("  open: true", "  address: 10.42.0.1/24", "  address: 10.9.0.2",
     "guest.address: 10.9.0.2 is outside the bridge's subnet 10.42.0.0/24"),
    ("  open: true", "  dhcp_start: 10.42.0.1", None, "network.address: 10.42.0.1 is inside the DHCP range"),
    ("  open: true", "  dhcp_start: 10.42.0.150\n  dhcp_end: 10.42.0.120", None,
     "network.dhcp_end: 10.42.0.120 comes before network.dhcp_start 10.42.0.150"),
    ("  open: true", "  names: [Not A Name]", None, "network.names[0]: 'Not A Name' is not a lower-case DNS name"),
    ("  open: true", "  uplink: dhcp", "  mac: 01:16:3e:42:00:02", "guest.mac: 01:16:3e:42:00:02 is a multicast"),
    ("  open: true", "  uplink: dhcp", "  address: 10.42.0.1", "guest.address: 10.42.0.1 is the bridge's own address"),
])
def test_bad_values_are_refused(tmp_path: Path, wifi: str, network: str, guest_: str | None, message: str):
    text = RECIPE.format(name="bad", wifi=wifi, network=network) + (f"guest:\n{guest_}\n" if guest_ else "")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as err:
        config.load(str(path))
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


@pytest.mark.parametrize("value, count", [("short", 5), ("y" * 64, 64), ("tab\there ok", 11)])
def test_bad_passphrases_are_refused(tmp_path: Path, monkeypatch, value: str, count: int):
    monkeypatch.setenv("APPLIANCE_WIFI_PASSPHRASE", value)
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(name="r", wifi="  open: false", network="  uplink: dhcp"))
    with pytest.raises(RecipeError) as err:
        config.load(str(path))
    assert str(err.value) == (f"{path}: wifi.passphrase_env: the passphrase in $APPLIANCE_WIFI_PASSPHRASE must be "
                              f"8 to 63 printable ASCII characters (it has {count})")


def test_a_missing_passphrase_is_refused_when_rendering(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(name="r", wifi="  open: false", network="  uplink: dhcp"))
    cfg = config.load(str(path))  # loading needs no secret: flashing or `invoke guest` do not use it
    with pytest.raises(RecipeError, match="wifi: no WPA2 passphrase: set wifi.passphrase_file, or the environment "
                                          "variable APPLIANCE_WIFI_PASSPHRASE, or wifi.open: true"):
        configure.context(cfg, derive(cfg.digest))
    with pytest.raises(RecipeError, match=f"^{path}: wifi: no WPA2 passphrase"):
        config.wifi_passphrase(cfg.recipe, path)  # given the recipe file, the message names it


# ---------------------------------------------------------------- the launcher, imported from the overlay


@pytest.fixture(scope="module")
def lau():
    return guest.launcher(config.load("booth"))


SITE = {"bridge": "br0", "address": "127.0.0.1", "netmask": "255.255.255.0", "prefix": 24, "gateway": "10.42.0.1",
        "mac": "00:16:3e:42:00:02", "memory": 96, "vcpus": 1, "port": 80, "health_path": "/", "deadline": 120}


def zimage(tag: bytes = b"") -> bytes:
    head = bytearray(0x30)
    head[0x24:0x28] = (0x016F2818).to_bytes(4, "little")
    return bytes(head) + tag


def make_version(store: Path, version: str, manifest: dict[str, Any] | None = None, ramdisk: bool = True) -> Path:
    d = store / version
    d.mkdir(parents=True)
    (d / "vmlinuz").write_bytes(zimage(version.encode()))
    files = ["vmlinuz"]
    if ramdisk:
        (d / "initrd.gz").write_bytes(b"ramdisk " + version.encode())
        files.append("initrd.gz")
    m = {"name": "demo", "version": version, "kernel": "vmlinuz", **({"ramdisk": "initrd.gz"} if ramdisk else {}),
         "sha256": {f: guest.sha256(d / f) for f in files}}
    m.update(manifest or {})
    (d / "guest.yaml").write_text(json.dumps(m))
    return d


@pytest.fixture
def paths(lau, tmp_path: Path):
    p = lau.Paths(tmp_path / "guests", tmp_path / "guest.json", tmp_path / "run", str(tmp_path / "xl"))
    p.store.mkdir()
    p.site.write_text(json.dumps(SITE))
    return p


def test_manifest_json_and_yaml_subset(lau):
    text = ("# a guest\nname: mirage\nversion: '2'\nkernel: www.xen\nmemory: 32\nsha256:\n  www.xen: " + "a" * 64 +
            "\nhealth:\n  port: 8080   # its own port\n  path: /health\nextra: \"--ipv4={address}/{prefix}\"\n")
    data = lau.parse_manifest(text)
    assert data == {"name": "mirage", "version": "2", "kernel": "www.xen", "memory": 32, "sha256": {"www.xen": "a" * 64},
                    "health": {"port": 8080, "path": "/health"}, "extra": "--ipv4={address}/{prefix}"}
    assert lau.parse_manifest(json.dumps(data)) == data
    with pytest.raises(lau.Error, match="line 1: not `key: value`"):
        lau.parse_manifest("- a list\n")


def test_xl_config_from_manifest_and_site(lau, paths):
    d = make_version(paths.store, "1.0-abc", {"memory": 64})
    g = lau.load(d, SITE)
    cfg = lau.xl_config(g)
    assert f'kernel = "{d.resolve()}/vmlinuz"' in cfg
    assert f'ramdisk = "{d.resolve()}/initrd.gz"' in cfg
    assert "memory = 64" in cfg and "vcpus = 1" in cfg and 'name = "demo"' in cfg
    assert "vif = ['mac=00:16:3e:42:00:02,bridge=br0']" in cfg
    assert 'extra = "console=hvc0 ip=127.0.0.1::10.42.0.1:255.255.255.0:demo:eth0:off"' in cfg
    assert 'on_crash = "destroy"' in cfg
    bare = lau.load(make_version(paths.store, "mirage-1", {"name": "mirage", "extra": "--ipv4={address}/{prefix}",
                                                          "health": None}, ramdisk=False), SITE)
    assert "ramdisk" not in lau.xl_config(bare) and 'extra = "--ipv4=127.0.0.1/24"' in lau.xl_config(bare)
    assert bare.health is None


@pytest.mark.parametrize("change, message", [
    ({"version": "other"}, "version: 'other' does not match its directory '1.0'"),
    ({"sha256": {}}, "sha256: no sha256 for vmlinuz"),
    ({"mac": "00:16:3E:42:00:02"}, "mac: '00:16:3E:42:00:02' is not a lower-case MAC address"),
    ({"extra": "ip={nope}"}, "extra: unknown placeholder 'nope'"),
    ({"kernel": "../vmlinuz"}, "kernel: '../vmlinuz' must be a file name in the version's directory"),
    ({"name": "no spaces"}, "name: 'no spaces' must be letters"),
    ({"memory": "lots"}, "memory: 'lots' must be int"),
])
def test_bad_manifests_are_refused(lau, paths, change: dict[str, Any], message: str):
    d = make_version(paths.store, "1.0", change)
    with pytest.raises(lau.Error) as err:
        lau.load(d, SITE)
    assert str(err.value).startswith(f"{d}/guest.yaml: ") and message in str(err.value)


def test_verify_checks_sha256_and_zimage(lau, paths):
    d = make_version(paths.store, "1.0")
    lau.verify(lau.load(d, SITE))
    (d / "initrd.gz").write_bytes(b"tampered")
    with pytest.raises(lau.Error, match="sha256 does not match"):
        lau.verify(lau.load(d, SITE))
    d2 = make_version(paths.store, "2.0")
    (d2 / "vmlinuz").write_bytes(b"not a kernel at all" * 4)
    m = json.loads((d2 / "guest.yaml").read_text())
    m["sha256"]["vmlinuz"] = guest.sha256(d2 / "vmlinuz")
    (d2 / "guest.yaml").write_text(json.dumps(m))
    with pytest.raises(lau.Error, match="not an ARM zImage"):
        lau.verify(lau.load(d2, SITE))


def test_switch_is_atomic_and_keeps_previous(lau, paths):
    for v in ("1.0", "2.0"):
        make_version(paths.store, v)
    assert lau.switch_pointers(paths, "1.0") is None
    seen: set[str] = set()
    missing: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.add(os.readlink(paths.store / "current"))
            except OSError as exc:
                missing.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(300):
        lau.set_pointer(paths, "2.0" if i % 2 == 0 else "1.0")
    stop.set()
    t.join()
    assert not missing, "a reader found no `current` while it was being switched"
    assert seen <= {"1.0", "2.0"}
    assert lau.switch_pointers(paths, "2.0") == "1.0"
    assert lau.pointer(paths) == "2.0" and lau.pointer(paths, "previous") == "1.0"
    assert sorted(p.name for p in paths.store.iterdir()) == ["1.0", "2.0", "current", "previous"]
    assert lau.versions(paths) == ["1.0", "2.0"]


def test_switch_refuses_a_broken_version(lau, paths):
    make_version(paths.store, "1.0")
    bad = make_version(paths.store, "2.0")
    lau.switch_pointers(paths, "1.0")
    (bad / "vmlinuz").write_bytes(zimage(b"changed"))
    with pytest.raises(lau.Error, match="sha256 does not match"):
        lau.switch_pointers(paths, "2.0")
    assert lau.pointer(paths) == "1.0"
    listing = lau.cmd_list(paths)
    assert [(v["version"], v["ok"], v["current"]) for v in listing["versions"]] == [("1.0", True, True),
                                                                                    ("2.0", False, False)]


FAKE_XL = """#!{python}
# A stand-in for xl: domains are names in a file; every call is logged.
import sys, pathlib, re
here = pathlib.Path(__file__).parent
state, calls = here / "domains", here / "xl-calls"
doms = state.read_text().split() if state.exists() else []
with open(calls, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
cmd, arg = sys.argv[1], sys.argv[2]
if cmd == "create":
    doms.append(re.search(r'^name = "(.*)"$', pathlib.Path(arg).read_text(), re.M).group(1))
elif cmd == "domid":
    if arg not in doms:
        sys.exit(1)
    print(7)
elif cmd in ("destroy", "shutdown"):
    doms = [d for d in doms if d != arg]
state.write_text(" ".join(doms))
"""


@pytest.fixture
def web():
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_supervisor_starts_restarts_and_stops(lau, paths, web, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_GUEST_CHECK_BRIDGE", "0")
    xl = tmp_path / "xl"
    xl.write_text(FAKE_XL.format(python=sys.executable))
    xl.chmod(0o755)
    paths.site.write_text(json.dumps({**SITE, "port": web}))
    make_version(paths.store, "1.0")
    lau.set_pointer(paths, "1.0")
    sup = lau.Supervisor(paths, lau.Xl(str(xl)), poll_s=0.1, probe_s=0.2)
    t = threading.Thread(target=sup.run)
    t.start()
    try:
        wait_for(lambda: lau.read_state(paths).get("state") == "healthy")
        assert (tmp_path / "domains").read_text() == "demo"
        assert (paths.run / "demo.cfg").read_text() == lau.xl_config(lau.current(paths))
        (tmp_path / "domains").write_text("")          # the guest crashes (on_crash=destroy) or is destroyed
        wait_for(lambda: sup.restarts == 1 and lau.read_state(paths).get("state") == "healthy")
        assert (tmp_path / "domains").read_text() == "demo"
        assert sup.failures == 1 and sup.backoff() == 0, "the first restart is immediate"
    finally:
        sup.stop.set()
        t.join(10)
    assert not t.is_alive()
    assert (tmp_path / "domains").read_text() == ""
    assert lau.read_state(paths)["state"] == "stopped"
    calls = (tmp_path / "xl-calls").read_text().splitlines()
    assert sum(c.startswith("create ") for c in calls) == 2 and "shutdown demo" in calls


def test_supervisor_backs_off_when_the_guest_never_answers(lau, paths, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_GUEST_CHECK_BRIDGE", "0")
    xl = tmp_path / "xl"
    xl.write_text(FAKE_XL.format(python=sys.executable))
    xl.chmod(0o755)
    paths.site.write_text(json.dumps({**SITE, "port": 9, "deadline": 1}))  # nothing listens on port 9
    make_version(paths.store, "1.0")
    lau.set_pointer(paths, "1.0")
    sup = lau.Supervisor(paths, lau.Xl(str(xl)), poll_s=0.1)
    t = threading.Thread(target=sup.run)
    t.start()
    try:
        wait_for(lambda: lau.read_state(paths).get("state") == "backoff", timeout=20)
        state = lau.read_state(paths)
        assert state["failures"] == 2 and state["retry_in"] == 5
        assert state["error"] == "demo 1.0 did not answer at http://127.0.0.1:9/ within 1 s"
        assert (tmp_path / "domains").read_text() == "", "an unhealthy guest is destroyed before the next try"
    finally:
        sup.stop.set()
        t.join(10)
    assert [lau.BACKOFF_S[min(n, len(lau.BACKOFF_S)) - 1] for n in (1, 2, 3, 8, 20)] == [0, 5, 10, 300, 300]


def test_cli_prints_json(paths, tmp_path: Path, monkeypatch):
    make_version(paths.store, "1.0")
    make_version(paths.store, "2.0")
    env = {**os.environ, "APPLIANCE_GUEST_STORE": str(paths.store), "APPLIANCE_GUEST_SITE": str(paths.site),
           "APPLIANCE_GUEST_RUN": str(paths.run), "APPLIANCE_XL": "/bin/false", "APPLIANCE_GUEST_NO_SYSTEMD": "1"}
    cli = [sys.executable, str(BOOTH / "usr/local/sbin/appliance-guest")]

    def run(*args: str) -> tuple[int, dict[str, Any]]:
        p = subprocess.run([*cli, *args], check=False, capture_output=True, text=True, env=env)
        return p.returncode, json.loads(p.stdout)

    rc, out = run("switch", "1.0")
    assert rc == 0 and out["current"] == "1.0" and out["restarted"] is False
    rc, out = run("switch", "2.0")
    assert rc == 0 and out["switched_from"] == "1.0" and out["previous"] == "1.0"
    rc, out = run("rollback")
    assert rc == 0 and out["current"] == "1.0" and out["previous"] == "2.0"
    rc, out = run("switch", "3.0")
    assert rc == 1 and out == {"ok": False, "error": f"{paths.store}/3.0: no such version (have: 1.0, 2.0)"}
    rc, out = run("status")
    assert rc == 1 and out["running"] is False and out["version"] == "1.0"
    rc, out = run("list")
    assert rc == 0 and [v["version"] for v in out["versions"]] == ["1.0", "2.0"]


def wait_for(cond, timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


# ---------------------------------------------------------------- guest bundles on the host


def test_cpio_is_deterministic_and_readable(tmp_path: Path):
    from appliance import cpio

    entries = [cpio.directory("www"), cpio.file("init", b"#!/bin/sh\n", 0o755), cpio.file("www/index.html", b"<p>hi</p>"),
               cpio.symlink("bin/sh", "busybox"), cpio.directory("bin")]
    a, b = cpio.pack(entries), cpio.pack(list(reversed(entries)))
    assert a == b
    if shutil.which("cpio"):
        listing = subprocess.run(["cpio", "-t"], input=a, capture_output=True, check=True).stdout.decode().split()
        assert listing == ["bin", "bin/sh", "init", "www", "www/index.html"]


def test_cpio_adds_the_parent_directories_the_kernel_would_not_make():
    from appliance import cpio

    archive = cpio.pack([cpio.file("lib/modules/6.1/kernel/ext4.ko", b"\x7fELF")])
    if not shutil.which("cpio"):
        pytest.skip("no cpio on this host")
    listing = subprocess.run(["cpio", "-t"], input=archive, capture_output=True, check=True).stdout.decode().split()
    assert listing == ["lib", "lib/modules", "lib/modules/6.1", "lib/modules/6.1/kernel",
                       "lib/modules/6.1/kernel/ext4.ko"]


def test_a_bare_zimage_is_a_bundle(tmp_path: Path):
    k = tmp_path / "mirage-www.xen"
    k.write_bytes(zimage(b"unikernel"))
    manifest, files = guest.read_bundle(k)
    assert manifest["name"] == "mirage-www" and manifest["version"].startswith("mirage-www-")
    assert files == {"mirage-www.xen": k}


def test_install_a_user_bundle(tmp_path: Path):
    bundle = tmp_path / "mybundle"
    bundle.mkdir()
    (bundle / "kernel.xen").write_bytes(zimage(b"mine"))
    (bundle / "guest.yaml").write_text(f"name: mine\nversion: '7'\nkernel: kernel.xen\nmemory: 48\nsha256:\n"
                                       f"  kernel.xen: {guest.sha256(bundle / 'kernel.xen')}\n")
    text = RECIPE.format(name="u", wifi="  open: true", network="  uplink: dhcp") + "guest:\n  bundle: mybundle\n"
    (tmp_path / "u.yaml").write_text(text)
    cfg = config.load(str(tmp_path / "u.yaml"))
    tree = tmp_path / "tree"
    assert guest.install(cfg, None, tree) == "7"
    store = tree / guest.STORE
    assert os.readlink(store / "current") == "7"
    m = json.loads((store / "7/guest.yaml").read_text())
    assert m["memory"] == 48 and m["vcpus"] == 1 and m["mac"] == "00:16:3e:42:00:02"
    assert m["health"] == {"port": 80, "path": "/", "deadline": 120}
    guest.check(cfg)
    (bundle / "kernel.xen").write_bytes(b"no zImage here" * 4)
    with pytest.raises(GuestError, match="sha256 does not match"):
        guest.install(cfg, None, tree)
    with pytest.raises(GuestError, match=r"guest.yaml: sha256: kernel.xen is missing or does not match the file"):
        guest.check(cfg)


def test_a_missing_bundle_is_named(tmp_path: Path):
    text = RECIPE.format(name="u", wifi="  open: true", network="  uplink: dhcp") + "guest:\n  bundle: nowhere\n"
    (tmp_path / "u.yaml").write_text(text)
    cfg = config.load(str(tmp_path / "u.yaml"))
    with pytest.raises(GuestError) as err:
        guest.check(cfg)
    assert str(err.value) == f"{tmp_path}/u.yaml: guest.bundle: no such file or directory {tmp_path}/nowhere"
    guest.check(config.load("booth"))  # the demo's sources are all there


def test_the_initramfs_loads_what_modules_load_d_names(tmp_path: Path):
    from appliance import bootfiles

    conf = tmp_path / "etc/modules-load.d"
    conf.mkdir(parents=True)
    (conf / "b.conf").write_text("# the firewall\nnf_tables\n\n; old style comment\n  nft_ct  \n")
    (conf / "a.conf").write_text("xenfs\nxen-evtchn\n")
    (conf / "README").write_text("not a .conf\n")
    assert bootfiles.early_modules(tmp_path) == ["xenfs", "xen-evtchn", "nf_tables", "nft_ct"]
    assert bootfiles.early_modules(tmp_path / "nothing") == []
