"""On-demand sites: a site with `on_demand` sleeps until a visitor asks for it. While it sleeps its map element
is absent, so a connection to its service address arrives at dom0 itself, where the site's activator listens:
it holds the connection, wakes the guest, and passes the connection on once the guest passes its health check
(a slow first page, never an error, with any guest: Knative's activator, not Synjitsu's patched stack). Then the
map element is added and the next connections go straight to the guest. A DNS query for one of the site's names
wakes it too (dns.py), so the boot overlaps the visitor's connect, as Jitsu's did.

After `idle` seconds with no query, no new connection and no open one, the map element goes first (a visitor
arriving then is held by the activator again), then the guest: destroyed (its memory freed) or paused (kept for
an instant wake). Waking respects memory: when Xen has no room, the on-demand guests idle longest (and holding
no connection) are stopped first; when that is not enough the visitor gets a status page saying so, and no
running guest is touched.

What a wake did goes in the site's state: when it was woken, what woke it, how long the wake took (from the
query or connection to the health check's answer), the connections served since, the wakes today.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from . import front, launch, life, lifetime
from .context import log
from .errors import Error
from .life import Phase, Writer
from .lifetime import Figures
from .lock import Busy
from .settings import OnDemand, Site, Slot
from .watcher import GONE, Watcher

POLL_S = 1.0          # how often a serving guest's connections are counted (one `conntrack -L`)
BOOT = "boot"         # the trigger of a wake_at_boot site's wake
BOOT_WAKE_NICE = -5   # that wake's priority for dom0's CPU (the manager runs at -10)


class NoRoom(Error):
    """No memory for the guest, even with every idle on-demand guest stopped."""


def victims(need: int, free: int, others: Sequence[tuple[str, float, int]]) -> list[str] | None:
    """Which on-demand guests to stop so that `need` MiB fit: `others` are (site, last activity, MiB) of the guests
    that may go (idle ones, holding no connection); the longest idle go first, and no more than needed. None when
    even all of them would not make room."""
    if need <= free:
        return []
    out: list[str] = []
    for name, _, mib in sorted(others, key=lambda o: o[1]):
        out.append(name)
        free += mib
        if need <= free:
            return out
    return None


def idle_for(now: float, last: float, established: int, held: int) -> float:
    """Seconds the site has been idle: none while a connection is open (to the guest or held by the activator)."""
    return 0.0 if established or held else max(0.0, now - last)


def status_page(site: Site, reason: str) -> bytes:
    body = (f"<!doctype html><meta charset=utf-8><meta name=viewport content='width=device-width'>"
            f"<title>{site.name}: not now</title><h1>{site.name} cannot start right now</h1>"
            f"<p>{reason}</p><p>Try again in a minute.</p>\n").encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html; charset=utf-8\r\nRetry-After: 30\r\n"
            b"Cache-Control: no-store\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode() +
            b"\r\n\r\n" + body)


@dataclass
class DemandSite(Watcher):
    """One on-demand site: its wakes, its idle stop, and its figures."""

    registry: list[DemandSite] = field(default_factory=list)
    # set once the always-on sites have started (supervisor.when_started): at boot this site's first look (xl and
    # nft processes on dom0's one CPU) waits for it, as nobody can ask for it before the wifi is up
    after: threading.Event | None = None
    state: str = "asleep"            # a life.Phase: asleep, waking, serving, stopping, paused
    memory: int = 0
    paused_domid: int | None = None  # the paused guest's domain id, taken when it was paused: its wake is one call
    last: float = field(default_factory=time.monotonic)
    held: int = 0                    # connections the activator is passing on
    ids: set[int] = field(default_factory=set)
    cv: threading.Condition = field(default_factory=threading.Condition)
    _waking: Future[tuple[str, int]] | None = None

    def __post_init__(self) -> None:
        self.figures = Figures.of(self.ctx.read_state(self.site)).today()

    @property
    def policy(self) -> OnDemand:
        """idle and stop: the recipe's, or as changed on the board since (looked at on every use)."""
        p = self.ctx.on_demand(self.site)
        assert p is not None, "a DemandSite is made for on-demand sites only"
        return p

    def write(self, state: str | None = None) -> None:
        p = self.policy
        self.record(Writer.DEMAND, Phase(state or self.state), note=None, on_demand={"idle": p.idle, "stop": p.stop})

    # ---------------------------------------------------------------- waking

    def poke(self, trigger: str) -> None:
        """A DNS query for the site: it is not idle, and it wakes now (in the wake's thread) if it sleeps."""
        self.last = time.monotonic()
        if self.state in ("asleep", "paused"):
            self.waking(trigger, time.monotonic())

    def waking(self, trigger: str, t0: float) -> Future[tuple[str, int]]:
        """The backend once the site serves: at most one wake (one thread) at a time, whoever asks."""
        with self.cv:
            self.last = time.monotonic()
            if self._waking is None or self._waking.done():
                self._waking = Future()
                self._waking.set_running_or_notify_cancel()      # a waiter giving up cannot cancel it for all
                threading.Thread(target=self._wake_into, args=(self._waking, trigger, t0),
                                 name=f"wake-{self.site.name}", daemon=True).start()
            return self._waking

    def _wake_into(self, done: Future[tuple[str, int]], trigger: str, t0: float) -> None:
        if trigger == BOOT:
            # this thread and the xl processes it starts (they inherit it): below the visitors' path (-8), which
            # the page needs first, above the rest of the boot (0), which nobody at the booth waits for
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BOOT_WAKE_NICE)
        try:
            done.set_result(self.wake(trigger, t0))
        except Error as exc:
            log(f"site {self.site.name}: {exc}")
            done.set_exception(exc)
        except BaseException as exc:  # noqa: BLE001 - the held connections learn of it, the loop goes on
            log(f"site {self.site.name}: internal error: {type(exc).__name__}: {exc}")
            done.set_exception(Error(f"site {self.site.name}: internal error"))

    def holding(self, n: int) -> None:
        """The activator holds n more connections (or lets go of -n): none is idle while any is held."""
        with self.cv:
            self.held += n
            self.last = time.monotonic()

    def wake(self, trigger: str, t0: float) -> tuple[str, int]:
        """The backend to pass a connection to, once the site serves (it is woken if it sleeps)."""
        with self.cv:
            self.last = time.monotonic()
            while self.state in ("waking", "stopping"):
                self.cv.wait(1)
                if self.stop.is_set():
                    raise Error(f"site {self.site.name}: the guest manager is stopping")
            if self.state == "serving" and self.slot:
                return self.slot.address, self.port
            was, self.state = self.state, "waking"
        try:
            self.write()
            self._wake(was, trigger, t0)
        except Error as exc:
            with self.cv:
                self.state, self.error = ("paused" if was == "paused" and self.slot else "asleep"), str(exc)
                self.cv.notify_all()
            self.write()
            raise
        self.error = None
        self.write("serving")
        lifetime.tell(self.ctx, self.site)       # before any held connection goes on: its page has the figures
        with self.cv:
            self.state = "serving"
            self.cv.notify_all()
        assert self.slot is not None
        return self.slot.address, self.port

    def _wake(self, was: str, trigger: str, t0: float) -> None:
        try:
            lock = self.ctx.lock(self.site, f"wake ({trigger})", self.version, wait=self.site.deadline).acquire()
        except Busy as exc:
            raise Error(str(exc)) from None
        try:
            if not (was == "paused" and self.slot and self._unpaused(trigger)):
                self._boot()
            self.ctx.net.point(self.site.address, self.site.port, self.slot.address, self.port)  # type: ignore
        finally:
            lock.release()
        self.started(trigger, t0)
        # no conntrack look here (one process, a fifth of a second of the emulated board while a held visitor
        # waits): the ids kept from before the sleep are the baseline, so the first idle look counts what came since
        self.last = time.monotonic()
        log(f"site {self.site.name}: woken by a {trigger} in {self.figures.wake_ms} ms ({self.version} in "
            f"{self.slot.domain})")  # type: ignore[union-attr]

    def _unpaused(self, trigger: str) -> bool:
        """Unpause the site's paused guest: no `xl list` first (one xl process is a fifth of a second on the
        emulated board: most of a paused wake); an unpause that fails asks whether the domain is there at all
        (a guest gone meanwhile is booted again)."""
        assert self.slot is not None
        domid, self.paused_domid = self.paused_domid, None
        try:
            how = self.ctx.xl.unpause(self.slot.domain, domid)
        except Error as exc:
            if self.ctx.xl.domid(self.slot.domain) is None:
                log(f"site {self.site.name}: {self.slot.domain} was gone; booting it again ({exc})")
                return False
            log(f"site {self.site.name}: {self.slot.domain} was running already ({exc})")
            return True
        log(f"site {self.site.name}: unpaused {self.slot.domain} ({trigger}, by {how})")
        return True

    def _boot(self) -> None:
        store = self.ctx.store(self.site)
        version = store.pointer("current")
        if version is None:
            raise Error(f"{store.dir}/current: site {self.site.name} has no current version")
        m = store.load(version, self.site.defaults())
        self.make_room(m.memory)
        slot = life.start_slot(self.ctx, self.site)
        running = set(self.ctx.xl.list())       # one xl process, not one for each slot
        for s in self.site.slots:       # a paused guest that is not the one to wake holds memory for nothing
            if s.domain in running:
                self.ctx.xl.destroy(s.domain)
        launch.start(self.ctx, self.site, slot, version, self.stop, checked=m)
        self.slot, self.version, self.port, self.memory = slot, version, m.port, m.memory

    def make_room(self, need: int) -> None:
        free = self.ctx.xl.free_memory()
        others = [(d.site.name, d.last, d.memory) for d in self.registry
                  if d is not self and d.state in ("serving", "paused") and not d.held and d.memory]
        names = victims(need, free, others)
        if names is None:
            raise NoRoom(f"site {self.site.name}: needs {need} MiB and Xen has {free} MiB free, even with every "
                         f"idle on-demand site stopped; nothing was stopped")
        for d in self.registry:
            if d.site.name in names:
                log(f"site {self.site.name}: stopping {d.site.name}, idle longest, to make room for {need} MiB")
                d.sleep(destroy=True)

    # ---------------------------------------------------------------- idling

    def _connections(self) -> tuple[set[int], int]:
        if self.slot is None:
            return set(), 0
        try:
            return self.ctx.net.connections(self.site.address, self.slot.address)
        except Error as exc:
            log(str(exc))
            return set(self.ids), 1          # cannot tell: counted as busy, never stopped blind

    def tick(self, now: float) -> None:
        """One look at a serving site: new connections, a crash, a switch, the idle deadline."""
        if self.state in ("asleep", "paused"):
            self._adopt()
            return
        if self.state != "serving" or self.slot is None:
            return
        slot, version = self.ctx.served(self.site)
        if slot is not None and version is not None and (slot, version) != (self.slot, self.version):
            self.follow(slot, version)
        if self.gone(now):
            self._gone()
            return
        ids, established = self._connections()
        new = ids - self.ids
        if new:
            self.figures.requests += len(new)
            self.last = now
        self.ids = ids
        if new or established or self.held:
            self.last = now
        if new:
            self._write_if_ours()
        if idle_for(now, self.last, established, self.held) >= self.policy.idle:
            self.sleep()

    # A switch runs in another process and holds the site's lock from its guest's start until the old guest is
    # stopped: what this thread saw before (the slot, the version) is stale once the lock is free again, so what it
    # writes or removes on the strength of it goes through life.mine.

    def _write_if_ours(self) -> None:
        """Write the figures, unless a switch is at work or has moved the site (the next tick follows it)."""
        with life.mine(self.ctx, self.site, "figures", self.slot, self.version) as ours:
            if ours:
                self.write()

    def _gone(self) -> None:
        """The serving guest's domain is gone (crashed, shut down, destroyed): its map element goes and the next
        visitor wakes the site again, unless a switch stopped it, having moved the site to its new guest."""
        with life.mine(self.ctx, self.site, "a gone guest", self.slot, self.version) as ours:
            assert self.slot is not None
            if not ours or self.ctx.xl.domid(self.slot.domain) is not None:
                return                    # a switch is at work or moved the site: the next tick follows it
            log(f"site {self.site.name}: {self.slot.domain} {GONE}; the next visitor wakes it again")
            active = self.ctx.net.active(self.site.address, self.site.port)
            if active is not None and active[0] == self.slot.address:
                self.ctx.net.remove(self.site.address, self.site.port)
            with self.cv:
                self.state, self.error = "asleep", f"{self.slot.domain} was gone"
            self.write()

    def take(self, slot: Slot, version: str, st: life.SiteState | None = None) -> None:
        super().take(slot, version, st)
        self.figures.requests = 0            # counted from here
        try:
            m = self.ctx.store(self.site).load(version, self.site.defaults())
            self.port, self.memory = m.port, m.memory
        except Error as exc:
            log(str(exc))

    def _adopt(self) -> None:
        """A switch or a deploy started the sleeping site: it serves now, and idles from here."""
        found = self.found(mapped=True)
        if found is None:
            return
        slot, version = found
        with self.cv:
            if self.state not in ("asleep", "paused"):
                return
            self.slot, self.version, self.state, self.last = slot, version, "serving", time.monotonic()
        self.adopt(slot, version, " (started by a switch)")
        self.ids = self._connections()[0]
        self._write_if_ours()

    def sleep(self, destroy: bool = False) -> None:
        """Stop the idle guest: the map element first, then the guest (paused, or destroyed)."""
        with life.mine(self.ctx, self.site, "idle stop", self.slot, self.version) as ours:
            if ours:                      # else a switch or a wake is at work, or moved the site: look again later
                self._sleep(destroy)

    def _sleep(self, destroy: bool) -> None:
        try:
            with self.cv:
                if self.state not in ("serving", "paused") or self.slot is None:
                    return
                was, self.state = self.state, "stopping"
            slot = self.slot
            self.ctx.net.remove(self.site.address, self.site.port)
            if was == "serving" and (self._connections()[1] or self.held) and not destroy:
                self.ctx.net.point(self.site.address, self.site.port, slot.address, self.port)
                with self.cv:
                    self.state = "serving"
                    self.cv.notify_all()
                return                    # a visitor came just now
            pause = self.policy.stop == "pause" and not destroy
            if pause and was == "serving":
                self.ctx.xl.pause(slot.domain)
                self.paused_domid = self.ctx.xl.domid(slot.domain)
            elif not pause:
                self.ctx.xl.destroy(slot.domain)
                self.paused_domid = None
            log(f"site {self.site.name}: idle: {'paused' if pause else 'destroyed'} {slot.domain}")
            with self.cv:
                self.state = "paused" if pause else "asleep"
                if not pause:
                    self.memory = 0
                self.cv.notify_all()
            self.write()
        except Error as exc:
            log(f"site {self.site.name}: idle stop: {exc}")
            with self.cv:
                if self.state == "stopping":
                    self.state = "serving"
                self.cv.notify_all()

    def run(self) -> None:
        while self.after is not None and not self.after.wait(0.5):
            if self.stop.is_set():
                return
        if self._removable():
            self.ctx.net.remove(self.site.address, self.site.port)
        self.stop_slots()                 # what a previous run left: nobody asked for it yet
        self.write()
        # wake_at_boot is the recipe's, not changed on the board: the captive site, every phone's first page, is
        # serving by the time the wifi is up instead of waking under the first visitor (then idle as usual)
        assert self.site.on_demand is not None
        at_boot = self.site.on_demand.wake_at_boot
        log(f"site {self.site.name}: on demand (idle {self.policy.idle:g} s, then {self.policy.stop}); "
            f"{'woken at boot' if at_boot else 'asleep until a visitor asks'}")
        if at_boot:
            self.waking(BOOT, time.monotonic())
        while not self.stop.wait(POLL_S):
            try:
                self.tick(time.monotonic())
            except Error as exc:
                log(f"site {self.site.name}: {exc}")
            except Exception as exc:      # a bug must not stop the other sites  # noqa: BLE001
                log(f"site {self.site.name}: internal error: {type(exc).__name__}: {exc}")

    def _removable(self) -> bool:
        try:
            return self.ctx.net.active(self.site.address, self.site.port) is not None
        except Error as exc:
            log(str(exc))
            return False


