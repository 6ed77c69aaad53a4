"""The simulated phone's last steps (appliance/emulate/visitor.py): resolve the page's name with the lease's DNS
server (here a real dnsmasq on loopback) and load it, polling until a deadline. Its wifi steps need mac80211_hwsim,
which only the emulated board has (system tier, bench)."""

from __future__ import annotations

import http.server
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from appliance.emulate import visitor

pytestmark = pytest.mark.unit


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def dns() -> Iterator[int]:
    """dnsmasq on a loopback port answering demo.booth with 127.0.0.1, and nothing else."""
    port = _free_udp_port()
    p = subprocess.Popen(["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
                          "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={port}",
                          "--address=/demo.booth/127.0.0.1", "--pid-file", "--user=root"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 10
        while visitor.resolve("demo.booth", "127.0.0.1", port) is None:
            assert p.poll() is None and time.monotonic() < end, "dnsmasq did not answer"
            time.sleep(0.05)
        yield port
    finally:
        p.terminate()
        p.wait()


@pytest.fixture
def server() -> Iterator[int]:
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<title>demo</title>" if self.headers["Host"].startswith("demo.booth") else b""
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield int(httpd.server_address[1])
    httpd.shutdown()
    httpd.server_close()


def test_the_lease_servers_answer_is_the_address_and_an_unknown_name_is_none(dns: int) -> None:
    assert visitor.resolve("demo.booth", "127.0.0.1", dns) == "127.0.0.1"
    assert visitor.resolve("other.example", "127.0.0.1", dns) is None


def test_the_visitor_resolves_the_name_and_loads_the_page(dns: int, server: int,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://demo.booth:{server}/"
    assert visitor.page(url, "127.0.0.1", time.monotonic() + 30, console=False, dns_port=dns) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["appliance-visitor: resolved demo.booth to 127.0.0.1",
                     f"appliance-visitor: first page {url} 200 (19 bytes)"]   # asked by its name (Host)


def test_a_page_that_never_answers_gives_up_at_the_deadline(dns: int, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))     # a port nobody listens on
        url = f"http://demo.booth:{s.getsockname()[1]}/"
        start = time.monotonic()
        assert visitor.page(url, "127.0.0.1", time.monotonic() + 1, console=False, dns_port=dns) == 1
    assert time.monotonic() - start < 10
    assert capsys.readouterr().out.splitlines()[-1] == f"appliance-visitor: gave up: no page at {url} before the deadline"
