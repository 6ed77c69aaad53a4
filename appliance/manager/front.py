"""dom0's front doors in one event loop: the activators of sleeping on-demand sites and the wake DNS server (UDP
and TCP) share one thread (asyncio), so the manager's threads stay flat whatever visitors do. Whatever a stranger
can open here has a bound (per visitor address and in total) and a timeout, and one failing connection ends alone.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from .errors import Error
from .settings import Front

BUFFER = 65536
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
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise Error(f"{what}: cannot listen on {address[0]}:{address[1]}/tcp: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


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
        self.servers: list[asyncio.AbstractServer] = []
        self.transports: list[asyncio.BaseTransport] = []
        self.thread = threading.Thread(target=self.loop.run_forever, name="front-door", daemon=True)
        self._said = 0.0

    def start(self) -> Door:
        self.thread.start()
        return self

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run coro in the loop from another thread (or here, before start) and wait for its result."""
        if self.thread.is_alive():
            return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)
        return self.loop.run_until_complete(coro)

    def _exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # asyncio's accept loop reports EMFILE here, then backs off a second: one line a minute is enough
        now = time.monotonic()
        if now - self._said >= 60:
            self._said = now
            exc = context.get("exception")
            self.log(f"front door: {context.get('message')}" + (f": {exc}" if exc else ""))

    def listen(self, sock: socket.socket, handler: Handler) -> None:
        async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            except Exception as exc:  # one connection's trouble never reaches the loop  # noqa: BLE001
                self._exception(self.loop, {"message": "a connection failed", "exception": exc})
                writer.transport.abort()

        async def serve() -> None:
            self.servers.append(await asyncio.start_server(guarded, sock=sock, limit=BUFFER))

        self.run(serve())

    def datagrams(self, sock: socket.socket, protocol: Callable[[], asyncio.DatagramProtocol]) -> None:
        async def serve() -> None:
            transport, _ = await self.loop.create_datagram_endpoint(protocol, sock=sock)
            self.transports.append(transport)

        sock.setblocking(False)
        self.run(serve())

    def close(self) -> None:
        async def shut() -> None:
            for s in self.servers:
                s.close()
            for t in self.transports:
                t.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

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
