"""Keeps every site serving. At boot it starts each site's current version in a slot, health-checks it and
points the site's map element at it; then it watches, and starts a guest again (with a backoff) when it crashes
or misses its health probes. A bad version never stops it: it serves what it can (previous, when current cannot
start) and says so. Its starts hold the site's lock, and after a switch it follows the slot the switch recorded.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import demand, dns, front, launch, life, lifetime
from .context import Context, log
from .errors import Error
from .life import Phase, Writer
from .lock import Busy
from .net import healthy
from .settings import Slot
from .watcher import GONE, LOOK_S, Watcher

BACKOFF_S = (0, 5, 10, 20, 40, 80, 160, 300)
STABLE_S = 60.0        # a guest healthy this long has recovered: its next failure restarts it at once
BRIDGE_WAIT_S = 120.0
READY_S = 60.0         # the rest of the boot waits for the always-on sites' first start at most this long
BOARD_SYSFS = Path("/sys/class/net")  # the manager starts early in the boot; networkd makes the bridges a little later


def wait_bridges(sysfs: Path, bridges: Sequence[str], deadline: float, stop: threading.Event) -> None:
    end = time.monotonic() + deadline
    while True:
        missing = [b for b in bridges if not (sysfs / b).exists()]
        if not missing:
            return
        if time.monotonic() >= end or stop.is_set():
            raise Error(f"bridge {', '.join(missing)} does not exist after {deadline:g} s "
                        f"({sysfs}; systemd-networkd makes it)")
        stop.wait(0.1)


@dataclass
class SiteSupervisor(Watcher):
    """An always-on site's thread: starts its guest, watches it, starts it again when it goes."""

    backoff_s: Sequence[float] = BACKOFF_S
    stable_s: float = STABLE_S
    failures: int = 0
    restarts: int = 0
    booted: bool = False
    up_since: float = 0.0
    note: str | None = None
    misses: int = 0
    _next_probe: float = field(default=0.0, repr=False)

    def delay(self) -> float:
        return float(self.backoff_s[min(self.failures, len(self.backoff_s)) - 1]) if self.failures else 0.0

    def state(self, state: str, **extra: object) -> None:
        self.record(Writer.SUPERVISOR, Phase(state), failures=self.failures, restarts=self.restarts, note=self.note,
                    **extra)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                if self.slot is None:
                    self.bring_up()
                else:
                    self.watch()
            except Error as exc:          # a failing command: say so, wait, try again; never give up
                log(f"site {self.site.name}: {exc}")
                self.error = str(exc)
                self.stop.wait(max(1.0, self.delay()))
            except Exception as exc:      # a bug must not stop the other sites or the serving guest  # noqa: BLE001
                log(f"site {self.site.name}: internal error: {type(exc).__name__}: {exc}")
                self.stop.wait(5)

    # ---------------------------------------------------------------- starting

    def candidates(self) -> list[str]:
        store = self.ctx.store(self.site)
        cur, prev = store.pointer("current"), store.pointer("previous")
        out = [v for v in (self.version, cur, prev) if v]
        return list(dict.fromkeys(out))

    def bring_up(self) -> None:
        delay = self.delay()
        if delay:
            log(f"site {self.site.name}: failure {self.failures} in a row: starting again in {delay:g} s")
            life.write(self.ctx, self.site, Writer.SUPERVISOR, Phase.BACKOFF, retry_in=delay, error=self.error,
                       failures=self.failures, restarts=self.restarts)
            if self.stop.wait(delay):
                return
        try:
            lock = self.ctx.lock(self.site, "supervisor start", self.version).acquire()
        except Busy:
            self.stop.wait(0.2)           # a switch is starting a guest of this site: follow it when done
            return
        try:
            if self.adopt_serving():
                return
            self._bring_up()
        finally:
            lock.release()

    def adopt_serving(self) -> bool:
        """A guest already serving (a switch just made it so, or this supervisor restarted) is kept once it answers
        its health check, and the map pointed at it."""
        found = self.found(mapped=False)
        if found is None:
            return False
        slot, version = found
        try:
            m = self.ctx.store(self.site).load(version, self.site.defaults())
        except Error:
            return False
        if m.health and not healthy(slot.address, m.port, m.health.path)[0]:
            return False
        active = self.ctx.net.active(self.site.address, self.site.port)
        if active != (slot.address, m.port):
            self.ctx.net.point(self.site.address, self.site.port, slot.address, m.port)
        self.adopt(slot, version)
        self.port, self.misses, self.booted = m.port, 0, True
        self.up_since, self._next_probe = time.monotonic(), time.monotonic() + self.site.probe_interval
        self.state("serving")
        return True

    def _bring_up(self) -> None:
        versions = self.candidates()
        if not versions:
            self.error = f"{self.ctx.store(self.site).dir}/current: no current version (install one and switch)"
            self.failures += 1
            self.state("failed")
            return
        slot = life.start_slot(self.ctx, self.site)
        reasons: list[str] = []
        for version in versions:
            self.version, self.slot = version, slot
            self.state("starting")
            try:
                t0 = time.monotonic()
                m = launch.start(self.ctx, self.site, slot, version, self.stop)
                self._point(slot, m.port)
                self.started("restart" if self.restarts else "boot", t0)
                self.port = m.port
            except Error as exc:
                reasons.append(str(exc))
                log(str(exc))
                try:
                    self.ctx.xl.destroy(slot.domain)
                except Error:
                    pass
                continue
            finally:
                self.slot = None
            if self.stop.is_set():
                return
            cur = self.ctx.store(self.site).pointer("current")
            self.note = None if version == cur else (
                f"serving {version}, not current {cur}: {reasons[-1] if reasons else 'it did not start'}")
            if self.note:
                log(f"site {self.site.name}: {self.note}")
            self.slot, self.misses, self.booted = slot, 0, True
            self.up_since, self._next_probe = time.monotonic(), time.monotonic() + self.site.probe_interval
            self.error = "; ".join(reasons) or self.error    # the last trouble stays visible in the state
            self.state("serving")
            return
        self.failures += 1
        self.error = "; ".join(reasons)
        self.version = versions[0]
        self.state("failed")

    def _point(self, slot: Slot, port: int) -> None:
        """Point the site's map element at a guest that passed its health check. Early in the boot the ruleset
        may not be loaded yet: the healthy guest is kept, and the element added once the map is there."""
        said = False
        while True:
            try:
                self.ctx.net.point(self.site.address, self.site.port, slot.address, port)
                return
            except Error as exc:
                if self.stop.is_set():
                    raise
                if not said:
                    log(f"site {self.site.name}: {exc}; trying again until the firewall is loaded")
                    said = True
                self.stop.wait(1)

    # ---------------------------------------------------------------- watching

    def watch(self) -> None:
        assert self.slot is not None
        self.stop.wait(min(0.5, self.site.probe_interval))
        if self.stop.is_set():
            return
        st = life.read(self.ctx, self.site)
        if st.slot and not st.names(self.slot, self.version):
            if st.phase == Phase.SERVING and st.version:   # a switch moved the site: watch its slot from now on
                self.follow(self.site.slot(st.slot), st.version, st)
                self.misses, self.up_since = 0, time.monotonic()
            return
        reason = None
        now = time.monotonic()
        if self.gone(now, min(LOOK_S, self.site.probe_interval)):
            reason = GONE
        if reason is None and now >= self._next_probe:
            self._next_probe = time.monotonic() + self.site.probe_interval
            m = self.ctx.store(self.site).load(self.version or "", self.site.defaults())
            if m.health:
                ok, what = healthy(self.slot.address, m.port, m.health.path)
                self.misses = 0 if ok else self.misses + 1
                if self.misses >= self.site.probe_failures:
                    reason = f"missed {self.misses} health probes at http://{self.slot.address}:{m.port}" \
                             f"{m.health.path} ({what})"
        if reason is None:
            return
        with life.mine(self.ctx, self.site, "supervisor restart", self.slot, self.version) as ours:
            if not ours:
                return                    # a switch is at work or moved the site: the next look follows it
            self.ctx.xl.destroy(self.slot.domain)
            self.restarts += 1
            self.failures = 1 if time.monotonic() - self.up_since >= self.stable_s else self.failures + 1
            self.error = f"{self.site.name} {self.version} in {self.slot.domain} {reason}"
            log(f"{self.error}; starting it again")
            self.state("down")            # bring_up restarts in the slot this state names
            self.slot = None

    def stop_guest(self) -> None:
        slot, _ = self.ctx.served(self.site)
        self.stop_slots(self.site.stop_grace)
        self.slot = slot
        life.write(self.ctx, self.site, Writer.SUPERVISOR, Phase.STOPPED, slot=slot.name if slot else None,
                   version=self.version)


