"""Unit tier: deploy's host-side pieces without a board: what GUEST can be (bundle, tarball, bare kernel), a
tarball that tries to escape, hosts files (one a line, Ansible INI), the fleet's table, a static site's files.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from appliance import ROOT
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
    with pytest.raises(GuestError, match=rf"^{k}: kernel: vmlinux is not an ARM zImage"), d.source(k):
        pass                                  # on the laptop, before any board is contacted


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


@pytest.mark.parametrize("kernel, member, message", [
    ("evil", "../../etc/evil", "no evil in it"),               # only names at its top or in one directory count
    ("../evil", "../evil", "guest.yaml: kernel: '../evil' is not a plain file name"),
    ("vmlinuz", "a/b/c/vmlinuz", "no vmlinuz in it"),
    ("vmlinuz", "link:vmlinuz", "'vmlinuz' is not a plain file"),
])
def test_a_tarball_that_reaches_out_is_refused(tmp_path: Path, kernel: str, member: str, message: str):
    t = tmp_path / "b.tar.gz"
    with tarfile.open(t, "w:gz") as tar:
        data = json.dumps({"version": "1", "kernel": kernel, "sha256": {kernel: "0" * 64}}).encode()
        info = tarfile.TarInfo("guest.yaml")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo(member.removeprefix("link:"))
        if member.startswith("link:"):
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        else:
            info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(GuestError, match=message), d.source(t):
        pass
    assert not (tmp_path / "etc").exists()


def _bundle(tmp: Path, **manifest: object) -> Path:
    folder = tmp / "bundle"
    folder.mkdir(exist_ok=True)
    (folder / "vmlinuz").write_bytes(zimage())
    data = {"version": "2.0", "kernel": "vmlinuz", "sha256": {"vmlinuz": hashlib.sha256(zimage()).hexdigest()},
            **manifest}
    (folder / "guest.yaml").write_text(json.dumps(data))
    return folder


def alias_bomb() -> bytes:
    """The "billion laughs" in YAML: nine levels of nine aliases, 661 bytes that expand to 9**9 strings."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    text = "\n".join(lines) + "\n"
    return (text + "#" * (660 - len(text)) + "\n").encode()


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path):
    folder = tmp_path / "bomb"
    folder.mkdir()
    (folder / "guest.yaml").write_bytes(alias_bomb())
    assert len(alias_bomb()) == 661
    with pytest.raises(GuestError, match=rf"^{folder}/guest.yaml: not valid YAML at line 1: anchors and aliases "
                                         r"\(& and \*\) are not allowed in a guest.yaml$"), d.source(folder):
        pass
    (folder / "guest.yaml").write_bytes(b"version: '1'\n" + b"#" * (64 << 10))
    with pytest.raises(GuestError, match=rf"^{folder}/guest.yaml: more than 64 KiB; a guest.yaml is a few lines$"), \
            d.source(folder):
        pass


def test_a_sparse_2_gb_member_no_manifest_names_is_never_extracted(tmp_path: Path):
    """A tarball of a few hundred bytes with a 2 GB sparse member (GNU tar -S): the bundle is read by the names its
    guest.yaml gives; the big member is neither extracted nor read, and when named it is refused by its size."""
    src = _bundle(tmp_path)
    with open(src / "huge", "wb") as f:
        f.truncate(2 << 30)
    t = tmp_path / "b.tar.gz"
    subprocess.run(["tar", "-S", "-czf", str(t), "-C", str(src), "guest.yaml", "vmlinuz", "huge"], check=True)
    (src / "huge").unlink()
    assert t.stat().st_size < 1000
    with d.source(t) as g:
        assert sorted(p.name for p in g.folder.iterdir()) == ["guest.yaml", "vmlinuz"]
        assert d.check(g, "demo", DEFAULTS).version == "2.0"
    data = json.loads((src / "guest.yaml").read_text())
    (src / "guest.yaml").write_text(json.dumps({**data, "ramdisk": "huge", "sha256": {**data["sha256"],
                                                                                       "huge": "0" * 64}}))
    with open(src / "huge", "wb") as f:
        f.truncate(2 << 30)
    subprocess.run(["tar", "-S", "-czf", str(t), "-C", str(src), "guest.yaml", "vmlinuz", "huge"], check=True)
    (src / "huge").unlink()
    with pytest.raises(GuestError, match=rf"^{t}: 'huge': 2147483648 bytes, more than the 512 MiB a bundle's file "
                                         r"may be$"), d.source(t):
        pass


