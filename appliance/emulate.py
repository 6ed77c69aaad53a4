"""Boot an image file under QEMU the way a card boots: U-Boot -> the image's own boot.scr -> Xen -> dom0 -> guest.

The image is never written (QEMU keeps the board's writes in a throw-away overlay). dom0's SSH is forwarded
to a free host port, the guest's HTTP to another (through that SSH, as the guest sits on dom0's bridge), and
the serial console goes to the terminal or to a log whose boot milestones are timed from power-on.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import select
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import paramiko

from . import ROOT, log
from .config import Board as BoardSpec
from .config import Config, load, load_board
from .errors import EmulateError

DEFAULT_BOARD = "qemu-virt"
T = TypeVar("T")

# The launcher's own health check, an HTTP GET to the guest across the bridge, answered 200.
GUEST_SERVED = "guest HTTP 200 on the bridge"
# The first console line matching each pattern marks a milestone (seconds from power-on).
MILESTONES: tuple[tuple[str, re.Pattern[bytes]], ...] = (
    ("spl", re.compile(rb"^U-Boot SPL \d{4}\.")),          # boards that boot U-Boot from the card
    ("u-boot", re.compile(rb"^U-Boot \d{4}\.")),
    ("boot.scr", re.compile(rb"appliance: booting Xen on")),
    ("xen", re.compile(rb"\(XEN\) ")),
    ("dom0 kernel", re.compile(rb"Booting Linux on physical CPU|Linux version \d")),
    ("dom0 initramfs", re.compile(rb"Run /init as init process|Loading, please wait")),
    ("dom0 systemd", re.compile(rb"systemd\[1\]: |Welcome to ")),
    ("guest started", re.compile(rb"appliance-guest: starting ")),
    (GUEST_SERVED, re.compile(rb"appliance-guest: .* answers at http")),
    ("login prompt", re.compile(rb" login: ")),
)
# Console lines after which waiting longer cannot help; the error quotes the console's tail.
FATAL: tuple[tuple[re.Pattern[bytes], str], ...] = (
    (re.compile(rb"BOOTP broadcast|Retrieving file: pxelinux"),
     "U-Boot found no boot.scr it could run on the disk and fell back to network boot"),
    (re.compile(rb"Wrong image format for .source. command|SCRIPT FAILED"), "U-Boot could not run boot.scr"),
    (re.compile(rb"Bad Linux ARM zImage magic"), "U-Boot did not find a zImage where boot.scr loaded Xen"),
    (re.compile(rb"\(XEN\) (Panic on CPU|\*+ PANIC)"), "Xen panicked"),
    (re.compile(rb"Kernel panic - not syncing"), "the dom0 kernel panicked"),
    (re.compile(rb"Dropping to a shell|Gave up waiting for root|appliance-initramfs: root=.* not found"),
     "dom0's initramfs did not find the root filesystem"),
    (re.compile(rb"appliance-initramfs: cannot mount"), "dom0's initramfs could not mount the root filesystem"),
    (re.compile(rb"Press any key to proceed"), "the boot waits for a key on the console (systemd-firstboot prompts)"),
)

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


@dataclass(frozen=True)
class Result:
    """One command's outcome on the board."""

    rc: int
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


