"""Unit tier: deploy's host-side pieces without a board: what GUEST can be (bundle, tarball, bare kernel), a
tarball that tries to escape, hosts files (one a line, Ansible INI), the fleet's table, a static site's files.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from appliance import deploy as d
from appliance.build import guest
from appliance.errors import DeployError, GuestError

pytestmark = pytest.mark.unit
DEFAULTS = {"memory": 96, "vcpus": 1, "port": 80, "health": {"path": "/", "deadline": 120}}


def zimage(tail: bytes = b"x") -> bytes:
    head = bytearray(0x30)
    head[0x24:0x28] = (0x016F2818).to_bytes(4, "little")
    return bytes(head) + tail


def test_a_bare_kernel_is_named_by_its_content_unless_told(tmp_path: Path):
    k = tmp_path / "unikernel.xen"
    k.write_bytes(zimage())
    digest = hashlib.sha256(k.read_bytes()).hexdigest()
    with d.source(k) as g:
        m = d.check(g, "demo", DEFAULTS)
    assert (m.name, m.version, m.kernel, m.memory) == ("demo", f"unikernel-{digest[:10]}", "unikernel.xen", 96)
    with d.source(k, name="mirage", memory=32) as g:
        assert d.check(g, "demo", DEFAULTS).version == f"mirage-{digest[:10]}"
        assert d.check(g, "demo", DEFAULTS).memory == 32
    with d.source(k, version="7.1") as g:
        assert d.check(g, "demo", DEFAULTS).version == "7.1"


def test_a_kernel_that_is_not_a_zimage_is_refused(tmp_path: Path):
    k = tmp_path / "vmlinux"
    k.write_bytes(b"\x7fELF" + bytes(100))
    with d.source(k) as g, pytest.raises(GuestError, match=rf"^{k}: kernel: vmlinux is not an ARM zImage"):
        d.check(g, "demo", DEFAULTS)


def _tar(path: Path, members: dict[str, bytes], compress: bool = True) -> Path:
    with tarfile.open(path, "w:gz" if compress else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("name, compress", [("b.tar.gz", True), ("b.tar", False), ("b.tgz", True)])
def test_a_tarball_bundle(tmp_path: Path, name: str, compress: bool):
    k = zimage()
    manifest = {"version": "2.0", "kernel": "vmlinuz", "sha256": {"vmlinuz": hashlib.sha256(k).hexdigest()}}
    t = _tar(tmp_path / name, {"demo-2.0/guest.yaml": json.dumps(manifest).encode(), "demo-2.0/vmlinuz": k},
             compress)
    with d.source(t) as g:
        m = d.check(g, "demo", DEFAULTS)
        assert m.version == "2.0" and (g.folder / "vmlinuz").read_bytes() == k


@pytest.mark.parametrize("member, message", [
    ("../../etc/evil", "holds only plain files"),
    ("x/.hidden\\nname", "not a plain file name"),
    ("a/b/c/vmlinuz", "holds only plain files"),
])
def test_a_tarball_that_reaches_out_is_refused(tmp_path: Path, member: str, message: str):
    t = _tar(tmp_path / "b.tar.gz", {"guest.yaml": b"{}", member: b"x"})
    with pytest.raises(GuestError, match=message), d.source(t):
        pass
    assert not (tmp_path / "etc").exists()


def test_hosts_file_lines_and_ansible_inventory(tmp_path: Path):
    f = tmp_path / "hosts"
    f.write_text("# the booths\nroot@booth-1.local\n\n[booths]\nbooth-2 ansible_host=10.0.0.2 ansible_user=root "
                 "ansible_port=2222\nbooth-3  ; spare\n[booths:vars]\nansible_user=root\n[all:children]\nbooths\n")
    assert d.hosts_file(f) == ["root@booth-1.local", "root@10.0.0.2:2222", "booth-3"]
    f.write_text("booth-1 not-an-option\n")
    with pytest.raises(DeployError, match=rf"^{f}:1: 'booth-1 not-an-option' is not a host"):
        d.hosts_file(f)


def test_the_table():
    rows = [d.Row("booth-1", "demo", "1.0", "2.0", "deployed", 12.34, ok=True),
            d.Row("booth-2", "?", None, None, "failed: booth-2: cannot connect\nmore", 0.5)]
    assert d.table(rows).splitlines() == [
        "host     site  old  new  result                           seconds",
        "booth-1  demo  1.0  2.0  deployed                         12.3",
        "booth-2  ?     -    -    failed: booth-2: cannot connect  0.5"]


def test_a_static_site_takes_its_regular_files(tmp_path: Path):
    site = tmp_path / "site"
    (site / "img").mkdir(parents=True)
    (site / "index.html").write_text("<h1>hi</h1>")
    (site / "img/logo.png").write_bytes(b"\x89PNG")
    (site / "link").symlink_to("/etc/passwd")
    assert list(guest.static_files(site)) == ["img/logo.png", "index.html"]
    (site / "index.html").unlink()
    with pytest.raises(GuestError, match="no index.html"):
        guest.static_files(site)
