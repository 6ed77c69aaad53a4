"""Sites as the board sees them: each site's two slots (blue, green) on the guests' bridge, and the board's
/etc/appliance/sites.json, derived from the recipe once, here.

Site i (in recipe order) has its slot j (blue 0, green 1) at guests-network + 10 + 2i + j, with the MAC
00:16:3e (Xen's prefix) followed by that address's last three octets; its Xen domain is `<site>.<slot>`.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

from .config import OnDemand, Recipe
from .manager import settings
from .manager.settings import SLOTS, WAKE_DNS

BOARD_PATH = Path(settings.BOARD_FILE)


def _net(address: str, bridge: str) -> dict[str, Any]:
    iface = ipaddress.IPv4Interface(address)
    return {"bridge": bridge, "address": str(iface.ip), "prefix": iface.network.prefixlen,
            "netmask": str(iface.netmask), "network": str(iface.network), "cidr": str(iface)}


def visitors(rec: Recipe) -> dict[str, Any]:
    return _net(rec.network.address, rec.network.bridge)


def guests(rec: Recipe) -> dict[str, Any]:
    return _net(rec.guests.address, rec.guests.bridge)


def slot(rec: Recipe, index: int, j: int) -> dict[str, str]:
    ip = ipaddress.IPv4Interface(rec.guests.address).network.network_address + 10 + 2 * index + j
    return {"address": str(ip), "mac": "00:16:3e:" + ":".join(f"{b:02x}" for b in ip.packed[1:])}


def on_demand(o: OnDemand) -> dict[str, Any]:
    """A site's on_demand as sites.json has it (wake_at_boot only when set)."""
    return {"idle": o.idle, "stop": o.stop, **({"wake_at_boot": True} if o.wake_at_boot else {})}


def resolved(rec: Recipe) -> list[dict[str, Any]]:
    """Every site with its slots, in recipe order (the first is the default site)."""
    return [{"name": s.name, "names": list(s.names), "address": s.address, "port": s.port, "memory": s.memory_mib,
             "vcpus": s.vcpus, "health_path": s.health_path, "deadline": s.deadline, "drain": s.drain,
             "keep": s.keep,
             "on_demand": on_demand(s.on_demand) if s.on_demand else None,
             "slots": {name: slot(rec, i, j) for j, name in enumerate(SLOTS)}}
            for i, s in enumerate(rec.sites)]


def board_settings(rec: Recipe) -> dict[str, Any]:
    """What /etc/appliance/sites.json says: the networks and every site, for the board's guest manager."""
    keep = ("bridge", "address", "prefix", "netmask")
    nets = {"visitors": visitors(rec), "guests": guests(rec)}
    return {**{side: {k: net[k] for k in keep} for side, net in nets.items()},
            "sites": {s["name"]: {k: v for k, v in s.items() if k != "name"} for s in resolved(rec)}}


def board_json(rec: Recipe) -> str:
    """sites.json, checked as the board will read it (one declaration of a site: manager/settings.py)."""
    data = board_settings(rec)
    settings.parse(data, BOARD_PATH)
    return json.dumps(data, indent=1) + "\n"


MAX_STATIONS = 100   # wifi stations at once: more than a USB dongle's access point serves well on this board


def dhcp_pool(rec: Recipe) -> int:
    """How many addresses dnsmasq leases (network.dhcp_start to dhcp_end)."""
    return int(ipaddress.IPv4Address(rec.network.dhcp_end)) - int(ipaddress.IPv4Address(rec.network.dhcp_start)) + 1


def max_stations(rec: Recipe) -> int:
    """hostapd's station limit: at most MAX_STATIONS, and at most half the pool's worth of stations holding
    leases_per_station each, so the pool keeps room to spare whoever holds it."""
    return max(1, min(MAX_STATIONS, dhcp_pool(rec) // (2 * rec.network.leases_per_station)))


# What one visitor may hold or open in dom0 (README, "The network"; the rendered firewall's bounds): connections
# to the sites and new ones a second (per address), DNS queries a second (per address), DNS connections over TCP
# open and new a second (per station: each is a child process of dnsmasq).
VISITOR_LIMITS = {"flows": 64, "rate": 200, "burst": 400, "dns_rate": 100, "dns_burst": 200,
                  "dns_tcp": 2, "dns_tcp_rate": 5, "dns_tcp_burst": 10}


def dns_tcp_children(rec: Recipe) -> int:
    """dnsmasq's children for DNS over TCP (max-tcp-connections; one per connection): every connection the
    stations the access point admits may hold, so no crowd of made-up stations leaves a newcomer none."""
    return max_stations(rec) * VISITOR_LIMITS["dns_tcp"]


def pull_settings(rec: Recipe, recipe_path: Path) -> dict[str, Any]:
    """What /etc/appliance/pull.json says: each site that follows a release channel, with its allowed signers'
    lines (read from the file the recipe names, relative to the recipe)."""
    from .config import pull_signers

    return {"sites": {s.name: {"url": s.pull.url, "branch": s.pull.branch, "every": s.pull.every,
                               "signers": pull_signers(s.pull, recipe_path, f"sites[{i}].pull")}
                      for i, s in enumerate(rec.sites) if s.pull}}


def pull_json(rec: Recipe, recipe_path: Path) -> str:
    """pull.json's text; empty when no site follows a channel (the pull timer's condition)."""
    data = pull_settings(rec, recipe_path)
    return json.dumps(data, indent=1) + "\n" if data["sites"] else ""


def pull_tick(rec: Recipe) -> int:
    """How often the pull timer wakes: the shortest `every` (each site's own is kept by the manager)."""
    return min([s.pull.every for s in rec.sites if s.pull] or [300])


def template_context(rec: Recipe) -> dict[str, Any]:
    """What the overlays' templates see of the sites and networks (see configure.context)."""
    all_sites, net = resolved(rec), visitors(rec)
    return {"net": net, "gnet": guests(rec), "sites": all_sites, "dhcp_pool": dhcp_pool(rec),
            "max_stations": max_stations(rec), "limits": VISITOR_LIMITS, "dns_tcp_children": dns_tcp_children(rec),
            "dom0_addresses": [net["address"], *(s["address"] for s in all_sites)],
            "guest_macs": [sl["mac"] for s in all_sites for sl in s["slots"].values()],
            "sites_json": board_json(rec), "wake_dns": "{}#{}".format(*WAKE_DNS)}