def notify(state: str, socket_path: str | None = None) -> bool:
    """sd_notify(3): tell systemd (Type=notify) a state such as READY=1; False when not run by systemd."""
    where = socket_path or os.environ.get("NOTIFY_SOCKET", "")
    if not where:
        return False
    addr = "\0" + where[1:] if where.startswith("@") else where
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as exc:
        log(f"cannot tell systemd {state}: {exc}")
        return False
    return True


def when_started(sups: Sequence[SiteSupervisor], deadline: float, stop: threading.Event,
                 then: Callable[[str], None]) -> None:
    """Call then(why) once every always-on site has served or failed its first start, or at the deadline: the
    boot's visitor side (udev's coldplug, networkd, SSH, wifi) waits for that, so the guests get dom0's one CPU
    first, and never waits longer than the deadline."""
    end = time.monotonic() + deadline
    while not stop.is_set():
        waiting = [s.site.name for s in sups if not s.booted and not s.failures]
        if not waiting:
            then("every always-on site started" if sups else "no always-on site")
            return
        if time.monotonic() >= end:
            then(f"still starting after {deadline:g} s: {', '.join(waiting)}")
            return
        stop.wait(0.1)


def _ready(why: str) -> None:
    log(f"{why}; the rest of the boot goes on")
    notify("READY=1\nSTATUS=" + why)


