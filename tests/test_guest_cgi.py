"""The demo guest's CGI scripts under busybox httpd (the host's busybox, the guest's is the same program): dom0's
lifetime figures are kept when dom0 posts them and refused from anyone else, and /cgi-bin/status answers with
them merged into the guest's own JSON."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import ROOT
from appliance.manager import lifetime

pytestmark = pytest.mark.unit


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    busybox = shutil.which("busybox")
    assert busybox, "busybox is missing: setup.sh installs it"
    www, state = tmp_path / "www", tmp_path / "state"
    shutil.copytree(ROOT / "guest/site", www)
    for script in (www / "cgi-bin").iterdir():     # the guest's /bin/sh is busybox's ash: so is theirs here
        lines = script.read_text().split("\n", 1)
        assert lines[0] == "#!/bin/sh", script
        script.write_text(f"#!{busybox} sh\n{lines[1]}")
    state.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # as the guest's init starts it: on every address, IPv6 and IPv4 (an IPv4 peer is then ::ffff:A.B.C.D)
    p = subprocess.Popen([busybox, "httpd", "-f", "-p", str(port), "-h", str(www)],
                         env={"PATH": "/usr/bin:/bin", "APPLIANCE_GUEST_STATE": str(state)})
    end = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < end, "busybox httpd did not listen"
            time.sleep(0.05)
    yield port, state
    p.terminate()
    p.wait(10)


def call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
    r = c.getresponse()
    out = r.status, r.read()
    c.close()
    return out


FIGURES = {"site": "demo", "woken": 1764800000.5, "wake_ms": 420, "trigger": "dns query", "requests": 17,
           "wakes_today": 3, "sites": {"demo": {"names": ["demo.booth", "game.booth"], "state": "serving",
                                                "version": "1.0-0123456789", "on_demand": {"idle": 60, "stop": "pause"}},
                                       "about": {"names": ["about.booth"], "state": "serving", "version": "site-ab12",
                                                 "woken": None, "on_demand": None}}}


def test_status_has_the_figures_dom0_posted(guest: tuple[int, Path]):
    port, state = guest
    status, body = call(port, "GET", "/cgi-bin/status")
    before = json.loads(body)
    assert status == 200 and set(before) == {"name", "version", "kernel", "uptime"}, "none until dom0 posts"
    (state / "dom0").write_text("127.0.0.1\n")
    assert lifetime.post("127.0.0.1", port, FIGURES) == 200, "the manager's own post, as it sends it"
    after = json.loads(call(port, "GET", "/cgi-bin/status")[1])
    assert {k: after[k] for k in FIGURES} == FIGURES and after["name"] == "demo"


@pytest.mark.parametrize("dom0, method, body, status", [
    ("127.0.0.2", "POST", json.dumps(FIGURES).encode(), 403),        # from a visitor's address
    ("", "POST", json.dumps(FIGURES).encode(), 403),                 # no gateway noted (DHCP)
    ("127.0.0.1", "GET", None, 405),
    ("127.0.0.1", "POST", b'{"woken": "$(reboot)"}', 400),
    ("127.0.0.1", "POST", b'{"woken": 1}\n{"x": 2}', 400),
    ("127.0.0.1", "POST", b"[1, 2]", 400),
    ("127.0.0.1", "POST", b'{"pad": "' + b"x" * 17000 + b'"}', 413),
])
def test_lifetime_refuses(guest: tuple[int, Path], dom0: str, method: str, body: bytes | None, status: int):
    port, state = guest
    (state / "dom0").write_text(dom0)
    assert call(port, method, "/cgi-bin/lifetime", body)[0] == status
    assert not (state / "lifetime.json").exists()
    assert set(json.loads(call(port, "GET", "/cgi-bin/status")[1])) == {"name", "version", "kernel", "uptime"}
