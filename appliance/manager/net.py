"""dom0's side of a site's network: the nftables map from a service address and port to the active backend
(one `nft -f -` batch moves a site), the conntrack count that tells when an old backend has drained (no
connection to it left unfinished), dom0's MAC in the bridge filter, and the health check of a backend on its
own address.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import ipaddress
import json
import re
import shlex
import socket
import subprocess
import threading
from pathlib import Path

from .errors import Error

TABLE = "inet appliance"
NETLINK_NETFILTER = 12     # linux/netlink.h
MAP = "svc"
Backend = tuple[str, int]


# conntrack's TCP states in which a connection is over on both sides; in any other a guest still owes or awaits
# packets (SYN_SENT and SYN_RECV included: `--state ESTABLISHED` alone missed a connect racing the switch).
OVER = frozenset({"TIME_WAIT", "CLOSE"})


def live(entry: list[str]) -> bool:
    """Whether a split `conntrack -L` TCP entry (`tcp 6 TIMEOUT STATE src=...`) is a connection not yet over."""
    return len(entry) > 3 and entry[3] not in OVER


def _addr(address: str, port: int) -> str:
    """An element key or value in nft syntax, refused unless it is an IPv4 address and a port."""
    ip = ipaddress.IPv4Address(address)
    if type(port) is not int or not 0 < port < 65536:
        raise Error(f"nft: {port!r} is not a TCP port")
    return f"{ip} . {port}"


class NftLib:
    """libnftables, the library the nft command is a front of: the same commands and the same one-transaction
    batches, without a process each. On a visitor's way (a wake points the site at its guest) one nft process cost
    0.15-0.22 s of the emulated board's one CPU, and a move took two (the look, then the batch): `invoke bench`."""

    JSON = 1 << 4          # NFT_CTX_OUTPUT_JSON (nftables/libnftables.h)

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_int
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_output_set_flags.restype = None
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self.lib, self.lock = lib, threading.Lock()
        self.ctx = lib.nft_ctx_new(0)
        if not self.ctx or lib.nft_ctx_buffer_output(self.ctx) or lib.nft_ctx_buffer_error(self.ctx):
            raise OSError("nft_ctx_new failed")

    @classmethod
    def here(cls) -> NftLib | None:
        """The library where the kernel gives this process a netfilter netlink socket, else None (the command).
        libnftables opens its socket once, in nft_ctx_new, and calls exit() when it cannot (qemu-user, as the
        image tier runs the board's manager in a chroot, has no such socket): so this asks first."""
        try:
            socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER).close()
            name = ctypes.util.find_library("nftables")
            return cls(ctypes.CDLL(name)) if name else None
        except OSError:
            return None

    def run(self, commands: str, json_out: bool = False) -> tuple[int, str, str]:
        """(status, output, errors) of one buffer of commands, as `nft [-j] -f -` gives them."""
        with self.lock:
            self.lib.nft_ctx_output_set_flags(self.ctx, self.JSON if json_out else 0)
            status = int(self.lib.nft_run_cmd_from_buffer(self.ctx, commands.encode()))
            out = self.lib.nft_ctx_get_output_buffer(self.ctx) or b""
            err = self.lib.nft_ctx_get_error_buffer(self.ctx) or b""
        return status, out.decode(errors="replace"), err.decode(errors="replace")


