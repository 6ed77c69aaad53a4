"""The one SSH layer for deploy, emulate and the tests: Fabric's Connection, configured as OpenSSH resolves the
host (`ssh -G`: Include, Match, User, IdentityFile in order, missing ones skipped, ProxyJump hops each resolved),
with OpenSSH's host-key policy on top, which Fabric leaves out (it trusts every key): an unknown key is refused
unless accept-new, a changed one always is, naming the hop and its own known_hosts line; failures in plain words. Commands give a Result; `Process` is a command to talk to line by line, and
`Tunnel` a local port carried to an address behind the host.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from base64 import b64encode
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import fabric
import invoke
import paramiko
from paramiko.hostkeys import HostKeyEntry, HostKeys

from .errors import HostKeyError, SshError

Policy = Literal["yes", "accept-new", "no"]      # OpenSSH's StrictHostKeyChecking values
FAILURES = (paramiko.SSHException, OSError, EOFError, invoke.exceptions.ThreadException)
ALIVE_S = 5.0       # seconds between the keepalives a wait for an answer sends (OpenSSH's ServerAliveInterval)


@dataclass(frozen=True)
class Result:
    """One command's outcome on the remote host."""

    rc: int
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


def fingerprint(key: paramiko.PKey) -> str:
    return "SHA256:" + b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def key_name(host: str, port: int) -> str:
    """The name a host's key is filed under in known_hosts."""
    return host if port == 22 else f"[{host}]:{port}"


def find_line(files: list[Path], name: str, keytype: str | None = None) -> tuple[Path, int] | None:
    """The known_hosts file and line (from 1) that hold name's key of keytype (any type if none matches)."""
    found: tuple[Path, int] | None = None
    for path in files:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for n, line in enumerate(lines, 1):
            try:
                entry = HostKeyEntry.from_line(line, n)
            except Exception:   # noqa: BLE001 - paramiko raises several kinds on a line it cannot read
                continue
            if entry is None or not any(h == name or (h.startswith("|1|") and HostKeys.hash_host(name, h) == h)
                                        for h in entry.hostnames):
                continue
            if keytype is None or entry.key.get_name() == keytype:
                return path, n
            found = found or (path, n)
    return found


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    def __init__(self, policy: Policy, files: list[Path]) -> None:
        self.policy, self.files = policy, files

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        where = " or ".join(str(f) for f in self.files) or "no known_hosts file"
        if self.policy == "no":
            return
        if self.policy == "accept-new" and self.files:
            path = self.files[0]
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                with open(path, "a") as f:
                    f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            except OSError as exc:
                raise HostKeyError(f"{hostname}: cannot add its host key to {path}: {exc.strerror}") from None
            client.get_host_keys().add(hostname, key.get_name(), key)
            return
        raise HostKeyError(f"{hostname}: unknown host key ({key.get_name()} {fingerprint(key)}), not in {where}; "
                           f"refused", hint="check the fingerprint with invoke boards or on the board's console, "
                                            "then use --accept-new")


KEYS = ("hostname", "port", "user", "identityfile", "identitiesonly", "proxyjump", "proxycommand",
        "userknownhostsfile", "stricthostkeychecking", "hostkeyalias")   # what we take from `ssh -G`


