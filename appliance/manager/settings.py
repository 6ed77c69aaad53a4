"""The board's /etc/appliance/sites.json, rendered from the recipe: both networks and every site with its two
slots, read into frozen dataclasses. Anything unexpected is one Error naming the file and the key.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import Error
from .manifest import HEALTH_PATH, MAX_MEMORY, MAX_VCPUS
from .names import check_site

SLOTS = ("blue", "green")
KEEP, KEEP_MAX = 3, 100     # versions kept in a site's store by default, and at most
IDLE_MIN, IDLE_MAX = 2, 86400   # seconds an on-demand guest may sit idle before it is stopped
STOPS = ("destroy", "pause")
# A site's limits, the one set: the recipe loader (config.py) and the board (below) check a site against these.
SITE_LIMITS = {"port": (1, 65535), "memory": (16, MAX_MEMORY), "vcpus": (1, MAX_VCPUS), "deadline": (5, 3600),
               "drain": (0, 3600), "keep": (1, KEEP_MAX), "idle": (IDLE_MIN, IDLE_MAX)}
BOARD_FILE = "/etc/appliance/sites.json"   # where the board reads this (APPLIANCE_SITES to move it)
WAKE_DNS = ("127.0.0.1", 5354)  # where dnsmasq sends the queries for on-demand sites' names (the manager answers)
MAC = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")
BRIDGE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


@dataclass(frozen=True)
class Bridge:
    """A bridge of dom0's (the visitors' or the guests'): its name and dom0's address on it."""

    bridge: str
    address: str
    prefix: int
    netmask: str


@dataclass(frozen=True)
class Slot:
    name: str        # blue or green
    address: str     # the backend address on the guests' bridge
    mac: str
    domain: str      # the Xen domain's name, <site>.<slot>


@dataclass(frozen=True)
class OnDemand:
    idle: float      # seconds with no query, no new connection and no open one before the guest is stopped
    stop: str        # destroy (frees its memory) or pause (kept for an instant wake)
    wake_at_boot: bool = False   # woken as the manager starts, then idle as usual (Knative's initial scale)


@dataclass(frozen=True)
class Site:
    name: str
    names: tuple[str, ...]
    address: str     # the service address, dom0's on the visitors' bridge
    port: int
    memory: int
    vcpus: int
    health_path: str
    deadline: int
    drain: float     # seconds an old guest keeps its established connections after a switch
    slots: tuple[Slot, Slot]
    probe_interval: float = 15.0    # seconds between health probes of the serving guest
    probe_failures: int = 3         # probes missed in a row before it is restarted
    stop_grace: float = 10.0        # seconds a stopped guest has to shut down before it is destroyed
    keep: int = 3                   # versions a deploy's prune keeps (current and previous always among them)
    on_demand: OnDemand | None = None   # None: always on

    def slot(self, name: str) -> Slot:
        for s in self.slots:
            if s.name == name:
                return s
        raise Error(f"site {self.name}: no slot {name!r} (slots: {', '.join(SLOTS)})")

    def other(self, slot: Slot) -> Slot:
        return self.slots[1] if slot.name == self.slots[0].name else self.slots[0]

    def defaults(self) -> dict[str, Any]:
        """What a version's manifest leaves out comes from its site."""
        return {"name": self.name, "memory": self.memory, "vcpus": self.vcpus, "port": self.port,
                "health": {"path": self.health_path, "deadline": self.deadline}}


@dataclass(frozen=True)
class Front:
    """The bounds of dom0's front doors (front.py): these defaults, or as the environment's APPLIANCE_FRONT (a JSON
    object) changes them. Sized for a 1 GiB board whose manager may open 4096 files (its unit's LimitNOFILE): a
    piped connection is two."""

    held_per_visitor: int = 32   # connections one visitor address may have held or piped by the activators
    held_total: int = 512        # the same, every visitor together
    hold_s: float = 90.0         # longest a connection is held while its site wakes (then the 503 page)
    idle_s: float = 120.0        # a piped connection with no byte either way this long is closed
    dns_tcp: int = 32            # DNS queries over TCP: connections at once
    dns_idle_s: float = 10.0     # and how long one may wait for its next query


FRONT_KEYS = {"held_per_visitor": (1, 4096), "held_total": (1, 4096), "hold_s": (1, 3600), "idle_s": (1, 86400),
              "dns_tcp": (1, 1024), "dns_idle_s": (1, 600)}


