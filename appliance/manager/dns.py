"""The wake-on-DNS side of on-demand sites, as Jitsu did it: dnsmasq sends the queries for an on-demand site's
names here (`server=/NAME/127.0.0.1#5354`); the answer is the site's service address, at once, and the query
wakes the site, so the guest boots while the visitor's device opens its connection. AAAA (and any other type)
for a known name is answered with no address (NOERROR, no records) rather than REFUSED or NXDOMAIN, so that a
phone asking for both does not stall or give up on the name. Names are matched without case, whole.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from . import front
from .errors import Error
from .settings import Front

TTL = 10             # seconds a device may keep the answer; a later connection to the address wakes the site too
A, AAAA, IN = 1, 28, 1
TCP_QUERIES = 64     # queries one TCP connection may ask before it is closed
NOERROR, FORMERR, NXDOMAIN, REFUSED = 0, 1, 3, 5


@dataclass(frozen=True)
class Query:
    id: int
    flags: int
    name: str        # lower case, no trailing dot
    qtype: int
    qclass: int
    question: bytes  # the question section as it came (echoed in the answer)


def parse(packet: bytes) -> Query:
    """One standard query with one question; anything else is an Error (answered FORMERR or dropped)."""
    if len(packet) < 12:
        raise Error("dns: shorter than a header")
    qid, flags, qd, an, ns, _ar = struct.unpack("!6H", packet[:12])
    if flags & 0x8000 or (flags >> 11) & 0xF != 0 or qd != 1 or an or ns:
        raise Error("dns: not one standard query")
    labels, i = [], 12
    while True:
        if i >= len(packet):
            raise Error("dns: the name runs past the packet")
        n = packet[i]
        i += 1
        if n == 0:
            break
        if n & 0xC0 or i + n > len(packet):
            raise Error("dns: a compressed or overlong label in a question")
        labels.append(packet[i:i + n])
        i += n
    if i + 4 > len(packet) or sum(len(x) + 1 for x in labels) > 254:
        raise Error("dns: no type and class after the name")
    qtype, qclass = struct.unpack("!2H", packet[i:i + 4])
    try:
        name = ".".join(x.decode("ascii") for x in labels).lower()
    except UnicodeDecodeError:
        raise Error("dns: a name that is not ASCII") from None
    return Query(qid, flags, name, qtype, qclass, packet[12:i + 4])


def answer(q: Query, rcode: int, address: str | None = None, ttl: int = TTL) -> bytes:
    """The response to q: its question echoed, and one A record when address is given."""
    flags = 0x8000 | 0x0400 | (q.flags & 0x0100) | rcode      # QR, AA, the query's RD, the rcode
    records = b""
    if address is not None:
        records = struct.pack("!HHHIH", 0xC00C, A, IN, ttl, 4) + socket.inet_aton(address)
    return struct.pack("!6H", q.id, flags, 1, 1 if records else 0, 0, 0) + q.question + records


def respond(packet: bytes, names: dict[str, str]) -> tuple[bytes | None, str | None]:
    """The answer to one packet, and the name it asked for when that is a known one (which wakes its site).
    names: host name -> service address."""
    try:
        q = parse(packet)
    except Error:
        if len(packet) >= 12 and not packet[2] & 0x80:
            return packet[:2] + struct.pack("!H", 0x8000 | FORMERR) + b"\0" * 8, None
        return None, None
    name = known(q.name, names)
    if name is None:
        return answer(q, REFUSED), None          # dnsmasq asks only for the names it was told are ours
    if q.qclass != IN:
        return answer(q, NOERROR), name
    return answer(q, NOERROR, names[name] if q.qtype == A else None), name


def known(name: str, names: dict[str, str]) -> str | None:
    """The site name that `name` is or is under (dnsmasq's server=/NAME/ sends the names under it too)."""
    labels = name.split(".")
    for i in range(len(labels)):
        if ".".join(labels[i:]) in names:
            return ".".join(labels[i:])
    return None


class Server:
    """WAKE_DNS over UDP and TCP, in the front door's loop (front.py; its own when none is given): answers at once
    and calls on_query(name) for every known name (in the loop: on_query must not block)."""

    def __init__(self, address: tuple[str, int], names: dict[str, str], on_query: Callable[[str], None],
                 door: front.Door | None = None) -> None:
        self.names, self.on_query = {n.lower(): a for n, a in names.items()}, on_query
        self.own = door is None
        self.door = door or front.Door(Front(), lambda line: None)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind(address)
        except OSError as exc:
            udp.close()
            raise Error(f"dns: cannot listen on {address[0]}:{address[1]}/udp: {exc.strerror}") from None
        self.address = udp.getsockname()
        try:
            tcp = front.tcp_listener(self.address, "dns")
        except Error:
            udp.close()
            raise
        self.door.datagrams(udp, lambda: _Datagrams(self))
        self.door.listen(tcp, self._stream, self.door.dns)

    def start(self) -> Server:
        if self.own:
            self.door.start()
        return self

    def asked(self, name: str | None) -> None:
        if name is not None:
            self.on_query(name)

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """RFC 7766: each message after its two-byte length; connections bounded in number and idle time."""
        idle = self.door.limits.dns_idle_s
        for _ in range(TCP_QUERIES):
            try:
                size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), idle))[0]
                packet = await asyncio.wait_for(reader.readexactly(size), idle)
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                return
            reply, name = respond(packet, self.names)
            if reply is None:
                return
            writer.write(struct.pack("!H", len(reply)) + reply)
            self.asked(name)
            await asyncio.wait_for(writer.drain(), idle)

    def close(self) -> None:
        if self.own:
            self.door.close()


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)   # 3.11's is one without saying so

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply, name = respond(data, self.server.names)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)
        self.server.asked(name)

    def error_received(self, exc: Exception) -> None:
        pass                                  # an ICMP error for an earlier answer: nothing to do
