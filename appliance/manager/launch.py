"""One version started in one slot: its xl config written, `xl create`, and the wait for its health check on the
slot's own address. On any failure the new domain goes, and GuestFailed says why with its console's tail.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from .context import Context, log
from .errors import Error
from .manifest import Manifest
from .net import healthy
from .settings import Site, Slot
from .xl import config

CONSOLE_LINES = 20


class GuestFailed(Error):
    """A version did not come up in its slot; carries the tail of its console log."""

    def __init__(self, message: str, console: list[str]) -> None:
        super().__init__(message)
        self.console = console


def console_log(ctx: Context, slot: Slot) -> Path:
    return ctx.console_dir / f"guest-{slot.domain}.log"


def console_tail(ctx: Context, slot: Slot, offset: int = 0, lines: int = CONSOLE_LINES) -> list[str]:
    """The last lines the guest wrote since offset, printable only."""
    try:
        with open(console_log(ctx, slot), "rb") as f:
            f.seek(offset if offset <= os.fstat(f.fileno()).st_size else 0)
            data = f.read()[-16384:]
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace")
    clean = ["".join(c if c.isprintable() else " " for c in line).rstrip() for line in text.splitlines()]
    return [line for line in clean if line][-lines:]


def start(ctx: Context, site: Site, slot: Slot, version: str, stop: threading.Event | None = None, *,
          checked: Manifest | None = None) -> Manifest:
    """Start a version in a slot and wait for its health check on the slot's own address. On any failure the
    new domain is destroyed and GuestFailed says why, with its console's tail. checked: the version's manifest,
    loaded by a caller (a wake) that has just made room in Xen's memory for it and emptied the slot: neither is
    asked again, nor are its files hashed again (one `xl info` took 2 s of a wake under QEMU, one `xl domid`
    0.2 s: `invoke bench`); xl create still refuses a guest that does not fit or a name that is taken."""
    stop = stop or threading.Event()
    m = checked or ctx.store(site).load(version, site.defaults())
    free = m.memory if checked else ctx.xl.free_memory()
    if m.memory > free:
        raise GuestFailed(f"site {site.name}: version {version} needs {m.memory} MiB and Xen has {free} MiB "
                          f"free (out of memory)", [])
    if not checked and ctx.xl.domid(slot.domain) is not None:
        log(f"{slot.domain} is already running; destroying it to start {version} there")
        ctx.xl.destroy(slot.domain)
    cfg = ctx.run / site.name / f"{slot.name}.cfg"
    try:
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(config(site, slot, m, ctx.store(site).dir / version, ctx.settings.guests))
        offset = console_log(ctx, slot).stat().st_size if console_log(ctx, slot).exists() else 0
    except OSError as exc:
        raise Error(f"{cfg}: cannot write the xl config: {exc.strerror}") from None
    log(f"starting {site.name} {version} in {slot.domain} ({m.memory} MiB, {m.vcpus} vcpu, {slot.address})")
    try:
        ctx.xl.create(cfg)
        _wait_healthy(ctx, site, slot, m, stop)
    except Error as exc:
        try:
            ctx.xl.destroy(slot.domain)
        except Error as again:
            log(str(again))
        raise GuestFailed(str(exc), _last_words(ctx, slot, offset)) from None
    return m


def _last_words(ctx: Context, slot: Slot, offset: int, grace: float = 1.0) -> list[str]:
    """The console's tail; xenconsoled writes it a little after the guest did, so wait a moment for it."""
    end = time.monotonic() + grace
    while not (tail := console_tail(ctx, slot, offset)) and time.monotonic() < end:
        time.sleep(0.05)
    return tail


def _wait_healthy(ctx: Context, site: Site, slot: Slot, m: Manifest, stop: threading.Event) -> None:
    if m.health is None:
        return
    url = f"http://{slot.address}:{m.port}{m.health.path}"
    end = time.monotonic() + m.health.deadline
    last, look = "no answer", 0.0
    while not stop.is_set():
        left = end - time.monotonic()
        if left <= 0:
            raise Error(f"site {site.name}: version {m.version} in {slot.domain} did not answer at {url} "
                        f"within {m.health.deadline} s (last: {last})")
        ok, last = healthy(slot.address, m.port, m.health.path, timeout=max(0.2, min(2.0, left)))
        if ok:
            log(f"{site.name} {m.version} answers at {url} ({last})")
            return
        if time.monotonic() >= look:   # one `xl domid` a second: the guest's boot needs dom0's CPU too
            look = time.monotonic() + 1.0
            if ctx.xl.domid(slot.domain) is None:
                raise Error(f"site {site.name}: version {m.version} in {slot.domain} stopped before it "
                            f"answered at {url} (it crashed or shut down)")
        stop.wait(0.1)
    raise Error(f"site {site.name}: stopped while {m.version} was starting")


def stop_slots(ctx: Context, site: Site, grace: float | None = None) -> None:
    """Stop whatever runs in the site's slots: asked to shut down with grace seconds to do it, else destroyed. A
    failure is said and the other slot still stopped."""
    for s in site.slots:
        try:
            if ctx.xl.domid(s.domain) is not None:
                if grace is None:
                    ctx.xl.destroy(s.domain)
                else:
                    log(f"stopping {s.domain}")
                    ctx.xl.stop(s.domain, grace)
        except Error as exc:
            log(str(exc))
