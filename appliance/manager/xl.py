"""The few xl commands the manager runs, and the xl domain config of one version in one slot. Every value that
goes between quotes is checked here again, whatever the manifest validator already said.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
import shlex
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from .errors import Error
from .manifest import Manifest
from .settings import Bridge, Site, Slot

SAFE = re.compile(r"[A-Za-z0-9_.,:=/+@~-]*")   # what a quoted xl value may hold: no quotes, backslash, space
VIF = re.compile(r"mac=([0-9a-f]{2}:){5}[0-9a-f]{2},bridge=[A-Za-z0-9_.-]{1,15}")
DOMAIN = re.compile(r"[a-z][a-z0-9-]{0,30}\.(blue|green)")


def _quoted(value: str, key: str, pattern: re.Pattern[str] = SAFE) -> str:
    if not pattern.fullmatch(value):
        raise Error(f"xl config: {key}: {value!r} could break out of its quotes; refused")
    return f'"{value}"'


def values(site: Site, slot: Slot, m: Manifest, guests: Bridge) -> dict[str, Any]:
    """The cmdline placeholders' values for a version in a slot."""
    return {"address": slot.address, "gateway": guests.address, "netmask": guests.netmask,
            "prefix": guests.prefix, "domain": slot.domain, "port": m.port, "site": site.name,
            "version": m.version, "mac": slot.mac}


def config(site: Site, slot: Slot, m: Manifest, directory: Path, guests: Bridge) -> str:
    """The domain config: the files by the version directory's resolved path (never through `current`)."""
    d = directory.resolve()
    name = _quoted(slot.domain, "name", DOMAIN)     # first: the messages below name it
    extra = m.render(values(site, slot, m, guests), f"xl config: {slot.domain}: extra")
    if not re.fullmatch(r"[\x20-\x7e]*", extra) or '"' in extra or "\\" in extra:
        raise Error(f"xl config: extra: {extra!r} could break out of its quotes; refused")
    vif = f"mac={slot.mac},bridge={guests.bridge}"
    if not VIF.fullmatch(vif):
        raise Error(f"xl config: vif: {vif!r} could break out of its quotes; refused")
    lines = [
        f"# {site.name} {m.version} in slot {slot.name}: written by appliance-guest",
        f"name = {name}",
        f"kernel = {_quoted(str(d / m.kernel), 'kernel')}",
        *([f"ramdisk = {_quoted(str(d / m.ramdisk), 'ramdisk')}"] if m.ramdisk else []),
        f"memory = {int(m.memory)}",
        f"vcpus = {int(m.vcpus)}",
        f"vif = ['{vif}']",
        f'extra = "{extra}"',
        'on_poweroff = "destroy"',
        'on_reboot = "restart"',
        'on_crash = "destroy"',    # the supervisor notices and starts it again, with a backoff
    ]
    return "\n".join(lines) + "\n"


def direct(command: str, version: Path = Path("/sys/hypervisor/version"), lib: Path = Path("/usr/lib")) -> str:
    """Debian's xl is a shell script that finds the running Xen's own xl and runs it: a process more for every xl
    command, a fraction of a second each on an emulated board. That xl itself, where the running Xen has one."""
    if command != "xl":
        return command
    try:
        xen = ".".join((version / part).read_text().strip() for part in ("major", "minor"))
    except OSError:
        return command
    own = lib / f"xen-{xen}" / "bin" / "xl"
    return str(own) if re.fullmatch(r"\d+\.\d+", xen) and os.access(own, os.X_OK) else command


class XenCtrl:
    """Xen's own control library (libxenctrl, the one xl itself calls), for the one call on a visitor's way that
    an xl process would make slow: unpausing a paused guest (one xl process costs 0.17 s on the emulated board,
    most of a paused wake; the library call, well under a millisecond)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.xc_interface_open.restype = ctypes.c_void_p
        lib.xc_interface_open.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
        lib.xc_domain_unpause.restype = ctypes.c_int
        lib.xc_domain_unpause.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        self.lib, self.lock = lib, threading.Lock()
        self.xch = lib.xc_interface_open(None, None, 0)
        if not self.xch:
            raise OSError("xc_interface_open failed")

    @classmethod
    def here(cls, hypervisor: Path = Path("/sys/hypervisor/type")) -> XenCtrl | None:
        """The library, on Xen's dom0 where it is installed; else None (xl does it all)."""
        try:
            if hypervisor.read_text().strip() != "xen":
                return None
            name = ctypes.util.find_library("xenctrl")
            return cls(ctypes.CDLL(name)) if name else None
        except OSError:
            return None

    def unpause(self, domid: int) -> bool:
        with self.lock:
            return int(self.lib.xc_domain_unpause(self.xch, domid)) == 0