class Console:
    """Reads QEMU's serial output into the log file, noting when each milestone first appears."""

    def __init__(self, stream: IO[bytes], log_path: Path, start: float) -> None:
        self.log_path, self.start = log_path, start
        self.milestones: dict[str, float] = {}
        self.fatal: tuple[str, bytes] | None = None
        self._stream = stream
        self._partial = b""
        self._thread = threading.Thread(target=self._pump, name="qemu-console", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        fd = self._stream.fileno()
        with open(self.log_path, "ab", buffering=0) as out:
            while chunk := os.read(fd, 65536):
                now = time.monotonic() - self.start
                out.write(chunk)
                *lines, self._partial = (self._partial + chunk).split(b"\n")
                # A prompt has no newline yet, so the unfinished line is looked at too.
                for line in [*lines, self._partial]:
                    self._note(line.rstrip(b"\r"), now)
                self._partial = self._partial[-4096:]

    def _note(self, line: bytes, now: float) -> None:
        for name, pattern in MILESTONES:
            if name not in self.milestones and pattern.search(line):
                self.milestones[name] = round(now, 2)
        if self.fatal is None:
            for pattern, why in FATAL:
                if pattern.search(line):
                    self.fatal = (why, line)

    def join(self, timeout: float = 5) -> None:
        self._thread.join(timeout)

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_bytes()[-16384:].decode(errors="replace")
        except OSError:
            return "(no console log)"
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).replace("\r\n", "\n")  # systemd's colours, CRLF
        return "\n".join(line.rstrip() for line in text.split("\n")[-lines:])


