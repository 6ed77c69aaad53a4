"""Real OpenSSH servers on loopback for the ssh tier: each with a temporary host key, an authorized client key,
a random port and its own config (`sshd -D -e -f`, with extra lines a test adds), and a bin directory on its sessions' PATH where a test puts
its `appliance-guest`. A test can drop every connection (SIGKILL of the per-connection sshd processes), or
reach the server through a Link it cuts (silence, as a wifi drop).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance import ROOT

SSHD = "/usr/sbin/sshd"
ENTRY = ROOT / "overlays/booth/usr/local/sbin/appliance-guest"
needs_sshd = pytest.mark.skipif(os.geteuid() != 0 or not Path(SSHD).exists() or not shutil.which("ssh-keygen"),
                                reason="needs root and openssh-server (sshd logs in as root)")


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Sshd:
    dir: Path
    port: int
    proc: subprocess.Popen[bytes]
    client_key: Path
    bin: Path

    @property
    def host_key_line(self) -> str:
        kind, b64 = (self.dir / "host_key.pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {b64}\n"

    def known_hosts(self) -> Path:
        """A known_hosts file that trusts this server."""
        path = self.dir / "known_hosts"
        path.write_text(self.host_key_line)
        return path

    def ssh_config(self, alias: str, path: Path | None = None, **more: str) -> Path:
        """An ssh_config with `Host alias` for this server (appended to path if it exists)."""
        path = path or self.dir / "ssh_config"
        opts = {"HostName": "127.0.0.1", "Port": str(self.port), "User": "root",
                "IdentityFile": str(self.client_key), "UserKnownHostsFile": str(self.known_hosts()), **more}
        with open(path, "a") as f:
            f.write(f"Host {alias}\n" + "".join(f"  {k} {v}\n" for k, v in opts.items()))
        return path

    def manager(self, env: dict[str, str], netns: str | None = None) -> Path:
        """Put an appliance-guest on the sessions' PATH: the repository's guest manager with env, run by the
        host's python3 (standard library only, as on the board), inside netns if given."""
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
        run = f"ip netns exec {shlex.quote(netns)} " if netns else ""
        path = self.bin / "appliance-guest"
        path.write_text(f"#!/bin/sh\n{exports}export PYTHONPATH={shlex.quote(str(ROOT))}\n"
                        f"exec {run}/usr/bin/python3 {shlex.quote(str(ENTRY))} \"$@\"\n")
        path.chmod(0o755)
        return path

    def children(self) -> list[int]:
        """The per-connection sshd processes."""
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                out.append(int(stat.parent.name))
        return out

    def drop(self) -> int:
        """Cut every connection at once, as a network failure would; how many there were."""
        pids = self.children()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def log(self) -> str:
        return (self.dir / "sshd.log").read_text(errors="replace")

    def stop(self) -> None:
        self.drop()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Link:
    """A TCP path to a server through which a link can die: `cut()` stops carrying bytes either way but keeps
    both sockets open (a wifi drop: no FIN, no RST, the server sees only silence). Its server-side sockets come
    from `source`, so the server sees the client at another address than a direct connection's."""

    def __init__(self, port: int, source: str = "127.0.0.2") -> None:
        self.server, self.source = ("127.0.0.1", port), source
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self._cut = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            up = socket.create_connection(self.server, source_address=(self.source, 0))
            self._socks += [client, up]
            for a, b in ((client, up), (up, client)):
                threading.Thread(target=self._carry, args=(a, b), daemon=True).start()

    def _carry(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while (data := a.recv(65536)) and not self._cut.is_set():
                b.sendall(data)
        except OSError:
            return
        if not self._cut.is_set():
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        self._cut.set()

    def close(self) -> None:
        self._cut.set()
        self._sock.close()
        for s in self._socks:
            s.close()


def start(dir: Path, client_key: Path, log_level: str = "INFO", extra: str = "", netns: str | None = None,
          host_key: Path | None = None, port: int | None = None) -> Sshd:
    """An sshd on a random port of 127.0.0.1 (of the network namespace netns, if given); extra: more sshd_config
    lines; host_key: the key it presents (default: one made for it); port: this one (a server come back, say with
    another key) rather than a free one."""
    dir.mkdir(parents=True, exist_ok=True)
    if host_key is None:
        host_key = keygen(dir / "host_key")
    else:
        shutil.copyfile(host_key, dir / "host_key")
        shutil.copyfile(f"{host_key}.pub", dir / "host_key.pub")
        os.chmod(dir / "host_key", 0o600)
        host_key = dir / "host_key"
    bin_dir = dir / "bin"
    bin_dir.mkdir(exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)     # sshd's privilege separation directory
    for attempt in range(5):
        port = port or _port()
        (dir / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
AuthorizedKeysFile {client_key}.pub
PidFile none
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding yes
LogLevel {log_level}
SetEnv PATH={bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
Subsystem sftp internal-sftp
{extra}""")
        log = open(dir / "sshd.log", "wb")
        proc = subprocess.Popen([*(["ip", "netns", "exec", netns] if netns else []), SSHD, "-D", "-e", "-f",
                                 str(dir / "sshd_config")], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
        end = time.monotonic() + 10
        while time.monotonic() < end and proc.poll() is None:
            if f"listening on 127.0.0.1 port {port}" in (dir / "sshd.log").read_text(errors="replace"):
                return Sshd(dir, port, proc, client_key, bin_dir)
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if "Address already in use" not in (dir / "sshd.log").read_text(errors="replace") or attempt == 4:
            raise AssertionError(f"sshd did not start: {(dir / 'sshd.log').read_text()[-500:]}")
    raise AssertionError("unreachable")
