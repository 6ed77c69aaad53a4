"""A phone on the booth's wifi, run inside dom0 on a simulated radio (mac80211_hwsim): joins, takes a lease,
resolves a name, loads a page, and says each moment on one line ("appliance-visitor: ..."). The bench image runs it
from power-on (its console lines are the boot's visitor milestones); the system tier runs it after boot.

Python 3's standard library only (it runs on the board); no fixed sleeps: each step polls until the deadline. One
process: it moves itself into the visitor's network namespace, so the board's CPU goes to the booth, not to it.
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import os
import random
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
PREFIX = "appliance-visitor:"
DHCP = "/usr/lib/klibc/bin/ipconfig"   # the DHCP client dom0 has (initramfs-tools depends on klibc)
CLONE_NEWNET = 0x40000000


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


def poll(what: str, probe: Callable[[], T | None], deadline: float, interval: float = 0.5) -> T:
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


def enter(netns: str) -> None:
    """Move this process into the named network namespace (as `ip netns exec` would, without a process more)."""
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
    finally:
        os.close(fd)


def resolve(name: str, server: str, port: int = 53) -> str | None:
    """The name's first IPv4 address from the DNS server the lease named (a phone asks that one), else None."""
    qid = random.randrange(65536)
    q = struct.pack("!6H", qid, 0x0100, 1, 0, 0, 0) + b"".join(
        bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0" + struct.pack("!2H", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(2)
        try:
            u.sendto(q, (server, port))
            answer = u.recv(2048)
        except OSError:
            return None
    if len(answer) < 12 or struct.unpack("!H", answer[:2])[0] != qid or struct.unpack("!H", answer[6:8])[0] == 0:
        return None
    i = len(q)                              # the answers follow the question, which the server echoes
    for _ in range(struct.unpack("!H", answer[6:8])[0]):
        i += 2 if answer[i] & 0xC0 == 0xC0 else answer.index(b"\0", i) + 1 - i
        kind, _, _, size = struct.unpack("!2HIH", answer[i:i + 10])
        i += 10
        if kind == 1 and size == 4:
            return socket.inet_ntoa(answer[i:i + 4])
        i += size
    return None


def get(address: str, port: int, host: str, path: str) -> int | None:
    """The page's length once it answers 200 (an on-demand site holds the connection while its guest wakes)."""
    conn = http.client.HTTPConnection(address, port, timeout=60)
    try:
        conn.request("GET", path, headers={"Host": host})
        r = conn.getresponse()
        return len(r.read()) if r.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def page(url: str, dns: str, deadline: float, console: bool, dns_port: int = 53) -> int:
    """Resolve the URL's name with the lease's DNS server and load it, as a browser does."""
    u = urllib.parse.urlsplit(url)
    name = u.hostname or ""
    try:
        addr = poll(f"address for {name} from {dns}", lambda: resolve(name, dns, dns_port), deadline, 0.2)
        say(console, f"resolved {name} to {addr}")
        size = poll(f"page at {url}", lambda: get(addr, u.port or 80, u.netloc, u.path or "/"), deadline, 0.2)
        say(console, f"first page {url} 200 ({size} bytes)")
        return 0
    except GaveUp as exc:
        say(console, f"gave up: {exc}")
        return 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ssid", required=True)
    ap.add_argument("--psk-file", help="WPA2: a file holding the passphrase (else the network is open)")
    ap.add_argument("--iface", help="the radio (default: the second wifi device to appear)")
    ap.add_argument("--netns", default="visitor")
    ap.add_argument("--url", help="the page to load, by name (e.g. http://demo.booth/); none: stop at the lease")
    ap.add_argument("--deadline", type=float, default=300)
    ap.add_argument("--console", action="store_true", help="say each moment on /dev/console too")
    a = ap.parse_args()
    deadline = time.monotonic() + a.deadline
    try:
        iface, phy = poll("second wifi device", lambda: radio(a.iface), deadline, 0.2)
        sh("sh", "-c", f"ip netns del {a.netns} 2>/dev/null; true")
        sh("ip", "netns", "add", a.netns)
        sh("iw", "phy", phy, "set", "netns", "name", a.netns)
        enter(a.netns)
        sh("ip", "link", "set", "lo", "up")
        sh("ip", "link", "set", iface, "up")
        say(a.console, f"radio {iface} ({phy}) in netns {a.netns}")

        # wpa_supplicant scans, joins and tries again after a missed answer (under TCG the AP's authentication
        # answer can miss the station's 100 ms window), as a phone's does; open or WPA2
        if a.psk_file:
            with open(a.psk_file) as f:
                key = f'psk="{f.read().strip()}"\n key_mgmt=WPA-PSK'
        else:
            key = "key_mgmt=NONE"
        conf = f"/run/{a.netns}-wpa.conf"
        with open(os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(f'network={{\n ssid="{a.ssid}"\n {key}\n}}\n')
        sh("wpa_supplicant", "-B", "-i", iface, "-c", conf, "-P", f"/run/{a.netns}-wpa.pid")
        poll(f"association with '{a.ssid}'",
             lambda: "Connected to" in sh("iw", "dev", iface, "link", check=False).stdout or None, deadline)
        say(a.console, f"associated with '{a.ssid}'")

        lease_file = f"/run/net-{iface}.conf"

        def lease() -> dict[str, str] | None:
            if os.path.exists(lease_file):
                os.unlink(lease_file)
            sh(DHCP, "-t", "10", "-c", "dhcp", "-d", iface, check=False, timeout=30)
            if not os.path.exists(lease_file):
                return None
            with open(lease_file) as f:
                return dict(re.findall(r"^(\w+)='?([^'\n]*)'?$", f.read(), re.MULTILINE))

        got = poll("DHCP lease", lease, deadline)
        address, dns = got.get("IPV4ADDR", ""), got.get("IPV4DNS0", "")
        os.makedirs(f"/etc/netns/{a.netns}", exist_ok=True)   # for `ip netns exec` in the namespace later
        with open(f"/etc/netns/{a.netns}/resolv.conf", "w") as f:
            f.write(f"nameserver {dns}\n")
        say(a.console, f"lease {address} dns {dns} on {iface}")
        return page(a.url, dns, deadline, a.console) if a.url else 0
    except (GaveUp, OSError, subprocess.SubprocessError) as exc:
        say(a.console, f"gave up: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
