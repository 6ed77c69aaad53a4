"""The booth's configuration: its templates rendered for WPA2 (two sites), open and bridged-uplink recipes, and bad
values refused (guest bundles: test_bundles.py; the initramfs: test_initramfs.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance import ROOT, config, sites
from appliance.build import configure
from appliance.errors import RecipeError
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
SITES_50 = ("guests:\n  address: 192.168.60.1/24\nsites:\n  - name: game\n    address: 192.168.50.2\n    port: 8080\n"
            "    names: [demo.booth, game.local]\n  - name: about\n    address: 192.168.50.3\n"
            "    names: [about.booth]\n")
KINDS = {
    "wpa2": (("  ssid: Booth WPA\n  country: FR\n  hw_mode: a\n  channel: 36\n  open: false\n"
              "  passphrase_file: wifi.pass\n  client_isolation: false"),
             ("  address: 192.168.50.1/24\n  dhcp_start: 192.168.50.20\n  dhcp_end: 192.168.50.80\n"
              "  captive: false")),
    "open": ("  ssid: Xen Booth\n  open: true", "  uplink: dhcp"),
    "bridged": ("  ssid: Bridged\n  open: true\n  channel: 11", "  uplink: bridge\n  unique_hostname: false"),
}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("APPLIANCE_WIFI_PASSPHRASE", raising=False)


def recipe(tmp_path: Path, kind: str) -> config.Config:
    wifi, network = KINDS[kind]
    text = RECIPE.format(name=f"t-{kind}", wifi=wifi, network=network) + (SITES_50 if kind == "wpa2" else "")
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


def test_wpa2_recipe_with_two_sites(tmp_path: Path):
    cfg = recipe(tmp_path, "wpa2")
    files = rendered(cfg)
    ap = files["etc/hostapd/appliance.conf"].splitlines()
    for line in ("ssid=Booth WPA", "country_code=FR", "hw_mode=a", "channel=36", "wpa=2", "wpa_key_mgmt=WPA-PSK",
                 "rsn_pairwise=CCMP", "wpa_passphrase=correct horse battery", "ap_isolate=0", "bridge=br0"):
        assert line in ap
    assert not any(line.startswith("interface=") for line in ap), "the interface is found at boot"
    dns = files["etc/dnsmasq.d/appliance.conf"].splitlines()
    assert any(line.startswith("dhcp-range=192.168.50.20,192.168.50.80,") for line in dns)
    assert "resolv-file=/run/appliance/resolv.conf" in dns
    assert "address=/demo.booth/192.168.50.2" in dns and "address=/game.local/192.168.50.2" in dns
    assert "address=/about.booth/192.168.50.3" in dns
    assert not any(line.startswith("address=/#/") for line in dns)
    assert not any(line.startswith("dhcp-host=") for line in dns), "guests are not on the visitors' bridge"
    board = json.loads(files["etc/appliance/sites.json"])
    assert board == sites.board_settings(cfg.recipe), "the board's sites.json and the host's view of it agree"
    assert board["guests"] == {"bridge": "brg0", "address": "192.168.60.1", "prefix": 24, "netmask": "255.255.255.0"}
    game, about = board["sites"]["game"], board["sites"]["about"]
    assert (game["address"], game["port"], about["port"]) == ("192.168.50.2", 8080, 80)
    assert game["slots"] == {"blue": {"address": "192.168.60.10", "mac": "00:16:3e:a8:3c:0a"},
                             "green": {"address": "192.168.60.11", "mac": "00:16:3e:a8:3c:0b"}}
    assert about["slots"]["blue"] == {"address": "192.168.60.12", "mac": "00:16:3e:a8:3c:0c"}


def test_open_recipe(tmp_path: Path):
    cfg = recipe(tmp_path, "open")
    files = rendered(cfg)
    ap = files["etc/hostapd/appliance.conf"].splitlines()
    assert "ssid=Xen Booth" in ap and "wpa=0" in ap and "ap_isolate=1" in ap
    assert not any(line.startswith("wpa_passphrase") for line in ap)
    dns = files["etc/dnsmasq.d/appliance.conf"].splitlines()
    assert "address=/#/10.42.0.2" in dns and "no-resolv" in dns
    assert "DHCP=ipv4" in files["etc/systemd/network/30-appliance-uplink.network"]
    bridge = files["etc/systemd/network/20-appliance-bridge.network"].splitlines()
    assert "Address=10.42.0.1/22" in bridge
    assert any(line.startswith("Address=10.42.0.2") for line in bridge), "dom0 owns the service address"
    assert "UNIQUE_HOSTNAME=yes" in files["etc/appliance/booth.env"].splitlines()


def test_secrets_have_their_mode_in_the_image(tmp_path: Path):
    cfg = recipe(tmp_path, "wpa2")
    modes = {f.rel: f.mode for f in configure.render_overlays(cfg, configure.context(cfg, derive(cfg.digest)))}
    assert modes["etc/hostapd/appliance.conf"] == 0o600
    assert modes["etc/dnsmasq.d/appliance.conf"] == 0o644


def test_bridged_uplink_recipe(tmp_path: Path):
    files = rendered(recipe(tmp_path, "bridged"))
    uplink = files["etc/systemd/network/30-appliance-uplink.network"]
    assert "Bridge=br0" in uplink and "DHCP=" not in uplink
    assert "UNIQUE_HOSTNAME=no" in files["etc/appliance/booth.env"].splitlines()
    assert "channel=11" in files["etc/hostapd/appliance.conf"].splitlines()


@pytest.mark.parametrize("wifi, network, sites_, message", [
    ("  ssid: " + "x" * 33 + "\n  open: true", "  uplink: dhcp", None,
     "wifi.ssid: '" + "x" * 33 + "' must be 1 to 32 bytes long"),
    ("  ssid: \"" + "\\u00e9" * 17 + "\"\n  open: true", "  uplink: dhcp", None,
     "must be 1 to 32 bytes long"),  # 17 characters, 34 bytes
    ("  hw_mode: a\n  channel: 11\n  open: true", "  uplink: dhcp", None,
     "wifi.channel: channel 11 is not allowed in hw_mode 'a'"),
    ("  hw_mode: b\n  channel: 36\n  open: true", "  uplink: dhcp", None,
     "wifi.channel: channel 36 is not allowed in hw_mode 'b'"),
    ("  open: true", "  address: 10.42.0.1/24\n  dhcp_end: 10.42.0.199", "  - address: 10.9.0.2",
     "sites[0].address: 10.9.0.2 is outside the bridge's subnet 10.42.0.0/24"),
    ("  open: true", "  dhcp_start: 10.42.0.1", None, "network.address: 10.42.0.1 is inside the DHCP range"),
    ("  open: true", "  dhcp_start: 10.42.0.150\n  dhcp_end: 10.42.0.120", None,
     "network.dhcp_end: 10.42.0.120 comes before network.dhcp_start 10.42.0.150"),
    ("  open: true", "  names: [demo.booth]", None, "network.names: moved to `sites[].names`"),
    ("  open: true", "  uplink: dhcp", "  - names: [Not A Name]",
     "sites[0].names[0]: 'Not A Name' is not a lower-case DNS name"),
    ("  open: true", "  uplink: dhcp", "  - address: 10.42.0.1",
     "sites[0].address: 10.42.0.1 is the router's own address"),
    ("  open: true", "  uplink: dhcp", "  - name: a\n  - name: b\n    names: [demo.booth]\n    address: 10.42.0.3",
     "sites[1].names: 'demo.booth' is already used by sites[0] (a)"),
    ("  open: true", "  uplink: dhcp", "  - memory_mib: 4096", "sites[0].memory_mib: 4096 must be 16 to 2048"),
    ("  open: true", "  leases_per_station: 0", None, "network.leases_per_station: 0 must be 1 to 64"),
    ("  open: true", "  uplink: dhcp", "  - health_path: 'no slash'",
     "sites[0].health_path: 'no slash' must be a URL path"),
    ("  open: true", "  uplink: dhcp", "  - drain: -1", "sites[0].drain: -1 must be 0 to 3600"),
])
def test_bad_values_are_refused(tmp_path: Path, wifi: str, network: str, sites_: str | None, message: str):
    text = RECIPE.format(name="bad", wifi=wifi, network=network) + (f"sites:\n{sites_}\n" if sites_ else "")
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
