"""Recipes and boards are data: strict YAML parsed once into frozen dataclasses.

Every setting is declared once, as a dataclass field; the same declaration drives parsing, defaults and
the error for an unknown or missing key, which always names the file and the dotted key. A setting with a few
choices is a Literal, checked when the file is loaded, and its error lists the choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import ipaddress
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from . import ROOT, MiB, cardsettings, checkout, default_cache, work_dir
from .errors import RecipeError
from .manager import manifest, names
from .manager.settings import SITE_LIMITS

REQUIRED: Any = dataclasses.MISSING
_SIZE = re.compile(r"^\s*(\d+)\s*(B|K|KiB|M|MiB|G|GiB)?\s*$")
_UNITS = {None: 1, "B": 1, "K": 1 << 10, "KiB": 1 << 10, "M": 1 << 20, "MiB": 1 << 20, "G": 1 << 30, "GiB": 1 << 30}


class Size(int):
    """A byte count written as 8192, 0x2000, '64MiB' or '1GiB'."""


class Addr(int):
    """A physical address, written in hex."""

    def __repr__(self) -> str:
        return f"{int(self):#x}"


# ---------------------------------------------------------------- boards


@dataclass(frozen=True)
class UBoot:
    package: str                 # Debian package that ships the binary
    file: str                    # path inside that package
    board_name: str              # what U-Boot reports as ${board_name}; boot.scr branches on it
    offset: Size | None = None   # byte offset on the card; None when QEMU loads it with -bios
    header: Literal["egon"] | None = None   # "egon" for Allwinner boot-ROM images


@dataclass(frozen=True)
class Ram:
    base: Addr
    size: Size


@dataclass(frozen=True)
class Load:
    xen: Addr
    kernel: Addr
    initrd: Addr
    dtb: Addr
    dtb_room: Size = Size(0x10000)  # bytes reserved for the relocated, resized DTB


@dataclass(frozen=True)
class Dom0:
    memory_mib: int = 512
    vcpus: int = 1


@dataclass(frozen=True)
class Console:
    xen_uart: str                # device-tree path of the UART Xen drives (dtuart=)
    dom0: str = "hvc0"
    baud: int = 115200


@dataclass(frozen=True)
class Qemu:
    binary: str = "qemu-system-arm"
    machine: str = "virt,virtualization=on,gic-version=2,highmem=off"
    cpu: str = "cortex-a15"
    smp: int = 2
    memory_mib: int = 2048
    disk: Literal["virtio", "sd"] = "virtio"   # -drive + virtio-blk-device, or the SoC's SD card (-sd IMAGE)
    nic: str = "virtio-net-device"
    cntfrq: int | None = None    # Hz of the CPUs' generic-timer counter; None: QEMU's default (62.5 MHz in 7.2)


@dataclass(frozen=True)
class BoardSpec:
    name: str
    description: str
    arch: str
    uboot: UBoot
    ram: Ram
    load: Load
    console: Console
    dtb: str | None              # file name in the kernel's dtb directory; None: U-Boot's own (${fdt_addr})
    kernel_package: str = "linux-image-armmp"
    xen_package: str = "xen-system-armhf"
    dom0: Dom0 = Dom0()
    modules: tuple[str, ...] = ()      # kernel modules the initramfs needs (storage, ext4, network)
    wifi_firmware: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()      # dpkg path-exclude patterns: files this board can never use
    xen_args: str = ""                 # extra Xen command line for this board
    dom0_args: str = ""                # extra dom0 kernel command line for this board
    disk: str = "mmcblk0"              # the root disk's kernel name
    ethernet: str = "eth0"
    qemu: Qemu | None = None           # set for boards QEMU can boot


# ---------------------------------------------------------------- recipes


@dataclass(frozen=True)
class ImageSpec:
    boot_size: Size = Size(64 << 20)
    root_free: Size = Size(256 << 20)  # free space left in the root filesystem (it grows at first boot)


@dataclass(frozen=True)
class Ssh:
    authorized_keys: str | None = None  # a file of the user's; none are baked in by default


@dataclass(frozen=True)
class Wifi:
    ssid: str = "appliance"
    country: str = "DE"                # regulatory domain: which channels and powers are legal
    hw_mode: Literal["a", "b", "g"] = "g"   # a (5 GHz), b or g (2.4 GHz)
    channel: int = 6
    open: bool = False                 # true: no encryption (a booth); false: WPA2 with the passphrase below
    passphrase_file: str | None = None  # a file of the user's (relative to the recipe), never in the repo
    passphrase_env: str | None = "APPLIANCE_WIFI_PASSPHRASE"
    client_isolation: bool = True      # visitors cannot reach each other (hostapd ap_isolate)


@dataclass(frozen=True)
class Network:
    """The visitors' side: the access point (and the wired port when uplink is "bridge") on one bridge."""

    bridge: str = "br0"
    address: str = "10.42.0.1/22"      # dom0, the visitors' router; the prefix is the visitors' subnet
    dhcp_start: str = "10.42.0.100"
    dhcp_end: str = "10.42.3.250"      # about 900 leases: a crowd of a few hundred, phones passing by
    lease_minutes: int = 30
    leases_per_station: int = 4        # one station (one source MAC) holds at most this many leases
    uplink: Literal["dhcp", "bridge"] = "dhcp"   # dhcp: the wired port is a DHCP client; bridge: joined to br0
    captive: bool = True               # booth mode: every name resolves to the default (first) site
    unique_hostname: bool = True       # first boot: hostname becomes NAME-xxxxxx (MAC suffix), published over mDNS


