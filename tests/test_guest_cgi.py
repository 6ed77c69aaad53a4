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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def guests(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    """The guest's two httpds: the site's (guest/site) and the figures' (guest/dom0); their ports and state."""
    busybox = shutil.which("busybox")
    assert busybox, "busybox is missing: setup.sh installs it"
    state = tmp_path / "state"
    state.mkdir()
    ports, procs = [], []
    for tree in ("site", "dom0"):
        www = tmp_path / tree
        shutil.copytree(ROOT / "guest" / tree, www)
        for script in (www / "cgi-bin").iterdir():     # the guest's /bin/sh is busybox's ash: so is theirs here
            lines = script.read_text().split("\n", 1)
            assert lines[0] == "#!/bin/sh", script
            script.write_text(f"#!{busybox} sh\n{lines[1]}")
        port = free_port()
        # as the guest's init starts them: on every address, IPv6 and IPv4 (an IPv4 peer is then ::ffff:A.B.C.D)
        procs.append(subprocess.Popen([busybox, "httpd", "-f", "-p", str(port), "-h", str(www)],
                                      env={"PATH": "/usr/bin:/bin", "APPLIANCE_GUEST_STATE": str(state)}))
        ports.append(port)
        listening(port)
    yield ports[0], ports[1], state
    for p in procs:
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


def test_status_has_the_figures_dom0_posted(guests: tuple[int, int, Path]):
    site, figures, state = guests
    status, body = call(site, "GET", "/cgi-bin/status")
    before = json.loads(body)
    assert status == 200 and set(before) == {"name", "version", "kernel", "uptime"}, "none until dom0 posts"
    (state / "dom0").write_text("127.0.0.1\n")
    assert lifetime.post("127.0.0.1", figures, FIGURES) == 200, "the manager's own post, as it sends it"
    after = json.loads(call(site, "GET", "/cgi-bin/status")[1])
    assert {k: after[k] for k in FIGURES} == FIGURES and after["name"] == "demo"


def test_the_sites_port_takes_no_figures_even_from_dom0(guests: tuple[int, int, Path]):
    """What dom0 forwards to a guest (a visitor's connection through the DNAT or the activator, from dom0's own
    address) reaches the site's port only: there, the path is not the figures' CGI."""
    site, _, state = guests
    (state / "dom0").write_text("127.0.0.1\n")
    assert lifetime.post("127.0.0.1", site, FIGURES) == 404
    assert not (state / "lifetime.json").exists()


def test_the_guest_serves_figures_on_lifetime_port():
    """One port for both sides: the demo guest's init starts the figures' httpd on lifetime.PORT, and the
    xl stand-in of the doubles serves them there too."""
    init = (ROOT / "guest/init").read_text()
    assert f"serve /run/httpd-dom0.pid -p {lifetime.PORT} -h /dom0 &" in init
    assert f"FIGURES_PORT = {lifetime.PORT} " in (ROOT / "tests/xl_standin.py").read_text()


@pytest.mark.parametrize("dom0, method, body, status", [
    ("127.0.0.2", "POST", json.dumps(FIGURES).encode(), 403),        # from a visitor's address
    ("", "POST", json.dumps(FIGURES).encode(), 403),                 # no gateway noted (DHCP)
    ("127.0.0.1", "GET", None, 405),
    ("127.0.0.1", "POST", b'{"woken": "$(reboot)"}', 400),
    ("127.0.0.1", "POST", b'{"woken": 1}\n{"x": 2}', 400),
    ("127.0.0.1", "POST", b"[1, 2]", 400),
    ("127.0.0.1", "POST", b'{"pad": "' + b"x" * 17000 + b'"}', 413),
])
def test_lifetime_refuses(guests: tuple[int, int, Path], dom0: str, method: str, body: bytes | None, status: int):
    site, figures, state = guests
    (state / "dom0").write_text(dom0)
    assert call(figures, method, "/cgi-bin/lifetime", body)[0] == status
    assert not (state / "lifetime.json").exists()
    assert set(json.loads(call(site, "GET", "/cgi-bin/status")[1])) == {"name", "version", "kernel", "uptime"}


def listening(port: int, timeout: float = 10) -> None:
    """Wait until busybox httpd takes connections on 127.0.0.1:port."""
    end = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < end, "busybox httpd did not listen"
            time.sleep(0.05)