def openssh_config(host: str, ssh_config: Path | None) -> paramiko.SSHConfig | None:
    """OpenSSH's own resolution of host (`ssh -G`: Include, Match, its defaults), and of each ProxyJump hop, as a
    paramiko config with one block a host; None where no ssh client is installed (paramiko reads the files)."""
    exe = shutil.which("ssh")
    if exe is None:
        return None
    blocks: list[str] = []
    todo, seen = [host], set[str]()
    while todo and len(seen) < 8:                     # a jump's own ProxyJump, at most a few hops
        spec = todo.pop(0)
        if spec in seen:
            continue
        seen.add(spec)
        dest, port = spec, None
        if spec.count(":") == 1 and spec.rsplit(":", 1)[1].isdigit():   # fabric's host:port, which ssh lacks
            dest, port = spec.rsplit(":", 1)
        cmd = [exe, "-G", *(["-F", str(ssh_config)] if ssh_config else []), *(["-p", port] if port else []),
               "--", dest]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL,
                               env={**os.environ, "LC_ALL": "C"}, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if p.returncode != 0:
            err = " / ".join(p.stderr.strip().splitlines()[-2:])
            raise SshError(f"{spec}: ssh -G cannot read the SSH settings for it: {err or 'exit ' + str(p.returncode)}")
        lines = [line.split(" ", 1) for line in p.stdout.splitlines() if " " in line]
        kept = [(k.lower(), v) for k, v in lines if k.lower() in KEYS]
        name = dest.rsplit("@", 1)[-1]
        blocks.append(f"Host {name}\n" + "".join(f"  {k} {v}\n" for k, v in kept if k != "proxyjump"
                                                 or v.lower() != "none"))
        for k, v in kept:
            if k == "proxyjump" and v.lower() != "none":
                todo += v.split(",")
    return paramiko.SSHConfig.from_text("".join(blocks))


def _existing_keys(c: fabric.Connection) -> None:
    """Identity files that do not exist are skipped, as OpenSSH skips them (paramiko would stop at the first)."""
    keys = c.connect_kwargs.get("key_filename")
    if isinstance(keys, (list, str)):
        files = [keys] if isinstance(keys, str) else keys
        c.connect_kwargs["key_filename"] = [k for k in files if Path(k).expanduser().is_file()]


def plain(exc: BaseException, spec: str, name: str, user: str, timeout: float, *, greeted: bool = True,
          waited: float = 0.0) -> SshError:
    """A connection failure in plain words with a hint, instead of the Python exception's name. greeted: the
    server sent an SSH version line; waited: seconds the attempt took."""
    text = str(exc)
    errors = [exc, exc.__context__, *getattr(exc, "errors", {}).values()]
    if not greeted and not any(isinstance(e, (OSError, socket.gaierror)) for e in errors if e is not None):
        if waited >= timeout * 0.9 or any(isinstance(e, TimeoutError) for e in errors):
            return SshError(f"{spec}: {name} did not answer within {timeout:g} s (no SSH greeting)",
                            hint="is the board up, and is this its SSH port?")
        return SshError(f"{spec}: {name} does not speak SSH (no SSH greeting from it)",
                        hint="is this the board's SSH port?")
    if any(isinstance(e, socket.gaierror) for e in errors):
        return SshError(f"{spec}: no such host: {name} does not resolve",
                        hint="check the name, or the HostName in your ssh_config")
    if any(isinstance(e, ConnectionRefusedError) for e in errors) or "Unable to connect" in text:
        return SshError(f"{spec}: {name} refused the connection (nothing listens for SSH there)",
                        hint="is the board up, and is this its address and port?")
    if any(isinstance(e, (TimeoutError, socket.timeout)) for e in errors) or "timed out" in text.lower():
        return SshError(f"{spec}: {name} did not answer within {timeout:g} s",
                        hint="is the board on this network?")
    if "protocol banner" in text or "Incompatible ssh" in text:
        return SshError(f"{spec}: {name} does not speak SSH (no SSH greeting from it)",
                        hint="is this the board's SSH port?")
    if isinstance(exc, paramiko.AuthenticationException) or "No existing session" in text or \
            "No authentication methods" in text:
        return SshError(f"{spec}: SSH login as {user} refused: no key it accepts",
                        hint="is your key in ssh-agent or an IdentityFile, and in the board's authorized_keys? "
                             "The board has only root: root@HOST or User root")
    return SshError(f"{spec}: cannot connect over SSH to {name}: {text.splitlines()[0] if text else 'failed'}")