class Tunnel:
    """A host port whose connections are carried over dom0's SSH to an address on the board's bridge.

    The port is bound before QEMU starts, so it cannot be taken meanwhile; connections made before SSH is
    up are closed at once, as a board that is not serving yet would.
    """

    def __init__(self, target: tuple[str, int], transport: Callable[[], paramiko.Transport]) -> None:
        self.target, self._transport = target, transport
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="guest-tunnel", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._carry, args=(conn, peer), daemon=True).start()

    def _carry(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        with conn:
            try:
                chan = self._transport().open_channel("direct-tcpip", self.target, peer, timeout=30)
            except (paramiko.SSHException, OSError, EOFError, EmulateError):
                return
            with chan:
                sources: list[socket.socket | paramiko.Channel] = [conn, chan]
                while not self._stop.is_set():
                    ready, _, _ = select.select(sources, [], [], 1.0)
                    if conn in ready:
                        data = conn.recv(65536)
                        if data:
                            chan.sendall(data)
                        else:  # the client has sent its request; the answer may still come
                            chan.shutdown_write()
                            sources.remove(conn)
                    if chan in ready:
                        data = chan.recv(65536)
                        if not data:
                            return
                        conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


@dataclass
class Board:
    """The emulated board, as tests and tasks see it: forwarded ports, the key, the console and a shell."""

    proc: subprocess.Popen[bytes]
    spec: BoardSpec
    image: Path
    ssh_port: int
    key: Path
    console: Path
    started: float
    ssh_config: Path
    guest: tuple[str, int]                 # the served guest's address and port on dom0's bridge
    _console: Console = field(repr=False)
    _client: paramiko.SSHClient | None = field(default=None, repr=False)
    _tunnel_client: paramiko.SSHClient | None = field(default=None, repr=False)
    _tunnel: Tunnel | None = field(default=None, repr=False)
    scratch: Path | None = None            # a card copy QEMU writes to (SD boards), removed at power-off
    host_key: str | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._tunnel = Tunnel(self.guest, self._tunnel_transport)

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
        return shlex.join(["ssh", "-i", str(self.key), "-p", str(self.ssh_port), "-o", "StrictHostKeyChecking=no",
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

    def _connect(self, timeout: float) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        try:
            client.connect("127.0.0.1", port=self.ssh_port, username="root", key_filename=str(self.key),
                           look_for_keys=False, allow_agent=False, timeout=timeout, banner_timeout=timeout,
                           auth_timeout=timeout)
        except BaseException:
            client.close()
            raise
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(15)
        self.host_key = transport.get_remote_server_key().get_base64()
        return client

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
            t = self._tunnel_client.get_transport() if self._tunnel_client else None
            if t is None or not t.is_active():
                if self._tunnel_client:
                    self._tunnel_client.close()
                self._tunnel_client = self._connect(timeout=30)
                t = self._tunnel_client.get_transport()
            assert t is not None
            return t

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
                except (paramiko.SSHException, OSError, EOFError, EmulateError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() >= deadline:
                    raise self.fail(f"dom0 did not accept an SSH login on port {self.ssh_port} within "
                                    f"{timeout:.0f} s (last: {last})")
                time.sleep(1)
        finally:
            quiet.setLevel(level)

    def run(self, cmd: str, *, check: bool = True, timeout: float = 120) -> Result:
        """Run a shell command in dom0 as root; with check, a non-zero exit raises EmulateError."""
        if self._client is None or not (t := self._client.get_transport()) or not t.is_active():
            self.check_alive(f"while running {cmd!r}")
            try:
                self._client = self._connect(timeout=30)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise EmulateError(f"{cmd!r}: cannot log in to the emulated board ({exc})") from None
        try:
            _, stdout, stderr = self._client.exec_command(cmd, timeout=timeout)
            out = stdout.read().decode(errors="replace")
            err = stderr.read().decode(errors="replace")
            rc = stdout.channel.recv_exit_status()
        except TimeoutError:
            raise EmulateError(f"{cmd!r} on the emulated board did not finish within {timeout:.0f} s") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise EmulateError(f"{cmd!r} on the emulated board: the SSH connection failed ({exc})") from None
        if check and rc != 0:
            detail = " / ".join((err or out).strip().splitlines()[-3:]) or "no output"
            raise EmulateError(f"{cmd!r} on the emulated board exited with {rc}: {detail}")
        return Result(rc, out, err)

    def put(self, local: Path, remote: str) -> None:
        """Copy a directory's files to a new directory in dom0 over SFTP (a .tmp beside it, then one rename)."""
        self.run(f"rm -rf {shlex.quote(remote)}.tmp && mkdir -p {shlex.quote(remote)}.tmp")
        assert self._client is not None
        with self._client.open_sftp() as sftp:
            for p in sorted(local.iterdir()):
                sftp.put(str(p), f"{remote}.tmp/{p.name}")
        self.run(f"mv {shlex.quote(remote)}.tmp {shlex.quote(remote)}")

    def boot_id(self) -> str:
        return self.run("cat /proc/sys/kernel/random/boot_id", timeout=30).out.strip()

    def reboot(self, timeout: float) -> float:
        """Reboot dom0 (and so the machine: Xen resets it) and wait for SSH on the new boot; seconds taken."""
        old = self.boot_id()
        with contextlib.suppress(EmulateError):
            # The connection may die before the command returns; that is the reboot starting.
            self.run("systemctl reboot", check=False, timeout=30)
        self.close()
        return self.wait_ssh(timeout, unless_boot_id=old)

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bios(spec: BoardSpec) -> Path | None:
    """The U-Boot QEMU starts as firmware; None when the board boots U-Boot from the card itself."""
    if spec.uboot.offset is not None:
        return None
    path = Path("/") / spec.uboot.file
    if not path.exists():
        raise EmulateError(f"board/{spec.name}.yaml: uboot.file: {path} is not on this machine",
                           hint=f"apt-get install {spec.uboot.package}")
    return path


def _escape(value: Path | str) -> str:
    return str(value).replace(",", ",,")  # QEMU's option syntax doubles a literal comma


def qemu_argv(spec: BoardSpec, img: Path, ssh_port: int, serial: str) -> list[str]:
    """The QEMU command line that boots img on the board, disk read-only underneath a throw-away overlay."""
    q = spec.qemu
    if q is None:
        raise EmulateError(f"board/{spec.name}.yaml has no qemu: section, so QEMU cannot boot it")
    # The counter must tick at the rate the firmware writes to CNTFRQ (what Xen and Linux go by), or time runs
    # fast or slow on the board; QEMU ticks at its cntfrq property, whatever CNTFRQ says.
    cpu = q.cpu if q.cntfrq is None else f"{q.cpu},cntfrq={q.cntfrq}"
    argv = [q.binary, "-M", q.machine, "-cpu", cpu, "-smp", str(q.smp), "-m", str(q.memory_mib),
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", serial]
    fw = bios(spec)
    if fw is not None:
        argv += ["-bios", str(fw)]
    if q.disk == "virtio":
        argv += ["-drive", f"if=none,file={_escape(img)},format=raw,id=hd0,snapshot=on",
                 "-device", "virtio-blk-device,drive=hd0"]
    elif q.disk == "sd":
        # img is already the card-sized scratch copy (see sd_card); the boot ROM model reads the SPL from it.
        argv += ["-drive", f"if=sd,file={_escape(img)},format=raw"]
    else:
        raise EmulateError(f"board/{spec.name}.yaml: qemu.disk: '{q.disk}' must be virtio or sd")
    fwd = f"user,hostfwd=tcp:127.0.0.1:{ssh_port}-:22"
    if q.nic == "builtin":
        argv += ["-nic", fwd]  # the SoC's own Ethernet
    else:
        argv += ["-netdev", f"{fwd},id=net0", "-device", f"{q.nic},netdev=net0"]
    return argv


def sd_card(img: Path, work: Path) -> Path:
    """A scratch copy of img the size of a real card (QEMU's SD model takes only powers of two), for QEMU to
    write to; the image itself stays untouched. The copy is sparse, so only the image's data is copied."""
    size = img.stat().st_size
    card = work / f"{img.stem}.sd-card.img"
    card.unlink(missing_ok=True)
    log.run(["cp", "--sparse=always", "--reflink=auto", img, card], what=f"copying {img.name} to a scratch card")
    os.truncate(card, 1 << (size - 1).bit_length())
    return card


def _check_image(img: Path) -> Path:
    img = Path(img).resolve()  # build/latest is a symlink to the .img
    if not img.is_file():
        raise EmulateError(f"{img}: no such image file", hint="run invoke build")
    if img.suffix != ".img":
        raise EmulateError(f"{img}: QEMU boots a raw .img; decompress {img.name} first")
    return img


def _manifest(img: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(img.with_suffix(".manifest.json").read_text())
        if isinstance(data, dict):
            return data
    return {}


def recipe_of(img: Path) -> Config:
    """The recipe the image's manifest names (default: booth)."""
    name = str(_manifest(img).get("recipe_file", "booth"))
    return load(name if Path(name).is_absolute() or "/" not in name else str(ROOT / name))


def guest_of(img: Path) -> tuple[str, int]:
    """The default site's service address and port: dom0 owns the address and passes its connections on to
    the site's active guest."""
    site = recipe_of(img).recipe.sites[0]
    return site.address, site.port


def board_for(img: Path) -> str:
    """The board to emulate for img: its own if QEMU can boot that, else one the card also boots."""
    m = _manifest(img)
    for name in (m.get("board"), *m.get("also_boots", [])):
        if isinstance(name, str) and load_board(name).qemu is not None:
            return name
    return DEFAULT_BOARD


def _ssh_config(log_path: Path) -> Path:
    path = log_path.with_name(log_path.name + ".ssh_config")
    path.write_text("Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n")
    return path


@contextlib.contextmanager
def boot(img: Path, *, log_path: Path, key: Path, board: str | None = None, timeout: float = 600,
         extra_args: Sequence[str] = ()) -> Iterator[Board]:
    """Boot img under QEMU, wait until root can log in over SSH, yield the Board; power off on exit.

    board: which emulated board (default: the image's own if QEMU has it, else one its card also boots).
    """
    img = _check_image(img)
    spec = load_board(board or board_for(img))
    key = Path(key)
    if not key.is_file():
        raise EmulateError(f"{key}: no such SSH private key")
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    b = start(spec, img, log_path, key, extra_args)
    try:
        b.wait_ssh(timeout)
        b.mark("ssh")
        assert b._tunnel is not None
        b._tunnel.start()
        log.info(f"{spec.name}: dom0 answers SSH on 127.0.0.1:{b.ssh_port} after {b.milestones['ssh']:.1f} s; "
                 f"the guest's HTTP is on 127.0.0.1:{b.http_port}; console in {log_path}")
        yield b
    finally:
        b.stop()


def start(spec: BoardSpec, img: Path, log_path: Path, key: Path, extra_args: Sequence[str] = ()) -> Board:
    """Start QEMU (not waiting for anything); if the SSH port was taken meanwhile, try again with another."""
    guest = guest_of(img)
    disk = sd_card(img, log_path.parent) if spec.qemu and spec.qemu.disk == "sd" else img
    for attempt in range(3):
        ssh_port = free_port()
        argv = [*qemu_argv(spec, disk, ssh_port, serial="stdio"), "-monitor", "none", *extra_args]
        log_path.write_bytes(b"")
        log.debug(f"+ {shlex.join(argv)}")
        t0 = time.monotonic()
        try:
            # stdin is a pipe so that type_keys() can reach the console; QEMU is its own process group.
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=log.clean_env(), start_new_session=True)
        except FileNotFoundError:
            raise EmulateError(f"{argv[0]} is not installed on this machine", hint="apt-get install qemu-system-arm") \
                from None
        assert proc.stdout is not None
        console = Console(proc.stdout, log_path, t0)
        b = Board(proc, spec, img, ssh_port, key, log_path, t0, _ssh_config(log_path), guest, console,
                  scratch=disk if disk != img else None)
        # QEMU refuses a taken port at once; past a second it is booting.
        try:
            proc.wait(timeout=1.5)
        except subprocess.TimeoutExpired:
            return b
        b.stop()
        if b"host forwarding rule" in log_path.read_bytes() and attempt < 2:
            continue
        raise b.fail(f"QEMU exited with status {proc.returncode} at start")
    raise AssertionError("unreachable")


def interactive(img: Path, *, board: str | None = None, timeout: float | None = None) -> int:
    """Boot img with the serial console on this terminal (Ctrl-A X quits); QEMU's exit status."""
    img = _check_image(img)
    spec = load_board(board or board_for(img))
    ssh_port = free_port()
    address, port = guest_of(img)
    disk = sd_card(img, ROOT / "build") if spec.qemu and spec.qemu.disk == "sd" else img
    argv = qemu_argv(spec, disk, ssh_port, serial="mon:stdio")
    ssh = f"ssh -p {ssh_port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
    log.info(f"{img.name} on {spec.name}; the image file is not modified")
    log.info(f"  dom0:  {ssh} root@127.0.0.1")
    log.info(f"  guest: {ssh} -N -L 8080:{address}:{port} root@127.0.0.1, then http://127.0.0.1:8080/")
    log.info("  console: Ctrl-A X quits QEMU, Ctrl-A C its monitor; Ctrl-A three times switches Xen/dom0")
    log.debug(f"+ {shlex.join(argv)}")
    try:
        proc = subprocess.Popen(argv, env=log.clean_env())
    except FileNotFoundError:
        raise EmulateError(f"{argv[0]} is not installed on this machine", hint="apt-get install qemu-system-arm") \
            from None
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.info(f"--timeout {timeout:.0f} s reached: powering off")
        proc.terminate()
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if disk != img:
            disk.unlink(missing_ok=True)


def headless(img: Path, *, key: Path, log_path: Path, board: str | None = None, timeout: float = 600,
             stay: float | None = None) -> dict[str, float]:
    """Boot img with the console to a log, print how to reach it, and keep it running for `stay` seconds
    (None: until interrupted; 0: power off once SSH answers). Returns the milestones."""
    with boot(img, log_path=log_path, key=key, board=board, timeout=timeout) as b:
        print(f"dom0:    {b.ssh_command()}\nguest:   http://127.0.0.1:{b.http_port}/\nconsole: {b.console}",
              flush=True)
        end = None if stay is None else time.monotonic() + stay
        while end is None or time.monotonic() < end:
            if not b.alive():
                raise b.fail(f"QEMU exited with status {b.proc.returncode}")
            time.sleep(1.0 if end is None else min(1.0, max(0.0, end - time.monotonic())))
        return b.milestones


def default_key() -> Path | None:
    """The test suite's key if it exists: the image `invoke test` built trusts it."""
    key = ROOT / "build" / "test" / "id_ed25519"
    return key if key.exists() else None
