"""What the board says about its sites (`appliance-guest status` and `list`, and a deploy session's status): each
site's pointers, state, slot, map, health, lifetime figures, versions kept, free space and release channel.
"""

from __future__ import annotations

import time
from typing import Any

from .context import Context
from .errors import Error
from .lifetime import FIGURES
from .net import healthy
from .settings import Site
from .store import free_bytes


def site_status(ctx: Context, site: Site) -> dict[str, Any]:
    store = ctx.store(site)
    st = ctx.read_state(site)
    out: dict[str, Any] = {"current": store.pointer("current"), "previous": store.pointer("previous"),
                           "state": st.get("state"), "note": st.get("note"), "error": st.get("error")}
    slot, version = ctx.served(site)
    out.update(slot=slot.name if slot else None, version=version)
    try:
        active = ctx.net.active(site.address, site.port)
        out["map"] = f"{site.address}:{site.port} -> {active[0]}:{active[1]}" if active else None
    except Error as exc:
        active, out["map"] = None, None
        out["error"] = str(exc)
    running = slot is not None and ctx.xl.domid(slot.domain) is not None
    out.update(domain=slot.domain if slot else None, running=running, healthy=None)
    if running and slot and version:
        try:
            m = store.load(version, site.defaults())
            if m.health:
                out["healthy"] = healthy(slot.address, m.port, m.health.path)[0]
        except Error as exc:
            out["error"] = str(exc)
    out["ok"] = bool(running and out["healthy"] is not False and active is not None)
    od = ctx.on_demand(site)
    out["on_demand"] = {"idle": od.idle, "stop": od.stop} if od else None
    if od:
        out["ok"] = out["ok"] or (st.get("state") in ("asleep", "paused") and not st.get("error"))
    out.update({k: st.get(k) for k in FIGURES})
    serving = running and st.get("state") == "serving" and isinstance(st.get("since"), (int, float))
    out.update(uptime_s=round(time.time() - st["since"]) if serving else None, keep=site.keep,
               versions=store.versions(), free_bytes=free_bytes(store.root))
    from . import pull  # pull mode: not imported by `run` either

    out["pull"] = pull.summary(ctx, site)
    return out


def status(ctx: Context, name: str | None) -> dict[str, Any]:
    if name:
        return {"site": name, **site_status(ctx, ctx.settings.site(name))}
    from . import pull

    sites = {s.name: site_status(ctx, s) for s in ctx.settings.sites.values()}
    return {"ok": all(s["ok"] for s in sites.values()), "sites": sites, "pull_key": pull.public_key(ctx)}


def listing(ctx: Context, name: str | None) -> dict[str, Any]:
    def one(site: Site) -> dict[str, Any]:
        store = ctx.store(site)
        return {"current": store.pointer("current"), "previous": store.pointer("previous"),
                "versions": store.listing(site.defaults())}

    if name:
        return {"ok": True, "site": name, **one(ctx.settings.site(name))}
    return {"ok": True, "sites": {s.name: one(s) for s in ctx.settings.sites.values()}}