class Connection:
    """One SSH connection, opened on first use: host is whatever OpenSSH accepts (user@name, an ssh_config alias).

    ssh_config: the one config file to read (default: ~/.ssh/config and /etc/ssh/ssh_config, as ssh does);
    key: use only this private key (no agent, no other key files); host_keys: None follows the config's
    StrictHostKeyChecking (default "yes"); known_hosts: default the config's UserKnownHostsFile, else
    ~/.ssh/known_hosts.
    """

    def __init__(self, host: str, *, user: str | None = None, port: int | None = None, key: Path | None = None,
                 ssh_config: Path | None = None, host_keys: Policy | None = None,
                 known_hosts: Path | None = None, timeout: float = 30) -> None:
        self.spec, self.timeout = host, timeout
        if ssh_config and not Path(ssh_config).is_file():
            raise SshError(f"{ssh_config}: no such ssh_config file")
        resolved = openssh_config(host, ssh_config)
        config = (fabric.Config(ssh_config=resolved) if resolved is not None else
                  fabric.Config(runtime_ssh_path=str(ssh_config)) if ssh_config else fabric.Config())
        kwargs: dict[str, object] = {"banner_timeout": timeout, "auth_timeout": timeout}
        if key is not None:
            kwargs.update(key_filename=[str(key)], look_for_keys=False, allow_agent=False)
        try:
            self.fabric = fabric.Connection(host, user=user, port=port, config=config,
                                            connect_timeout=max(1, round(timeout)), connect_kwargs=kwargs)
        except (ValueError, paramiko.SSHException) as exc:
            raise SshError(f"{host}: cannot read the SSH settings for it: {exc}") from None
        self.name = key_name(self.fabric.host, int(self.fabric.port))
        self.known_hosts: list[Path] = []
        self.hops: dict[str, list[Path]] = {}         # each hop's key name: its known_hosts files
        hop: object = self.fabric
        while isinstance(hop, fabric.Connection):    # ProxyJump hops are checked the same way
            files = self._arm(hop, host_keys, known_hosts)
            _existing_keys(hop)
            if key is not None and hop is self.fabric:
                hop.connect_kwargs["key_filename"] = [str(key)]     # only this key, whatever the config lists
            if hop is self.fabric:
                self.known_hosts = files
            self.hops.setdefault(key_name(hop.host, int(hop.port)), files)
            hop = hop.gateway
        self._lock = threading.Lock()

    @staticmethod
    def _arm(c: fabric.Connection, policy: Policy | None, known: Path | None) -> list[Path]:
        cfg = c.ssh_config
        if known is not None:
            files = [Path(known)]
        elif "userknownhostsfile" in cfg:
            files = [Path(p).expanduser() for p in str(cfg["userknownhostsfile"]).split()]
        else:
            files = [Path("~/.ssh/known_hosts").expanduser()]
        files = [f for f in files if str(f) != "/dev/null"]
        for f in files:
            if f.is_file():
                try:
                    c.client.load_system_host_keys(str(f))
                except (OSError, paramiko.SSHException) as exc:
                    raise HostKeyError(f"{f}: cannot read the known hosts: {exc}") from None
        chosen = policy or str(cfg.get("stricthostkeychecking", "yes")).lower()
        c.client.set_missing_host_key_policy(_HostKeyPolicy("no" if chosen in ("no", "off", "false") else
                                                            "accept-new" if chosen == "accept-new" else "yes",
                                                            files))
        return files

    def open(self) -> Connection:
        if self.fabric.is_connected:
            return self
        t0 = time.monotonic()
        try:
            self.fabric.open()
        except paramiko.BadHostKeyException as exc:
            name = self._hop_of(exc)                 # the hop that failed, with its own known_hosts files
            files = self.hops.get(name, self.known_hosts)
            at = find_line(files, name, exc.key.get_name())
            line = f"{at[0]}:{at[1]}" if at else " or ".join(map(str, files))
            what = "the board" if name == self.name else f"the ProxyJump host on the way to {self.spec}"
            self.close()
            raise HostKeyError(f"{name}: the host key of {what} has CHANGED ({exc.key.get_name()} "
                               f"{fingerprint(exc.key)}, {line} has {fingerprint(exc.expected_key)}); refused, as it "
                               f"could be another machine", hint=f"if {name} was re-installed, delete line "
                               f"{at[1] if at else '?'} of {at[0] if at else 'known_hosts'}") from None
        except HostKeyError:
            self.close()
            raise
        except (*FAILURES, ValueError) as exc:
            t = self.fabric.client.get_transport()
            greeted = bool(t is not None and t.remote_version) or isinstance(exc, paramiko.AuthenticationException)
            self.close()
            raise plain(exc, self.spec, self.name, self.fabric.user, self.timeout, greeted=greeted,
                        waited=time.monotonic() - t0) from None
        self.transport.set_keepalive(15)
        return self

    def _hop_of(self, exc: paramiko.BadHostKeyException) -> str:
        """Which hop's key changed: the one whose known_hosts hold the key that was expected (paramiko's name for
        a hop reached through a jump is not always the hop's own)."""
        for name, files in self.hops.items():
            at = find_line(files, name, exc.expected_key.get_name())
            if at is None:
                continue
            entry = HostKeyEntry.from_line(at[0].read_text(errors="replace").splitlines()[at[1] - 1])
            if entry is not None and entry.key == exc.expected_key:
                return name
        return self.name

    @property
    def transport(self) -> paramiko.Transport:
        t = self.fabric.client.get_transport()
        if t is None or not t.is_active():
            raise SshError(f"{self.spec}: the SSH connection is closed")
        return t

    @property
    def active(self) -> bool:
        t = self.fabric.client.get_transport()
        return bool(t and t.is_active())

    @property
    def host_key(self) -> str:
        return self.open().transport.get_remote_server_key().get_base64()

    def run(self, cmd: str, *, timeout: float | None = None) -> Result:
        """Run a shell command; its exit status, stdout and stderr (a failed connection raises SshError)."""
        self.open()
        try:
            r = self.fabric.run(cmd, hide=True, warn=True, in_stream=False, timeout=timeout)
        except invoke.exceptions.CommandTimedOut:
            raise SshError(f"{self.spec}: {cmd!r} did not finish within {timeout:g} s") from None
        except FAILURES as exc:
            self.close()
            raise SshError(f"{self.spec}: {cmd!r}: the SSH connection failed ({type(exc).__name__}: {exc})") \
                from None
        return Result(r.exited if r.exited is not None else -1, r.stdout, r.stderr)

    def sftp(self) -> paramiko.SFTPClient:
        try:
            return self.open().fabric.client.open_sftp()
        except FAILURES as exc:
            raise SshError(f"{self.spec}: cannot open SFTP ({type(exc).__name__}: {exc})") from None

    def process(self, cmd: str) -> Process:
        return Process(self, cmd)

    def close(self) -> None:
        with contextlib.suppress(*FAILURES):
            self.fabric.close()


