"""`invoke boards`: the boards on the local network, found over mDNS (DNS-SD `_ssh._tcp`), each with its address and
the SSH host key fingerprints, image and version its first boot published (TXT records). A one-shot query from a
port of our own (RFC 6762 §6.7: answered by unicast), so no mDNS daemon is needed here; every answer is bounded.
"""

from __future__ import annotations

import ipaddress
import os
import random
import select
import socket
import struct
import time
from dataclasses import dataclass, field

from .errors import ApplianceError

MDNS = ("224.0.0.251", 5353)
SERVICE = "_ssh._tcp.local"
PTR, TXT, SRV, A = 12, 16, 33, 1
MAX_PACKET = 9000          # an mDNS message is at most this (RFC 6762 §17)
MAX_BOARDS = 256           # a crowded network's answers stop counting here
MAX_RECORDS = 64           # per message


class DiscoveryError(ApplianceError):
    """The boards could not be looked for."""


class Malformed(ValueError):
    pass


@dataclass
class Discovered:
    """A board as its mDNS service tells of it."""

    instance: str                       # the service's name: the board's host name
    host: str = ""                      # SRV target, NAME.local
    port: int = 22
    address: str = ""
    txt: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.instance.removesuffix("." + SERVICE)

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "host": self.host, "address": self.address, "port": self.port,
                "image": self.txt.get("image", ""), "version": self.txt.get("version", ""),
                "fingerprints": {k.removeprefix("fp-"): v for k, v in self.txt.items() if k.startswith("fp-")}}


# ---------------------------------------------------------------- DNS messages


def _encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        raw = label.encode()
        out += bytes([len(raw)]) + raw
    return out + b"\0"


def query(qid: int, *questions: tuple[str, int]) -> bytes:
    head = struct.pack("!HHHHHH", qid, 0, len(questions), 0, 0, 0)
    return head + b"".join(_encode_name(n) + struct.pack("!HH", t, 1) for n, t in questions)


def _name(msg: bytes, pos: int) -> tuple[str, int]:
    """A (possibly compressed) name at pos, and where the record goes on after it."""
    labels: list[str] = []
    end, jumps, size = None, 0, 0
    while True:
        if pos >= len(msg):
            raise Malformed("a name runs past the message")
        n = msg[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(msg) or jumps > 32:
                raise Malformed("a bad compression pointer")
            end = pos + 2 if end is None else end
            pos, jumps = ((n & 0x3F) << 8) | msg[pos + 1], jumps + 1
            continue
        if n & 0xC0:
            raise Malformed("an unknown label type")
        if n == 0:
            return ".".join(labels), end if end is not None else pos + 1
        size += n + 1
        if size > 255 or pos + 1 + n > len(msg):
            raise Malformed("a name too long")
        labels.append(msg[pos + 1:pos + 1 + n].decode(errors="replace"))
        pos += 1 + n


def records(msg: bytes) -> list[tuple[str, int, object]]:
    """(name, type, value) of every answer, authority and additional record we use; others are skipped."""
    if len(msg) < 12:
        raise Malformed("shorter than a header")
    _, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", msg[:12])
    if not flags & 0x8000:
        return []                       # a query, not an answer
    pos = 12
    for _ in range(min(qd, MAX_RECORDS)):
        pos = _name(msg, pos)[1] + 4
    out: list[tuple[str, int, object]] = []
    for _ in range(min(an + ns + ar, MAX_RECORDS)):
        name, pos = _name(msg, pos)
        if pos + 10 > len(msg):
            raise Malformed("a record runs past the message")
        rtype, _, _, rdlen = struct.unpack("!HHIH", msg[pos:pos + 10])
        pos += 10
        data, start, pos = msg[pos:pos + rdlen], pos, pos + rdlen
        if pos > len(msg):
            raise Malformed("a record's data runs past the message")
        if rtype == PTR:
            out.append((name.lower(), PTR, _name(msg, start)[0]))
        elif rtype == SRV and rdlen >= 7:
            port = struct.unpack("!H", data[4:6])[0]
            out.append((name.lower(), SRV, (port, _name(msg, start + 6)[0])))
        elif rtype == TXT:
            strings, i = {}, 0
            while i < len(data):
                n = data[i]
                if i + 1 + n > len(data):
                    break                       # runs past its record: not a string
                key, _, value = data[i + 1:i + 1 + n].decode(errors="replace").partition("=")
                if key and key.isprintable() and value.isprintable():
                    strings[key.lower()] = value
                i += 1 + n
            out.append((name.lower(), TXT, strings))
        elif rtype == A and rdlen == 4:
            out.append((name.lower(), A, str(ipaddress.IPv4Address(data))))
    return out


# ---------------------------------------------------------------- asking


def _interfaces() -> list[int]:
    return [i for i, name in socket.if_nameindex() if name != "lo"]


def _send(sock: socket.socket, packet: bytes) -> int:
    """The query on every interface (a host has an uplink, maybe wifi and a dock): how many took it."""
    sent = 0
    for index in _interfaces():
        try:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, struct.pack("=4s4si", b"\xe0\0\0\xfb",
                                                                                    b"\0\0\0\0", index))
            sock.sendto(packet, MDNS)
            sent += 1
        except OSError:
            continue        # down, or no IPv4 address on it
    return sent


