"""A booth folder outside the checkout builds for real (image tier, from the cached base tree): its own overlay,
static site and WPA2 passphrase are in the image, which goes to build/ beside the recipe.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from conftest import extract_root
from test_recipe_folder import booth_folder

from appliance import build
from appliance.bundles import STORE

pytestmark = pytest.mark.image


def test_a_booth_folder_outside_the_checkout_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     test_key: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("APPLIANCE_WIFI_PASSPHRASE", raising=False)
    recipe = booth_folder(tmp_path / "my booth")
    out = build.build(str(recipe), authorized_keys=str(test_key.with_suffix(".pub")))
    assert out is not None and out.img.parent == recipe.parent / "build"
    assert (recipe.parent / "build" / "latest").resolve() == out.img
    root = extract_root(out.img, tmp_path / "rootfs")
    assert (root / "etc/motd").read_text() == "my booth\n"                       # the folder's own overlay
    assert "wpa_passphrase=a passphrase of mine\n" in (root / "etc/hostapd/appliance.conf").read_text()
    about = root / STORE / "about" / "current"                                  # the folder's own static site
    assert about.resolve().name.startswith("site-")
    assert b"<h1>mine</h1>\n" in gzip.decompress((about / "initrd.gz").read_bytes())
    out.img.unlink()          # 1 GB of sparse image: the outputs that matter were checked