class Process:
    """A remote command to exchange lines with (its stdin and stdout); its stderr is kept for errors."""

    def __init__(self, conn: Connection, cmd: str) -> None:
        self.conn, self.cmd = conn, cmd
        try:
            self.chan = conn.open().transport.open_session(timeout=conn.timeout)
            self.chan.exec_command(cmd)
        except FAILURES as exc:
            raise SshError(f"{conn.spec}: cannot start {cmd!r} ({type(exc).__name__}: {exc})") from None
        self._out = self.chan.makefile("rb")
        self._in = self.chan.makefile_stdin("wb")

    def send(self, line: str) -> None:
        try:
            self._in.write(line.encode() + b"\n")
            self._in.flush()
        except FAILURES as exc:
            raise SshError(f"{self.conn.spec}: {self.cmd!r}: the connection dropped ({exc})") from None

    def receive(self, timeout: float) -> str:
        """The next line; SshError when the command ended or dropped first, with its stderr's tail, or when the
        link died: the server must answer a keepalive every ALIVE_S s, and one unanswered for the connection's
        timeout ends the wait then (a board's long step, as a switch, goes on there without us)."""
        self.chan.settimeout(timeout)
        try:
            with _Alive(self.conn) as alive:
                raw = self._out.readline()
        except TimeoutError:
            raise SshError(f"{self.conn.spec}: {self.cmd!r} gave no answer within {timeout:g} s") from None
        except FAILURES as exc:
            if alive.dead:
                raise SshError(alive.dead) from None
            raise SshError(f"{self.conn.spec}: {self.cmd!r}: the connection dropped ({exc})") from None
        if alive.dead:
            raise SshError(alive.dead)
        if not raw:
            raise SshError(f"{self.conn.spec}: {self.cmd!r} ended without an answer: {self.stderr() or 'no output'}")
        return raw.decode(errors="replace")

    def stderr(self) -> str:
        data = b""
        with contextlib.suppress(*FAILURES):
            self.chan.settimeout(2)
            while self.chan.recv_stderr_ready() or not self.chan.exit_status_ready():
                chunk = self.chan.recv_stderr(65536)
                if not chunk:
                    break
                data += chunk
        return " / ".join(data.decode(errors="replace").strip().splitlines()[-3:])

    def close(self) -> None:
        with contextlib.suppress(*FAILURES):
            self.chan.shutdown_write()
            self.chan.close()