class Net:
    def __init__(self, nft: str = "nft", conntrack: str = "conntrack", sysfs: Path = Path("/sys/class/net")) -> None:
        self.nft, self.conntrack, self.sysfs = shlex.split(nft), shlex.split(conntrack), sysfs

    @functools.cached_property
    def _lib(self) -> NftLib | None:
        """libnftables for the plain `nft` (a board's, the namespace double's); a command of its own (a test's
        stand-in) runs as a process. Looked for at the first nft command."""
        return NftLib.here() if self.nft == ["nft"] else None

    def _nft_run(self, commands: str, what: str, json_out: bool = False) -> tuple[int, str, str]:
        if self._lib is not None:
            return self._lib.run(commands, json_out)
        # the command's -j with -f reads JSON, so a listing goes on its command line
        p = (self._run([*self.nft, "-j", *commands.split()], what) if json_out else
             self._run([*self.nft, "-f", "-"], what, stdin=commands))
        return p.returncode, p.stdout, p.stderr

    def _run(self, argv: list[str], what: str, stdin: str | None = None, timeout: float = 30
             ) -> subprocess.CompletedProcess[str]:
        try:
            if stdin is None:
                return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout,
                                      errors="replace", stdin=subprocess.DEVNULL)
            return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout,
                                  errors="replace", input=stdin)
        except subprocess.TimeoutExpired:
            raise Error(f"{what}: no answer in {timeout:g} s") from None
        except OSError as exc:
            raise Error(f"{what}: cannot run {argv[0]}: {exc.strerror}") from None

    def _nft(self, batch: str, what: str) -> None:
        status, _, err = self._nft_run(batch, what)
        if status != 0:
            tail = " / ".join(line.strip() for line in err.strip().splitlines()[:3]) or f"exit {status}"
            raise Error(f"nft -f - ({what}) failed: {tail}")

    def elements(self) -> dict[Backend, Backend]:
        """The map's elements: service address and port -> backend address and port."""
        status, out_text, err = self._nft_run(f"list map {TABLE} {MAP}\n", "nft list map", json_out=True)
        if status != 0:
            raise Error(f"nft -j list map {TABLE} {MAP} failed: {err.strip().splitlines()[:1]} (is the "
                        f"ruleset loaded?)")
        out: dict[Backend, Backend] = {}
        try:
            for item in json.loads(out_text)["nftables"]:
                for key, value in item.get("map", {}).get("elem", []):
                    a, b = key["concat"], value["concat"]
                    out[(str(a[0]), int(a[1]))] = (str(b[0]), int(b[1]))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise Error(f"nft -j list map {TABLE} {MAP}: unexpected output ({exc})") from None
        return out

    def active(self, address: str, port: int) -> Backend | None:
        return self.elements().get((address, port))

    def point(self, address: str, port: int, backend: str, backend_port: int) -> None:
        """Send the service address to the backend, in one transaction: `add` on an existing key fails, so the
        old element goes in the same batch."""
        key = _addr(address, port)
        batch = ""
        if self.active(address, port) is not None:
            batch += f"delete element {TABLE} {MAP} {{ {key} }}\n"
        batch += f"add element {TABLE} {MAP} {{ {key} : {_addr(backend, backend_port)} }}\n"
        self._nft(batch, f"point {address}:{port} at {backend}:{backend_port}")

    def remove(self, address: str, port: int) -> None:
        if self.active(address, port) is not None:
            self._nft(f"delete element {TABLE} {MAP} {{ {_addr(address, port)} }}\n", f"remove {address}:{port}")

    def _tcp(self, argv: list[str]) -> list[list[str]]:
        """The TCP entries of a `conntrack -L`, each split in words (the state is the fourth)."""
        p = self._run(argv, "conntrack -L")
        if p.returncode != 0:
            raise Error(f"{shlex.join(argv)} failed: {p.stderr.strip().splitlines()[-1:] or p.returncode}")
        return [line.split() for line in p.stdout.splitlines() if line.startswith("tcp")]

    def unfinished(self, backend: str, own: str | None = None) -> int:
        """TCP connections to a backend that are not over: a handshake under way (a SYN that reached the old
        guest just before the switch), established, or closing with its last data perhaps not yet acknowledged.
        Stopping the guest under any of them would leave a visitor waiting for an answer that never comes.
        Not counted: dom0's own (from `own`, its address on the guests' bridge) that were never answered, the
        health checks knocking while the guest booted; conntrack keeps them 120 s, and a switch back within
        that time drained for its whole deadline."""
        ipaddress.IPv4Address(backend)
        if own is not None:
            ipaddress.IPv4Address(own)
        entries = self._tcp([*self.conntrack, "-L", "-p", "tcp", "--reply-src", backend])
        return sum(1 for e in entries if live(e) and not (own and "[UNREPLIED]" in e and f"src={own}" in e[4:5]))

    def connections(self, service: str, backend: str) -> tuple[set[int], int]:
        """Visitors' TCP connections to a service address that went to a backend: their conntrack ids (a new id
        is a new connection) and how many are not over yet. dom0's own (health checks) go to the backend's own
        address and are not among them."""
        ipaddress.IPv4Address(service), ipaddress.IPv4Address(backend)
        # the idle look, once a second for each serving on-demand site: below the rest of dom0 for its one CPU (the
        # manager runs at -10; under QEMU each look costs a sixth of a second, and at boot the visitors' path waited
        # for them: `invoke bench`). No wake takes one while a visitor waits (demand.DemandSite._wake).
        argv = ["nice", "-n", "20", *self.conntrack, "-L", "-p", "tcp", "--orig-dst", service, "--reply-src",
                backend, "-o", "id"]
        ids: set[int] = set()
        going = 0
        for e in self._tcp(argv):
            going += live(e)
            ids.update(int(w[3:]) for w in e if w.startswith("id=") and w[3:].isdigit())
        return ids, going

    def mac(self, bridge: str) -> str | None:
        try:
            return (self.sysfs / bridge / "address").read_text().strip()
        except OSError:
            return None

    def make_bridge(self, bridge: str, cidr: str) -> None:
        """Make the guests' bridge with dom0's address on it, ahead of systemd-networkd (which starts late in a
        boot, and takes the bridge over as it finds it: the same name, the same address), in one `ip` process.
        Made as networkd's .netdev and .network say: no STP, no forward delay, no IPv6 link-local address."""
        ipaddress.IPv4Interface(cidr)
        batch = (f"link add name {bridge} type bridge stp_state 0 forward_delay 0\n"
                 f"link set dev {bridge} addrgenmode none\n"
                 f"addr add {cidr} dev {bridge}\n"
                 f"link set dev {bridge} up\n")
        p = self._run(["ip", "-force", "-batch", "-"], f"making bridge {bridge}", stdin=batch)
        errors = [line for line in p.stderr.splitlines() if line.strip() and not re.search(r"exists|already", line)
                  and not line.startswith("Command failed")]
        if p.returncode != 0 and errors:
            raise Error(f"ip -batch (making bridge {bridge}) failed: {' / '.join(errors[:3])}")

    def add_dom0_mac(self, bridge: str) -> str:
        """Put the visitors' bridge's own MAC in the bridge filter's set: no visitor may send from it."""
        mac = self.mac(bridge)
        if mac is None or not all(len(p) == 2 for p in mac.split(":")) or len(mac) != 17:
            raise Error(f"{self.sysfs / bridge / 'address'}: no MAC address for bridge {bridge}")
        self._nft(f"add element bridge appliance dom0_macs {{ {mac} }}\n", f"dom0_macs {mac}")
        return mac


def healthy(address: str, port: int, path: str, timeout: float = 2.0) -> tuple[bool, str]:
    """GET http://address:port/path from the guest itself: 2xx or 3xx is healthy; a redirect is not followed
    (http.client follows none), and no proxy is asked. Returns (healthy, what happened)."""
    # here, not at the top: its import (email's parser) is a second of an emulated boot, and the first check comes
    # while the guest boots on the other CPU
    import http.client

    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "appliance-guest health check", "Connection": "close"})
        r = conn.getresponse()
        r.read(65536)
        return 200 <= r.status < 400, f"HTTP {r.status}"
    except (OSError, http.client.HTTPException) as exc:
        return False, type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
