"""A phone on the booth's wifi, run inside dom0 on a simulated radio (mac80211_hwsim): joins, takes a lease,
resolves a name, loads a page, and says each moment on one line ("appliance-visitor: ..."). The bench image runs it
from power-on (its console lines are the boot's visitor milestones); the system tier runs it after boot.

Python 3's standard library only (it runs on the board); no fixed sleeps: each step polls until the deadline.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

PREFIX = "appliance-visitor:"
DHCP = "/usr/lib/klibc/bin/ipconfig"   # the DHCP client dom0 has (initramfs-tools depends on klibc)
RETRY_S = 2.0                          # a phone that found no network asks again this often


class GaveUp(Exception):
    pass


def say(console: bool, text: str) -> None:
    line = f"{PREFIX} {text}"
    print(line, flush=True)
    if console:
        # the serial console: the bench times each line as it arrives
        with open("/dev/console", "w") as c:
            c.write(line + "\n")


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)


def poll(what: str, probe: Callable[[], T | None], deadline: float, interval: float = 0.2) -> T:
    while True:
        got = probe()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise GaveUp(f"no {what} before the deadline")
        time.sleep(interval)


def radio(iface: str | None) -> tuple[str, str] | None:
    """(interface, phy): the one named, else the wifi device with the highest index once there are two
    (appliance-wifi gives the access point the lowest)."""
    found = []
    for name in os.listdir("/sys/class/net"):
        phy = f"/sys/class/net/{name}/phy80211"
        if os.path.exists(phy) and (iface is None or name == iface):
            with open(f"/sys/class/net/{name}/ifindex") as f:
                found.append((int(f.read()), name, os.path.basename(os.path.realpath(phy))))
    if not found or iface is None and len(found) < 2:
        return None
    _, name, phy = max(found)
    return name, phy


def page(url: str, deadline: float, console: bool) -> int:
    """Resolve the URL's name and load it, as a browser does (in the visitor's namespace)."""
    name = urllib.parse.urlsplit(url).hostname or ""
    try:
        addr = poll(f"address for {name}", lambda: _resolve(name), deadline)
        say(console, f"resolved {name} to {addr}")
        # an on-demand site holds the connection while its guest wakes: a long read timeout
        body = poll(f"page at {url}", lambda: _get(url), deadline)
        say(console, f"first page {url} 200 ({len(body)} bytes)")
        return 0
    except GaveUp as exc:
        say(console, f"gave up: {exc}")
        return 1


def _resolve(name: str) -> str | None:
    try:
        return str(socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
    except OSError:
        return None


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.read() if r.status == 200 else None
    except OSError:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ssid", required=True)
    ap.add_argument("--psk-file", help="WPA2: a file holding the passphrase (else the network is open)")
    ap.add_argument("--iface", help="the radio (default: the second wifi device to appear)")
    ap.add_argument("--netns", default="visitor")
    ap.add_argument("--url", help="the page to load, by name (e.g. http://demo.booth/); none: stop at the lease")
    ap.add_argument("--deadline", type=float, default=300)
    ap.add_argument("--console", action="store_true", help="say each moment on /dev/console too")
    ap.add_argument("--page", help=argparse.SUPPRESS)  # the last steps, run inside the namespace
    a = ap.parse_args()
    deadline = time.monotonic() + a.deadline
    if a.page:
        return page(a.page, deadline, a.console)
    ns = ["ip", "netns", "exec", a.netns]
    try:
        iface, phy = poll("second wifi device", lambda: radio(a.iface), deadline)
        sh("sh", "-c", f"ip netns del {a.netns} 2>/dev/null; true")
        sh("ip", "netns", "add", a.netns)
        sh("iw", "phy", phy, "set", "netns", "name", a.netns)
        sh("ip", "-n", a.netns, "link", "set", "lo", "up")
        sh("ip", "-n", a.netns, "link", "set", iface, "up")
        say(a.console, f"radio {iface} ({phy}) in netns {a.netns}")

        connect = [*ns, "iw", "dev", iface, "connect", a.ssid]
        if a.psk_file:
            with open(a.psk_file) as f:
                psk = f.read().strip()
            conf = f"/run/{a.netns}-wpa.conf"
            with open(os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(f'network={{\n ssid="{a.ssid}"\n psk="{psk}"\n key_mgmt=WPA-PSK\n}}\n')
            sh(*ns, "wpa_supplicant", "-B", "-i", iface, "-c", conf, "-P", f"/run/{a.netns}-wpa.pid")
        last = 0.0

        def associated() -> bool | None:
            nonlocal last
            if "Connected to" in sh(*ns, "iw", "dev", iface, "link", check=False).stdout:
                return True
            # `iw connect` tries once, and under TCG the AP's answer can miss the station's 100 ms window
            # (hostapd: "did not acknowledge authentication response"), or no AP is up yet: try again
            if not a.psk_file and time.monotonic() - last >= RETRY_S:
                sh(*ns, "iw", "dev", iface, "disconnect", check=False)
                sh(*connect, check=False)
                last = time.monotonic()
            return None

        poll(f"association with '{a.ssid}'", associated, deadline)
        say(a.console, f"associated with '{a.ssid}'")

        lease_file = f"/run/net-{iface}.conf"

        def lease() -> dict[str, str] | None:
            if os.path.exists(lease_file):
                os.unlink(lease_file)
            sh(*ns, DHCP, "-t", "10", "-c", "dhcp", "-d", iface, check=False, timeout=30)
            if not os.path.exists(lease_file):
                return None
            with open(lease_file) as f:
                return dict(re.findall(r"^(\w+)='?([^'\n]*)'?$", f.read(), re.MULTILINE))

        got = poll("DHCP lease", lease, deadline)
        address, dns = got.get("IPV4ADDR", ""), got.get("IPV4DNS0", "")
        os.makedirs(f"/etc/netns/{a.netns}", exist_ok=True)
        with open(f"/etc/netns/{a.netns}/resolv.conf", "w") as f:
            f.write(f"nameserver {dns}\n")
        say(a.console, f"lease {address} dns {dns} on {iface}")
        if not a.url:
            return 0

        # the name and the page from inside the visitor's namespace (its resolv.conf is the lease's server)
        return sh(*ns, sys.executable, os.path.abspath(__file__), "--page", a.url, "--ssid", a.ssid,
                  "--deadline", str(max(deadline - time.monotonic(), 1)), *(["--console"] if a.console else []),
                  check=False, timeout=a.deadline + 60).returncode
        return 0
    except (GaveUp, OSError, subprocess.SubprocessError) as exc:
        say(a.console, f"gave up: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
