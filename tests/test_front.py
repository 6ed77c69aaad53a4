"""dom0's front door on loopback (front.py): the wake DNS server over TCP, each bound hit (connections per
address and in total, idle time, a full file table), and a loop that outlives a failing connection.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from appliance import ROOT
from appliance.manager import dns, front, settings
from appliance.manager.errors import Error
from appliance.manager.settings import Front

pytestmark = pytest.mark.unit

NAMES = {"demo.booth": "10.42.0.2"}


def query(name: str, qid: int = 7) -> bytes:
    q = struct.pack("!6H", qid, 0x0100, 1, 0, 0, 0) + b"".join(bytes([len(x)]) + x.encode() for x in name.split("."))
    return q + b"\0" + struct.pack("!2H", dns.A, dns.IN)


def ask(s: socket.socket, packet: bytes) -> bytes:
    s.sendall(struct.pack("!H", len(packet)) + packet)
    head = recv_exactly(s, 2)
    return recv_exactly(s, struct.unpack("!H", head)[0])


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def server() -> Iterator[dns.Server]:
    asked: list[str] = []
    door = front.Door(Front(dns_tcp=4, dns_idle_s=1), lambda line: None)
    s = dns.Server(("127.0.0.1", 0), NAMES, asked.append, door)
    door.start()
    try:
        yield s
    finally:
        door.close()


def test_dns_over_tcp_answers_several_queries_on_one_connection(server: dns.Server):
    with socket.create_connection(server.address, timeout=5) as s:
        for qid in (1, 2):
            reply = ask(s, query("demo.booth", qid))
            assert struct.unpack("!H", reply[:2])[0] == qid and socket.inet_ntoa(reply[-4:]) == "10.42.0.2"
        assert ask(s, query("other.example"))[3] & 0xF == dns.REFUSED


def test_dns_over_tcp_is_bounded_in_connections_and_idle_time(server: dns.Server):
    held = [socket.create_connection(server.address, timeout=5) for _ in range(4)]
    over = socket.create_connection(server.address, timeout=5)
    assert closed(over), "the fifth connection is closed at once"
    assert ask(held[0], query("demo.booth"))[-4:] == socket.inet_aton("10.42.0.2"), "the first four still answer"
    t0 = time.monotonic()
    assert all(closed(s) for s in held), "idle connections are closed"
    assert time.monotonic() - t0 < 3
    with socket.create_connection(server.address, timeout=5) as s:
        assert ask(s, query("demo.booth"))[-4:] == socket.inet_aton("10.42.0.2"), "room again once they went"
    for s in [*held, over]:
        s.close()


def test_a_failing_connection_leaves_the_loop_serving():
    door = front.Door(Front(), lambda line: None)
    bound = front.Bound(2, 3)

    async def handler(reader: object, writer: object) -> None:
        raise RuntimeError("a bug in one connection")

    sock = front.tcp_listener(("127.0.0.1", 0), "test")
    door.listen(sock, handler, bound, b"busy\n")
    door.start()
    try:
        for _ in range(5):
            with socket.create_connection(sock.getsockname(), timeout=5) as s:
                assert closed(s)
        assert door.thread.is_alive() and bound.count == 0
    finally:
        door.close()


def test_bounds_per_address_and_in_total():
    b = front.Bound(2, 3)
    assert [b.take("a"), b.take("a"), b.take("a")] == [True, True, False]
    assert [b.take("b"), b.take("c")] == [True, False], "the total is reached"
    b.give("a")
    assert b.take("c") and b.open == {"a": 1, "b": 1, "c": 1}


# Out of files (RLIMIT_NOFILE low, bounds above it): accepting pauses instead of ending, and serves again once
# the holder lets go.
EMFILE = r"""
import asyncio, json, resource, socket, sys, time
sys.path.insert(0, sys.argv[1])
from appliance.manager import front
from appliance.manager.settings import Front
lines = []
door = front.Door(Front(), lines.append)
async def hold(reader, writer):
    await reader.read()          # until the client closes
    writer.write(b"bye")
