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


def zimage(tag: bytes = b"") -> bytes:
    head = bytearray(0x30)
    head[0x24:0x28] = (0x016F2818).to_bytes(4, "little")
    return bytes(head) + tag


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