@dataclass(frozen=True)
class GuestNet:
    """The guests' side: a bridge with no physical port; dom0 routes visitors to the guests through the DNAT."""

    bridge: str = "brg0"
    address: str = "10.42.100.1/24"    # dom0 on the guests' bridge; each site's two slots get addresses here


@dataclass(frozen=True)
class OnDemand:
    """A site whose guest sleeps until a visitor asks: woken by a DNS query for one of its names or by a
    connection to its service address (held by dom0 until the guest answers), stopped after `idle` seconds with
    no query, no new connection and no open one. destroy frees its memory; pause keeps it for an instant wake."""

    idle: int = 60
    stop: Literal["destroy", "pause"] = "destroy"
    wake_at_boot: bool = False      # woken as the board starts (the captive site: every phone's first page)


@dataclass(frozen=True)
class Pull:
    """A site that follows a signed release channel (README, "Pull mode"): the board fetches `branch` of the git
    repository at `url` every `every` seconds and takes a release only when a key in `signers` signed it."""

    url: str
    signers: str                       # an OpenSSH allowed_signers file, relative to the recipe
    branch: str = "stable"
    every: int = 300                   # seconds between checks (the board adds jitter, and backs off on failures)


@dataclass(frozen=True)
class SiteSpec:
    """What visitors reach: names, a service address owned by dom0, a health check and the guest that serves."""

    name: str = "demo"
    names: tuple[str, ...] = ("demo.booth",)
    address: str = "10.42.0.2"         # the service address, on the visitors' bridge
    port: int = 80                     # the service port visitors use
    bundle: str | None = None          # a guest bundle directory or a bare Xen ARM zImage; None: the demo guest
    static: str | None = None          # or a folder of static files, served by the demo guest's kernel and httpd
    memory_mib: int = 96
    vcpus: int = 1
    health_path: str = "/"             # the health check: HTTP GET backend:port/health_path, no redirect followed
    deadline: int = 120                # seconds a started guest has to pass it
    drain: int = 30                    # seconds an old guest keeps its connections after a switch
    keep: int = 3                      # versions a deploy keeps in the board's store (current, previous, newest)
    on_demand: OnDemand | None = None  # None: always on
    pull: Pull | None = None           # None: updated by push (`invoke deploy`) only