sock = front.tcp_listener(("127.0.0.1", 0), "test")
door.listen(sock, hold, front.Bound(1000, 1000))
resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
door.start()
addr = sock.getsockname()
print(json.dumps(addr), flush=True)
sys.stdin.readline()
end = time.monotonic() + 10
while not lines and time.monotonic() < end:
    time.sleep(0.05)
print(json.dumps({"alive": door.thread.is_alive(), "said": lines}), flush=True)
sys.stdin.readline()
"""


def test_out_of_files_pauses_accepting_and_the_loop_goes_on():
    p = subprocess.Popen([sys.executable, "-c", EMFILE, str(ROOT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout is not None and p.stdin is not None
        addr = tuple(json.loads(p.stdout.readline()))
        many = [socket.create_connection(addr, timeout=5) for _ in range(80)]   # twice what it may open
        p.stdin.write("\n")
        p.stdin.flush()
        told = json.loads(p.stdout.readline())
        assert told["alive"] and any("Too many open files" in line for line in told["said"]), told
        for s in many:
            s.close()
        end = time.monotonic() + 10
        while True:                # the last one is served once files are free again (within the 1 s pause)
            with socket.create_connection(addr, timeout=5) as s:
                s.shutdown(socket.SHUT_WR)
                s.settimeout(5)
                if s.recv(3) == b"bye":
                    break
            assert time.monotonic() < end, "not served again after the holder let go"
    finally:
        p.kill()
        p.wait()


def test_front_limits_from_the_environment():
    assert settings.front("") == Front()
    assert settings.front('{"held_per_visitor": 4, "idle_s": 30}') == Front(held_per_visitor=4, idle_s=30.0)
    with pytest.raises(Error, match=r"^APPLIANCE_FRONT: \(top level\)\.held_total: 0 must be a whole number from 1 "
                                    r"to 4096$"):
        settings.front('{"held_total": 0}')
    with pytest.raises(Error, match=r"^APPLIANCE_FRONT: \(top level\): unknown key 'held' "):
        settings.front('{"held": 1}')


@pytest.fixture
def piped() -> Iterator[tuple[tuple[str, int], socket.socket]]:
    """A door piping each connection to an upstream that sends 100 bytes every 0.1 s for 2 s once it gets a
    byte, and then stays silent: (the door's address, the upstream's listener)."""
    up = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def upstream() -> None:
        while not stop.is_set():
            try:
                conn, _ = up.accept()
            except OSError:
                return
            threading.Thread(target=talk, args=(conn,), daemon=True).start()

    def talk(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                if conn.recv(1):
                    for _ in range(20):
                        conn.sendall(b"x" * 100)
                        time.sleep(0.1)
                stop.wait(10)
            except OSError:
                pass

    threading.Thread(target=upstream, daemon=True).start()
    door = front.Door(Front(idle_s=1), lambda line: None)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await door.pipe((reader, writer), await asyncio.open_connection(*up.getsockname()))

    sock = front.tcp_listener(("127.0.0.1", 0), "test")
    door.listen(sock, handler, front.Bound(8, 8))
    door.start()
    try:
        yield sock.getsockname(), up
    finally:
        stop.set()
        door.close()
        up.close()


def test_a_piped_connection_idle_both_ways_is_closed(piped: tuple[tuple[str, int], socket.socket]):
    with socket.create_connection(piped[0], timeout=5) as s:
        t0 = time.monotonic()
        assert closed(s), "closed after idle_s with no byte either way"
        assert 0.9 <= time.monotonic() - t0 < 3


def test_a_piped_download_outlives_idle_s_while_bytes_flow(piped: tuple[tuple[str, int], socket.socket]):
    with socket.create_connection(piped[0], timeout=5) as s:
        s.sendall(b"?")                       # then silent this way, while 2 s of bytes come the other way
        got, t0 = 0, time.monotonic()
        while got < 2000:
            chunk = s.recv(4096)
            assert chunk, f"cut after {got} bytes and {time.monotonic() - t0:.1f} s"
            got += len(chunk)
        assert time.monotonic() - t0 >= 1.5, "the download took longer than idle_s"
        assert closed(s), "then idle both ways: closed"
