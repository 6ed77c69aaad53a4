"""A site's one typed life (life.py): which writer may move a site from which phase to which, the state record,
and a switch (in another process, under the site's lock) landing at every point of the on-demand thread's look
and of the supervisor's restart: the state after is always the switch's.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from test_manager import FakeNet, sites_json

from appliance.manager import demand, life
from appliance.manager.context import Context
from appliance.manager.errors import Error
from appliance.manager.life import ANY, Phase, Writer
from appliance.manager.supervisor import SiteSupervisor

pytestmark = pytest.mark.unit

P = Phase
# (writer, from, to, allowed): the table as a reader checks it
TABLE = [
    (Writer.SWITCH, P.ASLEEP, P.SERVING, True),
    (Writer.SWITCH, P.FAILED, P.SERVING, True),
    (Writer.SWITCH, None, P.SERVING, True),
    (Writer.SWITCH, P.SERVING, P.STOPPED, False),
    (Writer.SWITCH, P.SERVING, P.ASLEEP, False),
    (Writer.SUPERVISOR, None, P.STARTING, True),
    (Writer.SUPERVISOR, P.STARTING, P.SERVING, True),
    (Writer.SUPERVISOR, P.SERVING, P.DOWN, True),
    (Writer.SUPERVISOR, P.STARTING, P.DOWN, False),
    (Writer.SUPERVISOR, P.DOWN, P.BACKOFF, True),
    (Writer.SUPERVISOR, P.FAILED, P.BACKOFF, True),
    (Writer.SUPERVISOR, P.SERVING, P.BACKOFF, False),    # a switch made it serve meanwhile: no backoff over it
    (Writer.SUPERVISOR, P.SERVING, P.STOPPED, True),
    (Writer.SUPERVISOR, P.SERVING, P.ASLEEP, False),
    (Writer.SUPERVISOR, P.ASLEEP, P.WAKING, False),
    (Writer.DEMAND, P.ASLEEP, P.WAKING, True),
    (Writer.DEMAND, P.PAUSED, P.WAKING, True),
    (Writer.DEMAND, P.SERVING, P.WAKING, False),         # a switch made it serve: the wake has nothing to do
    (Writer.DEMAND, P.WAKING, P.SERVING, True),
    (Writer.DEMAND, P.ASLEEP, P.SERVING, True),          # adopted: a switch started it
    (Writer.DEMAND, P.STARTING, P.SERVING, False),
    (Writer.DEMAND, P.SERVING, P.STOPPING, True),
    (Writer.DEMAND, P.STOPPING, P.PAUSED, True),
    (Writer.DEMAND, P.ASLEEP, P.PAUSED, False),
    (Writer.DEMAND, P.SERVING, P.ASLEEP, True),
    (Writer.DEMAND, P.SERVING, P.DOWN, False),
    (Writer.DEMAND, P.SERVING, P.STOPPED, False),
]


@pytest.mark.parametrize("writer, old, new, ok", TABLE)
def test_who_may_move_a_site_from_which_phase_to_which(writer: Writer, old: Phase | None, new: Phase, ok: bool):
    assert life.allowed(writer, old, new) is ok


def test_every_phase_is_somebodys():
    written = {p for moves in life.TRANSITIONS.values() for p in moves}
    assert written == set(Phase), "each phase has a writer"
    assert all(frm <= ANY for moves in life.TRANSITIONS.values() for frm in moves.values())


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    (tmp_path / "sites.json").write_text(json.dumps(sites_json(on_demand={"idle": 5, "stop": "destroy"})))
    c = Context.from_env({"APPLIANCE_SITES": str(tmp_path / "sites.json"), "APPLIANCE_RUN": str(tmp_path / "run"),
                          "APPLIANCE_STORE": str(tmp_path / "store")})
    return c


def test_a_refused_move_names_both_phases_and_writes_nothing(ctx: Context):
    site = ctx.settings.site("demo")
    life.write(ctx, site, Writer.SWITCH, Phase.SERVING, slot="green", version="2.0")
    with pytest.raises(Error, match=r"^site demo: the supervisor may not move the site from serving to backoff "):
        life.write(ctx, site, Writer.SUPERVISOR, Phase.BACKOFF, retry_in=5)
    st = life.read(ctx, site)
    assert (st.phase, st.slot, st.version, st.get("retry_in")) == (Phase.SERVING, "green", "2.0", None)


def test_an_older_images_state_file_reads_as_it_is(ctx: Context):
    """state.json keeps the flat shape earlier managers wrote (and /run is new at every boot anyway)."""
    site = ctx.settings.site("demo")
    ctx.state_path(site).parent.mkdir(parents=True)
    ctx.state_path(site).write_text(json.dumps({"site": "demo", "state": "serving", "slot": "blue", "version": "1.0",
                                                "wakes_today": 3, "day": "2026-01-01", "pid": 1}))
    st = life.read(ctx, site)
    assert (st.phase, st.slot, st.version, st.get("wakes_today")) == (Phase.SERVING, "blue", "1.0", 3)
    ctx.state_path(site).write_text(json.dumps({"state": "dozing", "slot": "purple"}))
    assert life.read(ctx, site) == life.SiteState(None, None, None, {"state": "dozing", "slot": "purple"})


# ---------------------------------------------------------------- a switch at every point


class Hooked:
    """Calls `at` before the n-th call to any of the fakes' methods (the manager's looks at xl and the network)."""

    def __init__(self) -> None:
        self.calls = 0
        self.at: dict[int, Callable[[], None]] = {}

    def tick(self) -> None:
        self.calls += 1
        if self.calls in self.at:
            self.at.pop(self.calls)()


class HookedNet(FakeNet):
    def __init__(self, hook: Hooked) -> None:
        super().__init__()
        self.hook, self.removed, self.next_id = hook, [], 0

    def active(self, address: str, port: int) -> tuple[str, int] | None:
        self.hook.tick()
        return self.map.get((address, port))

    def remove(self, address: str, port: int) -> None:
        self.hook.tick()
        self.removed.append((address, port))
        self.map.pop((address, port), None)

    def connections(self, service: str, backend: str, background: bool = True) -> tuple[set[int], int]:
        self.hook.tick()
        return set(), 0


class HookedXl:
    def __init__(self, hook: Hooked, *names: str) -> None:
        self.hook, self.names, self.destroyed = hook, set(names), []

    def domid(self, name: str) -> int | None:
        self.hook.tick()
        return 1 if name in self.names else None

    def destroy(self, name: str) -> None:
        self.hook.tick()
        self.destroyed.append(name)
        self.names.discard(name)

    def pause(self, name: str) -> None:
        self.hook.tick()


def switch_to_green(ctx: Context) -> bool:
    """What `appliance-guest switch demo 2.0` does in its own process, under the site's lock (refused, as it
    would be, when the manager holds the lock at that moment): green starts, the map moves, blue stops."""
    site = ctx.settings.site("demo")
    green = site.slot("green")
    try:
        with ctx.lock(site, "switch", "2.0"):
            ctx.xl.names.add(green.domain)                                # type: ignore[attr-defined]
            ctx.net.point(site.address, site.port, green.address, 80)
            life.write(ctx, site, Writer.SWITCH, Phase.SERVING, slot="green", domain=green.domain, version="2.0",
                       backend=green.address, port=80)
            ctx.xl.names.discard(site.slot("blue").domain)               # type: ignore[attr-defined]
    except Error:
        return False
    return True


def assert_switchs(ctx: Context, landed: list[bool], idle: bool = False) -> None:
    """The state names the switch's slot and version, and the map its guest: serving, or (an idle on-demand site,
    followed and then stopped as idle) asleep with nothing in the map. Never blue again."""
    site = ctx.settings.site("demo")
    st = life.read(ctx, site)
    if not (landed and landed[0]):
        return
    assert (st.slot, st.version) == ("green", "2.0"), st
    if st.phase == Phase.SERVING or not idle:
        assert st.phase == Phase.SERVING, st
        assert ctx.net.active(site.address, site.port) == ("127.0.0.2", 80)
        assert "demo.green" in ctx.xl.names and "demo.green" not in ctx.xl.destroyed   # type: ignore[attr-defined]
    else:
        assert st.phase == Phase.ASLEEP and ctx.net.active(site.address, site.port) is None, st


LOOK_POINTS = range(1, 9)


@pytest.mark.parametrize("idle", [3600, 0], ids=["busy", "idle"])    # 0: idle after 2 s
@pytest.mark.parametrize("point", LOOK_POINTS)
def test_a_switch_at_any_point_of_an_on_demand_look(ctx: Context, point: int, idle: float):
    hook = Hooked()
    ctx.net, ctx.xl = HookedNet(hook), HookedXl(hook, "demo.blue")     # type: ignore[assignment]
    site = ctx.settings.site("demo")
    ctx.set_on_demand(site, idle or 2, "destroy")
    blue = site.slot("blue")
    ctx.net.point(site.address, site.port, blue.address, 80)
    d = demand.DemandSite(ctx, site, threading.Event())
    d.state, d.slot, d.version, d.port, d.last = "serving", blue, "1.0", 80, 0.0
    d.write()
    landed: list[bool] = []
    hook.at[point] = lambda: landed.append(switch_to_green(ctx))
    for n in range(4):
        d._next_look = 0.0
        d.tick(1000.0 + n)
    assert hook.calls >= point, "the switch had its turn"
    assert_switchs(ctx, landed, idle=not idle)
    if landed and landed[0] and idle:
        assert (d.state, d.slot.name if d.slot else None, d.version) == ("serving", "green", "2.0")


RESTART_POINTS = range(1, 3)     # its look for the domain, its destroy (under the lock: the switch is refused)


@pytest.mark.parametrize("point", RESTART_POINTS)
def test_a_switch_at_any_point_of_a_supervisor_restart(ctx: Context, tmp_path: Path, point: int):
    (tmp_path / "sites.json").write_text(json.dumps(sites_json()))
    ctx._settings = None
    hook = Hooked()
    ctx.net, ctx.xl = HookedNet(hook), HookedXl(hook)                  # type: ignore[assignment]
    site = ctx.settings.site("demo")
    blue = site.slot("blue")
    ctx.net.point(site.address, site.port, blue.address, 80)
    sup = SiteSupervisor(ctx, site, threading.Event())
    sup.slot, sup.version, sup._next_probe = blue, "1.0", float("inf")   # looks for the domain only
    sup.state("serving")                                               # blue is gone: the next look restarts it
    landed: list[bool] = []
    hook.at[point] = lambda: landed.append(switch_to_green(ctx))
    for _ in range(3):
        sup._next_look = 0.0
        sup.watch()
        if sup.slot is None:
            break
    assert hook.calls >= point
    assert_switchs(ctx, landed)
    if landed and landed[0]:
        assert sup.slot is not None and (sup.slot.name, sup.version) == ("green", "2.0"), "followed, not undone"
        assert sup.restarts == 0 and "demo.green" not in ctx.xl.destroyed   # type: ignore[attr-defined]
    else:
        assert sup.slot is None and life.read(ctx, site).phase == Phase.DOWN, "no switch: blue is restarted"