# ---------------------------------------------------------------- the activator


class Activator:
    """dom0's listener on a sleeping site's service address, in the front door's loop: holds each connection until
    the site serves, then pipes it to the guest. Held and piped connections count against the door's bounds; one
    over them gets the status page at once."""

    def __init__(self, demand: DemandSite, door: front.Door) -> None:
        self.demand, self.door = demand, door
        site = demand.site
        door.listen(front.tcp_listener((site.address, site.port), f"site {site.name}", freebind=True), self.serve,
                    door.held, status_page(site, "Too many connections are waiting for it (from your device, or "
                                                 "from everyone)."))

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        d, t0 = self.demand, time.monotonic()
        d.holding(1)
        try:
            try:
                backend = await asyncio.wait_for(asyncio.wrap_future(d.waking("connection", t0)),
                                                 self.door.limits.hold_s)
                up = await asyncio.wait_for(asyncio.open_connection(*backend, limit=front.BUFFER), 10)
            except NoRoom as exc:
                writer.write(status_page(d.site, "The board has no memory free for it while the other sites "
                                                 "are busy."))
                log(str(exc))
                return
            except (Error, OSError, TimeoutError) as exc:
                writer.write(status_page(d.site, "Its guest did not start."))
                log(f"site {d.site.name}: a held connection: {exc or type(exc).__name__}")
                return
            d.figures.requests += 1
            await self.door.pipe((reader, writer), up)
        finally:
            d.holding(-1)