def browse(timeout: float = 3.0) -> list[Discovered]:
    """The `_ssh._tcp` services answering within `timeout` seconds: what they published, and their addresses."""
    qid = random.randrange(1, 0x10000)
    boards: dict[str, Discovered] = {}
    hosts: dict[str, str] = {}           # NAME.local -> its A record
    sources: dict[str, str] = {}         # instance -> the address its SRV came from
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
        sock.bind(("0.0.0.0", 0))
        if not _send(sock, query(qid, (SERVICE, PTR))):
            raise DiscoveryError("no network interface to ask on for boards (is the network up?)")
        start = time.monotonic()
        asked_again = False
        while (left := start + timeout - time.monotonic()) > 0:
            if not asked_again and left < timeout / 2:
                # what the first answers left out (a responder may send the PTR alone): ask for it by name
                asked_again = True
                more = [(b.instance, t) for b in boards.values() for t in (SRV, TXT) if not (b.host and b.txt)]
                more += [(b.host, A) for b in boards.values() if b.host and b.host not in hosts]
                if more:
                    _send(sock, query(qid, *more[:MAX_RECORDS]))
            if not select.select([sock], [], [], left)[0]:
                break
            msg, peer = sock.recvfrom(MAX_PACKET)
            try:
                recs = records(msg)
            except Malformed:
                continue         # not ours to fix; one bad responder hides no other
            for name, rtype, value in recs:
                if rtype == PTR and name == SERVICE.lower() and isinstance(value, str):
                    if value.lower() not in boards and len(boards) < MAX_BOARDS:
                        boards[value.lower()] = Discovered(value)
                elif rtype == SRV and name in boards and isinstance(value, tuple):
                    boards[name].port, boards[name].host = value
                    sources[name] = peer[0]
                elif rtype == TXT and name in boards and isinstance(value, dict):
                    boards[name].txt = value
                elif rtype == A and isinstance(value, str) and len(hosts) < MAX_BOARDS:
                    hosts[name] = value
    for key, b in boards.items():
        b.address = hosts.get(b.host.lower(), sources.get(key, ""))
    return sorted(boards.values(), key=lambda b: b.name)


def table(boards: list[Discovered]) -> str:
    if not boards:
        return "no board answered (mDNS on this network segment; is the board's uplink on it?)"
    rows = [("name", "address", "image", "version", "SSH host key (ed25519)")]
    for b in boards:
        d = b.as_dict()
        fps: dict[str, str] = d["fingerprints"]  # type: ignore[assignment]
        where = b.address + (f":{b.port}" if b.port != 22 else "")
        rows.append((b.name, where or "-", str(d["image"]) or "-", str(d["version"]) or "-",
                     fps.get("ed25519") or next(iter(fps.values()), "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return os.linesep.join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1]
                           for r in rows)