@dataclass(frozen=True)
class Settings:
    path: Path
    visitors: Bridge
    guests: Bridge
    sites: dict[str, Site]

    def site(self, name: str) -> Site:
        if name not in self.sites:
            raise Error(f"{self.path}: no site {name!r} (sites: {', '.join(self.sites) or 'none'})")
        return self.sites[name]


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, text: str) -> Error:
        return Error(f"{self.path}: {key}: {text}")

    def mapping(self, value: object, key: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
                ) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"{value!r} must be a mapping")
        for k in value:
            if k not in required + optional:
                raise self.fail(key, f"unknown key {k!r} (known: {', '.join(required + optional)})")
        for k in required:
            if k not in value:
                raise self.fail(key, f"{k} is missing")
        return value

    def int(self, value: object, key: str, low: int, high: int) -> int:
        if type(value) is not int or not low <= value <= high:
            raise self.fail(key, f"{value!r} must be a whole number from {low} to {high}")
        return value

    def seconds(self, value: object, key: str, low: float, high: float) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise self.fail(key, f"{value!r} must be a number of seconds from {low:g} to {high:g}")
        return float(value)

    def ipv4(self, value: object, key: str) -> str:
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            raise self.fail(key, f"{value!r} is not an IPv4 address") from None

    def text(self, value: object, key: str, pattern: re.Pattern[str], what: str) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise self.fail(key, f"{value!r} must be {what}")
        return value

    def on_demand(self, value: object, key: str) -> OnDemand:
        o = self.mapping(value, key, ("idle", "stop"), ("wake_at_boot",))
        if o["stop"] not in STOPS:
            raise self.fail(f"{key}.stop", f"{o['stop']!r} must be destroy or pause")
        at_boot = o.get("wake_at_boot", False)
        if not isinstance(at_boot, bool):
            raise self.fail(f"{key}.wake_at_boot", f"{at_boot!r} must be true or false")
        return OnDemand(self.seconds(o["idle"], f"{key}.idle", *SITE_LIMITS["idle"]), o["stop"], at_boot)

    def front(self, value: object, key: str) -> Front:
        d = self.mapping(value, key, (), tuple(FRONT_KEYS))
        given: dict[str, Any] = {k: self.seconds(v, f"{key}.{k}", *FRONT_KEYS[k]) if k.endswith("_s")
                                 else self.int(v, f"{key}.{k}", *FRONT_KEYS[k]) for k, v in d.items()}
        return Front(**given)

    def bridge(self, value: object, key: str) -> Bridge:
        d = self.mapping(value, key, ("bridge", "address", "prefix", "netmask"))
        return Bridge(self.text(d["bridge"], f"{key}.bridge", BRIDGE_NAME, "an interface name"),
                      self.ipv4(d["address"], f"{key}.address"), self.int(d["prefix"], f"{key}.prefix", 8, 30),
                      self.ipv4(d["netmask"], f"{key}.netmask"))

    def site(self, name: str, value: object) -> Site:
        key = f"sites.{name}"
        try:
            check_site(name, f"{self.path}: sites")
        except Error:
            raise self.fail("sites", f"{name!r} is not a site name") from None
        d = self.mapping(value, key, ("names", "address", "port", "memory", "vcpus", "health_path", "deadline",
                                      "drain", "slots"), ("probe_interval", "probe_failures", "stop_grace", "keep",
                                                          "on_demand"))
        names = d["names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise self.fail(f"{key}.names", f"{names!r} must be a list of host names")
        slots = self.mapping(d["slots"], f"{key}.slots", SLOTS)
        made = []
        for s in SLOTS:
            sd = self.mapping(slots[s], f"{key}.slots.{s}", ("address", "mac"))
            made.append(Slot(s, self.ipv4(sd["address"], f"{key}.slots.{s}.address"),
                             self.text(sd["mac"], f"{key}.slots.{s}.mac", MAC, "a lower-case MAC address"),
                             f"{name}.{s}"))
        od = self.on_demand(d["on_demand"], f"{key}.on_demand") if d.get("on_demand") is not None else None
        return Site(name, tuple(names), self.ipv4(d["address"], f"{key}.address"),
                    self.int(d["port"], f"{key}.port", *SITE_LIMITS["port"]),
                    self.int(d["memory"], f"{key}.memory", *SITE_LIMITS["memory"]),
                    self.int(d["vcpus"], f"{key}.vcpus", *SITE_LIMITS["vcpus"]),
                    self.text(d["health_path"], f"{key}.health_path", HEALTH_PATH, "a URL path"),
                    self.int(d["deadline"], f"{key}.deadline", *SITE_LIMITS["deadline"]),
                    self.seconds(d["drain"], f"{key}.drain", *SITE_LIMITS["drain"]), (made[0], made[1]),
                    self.seconds(d.get("probe_interval", 15), f"{key}.probe_interval", 0.05, 3600),
                    self.int(d.get("probe_failures", 3), f"{key}.probe_failures", 1, 100),
                    self.seconds(d.get("stop_grace", 10), f"{key}.stop_grace", 0, 600),
                    self.int(d.get("keep", KEEP), f"{key}.keep", *SITE_LIMITS["keep"]), od)


def _json(path: Path, what: str) -> object:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise Error(f"{path}: cannot read {what}: {exc.strerror}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise Error(f"{path}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    except ValueError as exc:
        raise Error(f"{path}: not JSON: {getattr(exc, 'msg', exc)} (line {getattr(exc, 'lineno', 0)}, "
                    f"column {getattr(exc, 'colno', 0)})") from None


def on_demand_override(path: Path) -> OnDemand | None:
    """A site's on_demand as changed on the board (`appliance-guest on-demand`), if it was: idle and stop."""
    if not path.exists():
        return None
    return _Reader(path).on_demand(_json(path, "the site's on-demand setting"), "(top level)")


def load(path: Path) -> Settings:
    return parse(_json(path, "the board's site settings"), path)


def parse(data: object, path: Path) -> Settings:
    """sites.json's content as the board reads it (the host checks what it writes with this too)."""
    r = _Reader(path)
    d = r.mapping(data, "(top level)", ("visitors", "guests", "sites"))
    sites = d["sites"]
    if not isinstance(sites, dict):
        raise r.fail("sites", f"{sites!r} must be a mapping of site name to site")
    return Settings(path, r.bridge(d["visitors"], "visitors"), r.bridge(d["guests"], "guests"),
                    {name: r.site(name, value) for name, value in sites.items()})


def front(text: str) -> Front:
    """APPLIANCE_FRONT: a JSON object of Front's fields to change (empty: the defaults)."""
    r = _Reader(Path("APPLIANCE_FRONT"))
    try:
        value = json.loads(text or "{}")
    except ValueError as exc:
        raise r.fail("(top level)", f"not JSON: {getattr(exc, 'msg', exc)}") from None
    return r.front(value, "(top level)")
