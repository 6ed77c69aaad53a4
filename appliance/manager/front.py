"""dom0's front doors in one event loop: the activators of sleeping on-demand sites and the wake DNS server (UDP
and TCP) share one thread (asyncio), so the manager's threads stay flat whatever visitors do. Whatever a stranger
can open here has a bound (per visitor address and in total) and a timeout, and one failing connection ends alone.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from .errors import Error
from .settings import Front

BUFFER = 65536
ACCEPT_BITE = 16       # connections accepted at one wakeup of the loop
BACKLOG = 1024         # connections the kernel keeps for the loop to accept (no file of the manager's yet)
RETRY_S = 1.0          # out of files: accepting waits this long
IP_FREEBIND = 15       # bind a service address before networkd has put it on the bridge
T = TypeVar("T")
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def tcp_listener(address: tuple[str, int], what: str, freebind: bool = False) -> socket.socket:
    """A listening TCP socket, or an Error naming what it was for."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if freebind:
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
    try:
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise Error(f"{what}: cannot listen on {address[0]}:{address[1]}/tcp: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def refuse(conn: socket.socket, answer: bytes) -> None:
    """Close a connection over a bound at once, after the answer when its send buffer takes it whole."""
    try:
        conn.setblocking(False)
        if answer:
            conn.send(answer)
    except OSError:
        pass
    conn.close()


class Bound:
    """How many connections each visitor address has open through a door, with a cap per address and in total."""

    def __init__(self, per_address: int, total: int) -> None:
        self.per_address, self.total = per_address, total
        self.open: dict[str, int] = {}
        self.count = 0

    def take(self, address: str) -> bool:
        if self.count >= self.total or self.open.get(address, 0) >= self.per_address:
            return False
        self.open[address] = self.open.get(address, 0) + 1
        self.count += 1
        return True

    def give(self, address: str) -> None:
        self.count -= 1
        self.open[address] -= 1
        if not self.open[address]:
            del self.open[address]


class Door:
    """One asyncio loop in one thread. Listeners are added before or after start(); close() ends them all."""

    def __init__(self, limits: Front, log: Callable[[str], None]) -> None:
        self.limits, self.log = limits, log
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._exception)
        self.held = Bound(limits.held_per_visitor, limits.held_total)
        self.dns = Bound(limits.dns_tcp, limits.dns_tcp)
        self.listeners: list[socket.socket] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.transports: list[asyncio.BaseTransport] = []
        self.thread = threading.Thread(target=self.loop.run_forever, name="front-door", daemon=True)
        self._said: dict[str, float] = {}

    def start(self) -> Door:
        self.thread.start()
        return self

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run coro in the loop from another thread (or here, before start) and wait for its result."""
        if self.thread.is_alive():
            return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)
        return self.loop.run_until_complete(coro)

    def _exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # a burst of failures (EMFILE at every accept) says each thing once a minute
        exc = context.get("exception")
        line = f"front door: {context.get('message')}" + (f": {exc}" if exc else "")
        now = time.monotonic()
        if now - self._said.get(line, -60.0) >= 60:
            if len(self._said) >= 64:         # what visitors cause may vary without end: remembered within bounds
                self._said.clear()
            self._said[line] = now
            self.log(line)

    def listen(self, sock: socket.socket, handler: Handler, bound: Bound, refusal: bytes = b"") -> None:
        """Serve each connection to sock with handler, in the loop; one over the bound gets refusal and is closed
        at once. A burst is accepted a few at a time; out of files, accepting pauses a second (the rest wait in the
        kernel's queue, no file of ours)."""

        def accept() -> None:
            for _ in range(ACCEPT_BITE):
                try:
                    conn, peer = sock.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    return
                except OSError as exc:
                    self._exception(self.loop, {"message": "cannot accept a connection", "exception": exc})
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        self.loop.remove_reader(sock)
                        self.loop.call_later(RETRY_S, self.loop.add_reader, sock, accept)
                    return
                if not bound.take(peer[0]):
                    refuse(conn, refusal)
                    continue
                task = self.loop.create_task(self._serve(conn, peer[0], handler, bound))
                self.tasks.add(task)              # the loop keeps only a weak reference to a task
                task.add_done_callback(self.tasks.discard)

        async def register() -> None:
            self.loop.add_reader(sock, accept)
            self.listeners.append(sock)

        self.run(register())

    async def _serve(self, conn: socket.socket, peer: str, handler: Handler, bound: Bound) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=BUFFER)
            await handler(reader, writer)
        except Exception as exc:  # one connection's trouble never reaches the loop  # noqa: BLE001
            self._exception(self.loop, {"message": "a connection failed", "exception": exc})
            if writer is not None:
                writer.transport.abort()
        finally:
            if writer is not None:
                writer.close()
            else:
                conn.close()
            bound.give(peer)

    def datagrams(self, sock: socket.socket, protocol: Callable[[], asyncio.DatagramProtocol]) -> None:
        async def serve() -> None:
            transport, _ = await self.loop.create_datagram_endpoint(protocol, sock=sock)
            self.transports.append(transport)

        sock.setblocking(False)
        self.run(serve())

    def close(self) -> None:
        async def shut() -> None:
            for sock in self.listeners:
                self.loop.remove_reader(sock)
                sock.close()
            for t in self.transports:
                t.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)   # their finally clauses run before the loop stops

        if self.loop.is_closed():
            return
        try:
            self.run(shut())
        except (RuntimeError, TimeoutError):
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self.thread.is_alive():
            self.thread.join(10)
        if not self.loop.is_running():
            self.loop.close()

    async def pipe(self, a: Stream, b: Stream) -> None:
        """Copy both ways until both ends are done; no byte either way for idle_s closes both."""
        last = [time.monotonic()]
        idle = self.limits.idle_s

        async def timed(aw: Awaitable[T]) -> T:
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(task := asyncio.ensure_future(aw)), idle)
                except TimeoutError:
                    if time.monotonic() - last[0] >= idle:
                        task.cancel()
                        raise
                    aw = task

        async def one(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await timed(src.read(BUFFER)):
                last[0] = time.monotonic()
                dst.write(data)
                await timed(dst.drain())
            if dst.can_write_eof():
                dst.write_eof()

        async def both(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                await one(src, dst)
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                a[1].transport.abort()
                b[1].transport.abort()

        await asyncio.gather(both(a[0], b[1]), both(b[0], a[1]))
        a[1].close()
        b[1].close()