class _Alive:
    """While a command's answer is awaited: a keepalive with a reply (as OpenSSH's ServerAliveInterval) every
    ALIVE_S s; when one goes unanswered for the connection's timeout the link is dead: the connection is closed
    (the wait ends at once) and `dead` says so. TCP alone notices a silent link after about 15 minutes."""

    def __init__(self, conn: Connection) -> None:
        self.conn, self.dead = conn, ""
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def __enter__(self) -> _Alive:
        threading.Thread(target=self._watch, args=(self.conn.transport,), daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._stop.set()

    @staticmethod
    def _ask(t: paramiko.Transport, answered: threading.Event) -> None:
        with contextlib.suppress(*FAILURES):
            t.global_request("keepalive@openssh.com", wait=True)   # any reply, even a refusal, will do
        answered.set()

    def _watch(self, t: paramiko.Transport) -> None:
        while not self._stop.wait(ALIVE_S):
            answered = threading.Event()
            threading.Thread(target=self._ask, args=(t, answered), daemon=True).start()
            if answered.wait(self.conn.timeout):
                continue
            with self._lock:
                if not self._stop.is_set():
                    self.dead = (f"{self.conn.spec}: no answer to a keepalive for {self.conn.timeout:g} s: the link "
                                 f"is down")
                    self.conn.close()
            return


class Tunnel:
    """A local port whose connections are carried over SSH to target (an address the remote host reaches).

    Unlike Fabric's forward_local, the port is bound at once, before the connection exists (so it cannot be
    taken meanwhile: the emulated board's ports are chosen before QEMU starts), and each new connection asks
    `transport` for a live SSH transport, so the tunnel outlives a reboot of the remote host. Connections made
    while SSH is not up are closed at once, as a host that is not serving yet would.
    """

    def __init__(self, target: tuple[str, int], transport: Callable[[], paramiko.Transport]) -> None:
        self.target, self._transport = target, transport
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, name="ssh-tunnel", daemon=True)

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
        """One connection, a thread each way. The channel is never select()ed: its fileno() makes a pipe that
        the transport's thread writes to as data arrives, and closing the channel under that write raced it
        (EBADF in the transport's thread killed the whole SSH connection, and every tunnel with it)."""
        with conn:
            try:
                chan = self._transport().open_channel("direct-tcpip", self.target, peer, timeout=30)
            except (*FAILURES, SshError):
                return
            with self._lock:
                self._open.add(conn)
            up = threading.Thread(target=self._up, args=(conn, chan), name="ssh-tunnel-up", daemon=True)
            up.start()
            with chan, contextlib.suppress(*FAILURES):
                while data := chan.recv(65536):
                    conn.sendall(data)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)      # the client's side is over: so is the upstream thread's recv
            up.join()
            with self._lock:
                self._open.discard(conn)

    @staticmethod
    def _up(conn: socket.socket, chan: paramiko.Channel) -> None:
        """The client's bytes to the channel; its end of the request (or its reset) ends the channel's write."""
        with contextlib.suppress(*FAILURES):
            while data := conn.recv(65536):
                chan.sendall(data)
            chan.shutdown_write()                     # the client has sent its request; the answer may still come
            return
        with contextlib.suppress(*FAILURES):
            chan.close()                             # the client went away: nobody reads the answer

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        with self._lock:
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
