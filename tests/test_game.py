"""The demo guest's 2048: its rules (guest/site/rules.js) tested in node (tests/game/*.test.js, node's own runner),
and the files the guest needs to serve it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from appliance import ROOT

pytestmark = pytest.mark.unit


def test_rules_in_node() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (./setup.sh installs Debian's nodejs)")
    run = subprocess.run([node, "--test", "tests/game/"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False)
    if run.returncode != 0:
        pytest.fail(f"node --test tests/game/ failed ({run.returncode}):\n{run.stdout}{run.stderr}", pytrace=False)
    assert "# pass " in run.stdout and "# fail 0" in run.stdout, run.stdout


def test_page_loads_only_local_files() -> None:
    """The guest serves only its own files: the page names no other host, and loads the rules before the game."""
    site = ROOT / "guest" / "site"
    page = (site / "index.html").read_text()
    assert page.index('src="/rules.js"') < page.index('src="/game.js"')
    for name in ("index.html", "game.js", "rules.js"):
        text = (site / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name
