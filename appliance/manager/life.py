"""A site's one typed life: its phase, the frozen record of its runtime state (state.json), and the one way to
write it. Three writers share a site (a switch in its own process, the supervisor, the on-demand thread); each may
move it only as TRANSITIONS says, and whoever acts on what it saw before takes the site's lock and reads it again
(`mine`), since a switch in another process may have moved the site meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from .errors import Error
from .lock import Busy
from .settings import SLOTS, Site, Slot

if TYPE_CHECKING:
    from .context import Context


class Phase(StrEnum):
    ASLEEP = "asleep"        # on demand: no guest, or none the map points at; the activator holds visitors
    WAKING = "waking"        # on demand: a visitor or a query woke it; its guest is starting
    STOPPING = "stopping"    # on demand: idle, its map element gone, its guest being paused or destroyed
    PAUSED = "paused"        # on demand: idle, its guest paused (memory kept, an instant wake)
    STARTING = "starting"    # always on: a version is starting in a slot
    SERVING = "serving"      # the map points at a healthy guest
    DOWN = "down"            # always on: the serving guest went or missed its probes; it starts again
    BACKOFF = "backoff"      # always on: failures in a row; waiting before the next start
    FAILED = "failed"        # always on: no version would start (or none is installed)
    STOPPED = "stopped"      # the manager stopped the site's guests (it is stopping)


class Writer(StrEnum):
    SWITCH = "switch"            # `appliance-guest switch|rollback` (and a deploy's), in its own process
    SUPERVISOR = "supervisor"    # an always-on site's thread
    DEMAND = "on-demand thread"  # an on-demand site's thread (and its wakes)


ANY: frozenset[Phase | None] = frozenset([None, *Phase])

# writer -> phase it writes -> the phases it may find on file (None: no state yet)
TRANSITIONS: dict[Writer, dict[Phase, frozenset[Phase | None]]] = {
    Writer.SWITCH: {Phase.SERVING: ANY},
    Writer.SUPERVISOR: {
        Phase.STARTING: ANY,             # the boot, a restart, the next candidate version
        Phase.SERVING: ANY,              # a started guest, or one adopted (a switch's, a previous run's)
        Phase.FAILED: ANY,
        Phase.DOWN: frozenset([Phase.SERVING]),
        Phase.BACKOFF: frozenset([Phase.FAILED, Phase.DOWN, Phase.BACKOFF, Phase.STARTING]),
        Phase.STOPPED: ANY,
    },
    Writer.DEMAND: {
        Phase.ASLEEP: ANY,               # the manager's start (whatever a previous run left), a failed wake, idle
        Phase.WAKING: frozenset([None, Phase.ASLEEP, Phase.PAUSED, Phase.WAKING]),
        Phase.SERVING: frozenset([None, Phase.WAKING, Phase.SERVING, Phase.ASLEEP, Phase.PAUSED]),
        Phase.STOPPING: frozenset([Phase.SERVING, Phase.PAUSED]),
        Phase.PAUSED: frozenset([Phase.SERVING, Phase.STOPPING, Phase.PAUSED, Phase.WAKING]),
    },
}


def allowed(writer: Writer, old: Phase | None, new: Phase) -> bool:
    return old in TRANSITIONS[writer].get(new, frozenset())


@dataclass(frozen=True)
class SiteState:
    """state.json as read: the fields every writer shares, and the rest (figures, errors) as stored. Its JSON
    shape is the one earlier images wrote (a flat object), so an older manager's file reads as it is."""

    phase: Phase | None = None
    slot: str | None = None
    version: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SiteState:
        phase = data.get("state")
        slot = data.get("slot")
        version = data.get("version")
        return cls(Phase(phase) if phase in set(Phase) else None,
                   slot if slot in SLOTS else None, version if isinstance(version, str) else None, dict(data))

    def names(self, slot: Slot | None, version: str | None) -> bool:
        """Whether this state names that slot and version (what a thread watches is still the site's)."""
        return slot is not None and (self.slot, self.version) == (slot.name, version)

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


def read(ctx: Context, site: Site) -> SiteState:
    return SiteState.from_json(ctx.read_state(site))


def write(ctx: Context, site: Site, writer: Writer, phase: Phase, **fields: Any) -> SiteState:
    """The one way a writer changes a site's state: refused (an Error) when TRANSITIONS does not let this writer
    move the site from the phase on file to this one."""
    old = read(ctx, site).phase
    if not allowed(writer, old, phase):
        raise Error(f"site {site.name}: the {writer} may not move the site from {old or 'no state'} to {phase} "
                    f"(another writer moved it meanwhile)")
    return SiteState.from_json(ctx.write_state(site, state=str(phase), **fields))


@contextmanager
def mine(ctx: Context, site: Site, what: str, slot: Slot | None, version: str | None) -> Iterator[bool]:
    """Hold the site's lock and read its state again: True when it still names the slot and version the caller
    watches (act), False when a switch is at work or has moved the site (act not: the next look follows it)."""
    try:
        lock = ctx.lock(site, what, version).acquire()
    except Busy:
        yield False
        return
    try:
        yield read(ctx, site).names(slot, version)
    finally:
        lock.release()


def start_slot(ctx: Context, site: Site) -> Slot:
    """Where a site's guest starts when none serves: the slot its state names (its last), else the first."""
    st = read(ctx, site)
    return site.slot(st.slot) if st.slot else site.slots[0]