def _protect_dom0(ctx: Context, bridge_wait: float, stop: threading.Event) -> None:
    """Once the visitors' bridge is there, put its MAC in the bridge filter (the guests need not wait for it)."""
    bridge = ctx.settings.visitors.bridge
    try:
        wait_bridges(ctx.net.sysfs, [bridge], bridge_wait, stop)
        log(f"{bridge} is dom0's MAC {ctx.net.add_dom0_mac(bridge)} for the bridge filter")
    except Error as exc:
        log(str(exc))


def run(ctx: Context, stop: threading.Event, bridge_wait: float = BRIDGE_WAIT_S, ready_s: float = READY_S,
        ready: Callable[[str], None] = _ready, **options: object) -> None:
    """The systemd unit's `appliance-guest run`: every site in its own thread, until stop is set."""
    s = ctx.settings
    if ctx.net.sysfs == BOARD_SYSFS and not (ctx.net.sysfs / s.guests.bridge).exists():
        try:
            ctx.net.make_bridge(s.guests.bridge, f"{s.guests.address}/{s.guests.prefix}")
            log(f"made the guests' bridge {s.guests.bridge} ahead of systemd-networkd")
        except Error as exc:
            log(str(exc))
    wait_bridges(ctx.net.sysfs, [s.guests.bridge], bridge_wait, stop)
    threading.Thread(target=_protect_dom0, args=(ctx, bridge_wait, stop), name="dom0-mac", daemon=True).start()
    sups = [SiteSupervisor(ctx, site, stop, **options)  # type: ignore[arg-type]
            for site in s.sites.values() if site.on_demand is None]
    started = threading.Event()
    registry: list[demand.DemandSite] = []
    registry += [demand.DemandSite(ctx, site, stop, registry, after=started) for site in s.sites.values()
                 if site.on_demand]
    door = front.Door(ctx.front, log)
    for d in registry:
        try:
            demand.Activator(d, door)
        except Error as exc:
            log(str(exc))
    if registry:
        by_name = {n: d for d in registry for n in d.site.names}
        try:
            dns.Server(ctx.wake_dns, {n: d.site.address for n, d in by_name.items()},
                       lambda name: by_name[name].poke("dns query"), door)
        except Error as exc:
            log(f"{exc}: on-demand sites wake by connection only")
    door.start()
    watchers: list[Watcher] = [*sups, *registry]
    threads = [threading.Thread(target=x.run, name=x.site.name, daemon=True) for x in watchers]
    threads.append(threading.Thread(target=lifetime.run, args=(ctx, stop), name="lifetime", daemon=True))

    def then(why: str) -> None:
        started.set()
        ready(why)

    threads.append(threading.Thread(target=when_started, args=(sups, ready_s, stop, then), name="ready",
                                    daemon=True))
    for t in threads:
        t.start()
    while not stop.wait(1):
        pass
    door.close()
    for t in threads:
        t.join(30)
    for w in watchers:
        w.stop_guest()