@dataclass(frozen=True)
class Recipe:
    name: str
    board: str
    description: str = ""
    suite: str = "bookworm"
    mirror: str | None = None          # None: the build host's apt sources
    security_mirror: str | None = None
    components: tuple[str, ...] = ("main",)
    packages: tuple[str, ...] = ()
    hostname: str = ""
    source_date_epoch: int | None = None
    also_boots: tuple[str, ...] = ("qemu-virt",)
    overlays: tuple[str, ...] = ("base",)
    image: ImageSpec = ImageSpec()
    ssh: Ssh = Ssh()
    wifi: Wifi = Wifi()
    network: Network = Network()
    guests: GuestNet = GuestNet()
    sites: tuple[SiteSpec, ...] = (SiteSpec(),)


@dataclass(frozen=True)
class Config:
    """Everything a build needs, resolved and checked: the recipe, its board and where they came from."""

    recipe: Recipe
    board: BoardSpec
    also: tuple[BoardSpec, ...]
    recipe_path: Path
    root: Path = ROOT
    digest: str = field(default="")
    cache: Path = field(default_factory=default_cache)   # base trees, initramfs images, xz chunks (a setting)

    @property
    def image_name(self) -> str:
        return f"{self.board.name}-{self.recipe.name}"

    @property
    def work(self) -> Path:
        """The build's lock, workspaces and guest bundles (appliance.work_dir)."""
        return work_dir(self.root, self.cache)


# ---------------------------------------------------------------- strict loading


def _fail(path: Path, key: str, message: str) -> RecipeError:
    where = f"{rel(path)}: {key}" if key else rel(path)
    return RecipeError(f"{where}: {message}")


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _convert(tp: Any, value: Any, path: Path, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, path, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            named = [f"'{c}'" for c in choices]
            either = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} or {named[-1]}"
            raise _fail(path, key, f"{value!r} must be {either}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(path, key, "must be a mapping")
        return _build(tp, value, path, key + ".")
    if origin is tuple:
        if not isinstance(value, list):
            raise _fail(path, key, "must be a list")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_convert(item, v, path, f"{key}[{i}]") for i, v in enumerate(value))
    if tp in (Size, Addr):
        if isinstance(value, int) and not isinstance(value, bool):
            return tp(value)
        m = _SIZE.match(str(value)) if tp is Size else None
        if m:
            return tp(int(m.group(1)) * _UNITS[m.group(2)])
        if isinstance(value, str) and re.fullmatch(r"0x[0-9a-fA-F]+", value.strip()):
            return tp(int(value, 16))
        raise _fail(path, key, f"{value!r} is not a {'size' if tp is Size else 'hex address'}")
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(path, key, f"{value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(path, key, f"{value!r} must be a whole number")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise _fail(path, key, f"{value!r} must be a string")
        return str(value)
    raise AssertionError(f"unsupported type {tp}")  # a declaration bug, not user input


def _build(cls: Any, data: dict[str, Any], path: Path, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise _fail(path, f"{prefix}{k}", "unknown key" + did_you_mean(str(k), names))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in ("root", "digest", "recipe_path"):
            continue
        key = f"{prefix}{f.name}"
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _fail(path, key, "missing key")
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name], path, key)
    return cls(**kwargs)


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """"; did you mean 'x'?" for the closest of choices, or nothing when none is close."""
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