@pytest.mark.parametrize("manifest, message", [
    ({"--version": "v" * (1 << 20)}, r"version: 'v{70,}… is not a version name"),   # (in guest.yaml: over 64 KiB)
    ({"health": None}, r"health: null would switch off the site's health check; a bundle may change its path or "
                       r"deadline, never switch it off"),
    ({"kernel": "manifest.json", "sha256": {"manifest.json": "0" * 64}},
     r"kernel: 'manifest.json' is a name the board uses itself"),
    ({"ramdisk": "vmlinuz.part", "sha256": {"vmlinuz": "0" * 64, "vmlinuz.part": "0" * 64}},
     r"ramdisk: 'vmlinuz.part' is a name the board uses itself \(a version's manifest.json, an upload's \*.part\)"),
])
def test_hostile_manifests_are_refused_in_one_short_line(tmp_path: Path, manifest: dict[str, object],
                                                         message: str):
    version = manifest.pop("--version", None)
    folder = _bundle(tmp_path, **manifest)
    with pytest.raises(GuestError) as err, d.source(folder, version=version):  # type: ignore[arg-type]
        pass
    text = str(err.value)
    assert re.search(message, text) and "\n" not in text and len(text) < 400, text[:500]


def test_a_hostile_bundle_is_refused_before_any_board_is_contacted(tmp_path: Path):
    folder = _bundle(tmp_path, health=None)
    p = subprocess.run([sys.executable, "-m", "invoke", "deploy", "--host", "root@127.0.0.1:1", str(folder)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [f"appliance: ERROR: {folder}/guest.yaml: health: null would switch off "
                                             f"the site's health check; a bundle may change its path or deadline, "
                                             f"never switch it off"]


def test_hosts_file_lines_and_ansible_inventory(tmp_path: Path):
    f = tmp_path / "hosts"
    f.write_text("# the booths\nroot@booth-1.local\n\n[booths]\nbooth-2 ansible_host=10.0.0.2 ansible_user=admin "
                 "ansible_port=2222\nbooth-3  ; spare\n[booths:vars]\nansible_user=root\n[all:children]\nbooths\n")
    assert d.hosts_file(f) == [("root@booth-1.local", "root@booth-1.local"), ("booth-2", "admin@10.0.0.2:2222"),
                               ("booth-3", "root@booth-3")]
    f.write_text("booth-1 not-an-option\n")
    with pytest.raises(DeployError, match=rf"^{f}:1: 'booth-1 not-an-option' is not a host"):
        d.hosts_file(f)


def test_inventory_vars_ranges_yaml_and_limit(tmp_path: Path):
    ini = tmp_path / "booths.ini"
    ini.write_text("[hall]\nbooth-[01:03] ansible_port=2222\n[lobby]\nlobby-[a:b]\n[lobby:vars]\nansible_user=admin\n"
                   "[booths:children]\nhall\nlobby\n[booths:vars]\nansible_user=root\n[all:vars]\nansible_user=nobody\n"
                   "ansible_host=10.0.0.9\n")
    assert d.hosts_file(ini) == [("booth-01", "root@10.0.0.9:2222"), ("booth-02", "root@10.0.0.9:2222"),
                                 ("booth-03", "root@10.0.0.9:2222"), ("lobby-a", "admin@10.0.0.9"),
                                 ("lobby-b", "admin@10.0.0.9")]
    assert [n for n, _ in d.hosts_file(ini, "lobby,booth-02")] == ["booth-02", "lobby-a", "lobby-b"]
    assert [n for n, _ in d.hosts_file(ini, "booths:!hall")] == ["lobby-a", "lobby-b"]
    assert [n for n, _ in d.hosts_file(ini, "booth-0[13]")] == ["booth-01", "booth-03"]
    with pytest.raises(DeployError, match=rf"^{ini}: --limit 'nowhere' leaves no host$"):
        d.hosts_file(ini, "nowhere")
    yml = tmp_path / "booths.yml"
    yml.write_text("all:\n  vars:\n    ansible_user: root\n  children:\n    hall:\n      hosts:\n"
                   "        booth-[1:2]:\n        stage: {ansible_host: 192.168.1.30, ansible_port: 2200}\n"
                   "      vars: {ansible_user: admin}\n    spare:\n      hosts: {booth-9: }\n")
    assert d.hosts_file(yml) == [("booth-1", "admin@booth-1"), ("booth-2", "admin@booth-2"),
                                 ("stage", "admin@192.168.1.30:2200"), ("booth-9", "root@booth-9")]
    assert [n for n, _ in d.hosts_file(yml, "spare")] == ["booth-9"]
    yml.write_text("all:\n  hosts:\n    a: &x {ansible_user: root}\n    b: *x\n")
    with pytest.raises(DeployError, match=rf"^{yml}: not valid YAML at line 3"):
        d.hosts_file(yml)


def test_the_table():
    rows = [d.Row("booth-1", "demo", "1.0", "2.0", "deployed", 12.34, ok=True),
            d.Row("booth-2", "?", None, None, "failed", 0.5,
                  detail={"error": "booth-2: no such host: booth-2 does not resolve\nmore"})]
    assert d.table(rows).splitlines() == [
        "host     site  old  new  result    seconds",
        "booth-1  demo  1.0  2.0  deployed  12.3",
        "booth-2  ?     -    -    failed    0.5",
        "booth-2: no such host: booth-2 does not resolve"]


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


def test_the_status_table_shows_every_site_whatever_its_health():
    site = {"current": "1.0", "previous": None, "versions": ["1.0"], "keep": 3, "free_bytes": 64 << 20}
    boards = {
        "booth-a": {"ok": False, "sites": {
            "demo": {**site, "ok": True, "state": "serving", "version": "1.0", "healthy": True, "uptime_s": 12},
            "make": {**site, "ok": True, "state": "asleep", "version": None, "healthy": None, "uptime_s": None},
            "about": {**site, "ok": False, "state": "failed", "version": "1.0", "healthy": False,
                      "uptime_s": None, "error": "x" * 500}}},
        "booth-b": {"ok": False, "error": "booth-b: no such host: booth-b does not resolve", "sites": {}},
    }
    lines = d.status_table(boards).splitlines()
    assert [line.split()[:5] for line in lines[:5]] == [
        ["host", "site", "state", "version", "health"],
        ["booth-a", "demo", "serving", "1.0", "healthy"],
        ["booth-a", "make", "asleep", "1.0", "asleep"],
        ["booth-a", "about", "FAILING", "1.0", "UNHEALTHY"],
        ["booth-b", "-", "FAILING", "-", "-"]]
    assert lines[5] == "booth-a about: " + "x" * 198 + "…"
    assert lines[6] == "booth-b: booth-b: no such host: booth-b does not resolve"
    assert len(lines) == 7


def test_a_deploy_lock_left_by_a_dead_holder_is_taken_with_a_line(tmp_path: Path):
    from appliance.manager.lock import SiteLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                     # a pid that is gone (killed with the lock held: a power cut)
    path = tmp_path / "demo/deploy.lock"
    path.parent.mkdir()
    path.write_text(json.dumps({"pid": dead.pid, "what": "deploy from 10.0.0.7", "version": None, "since": 0,
                                "idle": 120, "active": 0, "op": None}) + "\n")
    with SiteLock(tmp_path, "demo", "deploy", name="deploy.lock", idle=120) as lock:
        assert lock.notes == [f"site demo: {path} was left by pid {dead.pid} (deploy from 10.0.0.7 of version None, "
                              f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(0))}), which is gone"]
        assert json.loads(path.read_text())["pid"] != dead.pid
    assert path.read_text() == ""
    with SiteLock(tmp_path, "demo", "deploy", name="deploy.lock", idle=120) as lock:
        assert lock.notes == [], "a lock released as it should be says nothing"


def test_a_tarball_member_too_big_to_skip_is_refused_before_its_data_is_read(tmp_path: Path):
    info = tarfile.TarInfo("filler")
    info.size = 600 << 20                     # says 600 MiB; the file holds the header only (nothing is read)
    t = tmp_path / "b.tar"
    t.write_bytes(info.tobuf(format=tarfile.GNU_FORMAT))
    with pytest.raises(GuestError, match=rf"^{t}: 'filler': 629145600 bytes, more than the 512 MiB a bundle's "
                                         r"file may be$"), d.source(t):
        pass
