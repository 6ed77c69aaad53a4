"""Each guest's lifetime, told to the guest itself: the figures dom0's guest manager keeps in every site's state
(when the guest was woken and by what, how long the wake took, the visitors' connections since, the wakes today)
are posted as JSON to the serving guest's /cgi-bin/lifetime, every site's figures with its own, so the page it
serves can show them (the demo guest's /cgi-bin/status answers with what it was last told). The channel is the
guests' bridge, from dom0's address there, the one the guest accepts them from, to a port of their own (PORT):
dom0 forwards visitors (the DNAT, the activator's held connections) to the site's port only, and nothing from
the uplink reaches a guest, so no one else's POST arrives from dom0's address. A guest without that port or
path (a MirageOS .xen) refuses or answers 404 and is left alone.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .context import Context
from .settings import Site

PATH = "/cgi-bin/lifetime"
PORT = 8901                    # the demo guest's second httpd (guest/init): figures only, never a site's port
EVERY_S = 10.0
FIGURES = ("woken", "wake_ms", "trigger", "requests", "wakes_today")


@dataclass
class Figures:
    """A serving guest's lifetime figures, as its site's state holds them (with the day its wakes count)."""

    woken: float | None = None       # Unix time
    wake_ms: int | None = None       # from the trigger to the health check's answer
    trigger: str | None = None
    requests: int = 0                # connections served since
    wakes_today: int = 0
    day: str = ""

    @classmethod
    def of(cls, st: Mapping[str, Any]) -> Figures:
        """The figures a site's state holds (a switch, a start or the manager's previous run wrote them)."""
        def num(key: str) -> Any:
            value = st.get(key)
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        trigger, day = st.get("trigger"), st.get("day")
        return cls(num("woken"), num("wake_ms"), trigger if isinstance(trigger, str) else None,
                   int(num("requests") or 0), int(num("wakes_today") or 0), day if isinstance(day, str) else "")

    def today(self) -> Figures:
        """Only the wakes of the day (what a manager that starts again keeps of its previous run's figures)."""
        return Figures(wakes_today=self.wakes_today, day=self.day) if self.day == time.strftime("%Y-%m-%d") \
            else Figures()

    def started(self, trigger: str, wake_ms: int) -> Figures:
        """The figures of a guest just started (woken, switched to, booted, restarted): the wakes of the day go on
        counting."""
        today = time.strftime("%Y-%m-%d")
        return Figures(round(time.time(), 3), wake_ms, trigger, 0,
                       self.wakes_today + 1 if self.day == today else 1, today)

    def fields(self) -> dict[str, Any]:
        return asdict(self)


def site_figures(ctx: Context, site: Site) -> dict[str, Any]:
    st, od = ctx.read_state(site), ctx.on_demand(site)
    return {"names": list(site.names), "state": st.get("state"), "version": st.get("version"),
            **{k: st.get(k) for k in FIGURES},
            "on_demand": {"idle": od.idle, "stop": od.stop} if od else None}


def every_site(ctx: Context) -> dict[str, dict[str, Any]]:
    return {s.name: site_figures(ctx, s) for s in ctx.settings.sites.values()}


def post(address: str, port: int, body: dict[str, Any], timeout: float = 2.0) -> int | None:
    """POST the figures; the HTTP status, or None when the guest did not answer."""
    data = json.dumps(body, separators=(", ", ": ")).encode()
    import http.client  # as net.healthy does: not on the way to the first guest's start

    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("POST", PATH, body=data, headers={"Content-Type": "application/json", "Connection": "close",
                                                       "User-Agent": "appliance-guest lifetime"})
        r = conn.getresponse()
        r.read(4096)
        return r.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def tell(ctx: Context, site: Site, figures: dict[str, dict[str, Any]] | None = None) -> int | None:
    """Post a serving site's figures (and every site's) to its guest."""
    figures = figures if figures is not None else every_site(ctx)
    st = ctx.read_state(site)
    if st.get("state") != "serving" or not st.get("backend"):
        return None
    own = {k: v for k, v in figures[site.name].items() if v is not None}
    return post(str(st["backend"]), PORT, {"site": site.name, **own, "sites": figures})


def run(ctx: Context, stop: threading.Event, every: float = EVERY_S) -> None:
    """Tell every serving guest its figures now and then (a wake tells its guest at once)."""
    missing: set[str] = set()          # guests that have no such path: not asked again until they change
    while not stop.wait(every):
        figures = every_site(ctx)
        for site in ctx.settings.sites.values():
            key = f"{site.name}/{figures[site.name]['version']}"
            if key in missing:
                continue
            if tell(ctx, site, figures) == 404:
                missing.add(key)
