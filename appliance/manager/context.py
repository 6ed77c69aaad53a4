"""What every command works with: the paths (from the environment, with the board's defaults, so the tests and
the namespace double can redirect them), the settings, each site's store, xl and the network, and the runtime
state under /run/appliance/sites/<site>/ (written through life.py).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import settings as settings_mod
from .errors import Error
from .lock import SiteLock
from .net import Net
from .settings import Settings, Site, Slot
from .store import ROOT as STORE_ROOT
from .store import Store
from .xl import Xl

ENV = {  # variable: board default
    "APPLIANCE_SITES": settings_mod.BOARD_FILE,
    "APPLIANCE_STORE": STORE_ROOT,
    "APPLIANCE_RUN": "/run/appliance/sites",
    "APPLIANCE_CONSOLE": "/var/log/xen/console",
    "APPLIANCE_SYSFS_NET": "/sys/class/net",
    "APPLIANCE_XL": "xl",
    "APPLIANCE_NFT": "nft",
    "APPLIANCE_CONNTRACK": "conntrack",
    "APPLIANCE_STAGING": "/var/lib/appliance/staging",   # uploads; on the store's filesystem (one rename in)
    "APPLIANCE_MARGIN_MIB": "16",                        # free space an upload must leave
    "APPLIANCE_WAKE_DNS": "{}:{}".format(*settings_mod.WAKE_DNS),  # where dnsmasq asks for on-demand sites' names
    "APPLIANCE_FRONT": "",                               # the front doors' bounds changed (settings.Front), JSON
}


def log(message: str) -> None:
    try:
        print(f"appliance-guest: {message}", file=sys.stderr, flush=True)
    except OSError:     # the deploy's SSH channel is gone: the switch it asked for goes on regardless
        pass


def _mib(text: str) -> int:
    if not text.isdigit():
        raise Error(f"APPLIANCE_MARGIN_MIB: {text!r} must be a whole number of MiB")
    return int(text)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise Error(f"APPLIANCE_WAKE_DNS: {text!r} must be ADDRESS:PORT")
    return host, int(port)


@dataclass
class Context:
    settings_path: Path
    store_root: Path
    run: Path
    console_dir: Path
    xl: Xl
    net: Net
    staging_root: Path = Path(ENV["APPLIANCE_STAGING"])
    margin: int = int(ENV["APPLIANCE_MARGIN_MIB"]) << 20    # bytes
    wake_dns: tuple[str, int] = settings_mod.WAKE_DNS
    front: settings_mod.Front = settings_mod.Front()
    _settings: Settings | None = field(default=None, repr=False)
    _said: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Context:
        e = {k: (env if env is not None else os.environ).get(k) or v for k, v in ENV.items()}
        return cls(Path(e["APPLIANCE_SITES"]), Path(e["APPLIANCE_STORE"]), Path(e["APPLIANCE_RUN"]),
                   Path(e["APPLIANCE_CONSOLE"]), Xl(e["APPLIANCE_XL"]),
                   Net(e["APPLIANCE_NFT"], e["APPLIANCE_CONNTRACK"], Path(e["APPLIANCE_SYSFS_NET"])),
                   Path(e["APPLIANCE_STAGING"]), _mib(e["APPLIANCE_MARGIN_MIB"]) << 20,
                   _hostport(e["APPLIANCE_WAKE_DNS"]), settings_mod.front(e["APPLIANCE_FRONT"]))

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = settings_mod.load(self.settings_path)
        return self._settings

    def store(self, site: Site) -> Store:
        return Store(self.store_root, site.name)

    def on_demand_path(self, site: Site) -> Path:
        return self.store_root / site.name / "on_demand.json"

    def on_demand(self, site: Site) -> settings_mod.OnDemand | None:
        """The site's on_demand: as changed on the board, else as sites.json has it (None: always on). A broken
        override is said once in the log and the recipe's setting kept."""
        if site.on_demand is None:
            return None
        try:
            return settings_mod.on_demand_override(self.on_demand_path(site)) or site.on_demand
        except Error as exc:
            if str(exc) != self._said:
                log(f"{exc}; keeping sites.json's")
                self._said = str(exc)
            return site.on_demand

    def set_on_demand(self, site: Site, idle: float | None, stop: str | None) -> dict[str, Any]:
        """`appliance-guest on-demand SITE [--idle S] [--stop destroy|pause]`: taken by the running manager at its
        next look (within a second); whether a site is on demand at all is the recipe's (sites.json)."""
        now = self.on_demand(site)
        if now is None:
            raise Error(f"{self.settings_path}: site {site.name} is always on: only a site with on_demand in the "
                        f"recipe can change its idle or stop on the board")
        value = {"idle": now.idle if idle is None else idle, "stop": now.stop if stop is None else stop}
        path = self.on_demand_path(site)
        settings_mod._Reader(path).on_demand(value, "on-demand")          # refused before it is written
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(".on_demand.json.tmp")
            tmp.write_text(json.dumps(value) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            raise Error(f"{path}: cannot write: {exc.strerror}") from None
        return value

    def lock(self, site: Site, what: str, version: str | None, wait: float = 0.0, name: str = "lock") -> SiteLock:
        return SiteLock(self.run, site.name, what, version, wait, name)

    # ---------------------------------------------------------------- runtime state

    def state_path(self, site: Site) -> Path:
        return self.run / site.name / "state.json"

    def read_state(self, site: Site) -> dict[str, Any]:
        try:
            data = json.loads(self.state_path(site).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_state(self, site: Site, **state: Any) -> dict[str, Any]:
        """Replace the site's state (one rename: a reader sees the old state or the new). Writers go through
        life.write, which checks the move."""
        data = {"site": site.name, "since": round(time.time(), 3), "pid": os.getpid(), **state}
        path = self.state_path(site)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".state.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(json.dumps(data) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            raise Error(f"{path}: cannot write the site's state: {exc.strerror}") from None
        return data

    def served(self, site: Site) -> tuple[Slot | None, str | None]:
        """The slot and version that serve the site now: the runtime state, checked against the map."""
        st = self.read_state(site)
        slot = site.slot(st["slot"]) if st.get("slot") in ("blue", "green") else None
        try:
            active = self.net.active(site.address, site.port)
        except Error:
            active = None
        if active is not None:
            by_address = [s for s in site.slots if s.address == active[0]]
            if by_address and by_address[0] != slot:
                return by_address[0], None
        return slot, st.get("version") if slot else None
