"""A visitor's phone shows the booth at once: each platform's captive-portal probe (Apple, Android, Windows,
Firefox, NetworkManager), which captive DNS sends to the default site, gets the guest's own answer from busybox
httpd laid out as the guest's initramfs has it (appliance.build.guest.place): not the answer of an open network,
so the device opens its portal sheet, and that page leads to the site."""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_guest_cgi import listening

from appliance import ROOT
from appliance.build.guest import place

pytestmark = pytest.mark.unit

# host, path, what the device expects when the network is open (DESIGN.md, "Captive probes")
PROBES = [
    ("captive.apple.com", "/hotspot-detect.html", 200, "Success"),
    ("captive.apple.com", "/library/test/success.html", 200, "Success"),
    ("connectivitycheck.gstatic.com", "/generate_204", 204, ""),
    ("clients3.google.com", "/generate_204", 204, ""),
    ("www.google.com", "/gen_204", 204, ""),
    ("www.msftconnecttest.com", "/connecttest.txt", 200, "Microsoft Connect Test"),
    ("www.msftncsi.com", "/ncsi.txt", 200, "Microsoft NCSI"),
    ("detectportal.firefox.com", "/success.txt", 200, "success"),
    ("nmcheck.gnome.org", "/check_network_status.txt", 200, "NetworkManager is online"),
]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[int]:
    """The demo guest's www as its initramfs has it, served by busybox httpd with the guest's httpd.conf."""
    busybox = shutil.which("busybox")
    assert busybox, "busybox is missing: setup.sh installs it"
    root = tmp_path / "guest"
    for p in sorted((ROOT / "guest").rglob("*")):            # the build's order: probes/ first, then site/
        dest = place(str(p.relative_to(ROOT / "guest")))
        if p.is_file() and dest and dest.startswith("www/"):
            (root / dest).parent.mkdir(parents=True, exist_ok=True)
            (root / dest).write_bytes(p.read_bytes())
    conf = tmp_path / "httpd.conf"
    conf.write_text((ROOT / "guest/httpd.conf").read_text().replace("/www/", f"{root}/www/"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    p = subprocess.Popen([busybox, "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", str(root / "www"), "-c",
                          str(conf)])
    listening(port)
    yield port
    p.terminate()
    p.wait(10)


def get(port: int, host: str, path: str) -> tuple[int, str, str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", path, headers={"Host": host})
    r = c.getresponse()
    out = r.status, r.getheader("Location") or "", r.read().decode(errors="replace")
    c.close()
    return out


@pytest.mark.parametrize("host, path, status, body", PROBES, ids=[f"{h}{p}" for h, p, _, _ in PROBES])
def test_every_probe_finds_a_portal_that_leads_to_the_site(site: int, host: str, path: str, status: int,
                                                           body: str):
    code, location, text = get(site, host, path)
    if 300 <= code < 400:        # a portal too; the sheet follows it
        assert location.endswith(path + "/"), location
        code, _, text = get(site, host, path + "/")
    assert code == 200, (code, text[:80])
    assert (code, text.strip()) != (status, body), "the open network's answer: no portal sheet"
    assert '<meta http-equiv="refresh" content="0; url=/">' in text and '<a href="/">' in text, text[:200]


def test_the_site_is_what_the_portal_leads_to(site: int):
    code, _, text = get(site, "captive.apple.com", "/")
    assert code == 200 and "<title>Xen booth: 2048</title>" in text


def test_the_initramfs_places_probes_beside_the_site_and_the_figures_apart():
    assert place("site/index.html") == "www/index.html" and place("site/cgi-bin/status") == "www/cgi-bin/status"
    assert place("probes/generate_204/index.html") == "www/generate_204/index.html"
    assert place("dom0/cgi-bin/lifetime") == "dom0/cgi-bin/lifetime"
    assert place("init") == "init" and place("about/index.html") is None
    # packed in name order, later entries winning: a site's own file of a probe's name is the one served
    names = sorted(f"guest/{p}" for p in ("site/success.txt", "probes/success.txt"))
    assert [place(n.removeprefix("guest/")) for n in names] == ["www/success.txt"] * 2
    assert names[-1] == "guest/site/success.txt"
