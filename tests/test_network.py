"""Network tier on the host: the booth's rendered firewall and dnsmasq in network namespaces wired like the board,
attacked by a hostile visitor while a good visitor keeps fetching the demo site's page.

    namespace "d" (dom0)   br0  10.42.0.1/22, 10.42.0.2/32 (the demo's service address)
                                ports wlan0 -> "v0" (the good visitor), wlan1 -> "v1" (a visitor arriving during the
                                attack), wlan2 -> "att" (the attacker)
                           brg0 10.42.100.1/24, port vif1.0 -> "be" (the demo's blue slot: a Python http.server)
                           eth0 192.168.77.1/24 -> "up" (the uplink: the venue's network, a web server)

The rules are the real ones (the booth recipe rendered by appliance.build.configure, loaded with `nft -f`), and so is
dnsmasq's configuration. The DHCP client of the visitors is busybox udhcpc. The helpers that run inside the
namespaces (attacker, sniffer, web client, probes) are this file run as a script: see `main()`.
Needs root, nft, ip, bridge, dnsmasq and busybox (setup.sh installs them); skipped otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.root

TOOLS = ("nft", "ip", "bridge", "dnsmasq", "busybox")
PAGE = "the demo site, blue slot"
ATTACKER_IP = "10.42.0.66"
GUEST_MAC_SPOOF = 0  # index of the guest MAC the attacker takes (the demo's blue slot)
UPLINK, UPLINK_PEER = "192.168.77.1", "192.168.77.2"


def _needs() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        return f"needs {', '.join(missing)} (./setup.sh installs them)"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Packets (raw Ethernet frames for the attacker and the sniffer; no scapy)

BROADCAST = b"\xff" * 6


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def arp_frame(src_mac: bytes, sender_ip: str, target_ip: str, op: int = 1, dst: bytes = BROADCAST) -> bytes:
    """An ARP request (op 1) or reply (op 2); sender_ip == target_ip makes it gratuitous."""
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, src_mac, socket.inet_aton(sender_ip),
                       b"\0" * 6 if op == 1 else dst, socket.inet_aton(target_ip))
    return dst + src_mac + b"\x08\x06" + body


def udp_frame(src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str, sport: int, dport: int,
              payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), random.getrandbits(16), 0, 64, 17, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + udp


def bootp(op: int, xid: int, chaddr: bytes, options: dict[int, bytes], yiaddr: str = "0.0.0.0",
          siaddr: str = "0.0.0.0") -> bytes:
    """A BOOTP/DHCP message; flags ask for broadcast answers (the attacker's MAC is not the chaddr)."""
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", op, 1, 6, 0, xid, 0, 0x8000, b"\0" * 4,
                       socket.inet_aton(yiaddr), socket.inet_aton(siaddr), b"\0" * 4, chaddr.ljust(16, b"\0"),
                       b"", b"")
    opts = b"".join(bytes([k, len(v)]) + v for k, v in options.items()) + b"\xff"
    msg = head + b"\x63\x82\x53\x63" + opts
    return msg.ljust(300, b"\0")


def ip6_frame(src_mac: bytes, dst_mac: bytes, src: str, dst: str, nexthdr: int, payload: bytes,
              hop_limit: int = 255) -> bytes:
    """An IPv6 frame; payload's checksum (ICMPv6 at 2, UDP at 6) is filled in over the pseudo-header."""
    s6, d6 = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    at = 2 if nexthdr == 58 else 6
    pseudo = s6 + d6 + struct.pack("!I3xB", len(payload), nexthdr)
    payload = payload[:at] + struct.pack("!H", _csum(pseudo + payload)) + payload[at + 2:]
    head = struct.pack("!IHBB", 6 << 28, len(payload), nexthdr, hop_limit) + s6 + d6
    return dst_mac + src_mac + b"\x86\xdd" + head + payload


def router_advert(src_mac: bytes, prefix: str) -> bytes:
    """A router advertisement (a default router for 30 min, and prefix/64 to make addresses from) to all nodes."""
    ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
    ra += struct.pack("!BBBBIII", 3, 4, 64, 0xC0, 86400, 14400, 0) + socket.inet_pton(socket.AF_INET6, prefix)
    ra += bytes([1, 1]) + src_mac                                     # source link-layer address
    link_local = "fe80::" + src_mac[4:].hex()[:2] + "ff:fe" + src_mac[5:].hex()
    return ip6_frame(src_mac, bytes.fromhex("333300000001"), link_local, "ff02::1", 58, ra)


def dhcp6_advertise(src_mac: bytes) -> bytes:
    """A DHCPv6 server's Advertise (UDP 547 -> 546) to all nodes."""
    msg = bytes([2]) + random.randbytes(3)
    udp = struct.pack("!HHHH", 547, 546, 8 + len(msg), 0) + msg
    return ip6_frame(src_mac, bytes.fromhex("333300000001"), "fe80::1", "ff02::1", 17, udp)


