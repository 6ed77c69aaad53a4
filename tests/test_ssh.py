"""ssh tier: the one SSH layer (appliance.ssh) against a real OpenSSH server on loopback: commands and SFTP, the
host-key policy (unknown refused unless accept-new, a changed key refused naming its known_hosts line), an
ssh_config alias with HostName/Port/User/IdentityFile and ProxyJump, and the tunnel.
"""

from __future__ import annotations

import http.server
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from sshd_fixtures import Sshd, keygen, needs_sshd, start

from appliance import ssh
from appliance.errors import HostKeyError, SshError

pytestmark = [pytest.mark.ssh, needs_sshd]


@pytest.fixture
def client_key(tmp_path: Path) -> Path:
    return keygen(tmp_path / "id_ed25519")


@pytest.fixture
def sshd(tmp_path: Path, client_key: Path) -> Iterator[Sshd]:
    s = start(tmp_path / "sshd", client_key)
    yield s
    s.stop()


def conn(sshd: Sshd, **kw: object) -> ssh.Connection:
    return ssh.Connection("127.0.0.1", port=sshd.port, user="root", key=sshd.client_key, **kw)  # type: ignore[arg-type]


def test_run_gives_status_stdout_and_stderr(sshd: Sshd):
    c = conn(sshd, known_hosts=sshd.known_hosts())
    r = c.run("echo out; echo err >&2; exit 3")
    assert (r.rc, r.out, r.err, r.ok) == (3, "out\n", "err\n", False)
    assert c.run("id -un").out == "root\n"
    c.close()


def test_sftp_put(sshd: Sshd, tmp_path: Path):
    src = tmp_path / "blob"
    src.write_bytes(bytes(range(256)) * 1000)
    c = conn(sshd, known_hosts=sshd.known_hosts())
    with c.sftp() as sftp:
        sftp.put(str(src), str(tmp_path / "copy"))
    assert (tmp_path / "copy").read_bytes() == src.read_bytes()


def test_an_unknown_host_key_is_refused(sshd: Sshd, tmp_path: Path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyError, match=rf"^\[127\.0\.0\.1\]:{sshd.port}: unknown host key \(ssh-ed25519 "
                                           rf"SHA256:.*\), not in {empty}; refused"):
        conn(sshd, known_hosts=empty).open()
    assert empty.read_text() == ""


def test_accept_new_remembers_the_key_then_checks_it(sshd: Sshd, tmp_path: Path):
    known = tmp_path / "new" / "known_hosts"
    c = conn(sshd, known_hosts=known, host_keys="accept-new")
    assert c.run("true").ok
    c.close()
    assert known.read_text() == sshd.host_key_line
    again = conn(sshd, known_hosts=known)          # strict now: the remembered key lets it in
    assert again.run("true").ok
    again.close()