class Xl:
    def __init__(self, command: str = "xl") -> None:
        self.argv = shlex.split(direct(command))
        self._real = command == "xl"        # a stand-in (the namespace double) has no Xen to call

    @functools.cached_property
    def _ctrl(self) -> XenCtrl | None:
        """libxenctrl, looked for at the first unpause (not at start-up: most runs never unpause)."""
        return XenCtrl.here() if self._real else None

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [*self.argv, *args]
        try:
            return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, errors="replace")
        except subprocess.TimeoutExpired:
            raise Error(f"{shlex.join(cmd)}: no answer in {timeout:g} s") from None
        except OSError as exc:
            raise Error(f"{shlex.join(cmd)}: cannot run: {exc.strerror} (xen-utils installed?)") from None

    def _check(self, p: subprocess.CompletedProcess[str], what: str) -> str:
        if p.returncode != 0:
            tail = " / ".join(p.stderr.strip().splitlines()[-3:]) or f"exit status {p.returncode}"
            raise Error(f"xl {what} failed: {tail}")
        return p.stdout

    def create(self, cfg: Path) -> None:
        self._check(self.run("create", str(cfg)), f"create {cfg}")

    def domid(self, name: str) -> int | None:
        p = self.run("domid", name, timeout=30)
        out = p.stdout.strip()
        return int(out) if p.returncode == 0 and out.isdigit() else None

    def destroy(self, name: str) -> None:
        """Destroy the domain if it is there; one that went meanwhile (a guest powering off as asked) is not an
        error."""
        if self.domid(name) is None:
            return
        p = self.run("destroy", name, timeout=60)
        if p.returncode and self.domid(name) is None:
            return
        self._check(p, f"destroy {name}")

    def shutdown(self, name: str) -> None:
        """Ask the guest to shut down. xl writes the request at once and then waits for the guest to take it; a
        guest that never does (no PV control, or one already going) is not waited for long."""
        self.run("shutdown", name, timeout=10)

    def stop(self, name: str, grace: float = 10, *, asked: bool = False) -> None:
        """Ask the guest to shut down (unless `asked` already: a guest that took a first request never
        acknowledges a second, and xl waits for that); destroy it if it has not gone within grace seconds, or
        when the request itself gets no answer."""
        if self.domid(name) is None:
            return
        if not asked:
            try:
                self.shutdown(name)
            except Error:
                grace = 0
        end = time.monotonic() + grace
        while time.monotonic() < end and self.domid(name) is not None:
            time.sleep(0.1)
        self.destroy(name)

    def pause(self, name: str) -> None:
        self._check(self.run("pause", name, timeout=30), f"pause {name}")

    def unpause(self, name: str, domid: int | None = None) -> str:
        """Unpause the domain: by libxenctrl when its domid is known and the library is here, else (or if that
        call fails) by xl; which of the two did it."""
        if domid is not None and self._ctrl is not None and self._ctrl.unpause(domid):
            return "libxenctrl"
        self._check(self.run("unpause", name, timeout=30), f"unpause {name}")
        return "xl"

    def list(self) -> list[str]:
        """The names of the running domains but Domain-0."""
        out = self._check(self.run("list", timeout=30), "list")
        names = [line.split()[0] for line in out.splitlines()[1:] if line.split()]
        return [n for n in names if n != "Domain-0"]

    def free_memory(self) -> int:
        """MiB Xen can still give a guest (`xl info`'s free_memory)."""
        out = self._check(self.run("info", timeout=30), "info")
        m = re.search(r"^free_memory\s*:\s*(\d+)", out, re.M)
        if not m:
            raise Error("xl info: no free_memory line in its output")
        return int(m.group(1))