def fragments(frame: bytes, size: int = 64) -> list[bytes]:
    """An IPv4 frame (header of 20 bytes) cut into fragments of size bytes (a multiple of 8) of its payload."""
    head, ip, data = frame[:14], frame[14:34], frame[34:]
    out = []
    for off in range(0, len(data), size):
        more = 0x2000 if off + size < len(data) else 0
        part = data[off:off + size]
        h = ip[:2] + struct.pack("!H", 20 + len(part)) + ip[4:6] + struct.pack("!H", more | off // 8) + ip[8:10]
        h += b"\0\0" + ip[12:]
        h = h[:10] + struct.pack("!H", _csum(h)) + h[12:]
        out.append(head + h + part)
    return out


def parse_dhcp(frame: bytes) -> dict[str, Any] | None:
    """The DHCP message in an Ethernet frame (IPv4, UDP 67/68), or None."""
    if len(frame) < 14 + 20 + 8 + 240 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    udp = 14 + ihl
    sport, dport = struct.unpack("!HH", frame[udp:udp + 4])
    if {sport, dport} - {67, 68}:
        return None
    b = frame[udp + 8:]
    if len(b) < 240 or b[236:240] != b"\x63\x82\x53\x63":
        return None
    opts: dict[int, bytes] = {}
    i = 240
    while i < len(b) and b[i] != 255:
        if b[i] == 0:
            i += 1
            continue
        if i + 1 >= len(b):
            break
        opts[b[i]] = b[i + 2:i + 2 + b[i + 1]]
        i += 2 + b[i + 1]
    return {"src_mac": mac_text(frame[6:12]), "sport": sport, "dport": dport, "op": b[0],
            "xid": struct.unpack("!I", b[4:8])[0], "yiaddr": socket.inet_ntoa(b[16:20]),
            "chaddr": mac_text(b[28:34]), "type": opts.get(53, b"\0")[0], "options": opts}


def raw_socket(iface: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((iface, 0))
    return s


def receive(s: socket.socket) -> bytes:
    """The next frame that came in (a packet socket also sees what this host sends: those are skipped)."""
    while True:
        frame, addr = s.recvfrom(2048)
        if addr[2] != socket.PACKET_OUTGOING:
            return frame


def iface_mac(iface: str) -> str:
    return Path(f"/sys/class/net/{iface}/address").read_text().strip()


# ---------------------------------------------------------------------------------------------------------------
# The helpers run inside a namespace: `python tests/test_network.py MODE ARGS...`; each prints one JSON line.

def _stopped(stop: str) -> bool:
    return os.path.exists(stop)


def h_serve(addr: str, port: str, text: str) -> None:
    import http.server

    body = text.encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    http.server.ThreadingHTTPServer((addr, int(port)), Page).serve_forever()


def h_listen(*ports: str) -> None:
    """Stand-ins for dom0's SSH and other services: accept on every address and close."""
    socks = []
    for p in ports:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", int(p)))
        s.listen(64)
        socks.append(s)

    def loop(s: socket.socket) -> None:
        while True:
            c, _ = s.accept()
            c.close()

    for s in socks[1:]:
        threading.Thread(target=loop, args=(s,), daemon=True).start()
    loop(socks[0])


def h_fetch(url: str, stop: str, progress: str) -> None:
    """A steady visitor: GET url in a loop, a new connection each time, until the stop file appears."""
    import http.client
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    ok = fail = 0
    errors: list[str] = []
    while not _stopped(stop):
        try:
            c = http.client.HTTPConnection(u.hostname or "", u.port or 80, timeout=2)
            c.request("GET", u.path or "/")
            r = c.getresponse()
            data = r.read().decode(errors="replace")
            c.close()
            if r.status == 200 and data == PAGE:
                ok += 1
            else:
                fail += 1
                errors.append(f"{r.status} {data[:40]!r}")
        except OSError as e:
            fail += 1
            errors.append(repr(e))
        Path(progress + ".tmp").write_text(f"{ok} {fail}")
        os.replace(progress + ".tmp", progress)
    print(json.dumps({"ok": ok, "fail": fail, "errors": errors[:5]}))


def h_probe(*targets: str) -> None:
    """TCP connects in parallel (0.5 s each): {target: connected}."""
    out: dict[str, bool] = {}

    def one(t: str) -> None:
        host, port = t.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=0.5).close()
            out[t] = True
        except OSError:
            out[t] = False

    threads = [threading.Thread(target=one, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(out))


def h_dns(server: str, *names: str) -> None:
    """A records for names from server: {name: [address, ...]}."""
    out: dict[str, list[str]] = {}
    for name in names:
        qid = random.getrandbits(16)
        q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
        q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.sendto(q, (server, 53))
        r = s.recv(1500)
        s.close()
        ancount = struct.unpack("!H", r[6:8])[0]
        i = len(q)
        addrs = []
        for _ in range(ancount):
            i += 2 if r[i] & 0xC0 == 0xC0 else r.index(b"\0", i) - i + 1
            rtype, _, _, rdlen = struct.unpack("!HHIH", r[i:i + 10])
            i += 10
            if rtype == 1:
                addrs.append(socket.inet_ntoa(r[i:i + 4]))
            i += rdlen
        out[name] = addrs
    print(json.dumps(out))


def h_spoof(iface: str, stop: str, claims: str, macs: str) -> None:
    """Attacks (a) and (b) until stopped: gratuitous ARP for each claimed address, and ARP frames with each
    spoofed source MAC."""
    s = raw_socket(iface)
    own = mac_bytes(iface_mac(iface))
    frames = []
    for ip in claims.split(","):
        frames += [arp_frame(own, ip, ip, 1), arp_frame(own, ip, ip, 2)]
    for mac in macs.split(","):
        frames += [arp_frame(mac_bytes(mac), ATTACKER_IP, "10.42.0.1", 1)]
    sent = 0
    while not _stopped(stop):
        for f in frames:
            s.send(f)
            sent += 1
        time.sleep(0.01)  # a pace, not a wait for anything
    print(json.dumps({"sent": sent}))


def _collect(s: socket.socket, want: set[int], kind: int, quiet: float, total: float) -> dict[int, dict[str, Any]]:
    """DHCP answers of one kind for the xids in want, until every one came, or nothing came for quiet seconds,
    or total seconds passed."""
    got: dict[int, dict[str, Any]] = {}
    end = time.monotonic() + total
    last = time.monotonic()
    while want - set(got) and time.monotonic() < min(end, last + quiet):
        s.settimeout(max(0.01, min(end, last + quiet) - time.monotonic()))
        try:
            m = parse_dhcp(receive(s))
        except TimeoutError:
            break
        if m and m["op"] == 2 and m["xid"] in want and m["type"] == kind:
            got[m["xid"]] = m
            last = time.monotonic()
    return got


def h_flood(iface: str, count: str) -> None:
    """Attack (c): DISCOVER then REQUEST for count random client hardware addresses, all from one station."""
    s = raw_socket(iface)
    own = mac_bytes(iface_mac(iface))
    clients = {random.getrandbits(32): bytes([0x02]) + random.randbytes(5) for _ in range(int(count))}
    for xid, ch in clients.items():
        s.send(udp_frame(own, BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67,
                         bootp(1, xid, ch, {53: b"\x01", 55: b"\x01\x03\x06"})))
    offers = _collect(s, set(clients), 2, quiet=1.0, total=8)
    for xid, m in offers.items():
        s.send(udp_frame(own, BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67,
                         bootp(1, xid, clients[xid], {53: b"\x03", 50: socket.inet_aton(m["yiaddr"]),
                                                       54: m["options"].get(54, b"\0" * 4)})))
    acks = _collect(s, set(offers), 5, quiet=1.0, total=8)
    print(json.dumps({"sent": len(clients), "offers": len(offers), "acks": len(acks),
                      "chaddrs": [mac_text(c) for c in clients.values()]}))


def h_rogue(iface: str, stop: str, victim: str) -> None:
    """Attack (d): a rogue DHCP server. It answers every DISCOVER and REQUEST it sees (offering itself as the
    router), and keeps broadcasting unsolicited offers and acks for the victim's MAC."""
    s = raw_socket(iface)
    s.settimeout(0.02)
    own = mac_bytes(iface_mac(iface))
    me = socket.inet_aton(ATTACKER_IP)
    opts = {54: me, 3: me, 6: me, 1: socket.inet_aton("255.255.252.0"), 51: struct.pack("!I", 3600)}
    answered = unsolicited = 0
    while not _stopped(stop):
        try:
            m = parse_dhcp(receive(s))
        except TimeoutError:
            m = None
        if m and m["op"] == 1 and m["type"] in (1, 3):
            kind = b"\x02" if m["type"] == 1 else b"\x05"
            s.send(udp_frame(own, BROADCAST, ATTACKER_IP, "255.255.255.255", 67, 68,
                             bootp(2, m["xid"], mac_bytes(m["chaddr"]), {53: kind, **opts}, yiaddr="10.42.0.77")))
            answered += 1
        for kind in (b"\x02", b"\x05"):
            s.send(udp_frame(own, BROADCAST, ATTACKER_IP, "255.255.255.255", 67, 68,
                             bootp(2, random.getrandbits(32), mac_bytes(victim), {53: kind, **opts},
                                   yiaddr="10.42.0.77")))
            unsolicited += 1
    print(json.dumps({"answered": answered, "unsolicited": unsolicited}))


def h_sniff(iface: str, stop: str, attacker: str) -> None:
    """What reaches a visitor: DHCP server frames (UDP source port 67), from the attacker and from others."""
    s = raw_socket(iface)
    s.settimeout(0.05)
    counts = {"attacker": 0, "others": 0}
    while not _stopped(stop):
        try:
            m = parse_dhcp(receive(s))
        except TimeoutError:
            continue
        if m and m["sport"] == 67:
            counts["attacker" if m["src_mac"] == attacker else "others"] += 1
    print(json.dumps(counts))


def h_sniff_kinds(iface: str, stop: str, sender: str) -> None:
    """What reaches this host from sender's MAC, by kind: IPv6 router advertisements, DHCPv6 server messages,
    IPv4 fragments, DHCP server messages; until stopped."""
    s = raw_socket(iface)
    s.settimeout(0.05)
    print("listening", flush=True)
    counts = {"router_advert": 0, "dhcp6_server": 0, "fragment": 0, "dhcp_server": 0}
    while not _stopped(stop):
        try:
            f = receive(s)
        except TimeoutError:
            continue
        if mac_text(f[6:12]) != sender:
            continue
        if f[12:14] == b"\x86\xdd" and len(f) > 56:
            counts["router_advert"] += f[20] == 58 and f[54] == 134
            counts["dhcp6_server"] += f[20] == 17 and f[54:56] == b"\x02\x23"
        elif f[12:14] == b"\x08\x00" and len(f) > 34:
            counts["fragment"] += struct.unpack("!H", f[20:22])[0] & 0x3FFF != 0
            counts["dhcp_server"] += bool((m := parse_dhcp(f)) and m["sport"] == 67)
    print(json.dumps(counts))


def h_wake_dns(stop: str, names: str) -> None:
    """The guest manager's wake-on-DNS server (the board's own code), answering the on-demand sites' names that
    dnsmasq sends it: names is a JSON object of name to service address."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from appliance.manager import dns, settings

    server = dns.Server(settings.WAKE_DNS, json.loads(names), lambda name: None).start()
    print("listening", flush=True)
    while not os.path.exists(stop):
        time.sleep(0.1)
    server.close()


def _dns_query(name: str, qtype: int = 1) -> bytes:
    head = struct.pack("!HHHHHH", random.getrandbits(16), 0x0100, 1, 0, 0, 0)
    return head + b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH",
                                                                                                     qtype, 1)


def h_flows(stop: str, dns: str, site: str, udp: str, tcp: str, dns_tcp: str) -> None:
    """One visitor's flows with ordinary sockets: DNS queries each from a new socket (a new source port), TCP
    connects to the site that are never finished (non-blocking: a SYN each), and DNS connections over TCP held
    idle; held until stopped."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    t = time.monotonic()
    for _ in range(int(udp)):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(_dns_query(f"x{random.getrandbits(32):x}.example"), (dns, 53))
    host, port = site.rsplit(":", 1)
    held = []
    for _ in range(int(tcp)):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex((host, int(port)))
        held.append(c)
    idle = 0
    for _ in range(int(dns_tcp)):
        c = socket.socket()
        c.settimeout(0.5)
        try:
            c.connect((dns, 53))
            idle += 1
        except OSError:
            pass
        held.append(c)
    print(json.dumps({"udp": int(udp), "tcp": int(tcp), "dns_tcp_idle": idle, "s": round(time.monotonic() - t, 1)}),
          flush=True)
    while not _stopped(stop):
        time.sleep(0.1)


def h_dns_tcp(server: str, name: str) -> None:
    """An A query over TCP: the answer's addresses, or the error."""
    q = _dns_query(name)
    try:
        with socket.create_connection((server, 53), timeout=3) as c:
            c.sendall(struct.pack("!H", len(q)) + q)
            n = struct.unpack("!H", c.recv(2))[0]
            r = b""
            while len(r) < n:
                chunk = c.recv(n - len(r))
                if not chunk:
                    break
                r += chunk
        ancount = struct.unpack("!H", r[6:8])[0]
        print(json.dumps({"answers": ancount}))
    except (OSError, struct.error) as e:
        print(json.dumps({"error": repr(e)}))


def _dns_tcp_socket(iface: str, source: str) -> socket.socket:
    """A TCP socket that leaves by iface from source (one of a radio's made-up stations)."""
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
    c.bind((source, 0))
    return c


def h_hold_dns_tcp(server: str, per: str, stop: str, *stations: str) -> None:
    """Each station (IFACE=ADDRESS) opens per DNS connections over TCP and holds them idle until stopped; prints
    how many it holds and how many were reset."""
    held: list[socket.socket] = []
    refused = 0
    for station in stations:
        iface, source = station.split("=")
        for _ in range(int(per)):
            c = _dns_tcp_socket(iface, source)
            c.settimeout(1)
            try:
                c.connect((server, 53))
                held.append(c)
            except OSError:
                refused += 1
                c.close()
    print(json.dumps({"held": len(held), "refused": refused}), flush=True)
    while not _stopped(stop):
        time.sleep(0.1)
    for c in held:
        c.close()


def h_churn_dns_tcp(server: str, iface: str, source: str, seconds: str) -> None:
    """One station asks over TCP as fast as it can for seconds, a new connection for each query (each one a
    fork of dnsmasq): how many were answered and how many reset."""
    answered = reset = 0
    end = time.monotonic() + float(seconds)
    q = _dns_query("demo.booth")
    while time.monotonic() < end:
        with _dns_tcp_socket(iface, source) as c:
            c.settimeout(1)
            try:
                c.connect((server, 53))
                c.sendall(struct.pack("!H", len(q)) + q)
                if len(c.recv(2)) == 2:
                    answered += 1
            except OSError:
                reset += 1
    print(json.dumps({"answered": answered, "reset": reset, "s": float(seconds)}))


def h_send(iface: str, frames: str, repeat: str) -> None:
    """Send the frames (hex, one a line, from a file) repeat times, 10 ms apart."""
    s = raw_socket(iface)
    todo = [bytes.fromhex(line) for line in Path(frames).read_text().split()]
    for _ in range(int(repeat)):
        for f in todo:
            s.send(f)
        time.sleep(0.01)       # a pace, not a wait for anything
    print(json.dumps({"sent": len(todo) * int(repeat)}))


def h_sniff_dns(iface: str, stop: str) -> None:
    """DNS answers (UDP from port 53) that reach a visitor, until stopped (then what is queued)."""
    s = raw_socket(iface)
    s.settimeout(0.05)
    print("listening", flush=True)
    answers = 0
    while True:
        try:
            frame = receive(s)
        except TimeoutError:
            if _stopped(stop):
                break
            continue
        if len(frame) > 42 and frame[12:14] == b"\x08\x00" and frame[23] == 17:
            udp = 14 + (frame[14] & 0x0F) * 4
            answers += struct.unpack("!H", frame[udp:udp + 2])[0] == 53
    print(json.dumps({"answers": answers}))


def h_upstream(addr: str, stop: str) -> None:
    """The venue's DNS server: answers every A with 192.168.77.99 and every AAAA with 2001:db8::99; prints the
    names it was asked for when stopped."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, 53))
    s.settimeout(0.1)
    print("listening", flush=True)
    asked: list[str] = []
    while not _stopped(stop):
        try:
            q, peer = s.recvfrom(1500)
        except TimeoutError:
            continue
        i, labels = 12, []
        while q[i]:
            labels.append(q[i + 1:i + 1 + q[i]].decode())
            i += 1 + q[i]
        qtype = struct.unpack("!H", q[i + 1:i + 3])[0]
        asked.append(".".join(labels))
        rdata = socket.inet_aton("192.168.77.99") if qtype == 1 else socket.inet_pton(socket.AF_INET6, "2001:db8::99")
        answer = b"\xc0\x0c" + struct.pack("!HHIH", qtype, 1, 60, len(rdata)) + rdata
        s.sendto(q[:2] + b"\x81\x80" + q[4:6] + b"\x00\x01\x00\x00\x00\x00" + q[12:i + 5] + answer, peer)
    print(json.dumps({"asked": asked}))


def h_ask(server: str, qtype: str, *names: str) -> None:
    """One query of a type for each name: {name: [rcode, answer count]}."""
    out = {}
    for name in names:
        q = _dns_query(name, int(qtype))
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.sendto(q, (server, 53))
        r = s.recv(1500)
        s.close()
        out[name] = [r[3] & 0x0F, struct.unpack("!H", r[6:8])[0]]
    print(json.dumps(out))


def h_connect(*targets: str) -> None:
    """TCP connects (2 s each): {target: "connected" | "refused" | "timeout", and how long it took}."""
    out: dict[str, list[Any]] = {}
    for t in targets:
        host, port = t.rsplit(":", 1)
        start = time.monotonic()
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            what = "connected"
        except ConnectionRefusedError:
            what = "refused"
        except OSError:
            what = "timeout"
        out[t] = [what, round(time.monotonic() - start, 2)]
    print(json.dumps(out))


HELPERS: dict[str, Any] = {"connect": h_connect, "upstream": h_upstream, "ask": h_ask, "send": h_send, "sniff_dns": h_sniff_dns, "flows": h_flows, "dns_tcp": h_dns_tcp, "hold_dns_tcp": h_hold_dns_tcp, "sniff_kinds": h_sniff_kinds, "churn_dns_tcp": h_churn_dns_tcp,
           "serve": h_serve, "listen": h_listen, "fetch": h_fetch, "probe": h_probe, "dns": h_dns,
           "spoof": h_spoof, "flood": h_flood, "rogue": h_rogue, "sniff": h_sniff, "wake_dns": h_wake_dns}


def main(argv: list[str]) -> None:
    HELPERS[argv[0]](*argv[1:])


# ---------------------------------------------------------------------------------------------------------------
# The namespace double


def run(*cmd: str, check: bool = True) -> str:
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and p.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def wait_for(what: str, check: Any, deadline: float = 10) -> Any:
    end = time.monotonic() + deadline
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Double:
    """The board's network in namespaces; every process started here ends in close()."""

    def __init__(self, tmp: Path, files: dict[str, bytes], ctx: dict[str, Any]):
        self.tmp, self.files, self.ctx = tmp, files, ctx
        tag = f"{os.getpid() % 100000}"
        self.ns = {k: f"apn{tag}{k}" for k in ("d", "v0", "v1", "att", "be", "up")}
        self.procs: list[subprocess.Popen[str]] = []
        self.created: list[str] = []
        self.stop = str(tmp / "stop")

    # namespaces and links
    def setup(self, ruleset: str) -> None:
        ns, net, gnet = self.ns, self.ctx["net"], self.ctx["gnet"]
        for n in ns.values():
            run("ip", "netns", "add", n)
            self.created.append(n)
            run("ip", "-n", n, "link", "set", "lo", "up")
        d = ns["d"]
        bridge_nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
        if bridge_nf.exists():  # the board does not load br_netfilter: bridged frames skip the inet hooks there
            for key in ("iptables", "ip6tables", "arptables"):
                run("ip", "netns", "exec", d, "sysctl", "-qw", f"net.bridge.bridge-nf-call-{key}=0", check=False)
        run("ip", "netns", "exec", d, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        br, brg = self.ctx["recipe"].network.bridge, self.ctx["recipe"].guests.bridge
        for b in (br, brg):
            run("ip", "-n", d, "link", "add", b, "type", "bridge")
        for dev, peer in (("wlan0", "v0"), ("wlan1", "v1"), ("wlan2", "att"), ("vif1.0", "be"), ("eth0", "up")):
            run("ip", "link", "add", dev, "netns", d, "type", "veth", "peer", "name", "eth0", "netns", ns[peer])
            run("ip", "-n", ns[peer], "link", "set", "eth0", "up")
            if dev.startswith("wlan"):
                run("ip", "-n", d, "link", "set", dev, "master", br)
            run("ip", "-n", d, "link", "set", dev, "up")
        for b in (br, brg):
            run("ip", "-n", d, "link", "set", b, "up")
        run("ip", "-n", d, "addr", "add", net["cidr"], "dev", br)
        for site in self.ctx["sites"]:
            run("ip", "-n", d, "addr", "add", f"{site['address']}/32", "dev", br)
        run("ip", "-n", d, "addr", "add", gnet["cidr"], "dev", brg)
        run("ip", "-n", d, "addr", "add", f"{UPLINK}/24", "dev", "eth0")
        run("ip", "-n", ns["up"], "addr", "add", f"{UPLINK_PEER}/24", "dev", "eth0")
        run("ip", "-n", ns["up"], "route", "add", "default", "via", UPLINK)
        blue = self.ctx["sites"][0]["slots"]["blue"]
        run("ip", "-n", ns["be"], "link", "set", "eth0", "address", blue["mac"])
        run("ip", "-n", ns["be"], "addr", "add", f"{blue['address']}/{gnet['prefix']}", "dev", "eth0")
        run("ip", "-n", ns["be"], "route", "add", "default", "via", gnet["address"])
        run("ip", "-n", ns["att"], "addr", "add", f"{ATTACKER_IP}/{net['prefix']}", "dev", "eth0")
        # the rules, as nftables.service loads them, then what the guest manager adds at boot and on a health check
        (self.tmp / "nftables.conf").write_text(ruleset)
        run("ip", "netns", "exec", d, "nft", "-f", str(self.tmp / "nftables.conf"))
        if "table bridge appliance" in ruleset:
            self.nft(f"add element bridge appliance dom0_macs {{ {self.mac('d', br)} }}")
        self.plug("vif1.0", blue["mac"], brg, 1)
        site = self.ctx["sites"][0]
        self.nft(f"add element inet appliance svc {{ {site['address']} . {site['port']} : "
                 f"{blue['address']} . {site['port']} }}")

    def plug(self, vif: str, mac: str, bridge: str, domid: int) -> None:
        """A guest's vif joins the guests' bridge as on the board: the board's vif script, run by xl's stand-in."""
        slots = self.tmp / "slots"
        slots.write_bytes(self.files["etc/appliance/slots"])
        env = {**os.environ, "XL_STANDIN_DIR": str(self.tmp / "xl"), "APPLIANCE_SLOTS": str(slots)}
        p = subprocess.run(["ip", "netns", "exec", self.ns["d"], sys.executable, str(Path(__file__).parent /
                            "xl_standin.py"), "plug", vif, mac, bridge, str(domid)], env=env, capture_output=True,
                           text=True, check=False)
        assert p.returncode == 0, p.stderr

    def nft(self, command: str) -> str:
        return run("ip", "netns", "exec", self.ns["d"], "nft", command)

    def mac(self, ns: str, dev: str) -> str:
        return json.loads(run("ip", "-n", self.ns[ns], "-j", "link", "show", dev))[0]["address"]

    def neigh(self, ns: str, ip: str) -> str | None:
        for e in json.loads(run("ip", "-n", self.ns[ns], "-j", "neigh", "show", ip) or "[]"):
            return e.get("lladdr")
        return None

    def fdb(self) -> list[dict[str, Any]]:
        return json.loads(run("bridge", "-n", self.ns["d"], "-j", "fdb", "show", "br",
                              self.ctx["recipe"].network.bridge) or "[]")

    # processes
    def start(self, ns: str, *cmd: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[ns], *cmd], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def helper(self, ns: str, *args: str) -> subprocess.Popen[str]:
        return self.start(ns, sys.executable, __file__, *args)

    def call(self, ns: str, *args: str, timeout: float = 20) -> Any:
        p = self.helper(ns, *args)
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"{args[0]} in {ns} failed: {err.strip()}"
        return json.loads(out)

    @staticmethod
    def result(p: subprocess.Popen[str], timeout: float = 20) -> Any:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"{p.args!r} failed: {err.strip()}"
        return json.loads(out)

    def dnsmasq(self) -> Path:
        conf = self.tmp / "dnsmasq.conf"
        script = Path(__file__).resolve().parent.parent / "overlays/booth/usr/local/sbin/appliance-lease"
        conf.write_text(self.files["etc/dnsmasq.d/appliance.conf"].decode()   # the board's lease script, from here
                        .replace("dhcp-script=/usr/local/sbin/appliance-lease", f"dhcp-script={script}"))
        leases, log = self.tmp / "leases", self.tmp / "dnsmasq.log"
        leases.touch()
        self.start("d", "dnsmasq", "--keep-in-foreground", f"--conf-file={conf}", f"--dhcp-leasefile={leases}",
                   f"--pid-file={self.tmp / 'dnsmasq.pid'}", "--user=root", "--group=root", "--log-dhcp",
                   f"--log-facility={log}")
        wait_for("dnsmasq's DHCP service", lambda: log.exists() and "DHCP, IP range" in log.read_text())
        names = {n: s["address"] for s in self.ctx["sites"] if s["on_demand"] for n in s["names"]}
        if names:                  # dnsmasq sends these to the guest manager, which answers them (and wakes sites)
            p = self.helper("d", "wake_dns", self.stop, json.dumps(names))
            assert p.stdout is not None and p.stdout.readline().strip() == "listening", "the wake DNS server"
        return leases

    def udhcpc(self, ns: str, name: str) -> subprocess.Popen[str]:
        """busybox udhcpc on the namespace's eth0; its script configures the lease and records it in name."""
        out = self.tmp / name
        script = self.tmp / f"{name}.sh"
        script.write_text("#!/bin/sh\ncase \"$1\" in bound|renew)\n"
                          "  ip addr replace \"$ip/$subnet\" dev \"$interface\"\n"
                          "  ip route replace default via \"$router\"\n"
                          f"  env > {out}.tmp && mv {out}.tmp {out} ;;\nesac\n")
        script.chmod(0o755)
        return self.start(ns, "busybox", "udhcpc", "-f", "-q", "-n", "-t", "8", "-T", "1", "-A", "1", "-i", "eth0",
                          "-s", str(script))

    def lease(self, name: str, p: subprocess.Popen[str]) -> dict[str, str]:
        """The lease udhcpc took, once dnsmasq's lease script has put it in the firewall (as a phone, which
        retries, the double's one-shot clients wait for that)."""
        _, err = p.communicate(timeout=30)
        path = self.tmp / name
        assert p.returncode == 0 and path.exists(), f"udhcpc got no lease: {err.strip()}"
        lease = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        ns = next(k for k, v in self.ns.items() if p.args[3] == v)    # type: ignore[index]
        if "set leases {" in (self.tmp / "nftables.conf").read_text():
            key = f"{self.mac(ns, 'eth0')} . {lease['ip']}"
            wait_for(f"the lease {key} in the firewall",
                     lambda: key in run("ip", "netns", "exec", self.ns["d"], "nft", "list", "set", "bridge",
                                        "appliance", "leases"))
        return lease

    def lease_for(self, ns: str, name: str) -> dict[str, str]:
        """A visitor without the address setup gave it, then with dnsmasq's lease."""
        run("ip", "-n", self.ns[ns], "addr", "flush", "dev", "eth0")
        return self.lease(name, self.udhcpc(ns, name))

    def close(self) -> None:
        Path(self.stop).touch()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
        for n in self.created:
            run("ip", "netns", "del", n, check=False)


def leases_of(path: Path) -> dict[str, str]:
    """dnsmasq's lease file: {mac: address}."""
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out[parts[1]] = parts[2]
    return out


def booth(wifi: dict[str, Any] | None = None, **network: Any) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The booth recipe rendered; wifi, network: keys of its wifi and network sections to change."""
    from appliance import config
    from appliance.build import configure
    from appliance.identity import derive

    recipe = config.read_yaml(config.recipe_path("booth"))
    net = recipe["network"] | network if network else None
    cfg = config.load("booth", network=net, wifi=recipe["wifi"] | wifi if wifi else None)
    ctx = configure.context(cfg, derive(cfg.digest))
    files = {f.rel: f.data for f in configure.render_overlays(cfg, ctx) if f.data}
    return files, ctx


def without_bridge_table(ruleset: str) -> str:
    """The ruleset as it would be without its bridge-family filters (to measure what they stop)."""
    start = ruleset.index("table bridge appliance {")
    end = ruleset.index("\n}\n", start) + 3
    return ruleset[:start] + ruleset[end:]


@contextlib.contextmanager
def double(tmp: Path, ruleset_filter: Any = None, wifi: dict[str, Any] | None = None,
           **network: Any) -> Iterator[Double]:
    files, ctx = booth(wifi, **network)
    ruleset = files["etc/nftables.conf"].decode()
    d = Double(tmp, files, ctx)
    try:
        d.setup(ruleset_filter(ruleset) if ruleset_filter else ruleset)
        yield d
    finally:
        d.close()


def attack(d: Double, strict: bool = True) -> dict[str, Any]:
    """The good visitor fetches the page in a loop while the attacker runs (a)-(d); a second visitor arrives
    during the attack. Returns what everyone saw. Not strict (to measure a weaker ruleset): the attack goes on
    for 10 s when the visitor cannot get 50 more pages."""
    ctx = d.ctx
    br = ctx["recipe"].network.bridge
    site, blue = ctx["sites"][0], ctx["sites"][0]["slots"]["blue"]
    url = f"http://{site['address']}:{site['port']}/"
    d.helper("be", "serve", blue["address"], str(site["port"]), PAGE)
    d.helper("d", "listen", "22", "8080")
    d.helper("up", "serve", UPLINK_PEER, "80", "the venue's network")
    health = lambda: d.call("d", "probe", f"{blue['address']}:{site['port']}")  # noqa: E731
    wait_for("the backend", lambda: all(health().values()))
    leases = d.dnsmasq()

    # the good visitor joins: a lease, the names, then the page in a loop
    v0 = d.lease("v0.lease", d.udhcpc("v0", "v0.lease"))
    v0_ip, v0_mac, dom0_mac = v0["ip"], d.mac("v0", "eth0"), d.mac("d", br)
    names = d.call("v0", "dns", ctx["net"]["address"], *site["names"], "connectivitycheck.gstatic.com")
    progress = str(d.tmp / "v0.progress")
    fetch = d.helper("v0", "fetch", url, d.stop, progress)
    wait_for("the good visitor's first page",
             lambda: os.path.exists(progress) and int(Path(progress).read_text().split()[0]) > 0)

    # the attacker
    att_mac = d.mac("att", "eth0")
    claims = ",".join(ctx["dom0_addresses"])
    spoof = d.helper("att", "spoof", "eth0", d.stop, claims, f"{ctx['guest_macs'][GUEST_MAC_SPOOF]},{dom0_mac}")
    rogue = d.helper("att", "rogue", "eth0", d.stop, d.mac("v1", "eth0"))
    sniff = d.helper("v1", "sniff", "eth0", d.stop, att_mac)
    flood = d.call("att", "flood", "eth0", "40")
    # a visitor arriving during the attack, and the good visitor taking a lease again, both from dnsmasq
    v1 = d.lease("v1.lease", d.udhcpc("v1", "v1.lease"))
    v0_again = d.lease("v0b.lease", d.udhcpc("v0", "v0b.lease"))
    before = int(Path(progress).read_text().split()[0])
    try:
        wait_for("50 more pages under attack", lambda: int(Path(progress).read_text().split()[0]) >= before + 50)
    except AssertionError:
        if strict:
            raise
    v1_page = d.call("v1", "probe", f"{site['address']}:{site['port']}")
    neigh = {ip: d.neigh("v0", ip) for ip in ctx["dom0_addresses"]}
    dom0_neigh = d.neigh("d", v0_ip)
    fdb = [e for e in d.fdb() if e.get("ifname") == "wlan2" and e.get("state") != "permanent"]
    Path(d.stop).touch()
    held = leases_of(leases)
    return {
        "names": names, "fetch": d.result(fetch), "spoof": d.result(spoof), "rogue": d.result(rogue),
        "sniff": d.result(sniff), "flood": flood, "v0": v0, "v0_again": v0_again, "v1": v1, "v1_page": v1_page,
        "v0_mac": v0_mac, "v0_ip": v0_ip, "dom0_mac": dom0_mac, "att_mac": att_mac, "neigh": neigh,
        "dom0_neigh": dom0_neigh, "fdb_wlan2": sorted(e["mac"] for e in fdb),
        "attacker_leases": sorted(m for m in held if m in flood["chaddrs"] or m == att_mac), "leases": held,
    }


needs = _needs()


@pytest.mark.skipif(needs is not None, reason=needs or "")
def test_one_hostile_visitor_cannot_take_the_booth_down(tmp_path: Path):
    with double(tmp_path) as d:
        r = attack(d)
        ctx = d.ctx
    site, net = ctx["sites"][0], ctx["net"]
    print(json.dumps({k: r[k] for k in ("fetch", "spoof", "rogue", "sniff", "neigh", "fdb_wlan2")}
                     | {"flood": {k: v for k, v in r["flood"].items() if k != "chaddrs"},
                        "attacker_leases": len(r["attacker_leases"])}))
    # DNS: the site's names and, captive, every other name lead to the service address
    assert all(v == [site["address"]] for v in r["names"].values()), r["names"]
    # the good visitor got every page while the attack ran, and a lease from dnsmasq (again during the attack)
    assert r["fetch"]["fail"] == 0 and r["fetch"]["ok"] >= 50, r["fetch"]
    for lease in (r["v0"], r["v0_again"], r["v1"]):
        assert lease["serverid"] == net["address"] and lease["router"] == net["address"], lease
    assert r["leases"].get(r["v0_mac"]) == r["v0_ip"]
    assert r["v1_page"] == {f"{site['address']}:{site['port']}": True}
    # (a) the gratuitous ARPs moved nothing: the visitor still reaches dom0's addresses at dom0's MAC, dom0 the visitor
    assert r["spoof"]["sent"] > 0
    assert all(mac in (None, r["dom0_mac"]) for mac in r["neigh"].values()), r["neigh"]
    assert r["neigh"][site["address"]] == r["dom0_mac"]
    assert r["dom0_neigh"] == r["v0_mac"]
    # (b) the bridge never learned the guest's nor dom0's MAC on the attacker's port: only the attacker's own
    assert set(r["fdb_wlan2"]) <= {r["att_mac"]}, r["fdb_wlan2"]
    # (c) the flood's made-up client addresses got nothing: a DHCP message's chaddr must be its sender's MAC
    assert r["flood"]["offers"] == r["flood"]["acks"] == 0 and r["attacker_leases"] == [], (r["flood"],
                                                                                            r["attacker_leases"])
    # (d) the rogue server's answers never reached a visitor (dnsmasq's did: the sniffer works)
    assert r["rogue"]["unsolicited"] > 0
    assert r["sniff"]["attacker"] == 0 and r["sniff"]["others"] > 0, r["sniff"]


@pytest.mark.skipif(needs is not None, reason=needs or "")
def test_isolation(tmp_path: Path):
    with double(tmp_path) as d:
        ctx = d.ctx
        site, blue = ctx["sites"][0], ctx["sites"][0]["slots"]["blue"]
        gnet, net = ctx["gnet"], ctx["net"]
        svc, backend = f"{site['address']}:{site['port']}", f"{blue['address']}:{site['port']}"
        d.helper("be", "serve", blue["address"], str(site["port"]), PAGE)
        d.helper("be", "listen", "8080")
        d.helper("d", "listen", "22", "8080")
        d.helper("up", "serve", UPLINK_PEER, "80", "the venue's network")
        wait_for("the backend and the uplink", lambda: all(d.call("d", "probe", backend, f"{UPLINK_PEER}:80",
                                                                     "127.0.0.1:22").values()))
        d.dnsmasq()
        v0 = d.lease_for("v0", "v0.lease")["ip"]
        visitor = d.call("v0", "probe", svc, f"{net['address']}:22", f"{site['address']}:22",
                         f"{site['address']}:8080", backend, f"{blue['address']}:8080", f"{gnet['address']}:22",
                         f"{UPLINK_PEER}:80", f"{UPLINK}:22")
        guest = d.call("be", "probe", f"{gnet['address']}:22", f"{net['address']}:22", f"{UPLINK_PEER}:80",
                       f"{UPLINK}:22", f"{v0}:22")
        dom0 = d.call("d", "probe", backend, svc)
        uplink = d.call("up", "probe", f"{UPLINK}:22")
    assert visitor == {t: t == svc for t in visitor}, visitor
    assert guest == {t: False for t in guest}, guest
    assert dom0 == {backend: True, svc: True}, dom0  # the health check, direct and through the service address
    assert uplink == {f"{UPLINK}:22": True}, uplink


def conntrack_entries(d: Double, src: str | None = None) -> int:
    out = run("ip", "netns", "exec", d.ns["d"], "conntrack", "-L", *(["-s", src] if src else []), check=False)
    return sum(1 for line in out.splitlines() if "src=" in line)


@pytest.mark.skipif(needs is not None or not shutil.which("conntrack"), reason=needs or "needs conntrack")
def test_one_visitor_cannot_fill_connection_tracking(tmp_path: Path):
    """20,000 flows from one visitor's address (10,000 DNS queries from new ports, 10,000 unfinished connections
    to the site, 30 idle DNS connections over TCP): its entries in dom0's table stay within its bounds, and a new
    visitor still gets a lease, DNS (over UDP and TCP) and the page. (This kernel refuses a lower
    nf_conntrack_max in a network namespace, so the table is not made small here: what one visitor holds is.)"""
    with double(tmp_path) as d:
        ctx = d.ctx
        site, blue = ctx["sites"][0], ctx["sites"][0]["slots"]["blue"]
        svc = f"{site['address']}:{site['port']}"
        d.helper("be", "serve", blue["address"], str(site["port"]), PAGE)
        wait_for("the backend", lambda: all(d.call("d", "probe", f"{blue['address']}:{site['port']}").values()))
        d.dnsmasq()
        dns = ctx["net"]["address"]
        att = d.lease_for("att", "att.lease")["ip"]
        flood = d.helper("att", "flows", d.stop, dns, svc, "10000", "10000", "30")
        assert flood.stdout is not None and flood.stderr is not None
        line = flood.stdout.readline()
        assert line, f"the flood helper: {flood.stderr.read()}"
        sent = json.loads(line)
        attacker, total = conntrack_entries(d, att), conntrack_entries(d)
        v1 = d.lease("v1.lease", d.udhcpc("v1", "v1.lease"))
        names = d.call("v1", "dns", dns, *site["names"])
        over_tcp = d.call("v1", "dns_tcp", dns, site["names"][0])
        page = d.call("v1", "probe", svc)
        after = conntrack_entries(d, att)
    print(f"\none visitor's flows {sent}: its conntrack entries {attacker} (then {after}), the table's {total}; "
          f"newcomer: lease {v1.get('ip')}, DNS {names}, DNS over TCP {over_tcp}, page {page}")
    assert attacker <= 64 + 400 + 2, attacker
    assert v1["serverid"] == ctx["net"]["address"], v1
    assert names == {n: [site["address"]] for n in site["names"]}, names
    assert over_tcp == {"answers": 1}, over_tcp
    assert page == {svc: True}, page


def made_up_stations(d: Double, count: int) -> list[str]:
    """One radio with count made-up MACs, each associated and leased: macvlans on the attacker's port, each with
    dnsmasq's lease (in the firewall), answering ARP for its own address only. Returns IFACE=ADDRESS each."""
    att = d.ns["att"]
    for key in ("all", "default"):
        run("ip", "netns", "exec", att, "sysctl", "-qw", f"net.ipv4.conf.{key}.arp_ignore=1",
            f"net.ipv4.conf.{key}.arp_announce=2")
    clients = []
    for i in range(count):
        mac = "02:" + ":".join(f"{b:02x}" for b in random.randbytes(5))
        run("ip", "-n", att, "link", "add", "link", "eth0", f"m{i}", "address", mac, "type", "macvlan", "mode",
            "private")
        run("ip", "-n", att, "link", "set", f"m{i}", "up")
        script = d.tmp / f"m{i}.sh"
        script.write_text("#!/bin/sh\ncase \"$1\" in bound|renew)\n  ip addr replace \"$ip/$subnet\" dev \"$interface\"\n"
                          f"  echo \"$ip\" > {d.tmp / f'm{i}.ip'} ;;\nesac\n")
        script.chmod(0o755)
        clients.append((mac, d.start("att", "busybox", "udhcpc", "-f", "-q", "-n", "-t", "8", "-T", "1", "-A", "1",
                                     "-i", f"m{i}", "-s", str(script))))
    stations = []
    for i, (mac, p) in enumerate(clients):
        p.communicate(timeout=30)
        ip = (d.tmp / f"m{i}.ip").read_text().strip()
        wait_for(f"the lease {mac} . {ip} in the firewall",
                 lambda key=f"{mac} . {ip}": key in d.nft("list set bridge appliance leases"))
        stations.append(f"m{i}={ip}")
    return stations


def dnsmasq_children(d: Double) -> list[int]:
    pid = (d.tmp / "dnsmasq.pid").read_text().strip()
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def private_kib(pid: int) -> int:
    """A process's own memory (what it does not share with its parent): Private_Dirty + Private_Clean."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    return sum(int(line.split()[1]) for line in rollup if line.startswith(("Private_Dirty:", "Private_Clean:")))


@pytest.mark.skipif(needs is not None, reason=needs or "")
def test_one_radio_cannot_hold_every_dns_over_tcp(tmp_path: Path):
    """One radio with 12 made-up stations (each associated and leased), each holding as many idle DNS connections
    over TCP as it can: each holds 2, each served by a child of dnsmasq, and dnsmasq still has a child for a
    newcomer's query over TCP (it has one for every connection the stations hostapd admits may hold). A 13th
    station opening and closing connections as fast as it can is held to its rate (each one is a fork)."""
    with double(tmp_path) as d:
        ctx = d.ctx
        dns, name = ctx["net"]["address"], ctx["sites"][0]["names"][0]
        d.dnsmasq()
        *stations, churner = made_up_stations(d, 13)
        hold = d.helper("att", "hold_dns_tcp", dns, "5", d.stop, *stations)
        assert hold.stdout is not None and hold.stderr is not None
        line = hold.stdout.readline()
        assert line, f"the holding helper: {hold.stderr.read()}"
        held = json.loads(line)
        # a child for each held connection, and dnsmasq's helper for its lease script
        children = wait_for("dnsmasq's children for the held connections",
                            lambda: (c := dnsmasq_children(d)) and len(c) > held["held"] and c)
        memory = sorted(private_kib(c) for c in children)[:-1]
        v1 = d.lease_for("v1", "v1.lease")
        over_udp = d.call("v1", "dns", dns, name)
        over_tcp = d.call("v1", "dns_tcp", dns, name)
        iface, source = churner.split("=")
        churn = d.call("att", "churn_dns_tcp", dns, iface, source, "3")
    print(f"\n12 made-up stations, 5 DNS connections over TCP each: {held}; dnsmasq's children {len(memory)} "
          f"(own memory {min(memory)}-{max(memory)} KiB each, {sum(memory)} KiB in all); newcomer {v1['ip']}: "
          f"UDP {over_udp}, TCP {over_tcp}; a 13th asking over TCP for 3 s: {churn}")
    assert held["held"] == 12 * 2 and held["refused"] == 12 * 3, held
    assert over_udp == {name: [ctx["sites"][0]["address"]]}, over_udp
    assert over_tcp == {"answers": 1}, over_tcp
    assert 10 <= churn["answered"] <= 10 + 5 * churn["s"] + 2, churn


def rule_counter(d: Double, chain: str, comment: str) -> int:
    rules = json.loads(run("ip", "netns", "exec", d.ns["d"], "nft", "-j", "list", "chain", "bridge", "appliance",
                           chain))["nftables"]
    for r in rules:
        rule = r.get("rule", {})
        if comment in rule.get("comment", ""):
            return sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    raise AssertionError(f"no rule with {comment!r} in {chain}")


@pytest.mark.skipif(needs is not None, reason=needs or "")
def loading_and_sniffing(d: Double, site: dict[str, Any]) -> tuple[subprocess.Popen[str], str, subprocess.Popen[str]]:
    """Visitor v0 loading the site's page over and over (its first page in; the count in the progress file), and a
    DNS sniffer listening on v0's port (stopped by touching stop-sniff)."""
    progress = str(d.tmp / "v0.progress")
    fetch = d.helper("v0", "fetch", f"http://{site['address']}:{site['port']}/", d.stop, progress)
    wait_for("the visitor's first page", lambda: os.path.exists(progress) and
             int(Path(progress).read_text().split()[0]) > 0)
    sniff = d.helper("v0", "sniff_dns", "eth0", str(d.tmp / "stop-sniff"))
    assert sniff.stdout is not None and sniff.stdout.readline().strip() == "listening"
    return fetch, progress, sniff


def send_frames(d: Double, ns: str, name: str, frames: list[bytes], repeat: int = 50) -> None:
    """Namespace ns sends the raw frames on its eth0, `repeat` times each."""
    path = d.tmp / f"{name}.frames"
    path.write_text("\n".join(f.hex() for f in frames))
    d.call(ns, "send", "eth0", str(path), str(repeat))


def test_a_visitor_is_bound_to_its_lease(tmp_path: Path):
    """While a visitor fetches the page in a loop, another visitor (with a lease of its own) claims its address by
    ARP, sends a DHCPRELEASE of its lease, sends DNS queries from its address, and sends frames in each VLAN
    tag (802.1Q, 802.1ad, 0x9100): each is dropped."""
    with double(tmp_path) as d:
        ctx = d.ctx
        site, blue, net = ctx["sites"][0], ctx["sites"][0]["slots"]["blue"], ctx["net"]
        d.helper("be", "serve", blue["address"], str(site["port"]), PAGE)
        wait_for("the backend", lambda: all(d.call("d", "probe", f"{blue['address']}:{site['port']}").values()))
        leases = d.dnsmasq()
        v0 = d.lease_for("v0", "v0.lease")
        att = d.lease_for("att", "att.lease")
        v0_mac, att_mac = mac_bytes(d.mac("v0", "eth0")), mac_bytes(d.mac("att", "eth0"))
        dom0_mac, dom0 = mac_bytes(d.mac("d", ctx["recipe"].network.bridge)), net["address"]
        fetch, progress, sniff = loading_and_sniffing(d, site)

        def send(name: str, frames: list[bytes], repeat: int = 50) -> None:
            send_frames(d, "att", name, frames, repeat)

        # DNS queries from the visitor's address (their answers would go to it: first, while dom0 still knows its MAC)
        send("dns", [udp_frame(att_mac, dom0_mac, v0["ip"], dom0, 40000 + i, 53, _dns_query("demo.booth"))
                     for i in range(5)], repeat=4)
        # the ARP claim of the visitor's address, from the attacker's own MAC
        send("arp", [arp_frame(att_mac, v0["ip"], v0["ip"], 2), arp_frame(att_mac, v0["ip"], dom0, 1)])
        neigh = d.neigh("d", v0["ip"])
        # a DHCPRELEASE of the visitor's lease: from its address, and from the attacker's own
        release = bootp(1, random.getrandbits(32), v0_mac, {53: b"\x07", 54: socket.inet_aton(dom0)})
        release = release[:12] + socket.inet_aton(v0["ip"]) + release[16:]            # ciaddr
        send("release", [udp_frame(att_mac, dom0_mac, src, dom0, 68, 67, release) for src in (v0["ip"], att["ip"])],
             repeat=3)
        # VLAN-tagged ARP claims of dom0's address
        tagged = [f[:12] + tpid + b"\x00\x01" + f[12:] for tpid in (b"\x81\x00", b"\x88\xa8", b"\x91\x00")
                  for f in [arp_frame(att_mac, dom0, dom0, 2)]]
        vlan_before = rule_counter(d, "visitor_port", "no VLAN tags")
        send("vlan", tagged, repeat=10)
        vlan = rule_counter(d, "visitor_port", "no VLAN tags") - vlan_before
        # a sync point: the attacker's own renewal and DNS query are answered, so what came before was handled
        att_again = d.lease("att2.lease", d.udhcpc("att", "att2.lease"))
        own = d.call("att", "dns", dom0, "demo.booth")
        Path(d.tmp / "stop-sniff").touch()
        reflected = d.result(sniff)
        held = leases_of(leases)
        pages = int(Path(progress).read_text().split()[0])
        Path(d.stop).touch()
        fetched = d.result(fetch)
    print(f"\nvisitor {v0['ip']}: dom0's neighbour entry {neigh} (its MAC {mac_text(v0_mac)}); its lease after a "
          f"forged release {held.get(mac_text(v0_mac))}; DNS answers reflected to it {reflected['answers']}; VLAN "
          f"frames dropped {vlan} of 30; its pages {fetched['ok']} ok, {fetched['fail']} failed")
    assert neigh in (None, mac_text(v0_mac)), neigh
    assert held.get(mac_text(v0_mac)) == v0["ip"], held
    assert reflected["answers"] == 0, reflected
    assert vlan == 30, vlan
    assert own == {"demo.booth": [site["address"]]} and att_again["ip"] == att["ip"], (own, att_again)
    assert fetched["fail"] == 0 and fetched["ok"] >= pages > 0, fetched


@pytest.mark.skipif(needs is not None, reason=needs or "")
def test_a_wired_host_cannot_spoof_a_visitor(tmp_path: Path):
    """network.uplink: bridge puts the wired port on the visitors' bridge: a wired host gets a lease and dom0's
    SSH, but while a visitor fetches the page in a loop it can neither claim the visitor's address by ARP, nor
    send DNS queries from it, nor send with the visitor's MAC (the bridge would take the visitor's frames, and a
    release of its lease would pass), nor send from an address not leased to it; and a wifi station cannot
    send with the wired host's MAC."""
    with double(tmp_path, uplink="bridge") as d:
        ctx = d.ctx
        site, blue, net = ctx["sites"][0], ctx["sites"][0]["slots"]["blue"], ctx["net"]
        br = ctx["recipe"].network.bridge
        d.ns["lan"] = d.ns["d"][:-1] + "lan"
        run("ip", "netns", "add", d.ns["lan"])
        d.created.append(d.ns["lan"])
        run("ip", "link", "add", "lan0", "netns", d.ns["d"], "type", "veth", "peer", "name", "eth0", "netns",
            d.ns["lan"])
        run("ip", "-n", d.ns["lan"], "link", "set", "eth0", "up")
        run("ip", "-n", d.ns["d"], "link", "set", "lan0", "master", br, "up")
        d.helper("be", "serve", blue["address"], str(site["port"]), PAGE)
        d.helper("d", "listen", "22")
        wait_for("the backend", lambda: all(d.call("d", "probe", f"{blue['address']}:{site['port']}").values()))
        leases = d.dnsmasq()
        v0 = d.lease_for("v0", "v0.lease")
        wired = d.lease_for("lan", "lan.lease")
        v0_mac, lan_mac = mac_bytes(d.mac("v0", "eth0")), mac_bytes(d.mac("lan", "eth0"))
        dom0_mac, dom0 = mac_bytes(d.mac("d", br)), net["address"]
        fetch, progress, sniff = loading_and_sniffing(d, site)

        def send(ns: str, name: str, frames: list[bytes], repeat: int = 50) -> None:
            send_frames(d, ns, name, frames, repeat)

        release = bootp(1, random.getrandbits(32), v0_mac, {53: b"\x07", 54: socket.inet_aton(dom0)})
        release = release[:12] + socket.inet_aton(v0["ip"]) + release[16:]            # ciaddr
        send("lan", "dns", [udp_frame(lan_mac, dom0_mac, v0["ip"], dom0, 40000 + i, 53, _dns_query("demo.booth"))
                            for i in range(5)], repeat=4)
        send("lan", "arp", [arp_frame(lan_mac, v0["ip"], v0["ip"], 2), arp_frame(lan_mac, v0["ip"], dom0, 1)])
        send("lan", "steal", [arp_frame(v0_mac, v0["ip"], v0["ip"], 2),
                              udp_frame(v0_mac, dom0_mac, v0["ip"], dom0, 68, 67, release)], repeat=10)
        unleased = [udp_frame(lan_mac, dom0_mac, "10.42.0.77", dom0, 40000 + i, 53, _dns_query("demo.booth"))
                    for i in range(5)]
        send("lan", "unleased", unleased, repeat=4)
        send("att", "steal_wired", [arp_frame(lan_mac, wired["ip"], wired["ip"], 2)], repeat=10)
        neigh = {ip: d.neigh("d", ip) for ip in (v0["ip"], wired["ip"])}
        fdb = {e["mac"]: e.get("ifname") for e in d.fdb() if e.get("state") != "permanent"}
        # a sync point: the wired host's own renewal and SSH are answered, so what came before was handled
        wired_again = d.lease("lan2.lease", d.udhcpc("lan", "lan2.lease"))
        ssh = d.call("lan", "probe", f"{dom0}:22")
        Path(d.tmp / "stop-sniff").touch()
        reflected = d.result(sniff)
        held = leases_of(leases)
        pages = int(Path(progress).read_text().split()[0])
        Path(d.stop).touch()
        fetched = d.result(fetch)
    v0_text, lan_text = mac_text(v0_mac), mac_text(lan_mac)
    print(f"\nvisitor {v0['ip']} ({v0_text}), wired host {wired['ip']} ({lan_text}): dom0's neighbour entries "
          f"{neigh}; bridge ports of their MACs {fdb.get(v0_text)}, {fdb.get(lan_text)}; the visitor's lease after a "
          f"release with its MAC {held.get(v0_text)}; DNS answers reflected to it {reflected['answers']}; its pages "
          f"{fetched['ok']} ok, {fetched['fail']} failed; the wired host's SSH {ssh}")
    assert neigh[v0["ip"]] in (None, v0_text) and neigh[wired["ip"]] in (None, lan_text), neigh
    assert fdb.get(v0_text) == "wlan0" and fdb.get(lan_text) == "lan0", fdb
    assert held.get(v0_text) == v0["ip"], held
    assert reflected["answers"] == 0, reflected
    assert fetched["fail"] == 0 and fetched["ok"] >= pages > 0, fetched
    assert wired_again["ip"] == wired["ip"] and ssh == {f"{dom0}:22": True}, (wired_again, ssh)


@pytest.mark.skipif(needs is not None, reason=needs or "")
def test_rogue_routers_and_fragments_reach_no_one(tmp_path: Path):
    """With wifi.client_isolation: false (visitors reach each other), a visitor sends IPv6 router advertisements
    (a default route and a prefix), DHCPv6 Advertises, a DHCP offer cut in IPv4 fragments, and DNS queries cut in
    fragments to dom0: another visitor receives none of them and takes no IPv6 route or address, dom0 neither,
    and dnsmasq answers no fragment (the same query whole is answered)."""
    with double(tmp_path, wifi={"client_isolation": False}) as d:
        ctx, dom0 = d.ctx, d.ctx["net"]["address"]
        br = ctx["recipe"].network.bridge
        d.dnsmasq()
        v0 = d.lease_for("v0", "v0.lease")
        att = d.lease_for("att", "att.lease")
        att_mac, dom0_mac = mac_bytes(d.mac("att", "eth0")), mac_bytes(d.mac("d", br))
        for ns in ("v0", "d"):       # as a phone would, and dom0 too should anything reach it
            run("ip", "netns", "exec", d.ns[ns], "sysctl", "-qw", "net.ipv6.conf.all.accept_ra=2",
                f"net.ipv6.conf.{'eth0' if ns == 'v0' else br}.accept_ra=2")
        stop_sniff = str(d.tmp / "stop-sniff")
        sniff = d.helper("v0", "sniff_kinds", "eth0", stop_sniff, mac_text(att_mac))
        answers = d.helper("att", "sniff_dns", "eth0", stop_sniff)
        for p in (sniff, answers):
            assert p.stdout is not None and p.stdout.readline().strip() == "listening"
        offer = bootp(2, random.getrandbits(32), mac_bytes(d.mac("v0", "eth0")),
                      {53: b"\x02", 54: socket.inet_aton(att["ip"]), 3: socket.inet_aton(att["ip"]),
                       6: socket.inet_aton(att["ip"])}, yiaddr=v0["ip"], siaddr=att["ip"])
        frames = [router_advert(att_mac, "2001:db8:66::"), dhcp6_advertise(att_mac),
                  *fragments(udp_frame(att_mac, BROADCAST, att["ip"], "255.255.255.255", 67, 68, offer)),
                  *(f for i in range(5) for f in fragments(udp_frame(
                      att_mac, dom0_mac, att["ip"], dom0, 41000 + i, 53, _dns_query("demo.booth").ljust(80, b"\0")),
                      size=16))]
        path = d.tmp / "rogue.frames"
        path.write_text("\n".join(f.hex() for f in frames))
        sent = d.call("att", "send", "eth0", str(path), "10")
        whole = d.call("att", "dns", dom0, "demo.booth")           # a sync point: handled after the frames
        routes = {ns: run("ip", "-n", d.ns[ns], "-6", "route", "show") for ns in ("v0", "d")}
        addresses = {ns: run("ip", "-n", d.ns[ns], "-6", "addr", "show") for ns in ("v0", "d")}
        Path(stop_sniff).touch()
        seen, answered = d.result(sniff), d.result(answers)
    print(f"\n{sent['sent']} frames from a visitor (router advertisements, DHCPv6, fragments): another visitor "
          f"received {seen}; its IPv6 routes {routes['v0']!r}; dnsmasq's answers to the visitor {answered['answers']} (1: the "
          f"whole query)")
    assert seen == {"router_advert": 0, "dhcp6_server": 0, "fragment": 0, "dhcp_server": 0}, seen
    for ns in ("v0", "d"):
        assert "default" not in routes[ns] and "2001:db8:66" not in routes[ns] + addresses[ns], (routes, addresses)
    assert whole == {"demo.booth": [ctx["sites"][0]["address"]]} and answered["answers"] == 1, (whole, answered)


@pytest.mark.skipif(needs is not None, reason=needs or "")
def test_non_captive_dns_answers_aaaa_for_the_sites_itself(tmp_path: Path):
    """network.captive: false: other names go to the venue's DNS server, but a site's AAAA is answered by dnsmasq
    (or the wake DNS of an on-demand site) with no address, never from upstream."""
    with double(tmp_path, captive=False) as d:
        ctx, dns = d.ctx, d.ctx["net"]["address"]
        up = d.helper("up", "upstream", UPLINK_PEER, d.stop)
        assert up.stdout is not None and up.stdout.readline().strip() == "listening"
        resolv = d.tmp / "resolv.conf"
        resolv.write_text(f"nameserver {UPLINK_PEER}\n")
        d.files["etc/dnsmasq.d/appliance.conf"] = d.files["etc/dnsmasq.d/appliance.conf"].replace(
            b"resolv-file=/run/appliance/resolv.conf", f"resolv-file={resolv}".encode())
        d.dnsmasq()
        d.lease_for("v0", "v0.lease")
        names = [n for s in ctx["sites"] for n in s["names"]]
        aaaa = d.call("v0", "ask", dns, "28", *names)
        a = d.call("v0", "ask", dns, "1", *names, "example.org")
        Path(d.stop).touch()
        asked = d.result(up)["asked"]
    print(f"\nAAAA {aaaa}; A {a}; upstream asked {asked}")
    assert aaaa == {n: [0, 0] for n in names}, aaaa
    assert a == {**{n: [0, 1] for n in names}, "example.org": [0, 1]}, a
    assert asked == ["example.org"], asked


@pytest.mark.skipif(needs is not None, reason=needs or "")
def test_one_station_cannot_flood_dhcp(tmp_path: Path):
    """DHCP is not tracked: 2,000 DISCOVERs from one station (its own MAC as the client's) reach dnsmasq at most
    at the station's rate (10 a second after a burst of 30), and another station still gets its lease."""
    with double(tmp_path) as d:
        d.dnsmasq()
        log = d.tmp / "dnsmasq.log"
        att = mac_bytes(d.mac("att", "eth0"))
        frames = d.tmp / "discover.frames"
        frames.write_text("\n".join(udp_frame(att, BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67, bootp(
            1, random.getrandbits(32), att, {53: b"\x01"})).hex() for _ in range(20)))
        t = time.monotonic()
        sent = d.call("att", "send", "eth0", str(frames), "100")["sent"]
        took = time.monotonic() - t
        v1 = d.lease("v1.lease", d.udhcpc("v1", "v1.lease"))
        seen = sum(1 for line in log.read_text().splitlines() if f"DHCPDISCOVER(br0) {mac_text(att)}" in line)
    print(f"\n{sent} DISCOVERs in {took:.1f} s from one station: dnsmasq saw {seen}; another station's lease "
          f"{v1.get('ip')}")
    assert seen <= 30 + 10 * (took + 1), seen
    assert v1["serverid"] == d.ctx["net"]["address"], v1


STATION = Path(__file__).resolve().parent.parent / "overlays/booth/usr/local/sbin/appliance-station"


@pytest.mark.skipif(needs is not None or not shutil.which("dhcp_release"),
                    reason=needs or "needs dhcp_release (dnsmasq-utils; ./setup.sh installs it)")
def test_stations_that_leave_give_their_leases_back(tmp_path: Path):
    """A pool of 20 addresses and 40 stations in turn, each with a new MAC (one radio making up MACs, an
    association each): hostapd's event of each one leaving runs the board's action script, which releases its
    lease, so every station gets an address and the pool ends with all 20 free."""
    with double(tmp_path, dhcp_start="10.42.0.100", dhcp_end="10.42.0.119") as d:
        leases = d.dnsmasq()
        env = {**os.environ, "APPLIANCE_ENV": str(d.tmp / "booth.env"), "APPLIANCE_LEASES": str(leases)}
        (d.tmp / "booth.env").write_text(f"BRIDGE={d.ctx['recipe'].network.bridge}\n")
        got, sta = [], d.ns["v1"]
        for i in range(40):
            mac = "02:" + ":".join(f"{b:02x}" for b in random.randbytes(5))
            for step in (["down"], ["address", mac], ["up"]):
                run("ip", "-n", sta, "link", "set", "eth0", *step)
            run("ip", "-n", sta, "addr", "flush", "dev", "eth0")
            p = d.udhcpc("v1", f"s{i}.lease")
            p.communicate(timeout=30)
            if not (d.tmp / f"s{i}.lease").exists():
                break
            got.append(mac)
            # hostapd_cli -a runs it as "IFACE EVENT MAC" when the station leaves
            subprocess.run(["ip", "netns", "exec", d.ns["d"], str(STATION), "wlan1", "AP-STA-DISCONNECTED", mac],
                           env=env, check=True, capture_output=True)
            wait_for(f"{mac}'s lease released", lambda mac=mac: mac not in leases_of(leases))
        held = leases_of(leases)
        print(f"\n{len(got)} of 40 stations got a lease from a pool of 20; leases held at the end: {len(held)}")
        in_firewall = lambda: d.nft("list set bridge appliance leases").split("elements", 1)[1:]  # noqa: E731
        wait_for("the released leases out of the firewall", lambda: not in_firewall())
    assert len(got) == 40, f"station {len(got) + 1} got no address"
    assert held == {}, held


@pytest.mark.skipif(needs is not None, reason=needs or "")
def test_https_is_refused_at_once(tmp_path: Path):
    """Port 443 of dom0 and of every service address (where captive DNS sends every name) answers a reset: a
    phone's browser gives up at once instead of waiting for a timeout."""
    with double(tmp_path) as d:
        ctx = d.ctx
        d.dnsmasq()
        d.lease_for("v0", "v0.lease")
        targets = [f"{a}:443" for a in ctx["dom0_addresses"]]
        got = d.call("v0", "connect", *targets)
    print(f"\n{got}")
    assert {t: got[t][0] for t in targets} == {t: "refused" for t in targets}, got
    assert max(v[1] for v in got.values()) < 1, got


KINDS = {
    "open": ("  ssid: Xen Booth\n  open: true", "  uplink: dhcp"),
    "wpa2": (("  ssid: Booth WPA\n  country: FR\n  hw_mode: a\n  channel: 36\n  open: false\n"
              "  passphrase_file: wifi.pass\n  client_isolation: false"),
             ("  address: 192.168.50.1/24\n  dhcp_start: 192.168.50.20\n  dhcp_end: 192.168.50.80\n"
              "  leases_per_station: 2\n  captive: false\nguests:\n  bridge: brg7\n  address: 192.168.60.1/24\n"
              "sites:\n  - name: game\n    address: 192.168.50.2\n    port: 8080\n    names: [game.local]\n"
              "  - name: about\n    address: 192.168.50.3\n    names: [about.booth]")),
    "bridged": ("  ssid: Bridged\n  open: true\n  channel: 11", "  uplink: bridge\n  unique_hostname: false"),
}


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft")
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_nft_accepts_the_ruleset(tmp_path: Path, kind: str, monkeypatch):
    from appliance import ROOT, config
    from appliance.build import configure
    from appliance.identity import derive

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("APPLIANCE_WIFI_PASSPHRASE", raising=False)
    wifi, network = KINDS[kind]
    (tmp_path / "wifi.pass").write_text("correct horse battery\n")
    path = tmp_path / f"{kind}.yaml"
    path.write_text(f"name: t-{kind}\nboard: cubieboard2\noverlays: [base, booth]\nwifi:\n{wifi}\nnetwork:\n{network}\n")
    cfg = config.load(str(path))
    ctx = configure.context(cfg, derive(cfg.digest))
    files = {f.rel: f.data for f in configure.render_overlays(cfg, ctx) if f.data}
    rules = tmp_path / "nftables.conf"
    rules.write_bytes(files["etc/nftables.conf"])
    p = subprocess.run(["nft", "-c", "-f", str(rules)], check=False, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    text = rules.read_text()
    per = cfg.recipe.network.leases_per_station
    bridged = cfg.recipe.network.uplink == "bridge"
    # + rates (new, DNS, DNS over TCP, DHCP), self, and with a wired port on the bridge each side's MACs
    assert text.count("flags dynamic, timeout") == 2 * per + 5 + 2 * bridged
    for site in ctx["sites"]:
        assert site["address"] in text.split("set dom0_addresses", 1)[1].split("}", 1)[0]
    assert ("meta mark $VISITOR jump visitors" in text) == (cfg.recipe.network.uplink == "bridge")
    conf = tmp_path / "dnsmasq.conf"
    conf.write_bytes(files["etc/dnsmasq.d/appliance.conf"])
    # a child of dnsmasq for each DNS connection over TCP that the stations hostapd admits may hold
    assert f"max-tcp-connections={ctx['max_stations'] * 2}\n" in conf.read_text()
    assert f"max_num_sta={ctx['max_stations']}\n" in files["etc/hostapd/appliance.conf"].decode()
    if shutil.which("dnsmasq"):
        p = subprocess.run(["dnsmasq", "--test", f"--conf-file={conf}"], check=False, capture_output=True,
                           text=True)
        assert p.returncode == 0, p.stderr


RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft")
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipes_ruleset_and_dnsmasq_load(tmp_path: Path, recipe: str):
    """nftables.service loads the ruleset at boot: a syntax error there would leave every board without its
    access point, DHCP and DNS (fail closed). Each shipped recipe's rendering passes `nft -c`, and dnsmasq's
    `--test`."""
    from appliance import config
    from appliance.build import configure
    from appliance.identity import derive

    cfg = config.load(recipe)
    files = {f.rel: f.data for f in configure.render_overlays(cfg, configure.context(cfg, derive(cfg.digest)))
             if f.data}
    if "etc/nftables.conf" not in files:
        pytest.skip(f"{recipe} has no booth firewall")
    (tmp_path / "nftables.conf").write_bytes(files["etc/nftables.conf"])
    p = subprocess.run(["nft", "-c", "-f", str(tmp_path / "nftables.conf")], check=False, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    if shutil.which("dnsmasq"):
        (tmp_path / "dnsmasq.conf").write_bytes(files["etc/dnsmasq.d/appliance.conf"])
        p = subprocess.run(["dnsmasq", "--test", f"--conf-file={tmp_path / 'dnsmasq.conf'}"], check=False,
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr


def test_fail_closed_and_quiet_on_the_bridges():
    """Static facts of the rendered units and configs: no access point, DHCP or DNS without the firewall, one
    line on the console when it fails; avahi and the uplink stay off both bridges."""
    files, ctx = booth()
    text = {k: v.decode() for k, v in files.items() if k.startswith("etc/")}
    for unit in ("hostapd", "dnsmasq"):
        conf = text[f"etc/systemd/system/{unit}.service.d/appliance-fail-closed.conf"]
        assert "Requires=nftables.service" in conf and "After=nftables.service" in conf, unit
    assert "OnFailure=appliance-firewall-failed.service" in text["etc/systemd/system/nftables.service.d/"
                                                                  "appliance-fail-closed.conf"]
    report = text["etc/systemd/system/appliance-firewall-failed.service"]
    assert "/dev/console" in report and "the access point, DHCP and DNS stay off" in report
    br, brg = ctx["recipe"].network.bridge, ctx["recipe"].guests.bridge
    assert f"deny-interfaces={br},{brg}" in text["etc/avahi/avahi-daemon.conf"].splitlines()
    assert f"Name=!vif* {br} {brg}" in text["etc/systemd/network/30-appliance-uplink.network"].splitlines()
    guests = text["etc/systemd/network/21-appliance-guests.network"].splitlines()
    assert f"Name={brg}" in guests and f"Address={ctx['gnet']['cidr']}" in guests
    assert "ConfigureWithoutCarrier=yes" in guests
    visitors = text["etc/systemd/network/20-appliance-bridge.network"].splitlines()
    assert [f"Address={a}" for a in [ctx["net"]["cidr"]] + [f"{s['address']}/32" for s in ctx["sites"]]] == \
        [line for line in visitors if line.startswith("Address=")]
    assert "net.ipv4.ip_forward=1" in text["etc/sysctl.d/60-appliance-forward.conf"].splitlines()
    # a crowd-sized DHCP: 100 stations at once, each leaving gives its lease back, 919 addresses
    assert "max_num_sta=100" in text["etc/hostapd/appliance.conf"].splitlines()
    assert ("ExecStartPost=-/usr/sbin/hostapd_cli -B -p /run/hostapd -a /usr/local/sbin/appliance-station" in
            text["etc/systemd/system/hostapd.service.d/appliance.conf"].splitlines())
    assert ctx["max_stations"] * ctx["recipe"].network.leases_per_station * 2 <= ctx["dhcp_pool"] == 919
    assert "dnsmasq-utils" in ctx["recipe"].packages, "dhcp_release, for appliance-station"
    conntrack = text["etc/sysctl.d/60-appliance-conntrack.conf"].splitlines()
    assert "net.netfilter.nf_conntrack_max=32768" in conntrack
    assert "net.netfilter.nf_conntrack_tcp_timeout_time_wait=10" in conntrack
    # loaded with the rest by the initramfs (nf_conntrack among them), so systemd-sysctl finds the keys
    modules = text["etc/modules-load.d/appliance-net.conf"].splitlines()
    assert {"nf_conntrack", "nft_limit", "nft_connlimit", "nft_reject_inet"} <= set(modules)
    dns = text["etc/dnsmasq.d/appliance.conf"].splitlines()
    assert f"interface={br}" in dns and "except-interface=lo" in dns and "dhcp-host" not in "".join(dns)
    assert "dhcp-lease-max=919" in dns and "dhcp-range=10.42.0.100,10.42.3.250,255.255.252.0,30m" in dns
    assert f"address=/#/{ctx['sites'][0]['address']}" in dns


if __name__ == "__main__":
    main(sys.argv[1:])


def test_the_manager_makes_the_guests_bridge_as_networkd_would(tmp_path: Path):
    """The guests' bridge made ahead of networkd (appliance.manager.net.make_bridge, twice: a restarted manager finds
    it made) is already as its .netdev and .network say: no STP, no forward delay, no IPv6 link-local address,
    dom0's address, up."""
    from appliance import ROOT

    ns = f"appbrg{os.getpid()}"
    run("ip", "netns", "add", ns)
    try:
        code = ("from appliance.manager.net import Net\n"
                "for _ in range(2): Net().make_bridge('brg0', '10.42.100.1/24')\n")
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True, check=False)
        assert p.returncode == 0, p.stderr
        link = json.loads(run("ip", "netns", "exec", ns, "ip", "-d", "-j", "link", "show", "brg0"))[0]
        bridge = link["linkinfo"]["info_data"]
        assert (bridge["stp_state"], bridge["forward_delay"], link["inet6_addr_gen_mode"]) == (0, 0, "none")
        assert "UP" in link["flags"]
        addrs = json.loads(run("ip", "netns", "exec", ns, "ip", "-j", "addr", "show", "brg0"))[0]["addr_info"]
        assert [(a["family"], a["local"], a["prefixlen"]) for a in addrs] == [("inet", "10.42.100.1", 24)]
    finally:
        run("ip", "netns", "del", ns, check=False)