class _Duplicate(Exception):
    def __init__(self, key: str, line: int, first: int) -> None:
        self.key, self.line, self.first = key, line, first


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _Duplicate(str(key), key_node.start_mark.line + 1, seen[key])
                seen[key] = key_node.start_mark.line + 1
            except TypeError:
                continue   # an unhashable key: construct_mapping's own error names it
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{rel(path)}: no such file") from None
    except OSError as exc:
        raise RecipeError(f"{rel(path)}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader, stricter)
    except _Duplicate as dup:
        raise RecipeError(f"{rel(path)}: line {dup.line}: key '{dup.key}' is already set at line {dup.first} "
                          "(a key may appear once)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None)
        raise RecipeError(f"{rel(path)}: not valid YAML{line}" + (f": {problem}" if problem else "")) from None
    if not isinstance(data, dict):
        raise RecipeError(f"{rel(path)}: must be a mapping of keys")
    return data


def load_board(name: str, root: Path = ROOT) -> BoardSpec:
    path = root / "board" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (root / "board").glob("*.yaml"))
        raise RecipeError(f"{rel(path)}: no such board '{name}'{did_you_mean(name, known)}",
                          hint=f"known boards: {', '.join(known)}")
    board: BoardSpec = _build(BoardSpec, read_yaml(path), path)
    if board.name != name:
        raise _fail(path, "name", f"'{board.name}' does not match the file name '{name}'")
    return board


def recipe_path(name_or_path: str, root: Path = ROOT) -> Path:
    """A path (it has a '/' or ends .yaml) relative to where the user is, or the name of a recipe in recipes/."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or "/" in name_or_path:
        return p if p.is_absolute() else Path.cwd() / p
    path = root / "recipes" / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(q.stem for q in (root / "recipes").glob("*.yaml"))
        raise RecipeError(f"no such recipe '{name_or_path}'{did_you_mean(name_or_path, known)}",
                          hint=f"recipes: {', '.join(known)}; or a path to a .yaml file")
    return path


def in_checkout(path: Path, root: Path = ROOT) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def default_out_dir(recipe: Path, root: Path = ROOT) -> Path:
    """Where a build writes its image: build/ in the checkout for a recipe inside it, else build/ beside the
    recipe (a booth folder of one's own keeps its images); a recipe an installed tool ships, ./build."""
    if in_checkout(recipe, root):
        return root / "build" if checkout(root) else Path.cwd() / "build"
    return recipe.parent / "build"


# Paths in a recipe are the recipe folder's: a booth folder of one's own can live anywhere. A bare name (no '/')
# is first looked for there and otherwise names what the tool ships (its overlays, its static sites).
def overlay_dir(name: str, recipe: Path, root: Path = ROOT, key: str = "overlays") -> Path:
    """The folder an `overlays:` entry names: NAME is the recipe folder's overlays/NAME if it has one, else the
    tool's overlays/NAME; a path is relative to the recipe's folder and must stay inside it."""
    here = recipe.parent
    if "/" not in name and name not in ("", ".", ".."):
        own = here / "overlays" / name
        if not own.is_dir():
            d = root / "overlays" / name
            if not d.is_dir():
                shipped = sorted(p.name for p in (root / "overlays").iterdir() if p.is_dir())
                raise _fail(recipe, key, f"no overlay '{name}' beside the recipe (overlays/{name}/) or among the "
                                         f"tool's ({', '.join(shipped)}){did_you_mean(name, shipped)}")
            return d
        name = f"overlays/{name}"      # the folder's own, held to the same rule as a path (a symlink out of it)
    d = (here / name).resolve()
    if not d.is_relative_to(here.resolve()):
        raise _fail(recipe, key, f"'{name}' leaves the recipe's folder (an overlay is copied into the image, as "
                                 "root's)")
    if not d.is_dir():
        raise _fail(recipe, key, f"no overlay directory {rel(d)}")
    return d


def static_dir(name: str, recipe: Path, root: Path = ROOT) -> Path:
    """The folder a site's `static:` names: relative to the recipe's folder; a bare name that is not a folder
    there names a site the tool ships (guest/about, guest/make)."""
    p = Path(name).expanduser()
    own = p if p.is_absolute() else recipe.parent / p
    if "/" not in name and not own.exists() and (root / "guest" / name / "index.html").is_file():
        return root / "guest" / name
    return own.resolve()


def load(recipe: str = "booth", root: Path = ROOT, *, cache: Path | None = None, **overrides: Any) -> Config:
    """Load and check a recipe and its boards. `overrides` replace top-level recipe keys (CLI options);
    `cache` is where the build keeps what it can reuse (default: default_cache())."""
    path = recipe_path(recipe, root)
    data = read_yaml(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    _moved(data, path)
    rec: Recipe = _build(Recipe, data, path)
    _check_recipe(rec, path, root)
    board = load_board(rec.board, root)
    also = tuple(load_board(b, root) for b in rec.also_boots if b != rec.board)
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(rec), sort_keys=True, default=str).encode()).hexdigest()
    return Config(recipe=rec, board=board, also=also, recipe_path=path, root=root, digest=digest,
                  cache=Path(cache) if cache is not None else default_cache(root))


def _moved(data: dict[str, Any], path: Path) -> None:
    """Keys of the one-guest recipes, replaced by sites: (README, "Sites"): refused with where they went."""
    if "guest" in data:
        raise _fail(path, "guest", "replaced by `sites:`, a list of sites (name, names, address, port, bundle, "
                                   "memory_mib, vcpus, health_path, deadline, drain); see the README, \"Sites\"")
    net = data.get("network")
    if isinstance(net, dict) and "names" in net:
        raise _fail(path, "network.names", "moved to `sites[].names` (each site has its own names)")


# Channels each hardware mode may use as an access point (802.11g has no channel 14; 5 GHz channels 52-144 need
# radar detection (DFS), which USB dongles rarely offer; the country narrows these further).
_CHANNELS = {"g": range(1, 14), "b": range(1, 15), "a": (36, 40, 44, 48, 149, 153, 157, 161, 165)}
_DNS_NAME = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


# The components each Debian suite has (an unknown suite is not checked: its index tells at build time).
_MODERN = ("main", "contrib", "non-free", "non-free-firmware")
COMPONENTS = {"bookworm": _MODERN, "trixie": _MODERN, "forky": _MODERN, "sid": _MODERN,
              "bullseye": ("main", "contrib", "non-free"), "buster": ("main", "contrib", "non-free")}
# The least a partition can be made with: the boot files (Xen, the dom0 kernel, its initramfs, the DTBs: about
# 12 MiB) on FAT, and room for the first boot's writes (host keys, the journal) before the root is grown.
BOOT_MIN, ROOT_FREE_MIN = Size(16 * MiB), Size(16 * MiB)


def _check_recipe(rec: Recipe, path: Path, root: Path = ROOT) -> None:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,30}", rec.name):
        raise _fail(path, "name", f"'{rec.name}' must be lower-case letters, digits and '-'")
    known = COMPONENTS.get(rec.suite)
    for i, comp in enumerate(rec.components):
        if known and comp not in known:
            raise _fail(path, f"components[{i}]", f"'{comp}' is not a component of {rec.suite} "
                                                  f"({', '.join(known)}){did_you_mean(comp, known)}")
    for key, size, least in (("boot_size", rec.image.boot_size, BOOT_MIN),
                             ("root_free", rec.image.root_free, ROOT_FREE_MIN)):
        if size < least:
            raise _fail(path, f"image.{key}", f"{_mib(size)} is below the least a partition can be made with "
                                              f"({_mib(least)})")
    if rec.image.boot_size % MiB:
        raise _fail(path, "image.boot_size", f"{_mib(rec.image.boot_size)} is not a whole number of MiB (the root "
                                             "partition starts after it, aligned)")
    for i, overlay in enumerate(rec.overlays):
        overlay_dir(overlay, path, root, f"overlays[{i}]")
    for key, value, check in (("hostname", rec.hostname, cardsettings.check_hostname),
                              ("wifi.ssid", rec.wifi.ssid, cardsettings.check_ssid)):
        try:
            if value or key != "hostname":
                check(value)
        except cardsettings.Error as exc:
            raise _fail(path, key, str(exc)) from None
    _check_wifi(rec.wifi, path)
    _check_network(rec, path)
    if rec.mirror is not None and not re.fullmatch(r"(https?|file)://\S+", rec.mirror):
        raise _fail(path, "mirror", f"'{rec.mirror}' must be an http(s):// or file:// URL")


