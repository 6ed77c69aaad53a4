"""What a site's thread does whatever its policy (the supervisor's always on, demand.py's wake and idle): the guest
it watches (slot, version, port, lifetime figures), the state it writes of it, and the steps both take: adopt a
guest already serving, follow a switch, notice a guest gone, stop every slot.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from . import launch, life
from .context import Context, log
from .errors import Error
from .life import Phase, SiteState, Writer
from .lifetime import Figures
from .settings import Site, Slot

LOOK_S = 3.0       # how often the watched guest's domain is looked for (`xl domid`: a process of its own)
GONE = "is gone (crashed, shut down or destroyed)"


@dataclass
class Watcher:
    ctx: Context
    site: Site
    stop: threading.Event
    # keyword-only: a policy's own fields come after ctx, site and stop
    slot: Slot | None = field(default=None, kw_only=True)        # the guest watched: its slot and version
    version: str | None = field(default=None, kw_only=True)
    port: int = field(default=0, kw_only=True)                   # the guest's port
    error: str | None = field(default=None, kw_only=True)
    figures: Figures = field(default_factory=Figures, kw_only=True)
    _next_look: float = field(default=0.0, kw_only=True, repr=False)

    def run(self) -> None:
        """The site's thread, until stop is set."""
        raise NotImplementedError

    def record(self, writer: Writer, phase: Phase, **extra: Any) -> None:
        """Write the site's state as this thread sees it (life.write checks the move)."""
        s = self.slot
        life.write(self.ctx, self.site, writer, phase, slot=s.name if s else None, domain=s.domain if s else None,
                   version=self.version, backend=s.address if s else None, port=self.port or None,
                   error=self.error, **self.figures.fields(), **extra)

    def started(self, trigger: str, t0: float) -> None:
        """The figures of the guest this thread just started (woken, booted, restarted) since t0."""
        self.figures = Figures.of(self.ctx.read_state(self.site)).started(trigger,
                                                                          round((time.monotonic() - t0) * 1000))

    # ---------------------------------------------------------------- a guest this thread did not start

    def take(self, slot: Slot, version: str, st: SiteState | None = None) -> None:
        """Watch this guest from now on, with the port and figures its state holds (a switch wrote them, or the
        manager's previous run)."""
        st = st or life.read(self.ctx, self.site)
        port = st.get("port")
        self.slot, self.version, self.figures = slot, version, Figures.of(st.data)
        self.port = port if isinstance(port, int) and not isinstance(port, bool) else self.port

    def found(self, mapped: bool) -> tuple[Slot, str] | None:
        """The guest serving the site now (a switch or a deploy started it, or the manager's previous run): its slot
        and version as the state names them, with its domain running; `mapped`: and the map pointing at it (asked
        first: one nft look costs less than xl's)."""
        slot, version = self.ctx.served(self.site)
        if slot is None or version is None:
            return None
        if mapped:
            try:
                active = self.ctx.net.active(self.site.address, self.site.port)
            except Error:
                return None
            if active is None or active[0] != slot.address:
                return None
        return (slot, version) if self.ctx.xl.domid(slot.domain) is not None else None

    def adopt(self, slot: Slot, version: str, by: str = "") -> None:
        self.take(slot, version)
        log(f"site {self.site.name}: {version} serves from {slot.domain}{by}")

    def follow(self, slot: Slot, version: str, st: SiteState | None = None) -> None:
        """A switch moved the site to another guest: that one is watched from now on."""
        self.take(slot, version, st)
        log(f"site {self.site.name}: following the switch to {version} in {slot.domain}")

    # ---------------------------------------------------------------- the watched guest

    def gone(self, now: float, every: float = LOOK_S) -> bool:
        """Whether the watched guest's domain is gone (crashed, shut down or destroyed); looked for at most every
        `every` seconds."""
        if self.slot is None or now < self._next_look:
            return False
        self._next_look = now + every
        return self.ctx.xl.domid(self.slot.domain) is None

    def stop_slots(self, grace: float | None = None) -> None:
        """Stop whatever runs in the site's slots (asked to shut down with grace seconds to do it, else
        destroyed)."""
        launch.stop_slots(self.ctx, self.site, grace)

    def stop_guest(self) -> None:
        """When the manager stops."""
        self.stop_slots()
