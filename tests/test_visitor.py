"""The simulated phone's last steps (appliance/emulate/visitor.py): resolve the page's name and load it, polling
until a deadline. Its wifi steps need mac80211_hwsim, which only the emulated board has (system tier, bench)."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from appliance.emulate import visitor

pytestmark = pytest.mark.unit


@pytest.fixture
def server() -> Iterator[int]:
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<title>demo</title>")

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def test_the_visitor_resolves_the_name_and_loads_the_page(server: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert visitor.page(f"http://localhost:{server}/", time.monotonic() + 30, console=False) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("appliance-visitor: resolved localhost to 127.")
    assert lines[1] == f"appliance-visitor: first page http://localhost:{server}/ 200 (19 bytes)"


def test_a_page_that_never_answers_gives_up_at_the_deadline(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))     # a port nobody listens on
        port = s.getsockname()[1]
        start = time.monotonic()
        assert visitor.page(f"http://127.0.0.1:{port}/", time.monotonic() + 1, console=False) == 1
    assert time.monotonic() - start < 10
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"appliance-visitor: gave up: no page at http://127.0.0.1:{port}/ before the deadline"