def _mib(size: int) -> str:
    return f"{size >> 20}MiB" if size % MiB == 0 else f"{size} bytes"


def _check_wifi(w: Wifi, path: Path) -> None:
    if w.channel not in _CHANNELS[w.hw_mode]:
        raise _fail(path, "wifi.channel", f"channel {w.channel} is not allowed in hw_mode '{w.hw_mode}'")
    if not re.fullmatch(r"[A-Z]{2}", w.country):
        raise _fail(path, "wifi.country", f"'{w.country}' must be a two-letter ISO country code")
    if w.passphrase_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", w.passphrase_env):
        raise _fail(path, "wifi.passphrase_env", f"'{w.passphrase_env}' is not an environment variable name")
    _passphrase(w, path.parent, path, required=False)  # a wrong one is refused now; a missing one when rendering


def _check_network(rec: Recipe, path: Path) -> None:
    n = rec.network
    if not re.fullmatch(r"[a-z][a-z0-9_-]{0,14}", n.bridge):
        raise _fail(path, "network.bridge", f"'{n.bridge}' is not an interface name (up to 15 characters)")
    try:
        iface = ipaddress.IPv4Interface(n.address)
    except ValueError:
        raise _fail(path, "network.address", f"'{n.address}' is not an IPv4 address with a prefix") from None
    net = iface.network
    if net.prefixlen > 29 or iface.ip in (net.network_address, net.broadcast_address):
        raise _fail(path, "network.address", f"{n.address} leaves no room for visitors and a site")
    first = _host(n.dhcp_start, net, path, "network.dhcp_start")
    last = _host(n.dhcp_end, net, path, "network.dhcp_end")
    if last < first:
        raise _fail(path, "network.dhcp_end", f"{last} comes before network.dhcp_start {first}")
    if first <= iface.ip <= last:
        raise _fail(path, "network.address", f"{iface.ip} is inside the DHCP range {first}-{last}")
    if not 2 <= n.lease_minutes <= 24 * 60:
        raise _fail(path, "network.lease_minutes", f"{n.lease_minutes} must be 2 to 1440 (minutes)")
    if not 1 <= n.leases_per_station <= 64:
        raise _fail(path, "network.leases_per_station", f"{n.leases_per_station} must be 1 to 64")
    g = rec.guests
    if not re.fullmatch(r"[a-z][a-z0-9_-]{0,14}", g.bridge) or g.bridge == n.bridge:
        raise _fail(path, "guests.bridge", f"'{g.bridge}' must be an interface name other than network.bridge")
    try:
        giface = ipaddress.IPv4Interface(g.address)
    except ValueError:
        raise _fail(path, "guests.address", f"'{g.address}' is not an IPv4 address with a prefix") from None
    if giface.network.overlaps(net):
        raise _fail(path, "guests.address", f"{giface.network} overlaps the visitors' subnet {net}")
    if giface.network.num_addresses < 16 + 2 * len(rec.sites):
        raise _fail(path, "guests.address", f"{giface.network} has no room for {len(rec.sites)} sites' two slots")
    _check_sites(rec, path, iface, first, last)