def test_a_changed_host_key_is_refused_naming_the_line(sshd: Sshd, tmp_path: Path):
    other = keygen(tmp_path / "other_host_key")
    kind, b64 = other.with_suffix(".pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"# boards\nbooth-1.local {kind} {b64}\n[127.0.0.1]:{sshd.port} {kind} {b64}\n")
    for policy in ("yes", "accept-new", "no"):     # whatever the policy for unknown keys
        with pytest.raises(HostKeyError, match=rf"the host key of the board has CHANGED .* {known}:3 has SHA256:"
                                               rf".*refused"):
            conn(sshd, known_hosts=known, host_keys=policy).open()
    assert known.read_text().count("\n") == 3, "a changed key is never written"


def test_an_ssh_config_alias(sshd: Sshd, tmp_path: Path):
    cfg = sshd.ssh_config("booth-test")
    c = ssh.Connection("booth-test", ssh_config=cfg)
    assert c.name == f"[127.0.0.1]:{sshd.port}"
    assert c.run("id -un; echo $SSH_CONNECTION").out.split()[0] == "root"
    c.close()
    with pytest.raises(SshError, match=r"^booth-other: no such host: booth-other does not resolve \(check the name"):
        ssh.Connection("booth-other", ssh_config=cfg, timeout=5).open()   # no such alias: a name that fails


def test_proxyjump_goes_through_the_jump_host(sshd: Sshd, tmp_path: Path, client_key: Path):
    jump = start(tmp_path / "jump", client_key, log_level="DEBUG1")   # it logs each direct-tcpip it carries
    try:
        cfg = jump.ssh_config("jump")
        sshd.ssh_config("booth-behind", cfg, ProxyJump="jump")
        c = ssh.Connection("booth-behind", ssh_config=cfg)
        assert c.run("echo behind").out == "behind\n"
        c.close()
        assert f"target 127.0.0.1 port {sshd.port}" in jump.log(), "the jump host carried the connection"
    finally:
        jump.stop()


def test_the_tunnel_carries_http(sshd: Sshd):
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"through the tunnel")

        def log_message(self, *a: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    c = conn(sshd, known_hosts=sshd.known_hosts()).open()
    t = ssh.Tunnel(("127.0.0.1", server.server_port), lambda: c.transport)
    t.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{t.port}/", timeout=10) as r:
            assert r.read() == b"through the tunnel"
    finally:
        t.close()
        server.shutdown()
        c.close()


def test_a_client_that_goes_away_mid_answer_ends_only_its_own_connection(sshd: Sshd):
    """A browser that closes its tab while the answer is on its way: the tunnel drops that connection quietly
    (it raised BrokenPipeError in its thread) and carries the next one."""
    body = b"x" * (8 << 20)

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:
                pass

        def log_message(self, *a: object) -> None:
            pass

    errors: list[BaseException | None] = []
    hook, threading.excepthook = threading.excepthook, lambda args: errors.append(args.exc_value)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    c = conn(sshd, known_hosts=sshd.known_hosts()).open()
    t = ssh.Tunnel(("127.0.0.1", server.server_port), lambda: c.transport)
    t.start()
    try:
        s = socket.create_connection(("127.0.0.1", t.port), timeout=10)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert s.recv(1024).startswith(b"HTTP/1.0 200")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()                                   # a reset, with megabytes of the answer still to come
        with urllib.request.urlopen(f"http://127.0.0.1:{t.port}/", timeout=30) as r:
            assert len(r.read()) == len(body)
        carriers = [th for th in threading.enumerate() if th.name.endswith("(_carry)") or th.name == "ssh-tunnel-up"]
        deadline = time.monotonic() + 30
        while any(th.is_alive() for th in carriers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(th.is_alive() for th in carriers), "the dropped connection's carrier never ended"
        assert errors == []
    finally:
        threading.excepthook = hook
        t.close()
        server.shutdown()
        c.close()


def test_a_changed_jump_host_key_is_the_jump_hosts_with_its_own_file_and_line(sshd: Sshd, tmp_path: Path,
                                                                             client_key: Path):
    jump = start(tmp_path / "jump", client_key)
    try:
        cfg = jump.ssh_config("jump")
        sshd.ssh_config("booth-behind", cfg, ProxyJump="jump")
        kind, b64 = keygen(tmp_path / "other").with_suffix(".pub").read_text().split()[:2]
        jump_known = jump.dir / "known_hosts"
        jump_known.write_text(f"# the jump host\n[127.0.0.1]:{jump.port} {kind} {b64}\n")
        board_known = sshd.dir / "known_hosts"
        before = board_known.read_text()
        with pytest.raises(HostKeyError) as err:
            ssh.Connection("booth-behind", ssh_config=cfg).open()
        assert str(err.value).startswith(f"[127.0.0.1]:{jump.port}: the host key of the ProxyJump host on the way "
                                         f"to booth-behind has CHANGED (")
        assert f"{jump_known}:2 has SHA256:" in str(err.value) and str(err.value).endswith(
            f"(if [127.0.0.1]:{jump.port} was re-installed, delete line 2 of {jump_known})")
        assert board_known.read_text() == before
    finally:
        jump.stop()


def test_ssh_config_include_and_a_missing_identity_file_as_openssh_reads_them(sshd: Sshd, tmp_path: Path):
    included = sshd.ssh_config("booth-inc", tmp_path / "included.conf")
    text = included.read_text().replace(f"  IdentityFile {sshd.client_key}\n",
                                        f"  IdentityFile {tmp_path}/no-such-key\n  IdentityFile {sshd.client_key}\n")
    included.write_text(text)
    cfg = tmp_path / "config"
    cfg.write_text(f"Include {included}\n")
    c = ssh.Connection("booth-inc", ssh_config=cfg)
    assert c.run("echo in").out == "in\n", "the alias from the Included file, the missing key skipped"
    c.close()
    g = ssh.openssh_config("booth-inc", cfg)
    assert g is not None and g.lookup("booth-inc")["identityfile"][:2] == [f"{tmp_path}/no-such-key",
                                                                        str(sshd.client_key)]


def _server(reply: bytes | None) -> tuple[socket.socket, threading.Thread]:
    """A loopback server that answers each connection with reply (None: says nothing, holds it open)."""
    srv = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            held.append(c)
            if reply is not None:
                c.sendall(reply)
                c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


def test_connection_errors_in_plain_words(sshd: Sshd, tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    web, _ = _server(b"HTTP/1.0 400 Bad Request\r\n\r\n" * 40)
    silent, _ = _server(None)
    stranger = keygen(tmp_path / "stranger")
    try:
        cases = [
            (dict(host="root@nosuch.invalid"), r"^root@nosuch\.invalid: no such host: nosuch\.invalid does not "
                                               r"resolve \(check the name"),
            (dict(host="root@127.0.0.1", port=closed), rf"127\.0\.0\.1\]:{closed} refused the connection \(nothing "
                                                       r"listens for SSH there\) \(is the board up"),
            (dict(host="root@127.0.0.1", port=web.getsockname()[1]), r"does not speak SSH \(no SSH greeting from it\)"),
            (dict(host="root@127.0.0.1", port=silent.getsockname()[1], timeout=2), r"did not answer within 2 s"),
            (dict(host="root@127.0.0.1", port=sshd.port, key=stranger, known_hosts=sshd.known_hosts()),
             r"SSH login as root refused: no key it accepts \(is your key in ssh-agent"),
        ]
        for kw, message in cases:
            with pytest.raises(SshError, match=message) as err:
                ssh.Connection(**kw).open()  # type: ignore[arg-type]
            assert "Error" not in str(err.value) and "Exception" not in str(err.value), str(err.value)
    finally:
        web.close()
        silent.close()
