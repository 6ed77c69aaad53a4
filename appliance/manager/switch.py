"""The blue-green switch of a site: the new version starts in the idle slot while the old one serves, and
only once it passes its health check on its own address does one nft transaction move the service address to
it; then it is recorded as current, the old guest drains and stops. A new version that fails is destroyed and
the old one never stopped serving. `cold` is the old way (destroy, then create in the same slot), kept to
measure what the blue-green switch saves.
"""

from __future__ import annotations

import time
from typing import Any

from . import launch, life, reset
from .context import Context, log
from .errors import Error
from .launch import GuestFailed
from .life import Phase, Writer
from .lifetime import Figures
from .names import check_version
from .settings import Site, Slot

DRAIN_POLL_S = 0.5   # each look is a `conntrack -L` of the whole table: a process of its own on dom0's one CPU


def _ms(t0: float) -> int:
    return round((time.monotonic() - t0) * 1000)


def switch(ctx: Context, site_name: str, version: str, cold: bool = False) -> dict[str, Any]:
    site = ctx.settings.site(site_name)
    check_version(version, f"site {site.name}: version")
    store = ctx.store(site)
    # wait a little: the manager's own looks at an on-demand site take the lock for a moment (demand.py)
    with ctx.lock(site, "cold switch" if cold else "switch", version, wait=1):
        store.load(version, site.defaults())              # a bad version is refused before anything starts
        slot, old = ctx.served(site)
        if slot is not None and ctx.xl.domid(slot.domain) is None:
            slot = None                                    # nothing runs there: nothing to keep serving
        if cold:
            return _cold(ctx, site, slot, old, version)
        if slot is not None and old == version:
            store.make_current(version)
            return {"ok": True, "site": site.name, "version": version, "from": old, "slot": slot.name,
                    "changed": False}
        new = site.other(slot) if slot else site.slots[0]
        t0 = time.monotonic()
        try:
            m = launch.start(ctx, site, new, version)
        except GuestFailed as exc:
            keeps = f"{old} keeps serving from {slot.domain}" if slot else "nothing was serving"
            tail = f"; its console ends: {' | '.join(exc.console[-3:])}" if exc.console else ""
            raise GuestFailed(f"{exc}; {keeps}{tail}", exc.console) from None
        health_ms = _ms(t0)
        t1 = time.monotonic()
        ctx.net.point(site.address, site.port, new.address, m.port)
        switch_ms = _ms(t1)
        prev = store.make_current(version)
        life.write(ctx, site, Writer.SWITCH, Phase.SERVING, slot=new.name, domain=new.domain, version=version,
                        backend=new.address, port=m.port, failures=0, restarts=0, error=None, note=None,
                        switched_from=old, **figures(ctx, site, "switch", health_ms))
        log(f"site {site.name}: {site.address}:{site.port} now goes to {version} in {new.domain} "
            f"({switch_ms} ms)")
        drained: dict[str, Any] = {}
        if slot is not None:
            drained = _drain(ctx, site, slot)
        return {"ok": True, "site": site.name, "version": version, "from": old, "previous": prev,
                "slot": new.name, "backend": f"{new.address}:{m.port}", "changed": True, "start_ms": health_ms,
                "switch_ms": switch_ms, **drained}


def figures(ctx: Context, site: Site, trigger: str, wake_ms: int) -> dict[str, Any]:
    """A switch starts a guest too: its lifetime figures begin there (the wakes of the day go on counting)."""
    return Figures.of(ctx.read_state(site)).started(trigger, wake_ms).fields()


def _drain(ctx: Context, site: Site, old: Slot) -> dict[str, Any]:
    """Ask the old guest to stop (it may finish what is under way and power off), wait until no unfinished
    connection is left to it, it is gone, or the site's drain deadline; then reset the visitors' connections still
    open (a browser retries a reset at once, never a silent hang) and stop it."""
    t0 = time.monotonic()
    try:
        ctx.xl.shutdown(old.domain)
    except Error as exc:
        log(str(exc))
    left, own = -1, ctx.settings.guests.address
    while True:
        gone = ctx.xl.domid(old.domain) is None
        try:
            left = ctx.net.unfinished(old.address, own)
        except Error as exc:
            log(str(exc))
            left = -1
        if left == 0 or gone or time.monotonic() - t0 >= site.drain:
            break
        time.sleep(DRAIN_POLL_S)
    drain_ms = _ms(t0)
    cut = 0
    if left:
        try:
            cut = reset.cut(ctx.net, old.address, own)
        except Error as exc:
            log(f"site {site.name}: {exc}")
        if cut:
            log(f"site {site.name}: reset {cut} connections still open to {old.domain} at the drain's end")
        ctx.xl.destroy(old.domain)
    else:
        ctx.xl.stop(old.domain, site.stop_grace, asked=True)   # asked when the drain began
    return {"drain_ms": drain_ms, "left_connections": max(left, 0), "cut_connections": cut, "stopped": old.domain}


def _cold(ctx: Context, site: Site, slot: Slot | None, old: str | None, version: str) -> dict[str, Any]:
    """Destroy, then create in the same slot: the site is down in between (for the benchmark's comparison)."""
    slot = slot or site.slots[0]
    t0 = time.monotonic()
    ctx.xl.destroy(slot.domain)
    try:
        m = launch.start(ctx, site, slot, version)
    except GuestFailed as exc:
        back = ""
        if old:
            try:
                launch.start(ctx, site, slot, old)
                back = f"; {old} serves again from {slot.domain}"
            except Error as again:
                back = f"; {old} did not start again either: {again}"
        raise GuestFailed(f"{exc}{back}", exc.console) from None
    ctx.net.point(site.address, site.port, slot.address, m.port)
    prev = ctx.store(site).make_current(version)
    life.write(ctx, site, Writer.SWITCH, Phase.SERVING, slot=slot.name, domain=slot.domain, version=version,
                    backend=slot.address, port=m.port, failures=0, restarts=0, error=None, note=None,
                    switched_from=old, **figures(ctx, site, "cold switch", _ms(t0)))
    return {"ok": True, "site": site.name, "version": version, "from": old, "previous": prev, "slot": slot.name,
            "cold": True, "changed": True, "switch_ms": _ms(t0)}


def rollback(ctx: Context, site_name: str, version: str | None = None) -> dict[str, Any]:
    site = ctx.settings.site(site_name)
    if version is None:
        version = ctx.store(site).pointer("previous")
        if version is None:
            raise Error(f"{ctx.store(site).dir}/previous: site {site.name} has no previous version to go back to")
    return switch(ctx, site.name, version)
