"""The board's guest manager (appliance.manager), piece by piece: the name rules, the manifest validator against
a table of bad manifests, the xl config generator against hostile values, the store's pointers, the site lock,
the supervisor with an xl stand-in, and the command line's JSON.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from appliance import ROOT
from appliance.manager import manifest, names, switch, xl
from appliance.manager.context import Context
from appliance.manager.errors import Error
from appliance.manager.lock import Busy, SiteLock
from appliance.manager.net import Net
from appliance.manager.settings import Bridge as NetSettings
from appliance.manager.settings import load as load_settings
from appliance.manager.store import Store
from appliance.manager.supervisor import SiteSupervisor

pytestmark = pytest.mark.unit

ENTRY = ROOT / "overlays/booth/usr/local/sbin/appliance-guest"
A, B = "a" * 64, "b" * 64
DEFAULT_CMDLINE = "console=hvc0 ip={address}::{gateway}:{netmask}:{domain}:eth0:off appliance.port={port}"
BASE: dict[str, Any] = {"name": "demo", "version": "1.0", "kernel": "vmlinuz", "ramdisk": "initrd.gz",
                        "sha256": {"vmlinuz": A, "initrd.gz": B}, "memory": 96, "vcpus": 1, "port": 80,
                        "cmdline": DEFAULT_CMDLINE, "health": {"path": "/", "deadline": 120}}
KNOWN = "name, version, kernel, ramdisk, sha256, memory, vcpus, port, cmdline, health"
PLACES = "{address}, {gateway}, {netmask}, {prefix}, {domain}, {port}, {site}, {version}, {mac}"
GONE = object()


def wait_for(cond: Callable[[], object], timeout: float = 15, what: str = "a condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["demo", "a", "site-2", "a" + "b" * 30])
def test_good_site_names(name: str):
    assert names.check_site(name, "x") == name


@pytest.mark.parametrize("name", ["", "Demo", "2demo", "-a", "a_b", "a.b", "a" * 32, "démo", "a\n", 7, None])
def test_bad_site_names(name: object):
    with pytest.raises(Error) as err:
        names.check_site(name, "where")
    assert str(err.value).startswith("where: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("version, ok", [("1.0-abc", True), ("2.0+git.1_x", True), ("A" * 64, True),
                                         ("A" * 65, False), ("current", False), ("previous", False),
                                         (".hidden", False), ("-1", False), ("1/2", False), ("1 0", False),
                                         ("1.0\n", False), ("1'0", False)])
def test_version_names(version: str, ok: bool):
    if ok:
        assert names.check_version(version, "v") == version
    else:
        with pytest.raises(Error, match="^v: .* is not a version name"):
            names.check_version(version, "v")


@pytest.mark.parametrize("fname, ok", [("vmlinuz", True), ("initrd.gz", True), ("www.xen", True),
                                       ("..", False), ("a..b", False), ("../x", False), ("a/b", False),
                                       ("x\"y", False), ("x'y", False), ("x\ny", False), (".x", False),
                                       ("x" * 129, False), ("", False)])
def test_file_names(fname: str, ok: bool):
    if ok:
        assert names.check_file(fname, "f") == fname
    else:
        with pytest.raises(Error, match="is not a plain file name"):
            names.check_file(fname, "f")


# ---------------------------------------------------------------- the manifest validator


def changed(change: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(json.dumps(BASE))
    for key, value in change.items():
        if value is GONE:
            data.pop(key)
        else:
            data[key] = value
    return data


BAD_MANIFESTS = [
    ({"extra": "x"}, f"unknown key 'extra' (known: {KNOWN})"),
    ({"memory": GONE}, "memory is missing"),
    ({"name": "Demo"}, "name: 'Demo' is not a site name (a lower-case letter, then up to 30 lower-case letters, "
                       "digits or '-')"),
    ({"version": "current"}, "version: 'current' is not a version name (a letter or digit, then up to 63 letters, "
                             "digits, '_', '.', '+' or '-'; not 'current' or 'previous')"),
    ({"version": 1.1}, "version: 1.1 must be a string"),
    ({"kernel": "../vmlinuz"}, "kernel: '../vmlinuz' is not a plain file name (a letter or digit, then up to 127 "
                               "letters, digits, '_', '.', '+' or '-': no '/', '..', quotes or control characters)"),
    ({"kernel": 'vm"\niomem = ["0,1"]'}, "kernel: 'vm\"\\niomem = [\"0,1\"]' is not a plain file name"),
    ({"ramdisk": "vmlinuz"}, "ramdisk: 'vmlinuz' is the kernel's file too"),
    ({"sha256": {"vmlinuz": A}}, "sha256: no sha256 for 'initrd.gz'"),
    ({"sha256": {"vmlinuz": A.upper(), "initrd.gz": B}}, f"sha256: vmlinuz: '{A.upper()}' must be 64 lower-case hex"),
    ({"sha256": {"vmlinuz": A, "initrd.gz": B, "other": A}}, "sha256: 'other' is neither the kernel nor the ramdisk"),
    ({"sha256": [A]}, f"sha256: ['{A}'] must be a mapping of file name to sha256"),
    ({"memory": 10**12}, "memory: 1000000000000 must be a whole number of MiB from 16 to 2048"),
    ({"memory": 8}, "memory: 8 must be a whole number of MiB from 16 to 2048"),
    ({"memory": True}, "memory: True must be a whole number of MiB from 16 to 2048"),
    ({"memory": "0x40"}, "memory: '0x40' must be a whole number of MiB from 16 to 2048"),
    ({"memory": 96.0}, "memory: 96.0 must be a whole number of MiB from 16 to 2048"),
    ({"vcpus": -3}, "vcpus: -3 must be a whole number of vcpus from 1 to 4"),
    ({"port": 0}, "port: 0 must be a TCP port from 1 to 65535"),
    ({"cmdline": "ip={nope}"}, f"cmdline: unknown placeholder {{nope}} (known: {PLACES})"),
    ({"cmdline": "ip={address!r}"}, "cmdline: unknown placeholder {address!r}"),
    ({"cmdline": "ip={address.__class__}"}, "cmdline: unknown placeholder {address.__class__}"),
    ({"cmdline": "ip={address:>99}"}, "cmdline: unknown placeholder {address:>99}"),
    ({"cmdline": 'x" iomem = ["0,1"] "'}, "cmdline: 'x\" iomem = [\"0,1\"] \"' must not hold quotes, backslashes, "
                                          "control or non-ASCII characters"),
    ({"cmdline": "a\nirqs = [1]"}, "cmdline: 'a\\nirqs = [1]' must not hold quotes"),
    ({"cmdline": "a\\b"}, "cmdline: 'a\\\\b' must not hold quotes, backslashes"),
    ({"cmdline": "{"}, "cmdline: '{': Single '{' encountered in format string (write a brace as '{{' or '}}')"),
    ({"cmdline": "x" * 1025}, "cmdline: 1025 characters, more than 1024"),
    ({"cmdline": 5}, "cmdline: 5 must be a string"),
    ({"health": "yes"}, "health: 'yes' must be null or a mapping with path and deadline"),
    ({"health": {"path": "http://elsewhere/", "deadline": 9}},
     "health: path: 'http://elsewhere/' must be a URL path: '/' then up to 255 printable ASCII characters, no spaces"),
    ({"health": {"path": "/a b", "deadline": 9}}, "health: path: '/a b' must be a URL path"),
    ({"health": {"path": "/", "deadline": 4}}, "health: deadline: 4 must be a whole number of seconds from 5 to 3600"),
    ({"health": {"path": "/"}}, "health: deadline is missing"),
    ({"health": {"port": 8080, "path": "/", "deadline": 9}}, "health: unknown key 'port' (known: path, deadline)"),
]


@pytest.mark.parametrize("change, message", BAD_MANIFESTS, ids=[m[:40] for _, m in BAD_MANIFESTS])
def test_bad_manifests_are_refused(change: dict[str, Any], message: str):
    with pytest.raises(Error) as err:
        manifest.validate(changed(change), "m.json")
    assert str(err.value).startswith(f"m.json: {message}")
    assert "\n" not in str(err.value), "one line"


@pytest.mark.parametrize("data", [[], "x", None, 3])
def test_a_manifest_is_an_object(data: object):
    with pytest.raises(Error, match=re.escape(f"m.json: must be a JSON object of {KNOWN}")):
        manifest.validate(data, "m.json")


def test_limits_are_the_boards():
    with pytest.raises(Error, match="memory: 96 must be a whole number of MiB from 16 to 64"):
        manifest.validate(BASE, "m.json", max_memory=64)
    with pytest.raises(Error, match="vcpus: 2 must be a whole number of vcpus from 1 to 1"):
        manifest.validate(changed({"vcpus": 2}), "m.json", max_vcpus=1)


def test_defaults_fill_in_and_to_json_round_trips():
    bare = {"name": "demo", "version": "2", "kernel": "www.xen", "sha256": {"www.xen": A}}
    m = manifest.validate(bare, "m.json", {"memory": 32, "vcpus": 1, "port": 8080,
                                           "health": {"path": "/h", "deadline": 30}})
    assert (m.memory, m.port, m.ramdisk, m.cmdline) == (32, 8080, None, DEFAULT_CMDLINE)
    assert m.health == manifest.Health("/h", 30)
    assert manifest.validate(json.loads(manifest.to_json(m)), "again") == m
    assert manifest.validate({**bare, "health": {"path": "/x"}}, "m", {"memory": 32, "vcpus": 1, "port": 1,
                                                                      "health": {"path": "/", "deadline": 7}}
                             ).health == manifest.Health("/x", 7)
    full = manifest.validate(BASE, "m.json")
    assert json.loads(manifest.to_json(full)) == BASE
    with pytest.raises(Error, match="m.json: port is missing"):
        manifest.validate(bare, "m.json", {"memory": 32, "vcpus": 1, "health": None})


def zimage(tag: bytes = b"") -> bytes:
    head = bytearray(0x30)
    head[0x24:0x28] = (0x016F2818).to_bytes(4, "little")
    return bytes(head) + tag


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_check_files(tmp_path: Path):
    d = tmp_path / "1.0"
    d.mkdir()
    kernel, ramdisk = zimage(b"k"), b"ramdisk"
    (d / "vmlinuz").write_bytes(kernel)
    (d / "initrd.gz").write_bytes(ramdisk)
    m = manifest.validate(changed({"sha256": {"vmlinuz": sha(kernel), "initrd.gz": sha(ramdisk)}}), "m")
    manifest.check_files(m, d, "m")
    (d / "initrd.gz").write_bytes(b"tampered")
    with pytest.raises(Error, match=r"^m: initrd.gz: sha256 does not match the manifest \(a broken or changed copy\)$"):
        manifest.check_files(m, d, "m")
    (d / "initrd.gz").unlink()
    (tmp_path / "outside").write_bytes(ramdisk)
    (d / "initrd.gz").symlink_to(tmp_path / "outside")
    with pytest.raises(Error, match=r"^m: initrd.gz: is a symlink \(a version's files are regular files"):
        manifest.check_files(m, d, "m")
    (d / "initrd.gz").unlink()
    os.mkfifo(d / "initrd.gz")
    with pytest.raises(Error, match=f"^m: initrd.gz: {d}/initrd.gz is not a regular file$"):
        manifest.check_files(m, d, "m")
    (d / "initrd.gz").unlink()
    with pytest.raises(Error, match=f"^m: initrd.gz: missing from {d}$"):
        manifest.check_files(m, d, "m")
    notk = b"MZ not a kernel" * 4
    (d / "vmlinuz").write_bytes(notk)
    (d / "initrd.gz").write_bytes(ramdisk)
    m2 = manifest.validate(changed({"sha256": {"vmlinuz": sha(notk), "initrd.gz": sha(ramdisk)}}), "m")
    with pytest.raises(Error, match=r"^m: kernel: vmlinuz is not an ARM zImage"):
        manifest.check_files(m2, d, "m")


def test_read_names_bad_utf8_and_broken_json(tmp_path: Path):
    p = tmp_path / "manifest.json"
    p.write_bytes(b'{"name": "d\xe9mo"}')
    with pytest.raises(Error, match=re.escape(f"{p}: not UTF-8 (byte 0xe9 at offset 11)")):
        manifest.read(p)
    p.write_text('{"name": "demo",')
    with pytest.raises(Error, match=re.escape(f"{p}: not JSON: Expecting property name enclosed in double quotes "
                                              f"(line 1, column 17)")):
        manifest.read(p)
    with pytest.raises(Error, match=re.escape(f"{tmp_path}/nope: cannot read: No such file or directory")):
        manifest.read(tmp_path / "nope")


# ---------------------------------------------------------------- sites.json and the xl config


def sites_json(blue: str = "127.0.0.1", green: str = "127.0.0.2", **site: Any) -> dict[str, Any]:
    return {"visitors": {"bridge": "br0", "address": "10.42.0.1", "prefix": 22, "netmask": "255.255.252.0"},
            "guests": {"bridge": "brg0", "address": "10.42.100.1", "prefix": 24, "netmask": "255.255.255.0"},
            "sites": {"demo": {"names": ["demo.booth"], "address": "10.42.0.2", "port": 80, "memory": 96,
                               "vcpus": 1, "health_path": "/", "deadline": 120, "drain": 0.5,
                               "slots": {"blue": {"address": blue, "mac": "00:16:3e:2a:64:0a"},
                                         "green": {"address": green, "mac": "00:16:3e:2a:64:0b"}},
                               "probe_interval": 0.1, "probe_failures": 2, "stop_grace": 0.5, **site}}}


@pytest.mark.parametrize("text, message", [
    ("{", "not JSON: Expecting property name enclosed in double quotes (line 1, column 2)"),
    (b"\xff", "not UTF-8 (byte 0xff at offset 0)"),
    ("[]", "(top level): [] must be a mapping"),
    (json.dumps({**sites_json(), "more": 1}), "(top level): unknown key 'more' (known: visitors, guests, sites)"),
    (json.dumps({**sites_json(), "guests": {"bridge": "brg0"}}), "guests: address is missing"),
    (json.dumps(sites_json(port=True)), "sites.demo.port: True must be a whole number from 1 to 65535"),
    (json.dumps(sites_json(blue="10.42.100.300")), "sites.demo.slots.blue.address: '10.42.100.300' is not an IPv4"),
    (json.dumps(sites_json(drain="soon")), "sites.demo.drain: 'soon' must be a number of seconds from 0 to 3600"),
    (json.dumps({**sites_json(), "sites": {"Bad": {}}}), "sites: 'Bad' is not a site name"),
])
def test_bad_sites_json(tmp_path: Path, text: str | bytes, message: str):
    p = tmp_path / "sites.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(Error) as err:
        load_settings(p)
    assert str(err.value).startswith(f"{p}: {message}")


@pytest.fixture
def settings_file(tmp_path: Path) -> Path:
    p = tmp_path / "sites.json"
    p.write_text(json.dumps(sites_json()))
    return p


def test_xl_config(settings_file: Path, tmp_path: Path):
    s = load_settings(settings_file)
    site = s.site("demo")
    assert site.slot("green").domain == "demo.green" and site.other(site.slots[0]).name == "green"
    m = manifest.validate(BASE, "m")
    (tmp_path / "store/demo/1.0").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "store/demo/1.0")
    cfg = xl.config(site, site.slot("green"), m, tmp_path / "link", s.guests)
    d = (tmp_path / "store/demo/1.0").resolve()
    assert cfg.splitlines()[1:] == [
        'name = "demo.green"', f'kernel = "{d}/vmlinuz"', f'ramdisk = "{d}/initrd.gz"', "memory = 96", "vcpus = 1",
        "vif = ['mac=00:16:3e:2a:64:0b,bridge=brg0']",
        'extra = "console=hvc0 ip=127.0.0.2::10.42.100.1:255.255.255.0:demo.green:eth0:off appliance.port=80"',
        'on_poweroff = "destroy"', 'on_reboot = "restart"', 'on_crash = "destroy"']


HOSTILE = [
    ("kernel", lambda site, slot, m, g, d: (site, slot, replace(m, kernel='k"\niomem = ["0,1"]'), g, d),
     "xl config: kernel: "),
    ("ramdisk", lambda site, slot, m, g, d: (site, slot, replace(m, ramdisk="r d"), g, d), "xl config: ramdisk: "),
    ("directory", lambda site, slot, m, g, d: (site, slot, m, g, d.parent / 'x"y'), "xl config: kernel: "),
    ("domain", lambda site, slot, m, g, d: (site, replace(slot, domain='demo"\nirqs=[1]'), m, g, d),
     "xl config: name: "),
    ("mac", lambda site, slot, m, g, d: (site, replace(slot, mac="00:16:3e:00:00:01',bridge=br0"), m, g, d),
     "xl config: vif: "),
    ("bridge", lambda site, slot, m, g, d: (site, slot, m, replace(g, bridge="br0']"), d), "xl config: vif: "),
    ("cmdline", lambda site, slot, m, g, d: (site, slot, replace(m, cmdline='a" iomem'), g, d),
     "xl config: demo.blue: extra: "),
    ("value", lambda site, slot, m, g, d: (site, replace(slot, address='1" x'), m, g, d),
     "xl config: demo.blue: extra: "),
    ("newline value", lambda site, slot, m, g, d: (site, slot, m, replace(g, netmask="255\n"), d),
     "xl config: demo.blue: extra: "),
]


@pytest.mark.parametrize("what, spoil, message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_xl_config_refuses_hostile_values(settings_file: Path, tmp_path: Path, what: str, spoil: Any, message: str):
    """Values that bypassed the validator (a Manifest or Slot made by hand) are still refused here."""
    s = load_settings(settings_file)
    site = s.site("demo")
    (tmp_path / "v").mkdir()
    xl.config(site, site.slots[0], manifest.validate(BASE, "m"), tmp_path / "v", s.guests)  # unspoilt: fine
    site_, slot, m, guests, directory = spoil(site, site.slots[0], manifest.validate(BASE, "m"), s.guests,
                                              tmp_path / "v")
    with pytest.raises(Error) as err:
        xl.config(site_, slot, m, directory, guests)
    assert str(err.value).startswith(message)
    assert str(err.value).endswith("could break out of its quotes; refused") or "must not hold" in str(err.value)


# ---------------------------------------------------------------- the store


def make_version(root: Path, version: str, change: dict[str, Any] | None = None, tag: bytes = b"",
                 raw: bytes | None = None) -> Path:
    d = root / "demo" / version
    d.mkdir(parents=True)
    kernel = zimage(tag or version.encode())
    (d / "vmlinuz").write_bytes(kernel)
    m = {"name": "demo", "version": version, "kernel": "vmlinuz", "sha256": {"vmlinuz": sha(kernel)},
         "memory": 32, "vcpus": 1, "port": 80, "health": {"path": "/", "deadline": 5}, **(change or {})}
    (d / "manifest.json").write_bytes(raw if raw is not None else json.dumps(m).encode())
    return d


def test_pointers_are_atomic_under_a_concurrent_reader(tmp_path: Path):
    store = Store(tmp_path, "demo")
    for v in ("1.0", "2.0"):
        make_version(tmp_path, v)
    assert store.make_current("1.0") is None and store.pointer("previous") is None
    seen: set[str] = set()
    missing: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.add(os.readlink(store.dir / "current"))
            except OSError as exc:
                missing.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(300):
        store.set_pointer("current", "2.0" if i % 2 == 0 else "1.0")
    stop.set()
    t.join()
    assert not missing, "a reader found no `current` while it was being replaced"
    assert seen == {"1.0", "2.0"}
    assert store.make_current("2.0") == "1.0"
    assert (store.pointer("current"), store.pointer("previous")) == ("2.0", "1.0")
    assert sorted(p.name for p in store.dir.iterdir()) == ["1.0", "2.0", "current", "previous"]
    with pytest.raises(Error, match="is not a version name"):
        store.set_pointer("current", "../etc")


def test_listing_reports_bad_versions_without_raising(tmp_path: Path):
    store = Store(tmp_path, "demo")
    make_version(tmp_path, "1.0")
    make_version(tmp_path, "2.0", raw=b'{"name": "d\xe9mo"}')
    make_version(tmp_path, "3.0", raw=b'{"name": ')
    make_version(tmp_path, "4.0", {"version": "4.1"})
    make_version(tmp_path, "bad name")
    (tmp_path / "demo" / "5.0").symlink_to(tmp_path / "demo" / "1.0")   # a symlink is not a version
    store.make_current("1.0")
    items = {i["version"]: i for i in store.listing()}
    assert list(items) == ["1.0", "2.0", "3.0", "4.0", "bad name"]
    assert items["1.0"]["ok"] and items["1.0"]["current"] and items["1.0"]["bytes"] == 0x30 + 3
    d = tmp_path / "demo"
    assert items["2.0"] == {"version": "2.0", "current": False, "previous": False, "ok": False,
                            "error": f"{d}/2.0/manifest.json: not UTF-8 (byte 0xe9 at offset 11)"}
    assert items["3.0"]["error"] == (f"{d}/3.0/manifest.json: not JSON: Expecting value (line 1, column 10)")
    assert items["4.0"]["error"] == f"{d}/4.0/manifest.json: version: '4.1' does not match its directory '4.0'"
    assert "is not a version name" in items["bad name"]["error"]


# ---------------------------------------------------------------- the lock


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path):
    with SiteLock(tmp_path, "demo", "switch", "2.0"):
        with pytest.raises(Busy) as err:
            SiteLock(tmp_path, "demo", "switch", "3.0").acquire()
        assert re.fullmatch(rf"site demo: busy: {tmp_path}/demo/lock is held by pid {os.getpid()} \(switch of "
                            r"version 2.0, since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\)", str(err.value)), str(err.value)
        code = ("import sys; from appliance.manager.lock import SiteLock, Busy\n"
                f"try: SiteLock(__import__('pathlib').Path('{tmp_path}'), 'demo', 'x').acquire()\n"
                "except Busy as e: print(e); sys.exit(3)\n")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
        assert p.returncode == 3 and f"held by pid {os.getpid()}" in p.stdout, "another process is refused too"
    with SiteLock(tmp_path, "demo", "switch", "3.0"):
        pass  # released: the next one gets it
    with SiteLock(tmp_path, "other", "switch", "1.0"), SiteLock(tmp_path, "demo", "switch", "1.0"):
        pass  # one lock per site


# ---------------------------------------------------------------- the supervisor, with an xl stand-in

FAKE_XL = """#!{python}
# A stand-in for xl: domains are lines "name kernel" in a file; every call is logged. The supervisor's thread
# and a switch call it at the same time, so each call holds a lock for its read-modify-write and replaces the
# file whole (a reader of a half-written file would write back a list without the running guest).
import fcntl, os, pathlib, re, sys
here = pathlib.Path({here!r})
state, calls = here / "domains", here / "xl-calls"
lock = open(here / "xl.lock", "w")
fcntl.flock(lock, fcntl.LOCK_EX)
doms = dict(l.split(" ", 1) for l in state.read_text().splitlines()) if state.exists() else {{}}
with open(calls, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
cmd, arg = sys.argv[1], (sys.argv[2:] or [""])[0]
if cmd == "create":
    text = pathlib.Path(arg).read_text()
    name = re.search(r'^name = "(.*)"$', text, re.M).group(1)
    kernel = re.search(r'^kernel = "(.*)"$', text, re.M).group(1)
    if b"crash" not in pathlib.Path(kernel).read_bytes():
        doms[name] = kernel
elif cmd == "domid":
    if arg not in doms:
        sys.exit("Can't get domid of domain name " + arg)
    print(7 + sorted(doms).index(arg))
elif cmd in ("destroy", "shutdown"):
    doms.pop(arg, None)
elif cmd == "info":
    print("free_memory            : " + str(512 - 32 * len(doms)))
elif cmd == "list":
    print("Name ID Mem VCPUs State Time(s)")
    print("Domain-0 0 512 2 r----- 1.0")
    for n in doms:
        print(n + " 7 32 1 -b---- 0.1")
(here / "domains.new").write_text("".join(k + " " + v + "\\n" for k, v in doms.items()))
os.replace(here / "domains.new", state)
"""


class FakeNet(Net):
    """The nft map and conntrack, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.map: dict[tuple[str, int], tuple[str, int]] = {}
        self.points: list[tuple[str, int]] = []

    def elements(self) -> dict[tuple[str, int], tuple[str, int]]:
        return dict(self.map)

    def point(self, address: str, port: int, backend: str, backend_port: int) -> None:
        self.map[(address, port)] = (backend, backend_port)
        self.points.append((backend, backend_port))

    def unfinished(self, backend: str, own: str | None = None) -> int:
        return 0


# A conntrack table as `conntrack -L -p tcp --reply-src 10.42.1.10 -o id` prints it: a connect racing the switch
# (its SYN reached the old guest, no answer yet), one whose SYN-ACK is on its way back, one established, one whose
# guest has sent its answer and FIN, and two that are over.
CONNTRACK = "".join(
    f"tcp      6 {timeout} {state} src=10.42.0.{client} dst=10.42.0.2 sport={sport} dport=80 {unreplied}"
    f"src=10.42.1.10 dst=10.42.0.{client} sport=80 dport={sport} {assured}mark=0 use=1 id={cid}\n"
    for timeout, state, client, sport, unreplied, assured, cid in [
        (118, "SYN_SENT", 50, 40001, "[UNREPLIED] ", "", 11),
        (58, "SYN_RECV", 50, 40002, "", "", 12),
        (431999, "ESTABLISHED", 51, 40003, "", "[ASSURED] ", 13),
        (119, "FIN_WAIT", 51, 40004, "", "[ASSURED] ", 14),
        (110, "TIME_WAIT", 52, 40005, "", "[ASSURED] ", 15),
        (9, "CLOSE", 52, 40006, "", "[ASSURED] ", 16),
    ]) + (
    # dom0's own health check (from its address on the guests' bridge), knocking while the guest booted
    "tcp      6 97 SYN_SENT src=10.42.100.1 dst=10.42.1.10 sport=36772 dport=80 [UNREPLIED] src=10.42.1.10 "
    "dst=10.42.100.1 sport=80 dport=36772 mark=0 use=1 id=17\n"
    # and one answered, under way
    "tcp      6 431999 ESTABLISHED src=10.42.100.1 dst=10.42.1.10 sport=40332 dport=80 src=10.42.1.10 "
    "dst=10.42.100.1 sport=80 dport=40332 [ASSURED] mark=0 use=1 id=18\n"
    "conntrack v1.4.7 (conntrack-tools): 8 flow entries have been shown.\n")


def test_a_connection_is_unfinished_until_both_sides_are_done(tmp_path: Path):
    """The drain stops the old guest only when none of its connections is unfinished: a handshake under way counts
    (counting ESTABLISHED alone stopped a guest under a visitor's SYN, whose request then timed out)."""
    table = tmp_path / "table"
    table.write_text(CONNTRACK)
    fake = tmp_path / "conntrack"
    # conntrack's --orig-dst: the first dst= of a line (its other filters are the table's own: one backend)
    fake.write_text(f"#!/bin/sh\nd=; while [ $# -gt 0 ]; do [ \"$1\" = --orig-dst ] && d=$2; shift; done\n"
                    f"awk -v d=\"dst=$d\" '{{for (i = 1; i <= NF; i++) if ($i ~ /^dst=/) {{ if (d == \"dst=\" "
                    f"|| $i == d) print; break }}}}' {table}\n")
    fake.chmod(0o755)
    net = Net(conntrack=str(fake))
    assert net.unfinished("10.42.1.10") == 6
    assert net.unfinished("10.42.1.10", own="10.42.100.1") == 5       # not dom0's unanswered knock
    assert net.connections("10.42.0.2", "10.42.1.10") == ({11, 12, 13, 14, 15, 16}, 4)
    table.write_text("\n".join(line for line in CONNTRACK.splitlines() if "_WAIT" in line or "CLOSE" in line))
    assert net.unfinished("10.42.1.10") == 1
    table.write_text("")
    assert net.unfinished("10.42.1.10") == 0
    fake.write_text("#!/bin/sh\necho 'conntrack v1.4.7 (conntrack-tools): Operation not permitted' >&2\nexit 1\n")
    with pytest.raises(Error, match="conntrack -L -p tcp --reply-src 10.42.1.10 failed: .*Operation not permitted"):
        net.unfinished("10.42.1.10")


class Web(http.server.ThreadingHTTPServer):
    failing = False


@pytest.fixture
def web_server() -> Iterator[Web]:
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503 if self.server.failing else 200)  # type: ignore[attr-defined]
            self.end_headers()
            self.wfile.write(b"hi")

        def log_message(self, *args: Any) -> None:
            pass

    server = Web(("0.0.0.0", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def web(web_server: Web) -> int:
    return int(web_server.server_address[1])


@pytest.fixture
def ctx(tmp_path: Path, settings_file: Path) -> Context:
    fake = tmp_path / "xl"
    fake.write_text(FAKE_XL.format(python=sys.executable, here=str(tmp_path)))
    fake.chmod(0o755)
    c = Context.from_env({"APPLIANCE_SITES": str(settings_file), "APPLIANCE_STORE": str(tmp_path / "store"),
                          "APPLIANCE_RUN": str(tmp_path / "run"), "APPLIANCE_CONSOLE": str(tmp_path / "console"),
                          "APPLIANCE_XL": str(fake)})
    c.net = FakeNet()
    return c


def domains(tmp_path: Path) -> list[str]:
    p = tmp_path / "domains"
    return sorted(line.split()[0] for line in p.read_text().splitlines()) if p.exists() else []


class Running:
    def __init__(self, ctx: Context, **options: Any) -> None:
        self.stop = threading.Event()
        self.sup = SiteSupervisor(ctx, ctx.settings.site("demo"), self.stop, **options)
        self.thread = threading.Thread(target=self.sup.run)

    def __enter__(self) -> SiteSupervisor:
        self.thread.start()
        return self.sup

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(15)
        assert not self.thread.is_alive()
        self.sup.stop_guest()


def state(ctx: Context) -> dict[str, Any]:
    return ctx.read_state(ctx.settings.site("demo"))


def test_supervisor_starts_restarts_and_stops(ctx: Context, tmp_path: Path, web: int):
    store = tmp_path / "store"
    make_version(store, "1.0", {"port": web})
    Store(store, "demo").make_current("1.0")
    with Running(ctx) as sup:
        wait_for(lambda: state(ctx).get("state") == "serving", what="serving")
        assert domains(tmp_path) == ["demo.blue"]
        assert ctx.net.map == {("10.42.0.2", 80): ("127.0.0.1", web)}
        st = state(ctx)
        assert (st["slot"], st["version"], st["domain"], st["note"]) == ("blue", "1.0", "demo.blue", None)
        assert 'name = "demo.blue"' in (tmp_path / "run/demo/blue.cfg").read_text()
        (tmp_path / "domains").write_text("")          # the guest crashes (on_crash=destroy)
        wait_for(lambda: (state(ctx).get("restarts"), state(ctx).get("state")) == (1, "serving"), what="the restart")
        assert domains(tmp_path) == ["demo.blue"]
        assert sup.failures == 1 and sup.delay() == 0, "the first restart is immediate"
        assert "is gone (crashed, shut down or destroyed)" in state(ctx)["error"]
    assert domains(tmp_path) == [] and state(ctx)["state"] == "stopped"
    calls = (tmp_path / "xl-calls").read_text().splitlines()
    assert sum(c.startswith("create ") for c in calls) == 2 and "shutdown demo.blue" in calls


def test_supervisor_restarts_a_guest_that_misses_its_probes(ctx: Context, tmp_path: Path, web_server: Web,
                                                            web: int):
    make_version(tmp_path / "store", "1.0", {"port": web})
    Store(tmp_path / "store", "demo").make_current("1.0")
    with Running(ctx) as sup:
        wait_for(lambda: state(ctx).get("state") == "serving", what="serving")
        web_server.failing = True
        wait_for(lambda: state(ctx).get("state") == "down", what="a restart after missed probes")
        web_server.failing = False
        assert state(ctx)["error"] == (f"demo 1.0 in demo.blue missed 2 health probes at http://127.0.0.1:{web}/ "
                                       f"(HTTP 503)")
        wait_for(lambda: state(ctx).get("state") == "serving", what="serving again")
        assert sup.restarts == 1 and domains(tmp_path) == ["demo.blue"]


def test_supervisor_backs_off_when_a_version_crashes_at_start(ctx: Context, tmp_path: Path):
    make_version(tmp_path / "store", "1.0", tag=b"crash at once")
    Store(tmp_path / "store", "demo").make_current("1.0")
    with Running(ctx, backoff_s=(0, 0.3, 0.6)) as sup:
        wait_for(lambda: state(ctx).get("state") == "backoff" and sup.failures >= 2, what="a backoff")
        st = state(ctx)
        assert st["retry_in"] in (0.3, 0.6)
        assert "demo.blue stopped before it answered at http://127.0.0.1:80/ (it crashed or shut down)" in st["error"]
        assert domains(tmp_path) == []
        wait_for(lambda: sup.failures >= 3, what="it keeps trying")
        assert sup.delay() == 0.6
    site = ctx.settings.site("demo")
    assert [SiteSupervisor(ctx, site, threading.Event(), failures=n).delay() for n in (0, 1, 2, 3, 8, 20)] == [
        0, 0, 5, 10, 300, 300]


def test_a_bad_current_at_boot_serves_previous_and_says_so(ctx: Context, tmp_path: Path, web: int):
    store = Store(tmp_path / "store", "demo")
    make_version(tmp_path / "store", "1.0", {"port": web})
    make_version(tmp_path / "store", "2.0", raw=b"{broken")
    store.make_current("1.0")
    store.make_current("2.0")
    with Running(ctx):
        wait_for(lambda: state(ctx).get("state") == "serving", what="serving")
        st = state(ctx)
        assert st["version"] == "1.0" and st["note"].startswith("serving 1.0, not current 2.0: ")
        assert "2.0/manifest.json: not JSON" in st["note"]
        assert store.pointer("current") == "2.0", "the pointers stay as they are"


def test_a_bad_version_never_stops_the_supervisor(ctx: Context, tmp_path: Path):
    make_version(tmp_path / "store", "1.0", raw=b'{"name": "d\xe9mo"}')
    Store(tmp_path / "store", "demo").make_current("1.0")
    running = Running(ctx, backoff_s=(0, 0.1))
    with running as sup:
        wait_for(lambda: sup.failures >= 3, what="several failed tries")
        assert "manifest.json: not UTF-8" in state(ctx)["error"]
        assert running.thread.is_alive()


def test_the_supervisor_follows_a_switch(ctx: Context, tmp_path: Path, web: int):
    make_version(tmp_path / "store", "1.0", {"port": web})
    make_version(tmp_path / "store", "2.0", {"port": web})
    Store(tmp_path / "store", "demo").make_current("1.0")
    with Running(ctx) as sup:
        wait_for(lambda: state(ctx).get("state") == "serving", what="serving")
        out = switch.switch(ctx, "demo", "2.0")
        assert out["ok"] and (out["from"], out["slot"], out["previous"]) == ("1.0", "green", "1.0")
        assert out["backend"] == f"127.0.0.2:{web}" and out["stopped"] == "demo.blue"
        assert ctx.net.map == {("10.42.0.2", 80): ("127.0.0.2", web)}
        assert domains(tmp_path) == ["demo.green"]
        wait_for(lambda: sup.slot is not None and sup.slot.name == "green", what="the supervisor to follow")
        assert sup.restarts == 0, "the old guest's stop is no crash to the supervisor"
        (tmp_path / "domains").write_text("")
        wait_for(lambda: (state(ctx).get("restarts"), state(ctx).get("state")) == (1, "serving"), what="the restart")
        assert (state(ctx)["slot"], state(ctx)["version"], domains(tmp_path)) == ("green", "2.0", ["demo.green"])
        back = switch.rollback(ctx, "demo")
        assert back["ok"] and back["version"] == "1.0" and back["slot"] == "blue"


def test_a_failed_switch_keeps_the_old_version(ctx: Context, tmp_path: Path, web: int):
    make_version(tmp_path / "store", "1.0", {"port": web})
    make_version(tmp_path / "store", "2.0", tag=b"crash")
    make_version(tmp_path / "store", "3.0", {"memory": 1024})
    (tmp_path / "console").mkdir()
    (tmp_path / "console/guest-demo.green.log").write_text("old boot\n")
    Store(tmp_path / "store", "demo").make_current("1.0")
    with Running(ctx):
        wait_for(lambda: state(ctx).get("state") == "serving", what="serving")
        with pytest.raises(Error) as err:
            switch.switch(ctx, "demo", "2.0")
        assert str(err.value).startswith("site demo: version 2.0 in demo.green stopped before it answered")
        assert str(err.value).endswith("; 1.0 keeps serving from demo.blue")
        with pytest.raises(Error, match=r"needs 1024 MiB and Xen has 480 MiB free \(out of memory\); 1.0 keeps"):
            switch.switch(ctx, "demo", "3.0")
        assert domains(tmp_path) == ["demo.blue"] and ctx.net.map[("10.42.0.2", 80)] == ("127.0.0.1", web)
        assert Store(tmp_path / "store", "demo").pointer("current") == "1.0"


# ---------------------------------------------------------------- the command line


def cli(tmp_path: Path, *args: str, xl_cmd: str = "/bin/false") -> tuple[int, dict[str, Any], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "APPLIANCE_SITES": str(tmp_path / "sites.json"),
           "APPLIANCE_STORE": str(tmp_path / "store"), "APPLIANCE_RUN": str(tmp_path / "run"),
           "APPLIANCE_CONSOLE": str(tmp_path / "console"), "APPLIANCE_XL": xl_cmd, "APPLIANCE_NFT": "/bin/false",
           "APPLIANCE_CONNTRACK": "/bin/false"}
    p = subprocess.run([sys.executable, str(ENTRY), *args], capture_output=True, text=True, env=env, check=False)
    assert "Traceback" not in p.stderr + p.stdout
    return p.returncode, json.loads(p.stdout), p.stderr


def test_cli_on_a_broken_sites_json(tmp_path: Path):
    (tmp_path / "sites.json").write_text('{"visitors": ')
    for args in (["status"], ["list"], ["switch", "demo", "1.0"], ["run"], ["config", "demo"]):
        rc, out, _ = cli(tmp_path, *args)
        assert rc == 1 and out == {"ok": False, "error": f"{tmp_path}/sites.json: not JSON: Expecting value "
                                                         f"(line 1, column 14)"}, args


def test_cli_lists_bad_versions_and_switch_refuses_them(tmp_path: Path, settings_file: Path):
    store = tmp_path / "store"
    make_version(store, "1.0")
    make_version(store, "2.0", raw=b'{"name": "d\xe9mo"}')
    make_version(store, "3.0", raw=b'{"name": "demo", ')
    Store(store, "demo").make_current("1.0")
    rc, out, _ = cli(tmp_path, "list")
    assert rc == 0 and out["sites"]["demo"]["current"] == "1.0"
    assert [(v["version"], v["ok"]) for v in out["sites"]["demo"]["versions"]] == [
        ("1.0", True), ("2.0", False), ("3.0", False)]
    rc, out, _ = cli(tmp_path, "list", "demo")
    assert rc == 0 and out["site"] == "demo" and len(out["versions"]) == 3
    for v, error in (("2.0", "not UTF-8 (byte 0xe9 at offset 11)"),
                     ("3.0", "not JSON: Expecting property name enclosed in double quotes (line 1, column 18)")):
        rc, out, _ = cli(tmp_path, "switch", "demo", v)
        assert rc == 1 and out == {"ok": False, "error": f"{store}/demo/{v}/manifest.json: {error}"}
    rc, out, _ = cli(tmp_path, "switch", "demo", "9.0")
    assert out["error"] == f"{store}/demo/9.0: no such version of site demo (have: 1.0, 2.0, 3.0)"
    rc, out, _ = cli(tmp_path, "switch", "nosite", "1.0")
    assert out["error"] == f"{settings_file}: no site 'nosite' (sites: demo)"
    rc, out, _ = cli(tmp_path, "switch", "demo", "../../etc")
    assert rc == 1 and "is not a version name" in out["error"]
    rc, out, _ = cli(tmp_path, "rollback", "demo")
    assert out["error"] == f"{store}/demo/previous: site demo has no previous version to go back to"
    rc, out, _ = cli(tmp_path, "frobnicate")
    assert rc == 1 and out["error"].startswith("appliance-guest: argument cmd: invalid choice: 'frobnicate'")


def test_cli_status_and_config(tmp_path: Path, settings_file: Path):
    make_version(tmp_path / "store", "1.0")
    Store(tmp_path / "store", "demo").make_current("1.0")
    rc, out, _ = cli(tmp_path, "config", "demo")
    assert rc == 0 and out["version"] == "1.0" and 'name = "demo.blue"' in out["config"]
    rc, out, _ = cli(tmp_path, "status")
    assert rc == 1 and out["sites"]["demo"]["current"] == "1.0" and out["sites"]["demo"]["running"] is False
    rc, out, _ = cli(tmp_path, "status", "demo")
    assert rc == 1 and out["site"] == "demo" and out["ok"] is False


def test_the_manager_imports_only_the_standard_library():
    code = ("import sys; import appliance.manager.cli, appliance.manager.manifest\n"
            "mods = [m for m in sys.modules if m.startswith('appliance') and not m.startswith('appliance.manager')]\n"
            "assert mods == ['appliance'], mods\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('yaml', 'jinja2', 'invoke', 'paramiko')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    assert NetSettings  # the settings' Net is a plain dataclass the host can build too


# ---------------------------------------------------------------- the boot: systemd told when the guests are up


def test_the_rest_of_the_boot_goes_on_once_the_always_on_sites_have_started(ctx: Context, tmp_path: Path, web: int):
    from appliance.manager.supervisor import when_started

    make_version(tmp_path / "store", "1.0", {"port": web})
    Store(tmp_path / "store", "demo").make_current("1.0")
    told: list[tuple[str, bool]] = []
    with Running(ctx) as sup:
        waiter = threading.Thread(target=when_started, args=([sup], 60, sup.stop,
                                                             lambda why: told.append((why, sup.booted))))
        waiter.start()
        waiter.join(30)
        assert told == [("every always-on site started", True)]
        assert state(ctx)["state"] == "serving"


def test_the_rest_of_the_boot_waits_no_longer_than_the_deadline(ctx: Context):
    from appliance.manager.supervisor import when_started

    never = SiteSupervisor(ctx, ctx.settings.site("demo"), threading.Event())    # not running: never starts
    told: list[str] = []
    t0 = time.monotonic()
    when_started([never], 0.3, threading.Event(), told.append)
    assert told == ["still starting after 0.3 s: demo"] and 0.3 <= time.monotonic() - t0 < 5
    failed = SiteSupervisor(ctx, ctx.settings.site("demo"), threading.Event(), failures=1)
    when_started([failed], 60, threading.Event(), told.append)       # a failed first start counts as started
    when_started([], 60, threading.Event(), told.append)
    assert told[1:] == ["every always-on site started", "no always-on site"]


def test_systemd_is_told_on_its_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import socket

    from appliance.manager.supervisor import notify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False                       # not started by systemd: nothing to tell
    for where, bind in ((str(tmp_path / "notify"), str(tmp_path / "notify")),
                        (f"@appliance-test-{os.getpid()}", f"\0appliance-test-{os.getpid()}")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(bind)
            monkeypatch.setenv("NOTIFY_SOCKET", where)
            assert notify("READY=1\nSTATUS=up") is True
            assert s.recv(100) == b"READY=1\nSTATUS=up"
    assert notify("READY=1", str(tmp_path / "nobody")) is False      # says why in its log line, never raises


def test_xl_is_the_running_xens_own(tmp_path: Path):
    version, lib = tmp_path / "version", tmp_path / "lib"
    version.mkdir()
    (version / "major").write_text("4\n")
    (version / "minor").write_text("17\n")
    assert xl.direct("xl", version, lib) == "xl"                     # that Xen's tools are not installed
    own = lib / "xen-4.17/bin/xl"
    own.parent.mkdir(parents=True)
    own.write_text("#!/bin/sh\n")
    own.chmod(0o755)
    assert xl.direct("xl", version, lib) == str(own)
    assert xl.direct("/opt/xl-standin", version, lib) == "/opt/xl-standin"   # a command of the user's is kept
    (version / "minor").write_text("17/../../x\n")
    assert xl.direct("xl", version, lib) == "xl"
    assert xl.direct("xl", tmp_path / "no-hypervisor", lib) == "xl"


def test_the_idle_look_runs_below_the_rest_of_dom0(tmp_path: Path):
    """The once-a-second conntrack look of each serving on-demand site gives way to everything else on dom0's one
    CPU (at boot the visitors' path waited for it); the drain's look is not lowered."""
    seen = tmp_path / "niceness"
    fake = tmp_path / "conntrack"
    fake.write_text(f"#!/bin/sh\nnice >> {seen}\n")
    fake.chmod(0o755)
    net = Net(conntrack=str(fake))
    assert net.connections("10.42.0.2", "10.42.1.10") == (set(), 0)
    base = os.nice(0)
    net.unfinished("10.42.1.10")
    assert [int(n) for n in seen.read_text().split()] == [min(19, base + 20), base]


def test_libxenctrl_is_used_only_on_xen_and_never_for_a_stand_in(tmp_path: Path):
    """The paused wake's one library call happens on Xen's dom0 only; elsewhere (and for the namespace double's xl
    stand-in, whatever the host) xl does the unpause."""
    assert xl.XenCtrl.here(tmp_path / "no-hypervisor") is None
    (tmp_path / "type").write_text("kvm\n")
    assert xl.XenCtrl.here(tmp_path / "type") is None
    standin = xl.Xl(f"{sys.executable} /nonexistent/xl_standin.py")
    with pytest.raises(Error, match="xl unpause demo.blue failed"):
        standin.unpause("demo.blue", 7)
    assert standin._ctrl is None


NFT_PROBE = r"""
import json, sys
from appliance.manager.net import Net
from appliance.manager.errors import Error
n = Net(sys.argv[1])
n._nft("flush ruleset\ntable inet appliance {\n map svc { type ipv4_addr . inet_service : ipv4_addr . inet_service; }\n}\n",
       "setup")
seen = []
n.point("10.42.0.2", 80, "10.42.100.10", 80)
seen.append(sorted(n.elements().items()))
n.point("10.42.0.2", 80, "10.42.100.11", 8080)          # moved: the old element goes in the same batch
n.point("10.42.0.3", 80, "10.42.100.12", 80)
seen.append(sorted(n.elements().items()))
n.remove("10.42.0.2", 80)
seen.append(sorted(n.elements().items()))
try:
    n._nft("add element inet appliance nosuch { 10.0.0.1 . 80 : 10.0.0.2 . 80 }\n", "a missing map")
except Error as exc:
    seen.append(str(exc).split(":")[0])
print(json.dumps({"lib": n._lib is not None, "seen": seen}))
"""


@pytest.mark.root
def test_the_map_moves_the_same_by_libnftables_as_by_the_nft_command(tmp_path: Path):
    """The manager's plain `nft` is the library (no process on a visitor's way); a command of its own (a stand-in,
    here the same nft by its path) runs as a process. Both move, list and refuse alike, in a namespace of their own."""
    ns = f"appl-nft-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        got = {}
        for nft in ("nft", "/usr/sbin/nft"):
            p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", NFT_PROBE, nft], cwd=ROOT,
                               capture_output=True, text=True, check=False, timeout=60)
            assert p.returncode == 0, p.stderr
            got[nft] = json.loads(p.stdout)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert got["nft"]["lib"] and not got["/usr/sbin/nft"]["lib"]
    assert got["nft"]["seen"] == got["/usr/sbin/nft"]["seen"] == [
        [[["10.42.0.2", 80], ["10.42.100.10", 80]]],
        [[["10.42.0.2", 80], ["10.42.100.11", 8080]], [["10.42.0.3", 80], ["10.42.100.12", 80]]],
        [[["10.42.0.3", 80], ["10.42.100.12", 80]]],
        "nft -f - (a missing map) failed"]


def test_no_netfilter_socket_means_the_nft_command_not_the_library(monkeypatch):
    """libnftables exits the whole process when it cannot open its socket (qemu-user has none: the image tier runs
    the board's manager in a chroot), so the manager asks for one first and uses the command where there is none."""
    from appliance.manager import net as net_mod

    def refused(*args: object) -> None:
        raise OSError(93, "Protocol not supported")
    monkeypatch.setattr(net_mod.socket, "socket", refused)
    assert net_mod.NftLib.here() is None
    assert Net()._lib is None