def _host(value: str, net: ipaddress.IPv4Network, path: Path, key: str) -> ipaddress.IPv4Address:
    try:
        ip = ipaddress.IPv4Address(value)
    except ValueError:
        raise _fail(path, key, f"'{value}' is not an IPv4 address") from None
    if ip not in net or ip in (net.network_address, net.broadcast_address):
        raise _fail(path, key, f"{value} is outside the bridge's subnet {net}")
    return ip


def _check_sites(rec: Recipe, path: Path, router: ipaddress.IPv4Interface, first: ipaddress.IPv4Address,
                 last: ipaddress.IPv4Address) -> None:
    if not rec.sites:
        raise _fail(path, "sites", "must list at least one site")
    seen: dict[str, str] = {}
    for i, s in enumerate(rec.sites):
        key = f"sites[{i}]"
        try:
            names.check_site(s.name, f"{key}.name")
        except names.Error as exc:
            raise _fail(path, "", str(exc)) from None
        ip = _host(s.address, router.network, path, f"{key}.address")
        if ip == router.ip:
            raise _fail(path, f"{key}.address", f"{s.address} is the router's own address (network.address)")
        if first <= ip <= last:
            raise _fail(path, f"{key}.address", f"{s.address} is inside the DHCP range {first}-{last}")
        for what, value in (("name", s.name), ("address", s.address), *(("names", n) for n in s.names)):
            if f"{what}:{value}" in seen:
                raise _fail(path, f"{key}.{what}", f"'{value}' is already used by {seen[f'{what}:{value}']}")
            seen[f"{what}:{value}"] = f"sites[{i}] ({s.name})"
        for j, name in enumerate(s.names):
            if not _DNS_NAME.fullmatch(name):
                raise _fail(path, f"{key}.names[{j}]", f"'{name}' is not a lower-case DNS name")
        checks: tuple[tuple[str, str, int, str], ...] = (("memory_mib", "memory", s.memory_mib, " (MiB)"),
                                                         ("vcpus", "vcpus", s.vcpus, ""),
                                                         ("deadline", "deadline", s.deadline, " (seconds)"),
                                                         ("drain", "drain", s.drain, " (seconds)"),
                                                         ("keep", "keep", s.keep, " (versions)"))
        for field_, limit, amount, unit in checks:
            least, most = SITE_LIMITS[limit]         # the board's own, in one place (manager/settings.py)
            if not least <= amount <= most:
                raise _fail(path, f"{key}.{field_}", f"{amount} must be {least} to {most}{unit}")
        if not SITE_LIMITS["port"][0] <= s.port <= SITE_LIMITS["port"][1]:
            raise _fail(path, f"{key}.port", f"{s.port} is not a TCP port")
        if not manifest.HEALTH_PATH.fullmatch(s.health_path):
            raise _fail(path, f"{key}.health_path", f"'{s.health_path}' must be a URL path starting with '/'")
        if s.bundle and s.static:
            raise _fail(path, f"{key}.static", "a site is served by its bundle or by a folder of static files, not both")
        idle = SITE_LIMITS["idle"]
        if s.on_demand and not idle[0] <= s.on_demand.idle <= idle[1]:
            raise _fail(path, f"{key}.on_demand.idle", f"{s.on_demand.idle} must be {idle[0]} to {idle[1]} "
                                                      f"(seconds)")
        if s.pull:
            pull_signers(s.pull, path, f"{key}.pull")


