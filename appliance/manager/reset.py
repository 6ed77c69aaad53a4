"""The end of a drain: the visitors' connections still open to an old guest are reset, so a browser retries at
once instead of waiting on a guest that is gone. Their conntrack entries go (`conntrack -D`), and dom0 sends each
visitor one out-of-window ACK from the service address: the visitor answers with an ACK carrying its own
sequence numbers, which no longer matches a DNAT and reaches a port with no socket, so a RST in the visitor's
window goes back (RFC 5961's challenge ACK; no sequence number needed here).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

from .errors import Error
from .net import Net, live

Flow = tuple[str, int, str, int]       # visitor address and port, service address and port


def flows(net: Net, backend: str, own: str | None = None) -> list[Flow]:
    """The visitors' TCP connections to a backend that are not over (dom0's own, from `own`, left out)."""
    ipaddress.IPv4Address(backend)
    out: list[Flow] = []
    for e in net._tcp([*net.conntrack, "-L", "-p", "tcp", "--reply-src", backend]):
        words = dict(w.split("=", 1) for w in e[4:8] if "=" in w)
        if not live(e) or words.get("src") == own or not {"src", "dst", "sport", "dport"} <= words.keys():
            continue
        out.append((words["src"], int(words["sport"]), words["dst"], int(words["dport"])))
    return out


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ack(flow: Flow) -> bytes:
    """An IPv4 packet from the service to the visitor: a bare ACK with sequence numbers it will not accept."""
    visitor, vport, service, sport = flow
    src, dst = socket.inet_aton(service), socket.inet_aton(visitor)
    seq, acked = struct.unpack("!II", os.urandom(8))
    tcp = struct.pack("!HHIIBBHHH", sport, vport, seq, acked, 5 << 4, 0x10, 1024, 0, 0)
    tcp = tcp[:16] + struct.pack("!H", _checksum(src + dst + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, src, dst)
    return ip + tcp


def cut(net: Net, backend: str, own: str | None = None) -> int:
    """Reset every visitor's connection still open to backend; how many there were."""
    left = flows(net, backend, own)
    if not left:
        return 0
    p = net._run([*net.conntrack, "-D", "-p", "tcp", "--reply-src", backend], "conntrack -D")
    if p.returncode not in (0, 1):          # 1: none left to delete (they ended meanwhile)
        raise Error(f"conntrack -D -p tcp --reply-src {backend} failed: {p.stderr.strip()[-200:]}")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
            for flow in left:
                try:
                    s.sendto(ack(flow), (flow[0], 0))
                except OSError:
                    pass            # that visitor is gone from the network: nothing waits on it
    except OSError as exc:
        raise Error(f"cannot send the visitors' resets: {exc.strerror}") from None
    return len(left)
