"""A board you can find: its first boot's host keys, their fingerprints (console line, /etc/issue.d, mDNS TXT), a real
avahi-daemon announcing them from a network namespace with the booth's own avahi configuration, and `invoke boards`
finding it from the uplink but never from the visitors' bridge; the fingerprint is the one the SSH layer sees.

    namespace "b" (the board)  eth0 10.77.0.1/24  -> "u" (the uplink: a user's laptop, 10.77.0.2)
                               br0  10.78.0.1/24, port wlan0 -> "v" (a visitor, 10.78.0.50)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sshd_fixtures

from appliance import ROOT, boards, config, ssh
from appliance.build import configure
from appliance.errors import HostKeyError
from appliance.identity import derive

SCRIPT = ROOT / "overlays/base/usr/local/sbin/appliance-ssh-hostkeys"
NAME = "booth-c0ffee"


def first_boot(root: Path) -> subprocess.CompletedProcess[str]:
    """appliance-ssh-hostkeys on a tree: keys, /etc/issue.d and avahi's service file, as at a board's first boot."""
    for d in ("etc/ssh", "etc/avahi/services", "etc/appliance"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/appliance/image").write_text("NAME=cubieboard2-booth\nVERSION=20261207-0123abcd\n")
    return subprocess.run(["sh", SCRIPT, root], capture_output=True, text=True, check=True)


def fingerprint(pub: Path) -> str:
    return subprocess.run(["ssh-keygen", "-lf", pub], capture_output=True, text=True, check=True).stdout.split()[1]


@pytest.mark.unit
def test_the_first_boot_shows_and_publishes_the_host_keys(tmp_path: Path) -> None:
    out = first_boot(tmp_path).stdout
    ed, ec = (fingerprint(tmp_path / f"etc/ssh/ssh_host_{t}_key.pub") for t in ("ed25519", "ecdsa"))
    assert out.splitlines() == [f"appliance-ssh-hostkeys: SSH host key ed25519 {ed}",
                                f"appliance-ssh-hostkeys: SSH host key ecdsa {ec}"]
    assert (tmp_path / "etc/issue.d/appliance-ssh.issue").read_text() == (
        f"SSH host keys of \\n (check them when ssh asks):\n  ed25519  {ed}\n  ecdsa  {ec}\n\n")
    service = (tmp_path / "etc/avahi/services/ssh.service").read_text()
    assert re.findall(r"<txt-record>(.*)</txt-record>", service) == [
        f"fp-ed25519={ed}", f"fp-ecdsa={ec}", "image=cubieboard2-booth", "version=20261207-0123abcd"]
    keys = {p.name: p.read_bytes() for p in (tmp_path / "etc/ssh").iterdir()}
    first_boot(tmp_path)                  # a later run (e.g. the issue file lost) keeps the keys
    assert {p.name: p.read_bytes() for p in (tmp_path / "etc/ssh").iterdir()} == keys


@pytest.mark.unit
@pytest.mark.parametrize("msg", [b"", b"\x00\x01\x84\x00" + b"\x00" * 7, b"\x00\x00\x84\x00\x00\x00\x00\x01\x00\x00"
                                 b"\x00\x00\xc0\x0c\x00\x0c\x00\x01\x00\x00\x00\x0a\x00\x02\xc0\x0c",
                                 b"\x00\x00\x84\x00\x00\x00\x00\x01\x00\x00\x00\x00\x3f" + b"a" * 20])
def test_a_malformed_answer_is_refused_not_crashed_on(msg: bytes) -> None:
    """Anyone on the network can answer: a short header, a pointer loop, a label past the end."""
    with pytest.raises(boards.Malformed):
        boards.records(msg)


def answer(*rrs: tuple[str, int, bytes]) -> bytes:
    """An mDNS response holding these records (name, type, rdata)."""
    body = b"".join(boards._encode_name(n) + struct.pack("!HHIH", t, 0x8001, 120, len(d)) + d for n, t, d in rrs)
    return struct.pack("!HHHHHH", 0, 0x8400, 0, len(rrs), 0, 0) + body


@pytest.mark.unit
def test_an_answer_is_read_and_bounded() -> None:
    inst = f"{NAME}._ssh._tcp.local"
    msg = answer(("_ssh._tcp.local", boards.PTR, boards._encode_name(inst)),
                 (inst, boards.SRV, struct.pack("!HHH", 0, 0, 2222) + boards._encode_name(f"{NAME}.local")),
                 (inst, boards.TXT, b"".join(bytes([len(t)]) + t for t in (b"image=booth-x", b"fp-ed25519=SHA",
                                                                           b"bad\x01=x", b"=x", b"k="))
                  + b"\x07cut"),                               # a string running past its record: dropped
                 (f"{NAME}.local", boards.A, bytes([10, 0, 0, 7])))
    assert boards.records(msg) == [("_ssh._tcp.local", boards.PTR, inst),
                                   (inst, boards.SRV, (2222, f"{NAME}.local")),
                                   (inst, boards.TXT, {"image": "booth-x", "fp-ed25519": "SHA", "k": ""}),
                                   (f"{NAME}.local", boards.A, "10.0.0.7")]
    flood = answer(*[(f"b{i}._ssh._tcp.local", boards.PTR, b"\0") for i in range(500)])
    assert len(boards.records(flood)) == boards.MAX_RECORDS


@pytest.mark.unit
@pytest.mark.parametrize(("value", "line"), [
    ("abc", "appliance: ERROR: --timeout: 'abc' is not a number"),
    ("0", "appliance: ERROR: --timeout: 0 is out of range (give a number from 0.1 to 60)"),
    ("3600", "appliance: ERROR: --timeout: 3600 is out of range (give a number from 0.1 to 60)")])
def test_a_bad_timeout_is_one_line(value: str, line: str) -> None:
    r = subprocess.run([sys.executable, "-m", "invoke", "boards", "--timeout", value], cwd=ROOT, capture_output=True,
                       text=True, check=False)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", line + "\n")


# ---------------------------------------------------------------- root: a real avahi-daemon in a namespace


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def network() -> Iterator[str]:
    if os.geteuid() != 0 or not shutil.which("avahi-daemon") or not shutil.which("ip"):
        pytest.skip("needs root, ip and avahi-daemon (./setup.sh installs them)")
    tag = f"{os.getpid() % 10000}"
    b, u, v = f"brd{tag}b", f"brd{tag}u", f"brd{tag}v"
    try:
        for ns in (b, u, v):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", "eth0", "netns", b, "type", "veth", "peer", "name", "eth0", "netns", u)
        ip("-n", b, "link", "add", "br0", "type", "bridge")
        ip("link", "add", "wlan0", "netns", b, "type", "veth", "peer", "name", "eth0", "netns", v)
        ip("-n", b, "link", "set", "wlan0", "master", "br0")
        for ns, dev, addr in ((b, "eth0", "10.77.0.1/24"), (u, "eth0", "10.77.0.2/24"), (b, "br0", "10.78.0.1/24"),
                              (v, "eth0", "10.78.0.50/24")):
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        ip("-n", b, "link", "set", "wlan0", "up")
        yield tag
    finally:
        for ns in (b, u, v):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


@pytest.fixture
def avahi(network: str, tmp_path: Path) -> Iterator[Path]:
    """The booth's avahi-daemon.conf (rendered from its template) and the service file of a first boot, published by
    a real avahi-daemon in the board's namespace (its own mount and UTS namespaces: /etc/avahi, /run/avahi-daemon and
    the host name are its own; no D-Bus)."""
    cfg = config.load("booth")
    files = {f.rel: f.data for f in configure.render_overlays(cfg, configure.context(cfg, derive(cfg.digest),
                                                                                    need_secrets=False))}
    root = tmp_path / "board"
    first_boot(root)
    conf = files["etc/avahi/avahi-daemon.conf"]
    assert conf is not None
    (root / "etc/avahi/avahi-daemon.conf").write_bytes(conf.replace(b"[server]\n", b"[server]\nenable-dbus=no\n"))
    (root / "run").mkdir()
    script = (f"hostname {NAME} && mount --bind {root}/etc/avahi /etc/avahi && "
              f"mkdir -p /run/avahi-daemon && mount --bind {root}/run /run/avahi-daemon && "
              "exec avahi-daemon --no-drop-root --no-chroot --no-rlimits --no-proc-title -f /etc/avahi/avahi-daemon.conf")
    log = open(tmp_path / "avahi.log", "wb")
    proc = subprocess.Popen(["ip", "netns", "exec", f"brd{network}b", "unshare", "--mount", "--uts",
                             "--propagation", "private", "sh", "-c", script], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL)
    try:
        yield root
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def invoke_boards(ns: str, timeout: float = 2) -> list[dict[str, object]]:
    """`invoke boards --json` run on a machine of the namespace `ns`."""
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "invoke", "boards", "--json",
                        "--timeout", str(timeout)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    found: list[dict[str, object]] = json.loads(r.stdout)
    return found


@pytest.mark.root
def test_invoke_boards_finds_the_board_on_the_uplink_only(network: str, avahi: Path, tmp_path: Path) -> None:
    deadline, found = time.monotonic() + 30, list[dict[str, object]]()
    while not found and time.monotonic() < deadline:      # avahi probes its name before it announces
        found = invoke_boards(f"brd{network}u")
    log = (tmp_path / "avahi.log").read_text(errors="replace")
    assert found, f"no answer in 30 s; avahi-daemon said: {log[-800:]}"
    ed = fingerprint(avahi / "etc/ssh/ssh_host_ed25519_key.pub")
    ec = fingerprint(avahi / "etc/ssh/ssh_host_ecdsa_key.pub")
    assert found == [{"name": NAME, "host": f"{NAME}.local", "address": "10.77.0.1", "port": 22,
                      "image": "cubieboard2-booth", "version": "20261207-0123abcd",
                      "fingerprints": {"ed25519": ed, "ecdsa": ec}}]
    # a visitor on the booth's bridge asks the same, while the board is announcing: no answer
    assert invoke_boards(f"brd{network}v", timeout=3) == []
    assert invoke_boards(f"brd{network}u") == found       # and the uplink still gets one (avahi did not stop)


@pytest.mark.ssh
@sshd_fixtures.needs_sshd
def test_the_published_fingerprint_is_the_key_the_ssh_layer_sees(tmp_path: Path) -> None:
    root = tmp_path / "board"
    out = first_boot(root).stdout
    published = re.search(r"fp-ed25519=(\S+)</txt-record>", (root / "etc/avahi/services/ssh.service").read_text())
    assert published
    client = sshd_fixtures.keygen(tmp_path / "client")
    server = sshd_fixtures.start(tmp_path / "sshd", client, host_key=root / "etc/ssh/ssh_host_ed25519_key")
    try:
        empty = tmp_path / "known_hosts"
        empty.write_text("")
        with pytest.raises(HostKeyError) as err:
            ssh.Connection(f"root@127.0.0.1:{server.port}", key=client, known_hosts=empty).open()
    finally:
        server.stop()
    seen = re.search(r"unknown host key \(ssh-ed25519 (\S+)\)", str(err.value))
    assert seen, str(err.value)
    assert seen.group(1) == published.group(1)
    assert f"SSH host key ed25519 {seen.group(1)}" in out                     # the console's line
    assert f"ed25519  {seen.group(1)}" in (root / "etc/issue.d/appliance-ssh.issue").read_text()