def pull_signers(p: Pull, recipe: Path, key: str) -> list[str]:
    """A site's pull: checked with the board's own rules; its allowed_signers file's lines (relative to the
    recipe), each one an OpenSSH allowed_signers entry, checked by ssh-keygen on the board when it verifies."""
    from .manager import pull

    try:
        pull.check_url(p.url, key)
        pull.check_branch(p.branch, key)
        pull.check_every(p.every, key)
    except names.Error as exc:
        raise _fail(recipe, "", str(exc)) from None
    path = recipe.parent / p.signers
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(recipe, f"{key}.signers", f"cannot read {rel(path)}: {exc}") from None
    try:
        return pull.check_signers(text.splitlines(), f"{rel(path)}")
    except names.Error as exc:
        raise _fail(recipe, f"{key}.signers", str(exc)) from None


def _passphrase(w: Wifi, base: Path, recipe: Path | None, *, required: bool) -> str | None:
    import os

    where = f"{rel(recipe)}: " if recipe else ""
    if w.open:
        return None
    if w.passphrase_file:
        p = Path(w.passphrase_file).expanduser()
        p = p if p.is_absolute() else base / p
        key, source = "wifi.passphrase_file", rel(p)
        try:
            value = p.read_text().strip("\r\n")
        except OSError as exc:
            if not required and isinstance(exc, FileNotFoundError):
                return None
            raise RecipeError(f"{where}{key}: cannot read {source}: {exc.strerror}") from None
    elif w.passphrase_env and os.environ.get(w.passphrase_env):
        key, source, value = "wifi.passphrase_env", f"${w.passphrase_env}", os.environ[w.passphrase_env]
    elif required:
        raise RecipeError(f"{where}wifi: no WPA2 passphrase: set wifi.passphrase_file, or the environment variable "
                          f"{w.passphrase_env or '(wifi.passphrase_env)'}, or wifi.open: true")
    else:
        return None
    try:
        return cardsettings.check_passphrase(value, source)
    except cardsettings.Error as exc:
        raise RecipeError(f"{where}{key}: {exc}") from None


def wifi_passphrase(rec: Recipe, base: Path) -> str | None:
    """The WPA2 passphrase from the user's file or environment (never from the repo); None for open.

    `base` is the recipe file (errors then name it) or the directory a relative passphrase_file is in.
    """
    recipe = base if base.suffix in (".yaml", ".yml") else None
    return _passphrase(rec.wifi, base.parent if recipe else base, recipe, required=True)
