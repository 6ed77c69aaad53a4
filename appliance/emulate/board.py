"""The emulated board as tests and tasks see it: QEMU's process, the forwarded ports, the console, and dom0's
shell over the one SSH layer (appliance.ssh): run, put, fetch from inside dom0, the guest's HTTP through a tunnel.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import paramiko

from .. import ssh
from ..config import BoardSpec
from ..errors import EmulateError, SshError
from ..ssh import Result
from . import qemu
from .console import Console

T = TypeVar("T")

# A GET from dom0 with only the Python the image has: prints the status, then the body.
_FETCH = """import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))
    status, body = r.status, r.read()
except urllib.error.HTTPError as exc:
    status, body = exc.code, exc.read()
except Exception as exc:
    status, body = 0, repr(exc).encode()
sys.stdout.write(f"{status}\\n{body.decode(errors='replace')}")
"""



@dataclass
class Board:
    """The emulated board, as tests and tasks see it: forwarded ports, the key, the console and a shell."""

    proc: subprocess.Popen[bytes]
    spec: BoardSpec
    image: Path
    ssh_port: int
    key: Path | None          # None: a key ssh-agent holds
    console: Path
    started: float
    ssh_config: Path
    guest: tuple[str, int]                 # the served guest's address and port on dom0's bridge
    _console: Console = field(repr=False)
    _client: ssh.Connection | None = field(default=None, repr=False)
    _tunnel_client: ssh.Connection | None = field(default=None, repr=False)
    _tunnel: ssh.Tunnel | None = field(default=None, repr=False)
    scratch: Path | None = None            # a disk copy QEMU writes to (SD boards, persistent boots), removed at power-off
    host_key: str | None = None
    argv: list[str] = field(default_factory=list)   # how QEMU was started, to power it on again
    settled: bool = False                  # after SSH answers, wait for the rest of the boot too (tests)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._tunnel = ssh.Tunnel(self.guest, self._tunnel_transport)

    @property
    def http_port(self) -> int:
        """The host port that reaches the guest's HTTP (through dom0's SSH)."""
        assert self._tunnel is not None
        return self._tunnel.port

    @property
    def milestones(self) -> dict[str, float]:
        """Seconds from power-on to each boot milestone seen so far (console lines, then SSH and HTTP)."""
        return dict(self._console.milestones)

    def mark(self, name: str) -> float:
        """Note a milestone observed from outside the console (e.g. the first SSH login)."""
        t = round(time.monotonic() - self.started, 2)
        self._console.milestones.setdefault(name, t)
        return t

    @property
    def testinfra_url(self) -> str:
        # Host keys are new at every first boot, so they are not checked (ssh_config says so).
        return f"paramiko://root@127.0.0.1:{self.ssh_port}?timeout=60&ssh_config={self.ssh_config}"

    def ssh_command(self) -> str:
        key = ["-i", str(self.key)] if self.key is not None else []
        return shlex.join(["ssh", *key, "-p", str(self.ssh_port), "-o", "StrictHostKeyChecking=no",
                           "-o", "UserKnownHostsFile=/dev/null", "root@127.0.0.1"])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 25) -> str:
        return self._console.tail(lines)

    def fail(self, what: str) -> EmulateError:
        """An EmulateError naming the image and board, with the tail of the console log."""
        return EmulateError(f"{self.image.name} on {self.spec.name}: {what}; the console log {self.console} "
                            f"ends:\n{self.tail()}")

    def check_alive(self, when: str) -> None:
        """Raise at once if QEMU has exited or the console showed a boot that cannot go on."""
        if not self.alive():
            raise self.fail(f"QEMU exited with status {self.proc.returncode} {when}")
        if self._console.fatal:
            why, line = self._console.fatal
            raise self.fail(f"{why} ({line.decode(errors='replace').strip()!r}) {when}")

    # ------------------------------------------------------------ SSH

    def _connect(self, timeout: float) -> ssh.Connection:
        # Host keys are new at every first boot, so the ssh_config says not to check them.
        conn = ssh.Connection("127.0.0.1", port=self.ssh_port, user="root", key=self.key, ssh_config=self.ssh_config,
                              timeout=timeout).open()
        self.host_key = conn.host_key
        return conn

    def _banner(self, timeout: float) -> bool:
        # slirp accepts the host's connection before the board listens, then drops it; reading sshd's
        # banner tells the two apart quietly, before paramiko is asked to log in.
        try:
            with socket.create_connection(("127.0.0.1", self.ssh_port), timeout=timeout) as sock:
                return sock.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    def _tunnel_transport(self) -> paramiko.Transport:
        with self._lock:
            if self._tunnel_client is None or not self._tunnel_client.active:
                if self._tunnel_client:
                    self._tunnel_client.close()
                self._tunnel_client = self._connect(timeout=30)
            return self._tunnel_client.transport

    def close(self) -> None:
        """Drop the SSH connections (the next command reconnects)."""
        for c in (self._client, self._tunnel_client):
            if c is not None:
                c.close()
        self._client = self._tunnel_client = None

    def wait_ssh(self, timeout: float, *, unless_boot_id: str | None = None) -> float:
        """Poll until root can log in over SSH (and, after a reboot, the boot is a new one); seconds taken."""
        start = time.monotonic()
        deadline = start + timeout
        last = "no attempt yet"
        quiet = logging.getLogger("paramiko")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # each refused attempt would print a traceback
        try:
            while True:
                self.check_alive("before dom0's SSH answered")
                try:
                    self.close()
                    if not self._banner(timeout=min(10.0, max(deadline - time.monotonic(), 1.0))):
                        raise EOFError("no SSH banner yet")
                    self._client = self._connect(timeout=min(30.0, max(deadline - time.monotonic(), 5.0)))
                    if unless_boot_id is None or self.boot_id() != unless_boot_id:
                        return time.monotonic() - start
                    last = "the board has not rebooted yet"
                except (SshError, OSError, EOFError, EmulateError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() >= deadline:
                    raise self.fail(f"dom0 did not accept an SSH login on port {self.ssh_port} within "
                                    f"{timeout:.0f} s (last: {last})")
                time.sleep(1)
        finally:
            quiet.setLevel(level)

    def run(self, cmd: str, *, check: bool = True, timeout: float = 120) -> Result:
        """Run a shell command in dom0 as root; with check, a non-zero exit raises EmulateError."""
        if self._client is None or not self._client.active:
            self.check_alive(f"while running {cmd!r}")
            try:
                self._client = self._connect(timeout=30)
            except SshError as exc:
                raise EmulateError(f"{cmd!r}: cannot log in to the emulated board ({exc})") from None
        try:
            r = self._client.run(cmd, timeout=timeout)
        except SshError as exc:
            self.close()
            raise EmulateError(f"{cmd!r} on the emulated board: {exc}") from None
        if check and r.rc != 0:
            detail = " / ".join((r.err or r.out).strip().splitlines()[-3:]) or "no output"
            raise EmulateError(f"{cmd!r} on the emulated board exited with {r.rc}: {detail}")
        return r

    def connection(self) -> ssh.Connection:
        """dom0's SSH connection (for deploy: the same layer as everything else)."""
        if self._client is None or not self._client.active:
            self._client = self._connect(timeout=30)
        return self._client

    def put(self, local: Path, remote: str) -> None:
        """Copy a directory's files to a new directory in dom0 over SFTP (a .tmp beside it, then one rename)."""
        self.run(f"rm -rf {shlex.quote(remote)}.tmp && mkdir -p {shlex.quote(remote)}.tmp")
        try:
            with self.connection().sftp() as sftp:
                for p in sorted(local.iterdir()):
                    sftp.put(str(p), f"{remote}.tmp/{p.name}")
        except (SshError, OSError, paramiko.SSHException) as exc:
            raise EmulateError(f"copying {local} to {remote} on the emulated board failed ({exc})") from None
        self.run(f"mv {shlex.quote(remote)}.tmp {shlex.quote(remote)}")

    def boot_id(self) -> str:
        return self.run("cat /proc/sys/kernel/random/boot_id", timeout=30).out.strip()

    def settle(self, timeout: float) -> str:
        """Wait until systemd's boot job queue is empty; its state (running, degraded). dom0's SSH answers as soon
        as its host keys exist, before udev's whole coldplug, avahi or the first boot's growroot are done: tests
        that look at the booted board start after them (`settled`)."""
        return self.run("systemctl is-system-running --wait", check=False, timeout=max(timeout, 30)).out.strip()

    def _back(self, timeout: float, unless_boot_id: str | None = None) -> float:
        """After a reboot or power cut: wait for SSH, then (if settled) for the rest of the boot; seconds until
        SSH answered."""
        took = self.wait_ssh(timeout, unless_boot_id=unless_boot_id)
        if self.settled:
            self.settle(timeout - took)
        return took

    def reboot(self, timeout: float) -> float:
        """Reboot dom0 (and so the machine: Xen resets it) and wait for SSH on the new boot (and, if settled,
        for the rest of it); seconds taken."""
        old = self.boot_id()
        with contextlib.suppress(EmulateError):
            # The connection may die before the command returns; that is the reboot starting.
            self.run("systemctl reboot", check=False, timeout=30)
        self.close()
        return self._back(timeout, unless_boot_id=old)

    # ------------------------------------------------------------ HTTP

    def http_get(self, path: str = "/", timeout: float = 30) -> tuple[int, str]:
        """GET from the guest through the host's forwarded port: (status, body); (0, reason) if no answer."""
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        except (OSError, http.client.HTTPException) as exc:
            return 0, f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()

    def fetch(self, url: str, *, netns: str | None = None, timeout: float = 10) -> tuple[int, str]:
        """GET url from inside dom0 (or one of its network namespaces): (status, body); (0, reason) if none."""
        prefix = f"ip netns exec {shlex.quote(netns)} " if netns else ""
        r = self.run(f"{prefix}python3 -c {shlex.quote(_FETCH)} {shlex.quote(url)} {timeout}", check=False,
                     timeout=timeout + 60)
        status, _, body = r.out.partition("\n")
        return (int(status), body) if status.strip().isdigit() else (0, (r.err or r.out).strip())

    # ------------------------------------------------------------ power

    def type_keys(self, text: str) -> None:
        """Type text on the serial console, as someone at the board's UART would."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def power_cut(self, timeout: float) -> float:
        """Pull the plug: QEMU killed at once, so the board's disk keeps only what reached it; then power on
        again with the same disk and ports and wait for SSH; seconds from power-on. The console log goes on in
        the same file; the milestones are the new boot's."""
        if self.scratch is None or not self.argv:
            raise EmulateError(f"{self.image.name} on {self.spec.name} boots on a throw-away overlay: a power cut "
                               f"would lose every write (boot it with persistent=True)")
        self.close()
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        self._console.join()
        self.started = time.monotonic()
        self.proc = qemu.spawn(self.argv)
        assert self.proc.stdout is not None
        self._console = Console(self.proc.stdout, self.console, self.started)
        return self._back(timeout)

    def stop(self) -> None:
        """Power off at once: every write went to the throw-away overlay, so nothing is lost."""
        if self._tunnel is not None:
            self._tunnel.close()
        self.close()
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._console.join()
        if self.scratch is not None:
            self.scratch.unlink(missing_ok=True)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 1.0,
             board: Board | None = None) -> T:
    """Poll probe() until it returns something other than None/False, or raise EmulateError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if board is not None:
            board.check_alive(f"while waiting for {what}")
        if time.monotonic() >= deadline:
            raise EmulateError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


