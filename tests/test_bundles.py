"""Guest bundles on the host: a bare zImage or a directory with guest.yaml, checked by the board's own validator
before anything is laid into a site's store; hostile and broken bundles refused with one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from appliance import ROOT, bundles, config
from appliance.build.guest import install
from appliance.errors import GuestError

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def zimage(tag: bytes = b"") -> bytes:
    head = bytearray(0x30)
    head[0x24:0x28] = (0x016F2818).to_bytes(4, "little")
    return bytes(head) + tag


SITE = config.SiteSpec()


def test_a_bare_zimage_is_a_bundle(tmp_path: Path):
    k = tmp_path / "mirage-www.xen"
    k.write_bytes(zimage(b"unikernel"))
    m, folder = bundles.read_bundle(k, SITE)
    assert m.name == SITE.name and m.version.startswith("mirage-www-") and m.kernel == "mirage-www.xen"
    assert folder == tmp_path and m.ramdisk is None
    assert (m.memory, m.vcpus, m.port) == (SITE.memory_mib, SITE.vcpus, SITE.port), "the site fills in the rest"


def _user_recipe(tmp_path: Path, bundle: str) -> config.Config:
    text = f"name: u\nboard: cubieboard2\noverlays: [base, booth]\nwifi: {{open: true}}\n" \
           f"sites:\n  - name: mine\n    bundle: {bundle}\n"
    (tmp_path / "u.yaml").write_text(text)
    return config.load(str(tmp_path / "u.yaml"))


def test_install_a_user_bundle(tmp_path: Path):
    bundle = tmp_path / "mybundle"
    bundle.mkdir()
    (bundle / "kernel.xen").write_bytes(zimage(b"mine"))
    (bundle / "guest.yaml").write_text(f"name: mine\nversion: '7'\nkernel: kernel.xen\nmemory: 48\nsha256:\n"
                                       f"  kernel.xen: {bundles.sha256(bundle / 'kernel.xen')}\n")
    cfg = _user_recipe(tmp_path, "mybundle")
    tree = tmp_path / "tree"
    assert install(cfg, None, tree) == {"mine": "7"}
    store = tree / bundles.STORE / "mine"
    assert os.readlink(store / "current") == "7"
    assert sorted(p.name for p in (store / "7").iterdir()) == ["kernel.xen", "manifest.json"]
    m = json.loads((store / "7/manifest.json").read_text())
    assert m["memory"] == 48 and m["vcpus"] == 1 and m["port"] == 80
    assert m["health"] == {"path": "/", "deadline": 120}
    assert (tree / bundles.MANAGER / "appliance/manager/manifest.py").is_file(), "the board gets the same validator"
    bundles.check(cfg)
    (bundle / "kernel.xen").write_bytes(b"no zImage here" * 4)
    with pytest.raises(GuestError, match="sha256"):
        bundles.check(cfg)
    with pytest.raises(GuestError, match="sha256"):
        install(cfg, None, tree)
    assert os.readlink(store / "current") == "7" and (store / "7/kernel.xen").read_bytes() == zimage(b"mine")


@pytest.mark.parametrize("kernel", ["../../escaped", "a\"b\niomem = [ '0x0,1' ]", "/etc/passwd", ".."])
def test_a_hostile_bundle_is_refused_before_anything_is_copied(tmp_path: Path, kernel: str):
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "guest.yaml").write_text(json.dumps({"name": "x", "version": "1", "kernel": kernel,
                                                   "sha256": {kernel: "0" * 64}}))
    cfg = _user_recipe(tmp_path, "b")
    tree = tmp_path / "deep" / "tree"
    with pytest.raises(GuestError, match="kernel"):
        install(cfg, None, tree)
    assert not (tree / bundles.STORE).exists() and not (tmp_path / "escaped").exists()


def test_a_broken_guest_yaml_is_one_line(tmp_path: Path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "guest.yaml").write_bytes(b"name: 'unclosed\n")
    with pytest.raises(GuestError, match=r"guest.yaml: not valid YAML at line \d"):
        bundles.read_bundle(bundle, SITE)
    (bundle / "guest.yaml").write_bytes(b"name: caf\xe9\n")
    with pytest.raises(GuestError, match="guest.yaml: not UTF-8 text"):
        bundles.read_bundle(bundle, SITE)


def test_a_missing_bundle_is_named(tmp_path: Path):
    cfg = _user_recipe(tmp_path, "nowhere")
    with pytest.raises(GuestError) as err:
        bundles.check(cfg)
    assert str(err.value) == f"{tmp_path}/u.yaml: sites[0].bundle: no such file or directory {tmp_path}/nowhere"
    bundles.check(config.load("booth"))  # the demo's sources are all there
