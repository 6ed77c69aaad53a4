"""The booth as testinfra sees it: on the built image's rootfs (chroot, image tier) and on the booted board (ssh).

The rendered files must carry the default recipe's values, dnsmasq and nft must accept them, and each site's
store must hold its guest with matching checksums, checked by the board's own guest manager.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from appliance import config, sites

REC = config.load("booth").recipe
SITE = REC.sites[0]
STORE = f"/var/lib/appliance/sites/{SITE.name}"


@pytest.mark.parametrize("package", ["hostapd", "dnsmasq", "nftables", "avahi-daemon", "iw", "wireless-regdb",
                                     "fake-hwclock", "python3", "conntrack", "git", "firmware-realtek", "firmware-atheros",
                                     "firmware-misc-nonfree", "firmware-brcm80211", "fdisk", "e2fsprogs"])
def test_package_installed(host, package):
    assert host.package(package).is_installed


@pytest.mark.parametrize("unit", ["hostapd.service", "dnsmasq.service", "nftables.service", "avahi-daemon.service",
                                  "systemd-networkd.service", "appliance-guest.service",
                                  "appliance-growroot.service", "appliance-hostname.service",
                                  "appliance-ssh-hostkeys.service", "fake-hwclock.service",
                                  "appliance-clock-save.timer", "appliance-resolv.path", "appliance-pull.timer",
                                  "xenstored.service", "xenconsoled.service"])
def test_unit_enabled(host, unit):
    assert host.service(unit).is_enabled


# Debian's LSB scripts for Xen are replaced by native units (xenstored, xenconsoled); the launcher, not
# xendomains, starts the guest; and what the booth does not use is not started at all.
@pytest.mark.parametrize("unit", ["xen.service", "xendomains.service", "wpa_supplicant.service",
                                  "systemd-binfmt.service", "modprobe@drm.service"])
def test_unit_masked(host, unit):
    out = host.run(f"systemctl is-enabled {unit}")
    assert out.stdout.strip() == "masked", out.stdout + out.stderr


# Generators the board has nothing for (no encrypted, verity or GPT disk, no hibernation, no SysV-only script: each
# of its init.d scripts has a native unit) are masked: each was a process in every boot before systemd's first job.
@pytest.mark.parametrize("generator", ["cryptsetup", "gpt-auto", "hibernate-resume", "integritysetup", "veritysetup",
                                       "rc-local", "system-update", "sysv", "run"])
def test_unneeded_systemd_generators_are_masked(host, generator):
    f = host.file(f"/etc/systemd/system-generators/systemd-{generator}-generator")
    assert f.is_symlink and f.linked_to == "/dev/null"


def test_every_sysv_script_has_a_native_unit(host):
    """What masking systemd-sysv-generator relies on: no init.d script would go unstarted."""
    scripts = host.run("ls /etc/init.d").stdout.split()
    assert scripts
    for name in scripts:
        unit = {"hwclock.sh": "hwclock"}.get(name, name)
        units = [f"{d}/{unit}.service" for d in ("/lib/systemd/system", "/etc/systemd/system")]
        assert any(host.file(u).exists or host.file(u).is_symlink for u in units), f"/etc/init.d/{name}: no unit"


def test_the_guests_vifs_join_their_bridge_with_the_short_script(host):
    assert 'vif.default.script="vif-appliance"' in host.file("/etc/xen/xl.conf").content_string.splitlines()
    script = host.file("/etc/xen/scripts/vif-appliance")
    assert script.mode == 0o755 and "hotplug-status\" connected" in script.content_string
    assert host.run("sh -n /etc/xen/scripts/vif-appliance").rc == 0


@pytest.mark.parametrize("path, lines", [
    ("/etc/hostapd/appliance.conf", [f"ssid={REC.wifi.ssid}", f"channel={REC.wifi.channel}",
                                     f"country_code={REC.wifi.country}", f"hw_mode={REC.wifi.hw_mode}",
                                     f"bridge={REC.network.bridge}",
                                     f"ap_isolate={int(REC.wifi.client_isolation)}"]),
    ("/etc/dnsmasq.d/appliance.conf", [f"interface={REC.network.bridge}",
                                       *(f"server=/{n}/{sites.template_context(REC)['wake_dns']}" if s.on_demand
                                         else f"address=/{n}/{s.address}" for s in REC.sites for n in s.names)]),
    ("/etc/systemd/network/20-appliance-bridge.network", [f"Name={REC.network.bridge}",
                                                          f"Address={REC.network.address}"]),
    ("/etc/systemd/network/10-appliance-bridge.netdev", [f"Name={REC.network.bridge}", "Kind=bridge"]),
])
def test_rendered_files_carry_the_recipe(host, path, lines):
    f = host.file(path)
    assert f.is_file
    content = f.content_string.splitlines()
    for line in lines:
        assert line in content, f"{path}: no line {line!r}"


def test_dnsmasq_range_and_mode(host):
    content = host.file("/etc/dnsmasq.d/appliance.conf").content_string
    assert f"dhcp-range={REC.network.dhcp_start},{REC.network.dhcp_end}," in content
    assert (f"address=/#/{SITE.address}" in content) == REC.network.captive


def test_dnsmasq_accepts_its_configuration(host):
    out = host.run("dnsmasq --test -C /etc/dnsmasq.d/appliance.conf")
    assert out.rc == 0, out.stderr
    assert "syntax check OK" in out.stderr + out.stdout


def test_nft_accepts_the_ruleset(host, request):
    if host.backend_name == "ssh":
        out = host.run("nft -c -f /etc/nftables.conf")
        assert out.rc == 0, out.stderr
        return
    # qemu-user cannot open netfilter's netlink socket, so the chroot's own nft cannot check; the host's nft
    # (the same bookworm version) checks the image's file.
    if not shutil.which("nft"):
        pytest.skip("the host has no nft (apt-get install nftables)")
    rootfs = request.getfixturevalue("image_rootfs")
    subprocess.run(["nft", "-c", "-f", str(rootfs / "etc/nftables.conf")], check=True)


def test_sites_settings_match_the_recipe(host):
    assert json.loads(host.file("/etc/appliance/sites.json").content_string) == sites.board_settings(REC)


def test_the_access_points_secret_is_root_only(host):
    f = host.file("/etc/hostapd/appliance.conf")
    assert (f.mode, f.user, f.group) == (0o600, "root", "root")


@pytest.mark.parametrize("site", REC.sites, ids=[s.name for s in REC.sites])
def test_each_sites_guest_in_the_store(host, site):
    store = f"/var/lib/appliance/sites/{site.name}"
    current = host.file(f"{store}/current")
    assert current.is_symlink
    version = current.linked_to.rstrip("/").split("/")[-1]
    manifest = json.loads(host.file(f"{store}/{version}/manifest.json").content_string)
    assert manifest["version"] == version
    if not site.bundle:
        assert manifest["name"] == site.name          # the store names a version by its site
        assert set(manifest["sha256"]) == {"vmlinuz", "initrd.gz"}
    for name, digest in manifest["sha256"].items():
        assert host.file(f"{store}/{version}/{name}").sha256sum == digest, name


def test_guest_manager_lists_and_checks_the_store(host):
    out = host.run(f"/usr/local/sbin/appliance-guest list {SITE.name}")
    assert out.rc == 0, out.stdout + out.stderr
    listing = json.loads(out.stdout)
    assert listing["ok"], listing
    assert "Traceback" not in out.stderr
    text = json.dumps(listing)
    assert host.file(f"{STORE}/current").linked_to.rstrip("/").split("/")[-1] in text
    cfg = json.loads(host.check_output(f"/usr/local/sbin/appliance-guest config {SITE.name}"))["config"]
    blue = sites.resolved(REC)[0]["slots"]["blue"]
    assert f"vif = ['mac={blue['mac']},bridge={REC.guests.bridge}']" in cfg.splitlines()
    assert f"memory = {SITE.memory_mib}" in cfg.splitlines()


@pytest.mark.parametrize("path", ["/usr/local/sbin/appliance-guest", "/usr/local/sbin/appliance-wifi",
                                  "/usr/local/sbin/appliance-growroot", "/usr/local/sbin/appliance-hostname",
                                  "/usr/local/sbin/appliance-resolv", "/usr/local/sbin/appliance-lease",
                                  "/usr/local/sbin/appliance-station", "/usr/local/sbin/appliance-card-check",
                                  "/usr/bin/dhcp_release"])
def test_booth_scripts_are_executable(host, path):
    f = host.file(path)
    assert f.is_file and f.mode & 0o111 and f.user == "root"


def test_no_wifi_device_skips_the_access_point_without_failing(host):
    if host.backend_name == "ssh":
        pytest.skip("on the live board a wifi device may exist")
    out = host.run("/usr/local/sbin/appliance-wifi")  # the chroot has no /sys: no wifi device
    assert out.rc == 1, "exit 1 makes systemd skip hostapd.service (ExecCondition), not fail it"
    assert "no wifi device" in out.stderr


def test_live_services(host):
    if host.backend_name != "ssh":
        pytest.skip("live only")
    for unit in ("dnsmasq", "nftables", "systemd-networkd", "avahi-daemon", "appliance-guest"):
        assert host.service(unit).is_running, unit  # nftables: a oneshot that remains active
    assert host.interface(REC.network.bridge).exists and host.interface(REC.guests.bridge).exists
    out = host.run(f"/usr/local/sbin/appliance-guest status {SITE.name}")
    assert out.rc == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["ok"]
