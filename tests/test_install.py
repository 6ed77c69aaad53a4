"""The tool installed from its wheel (`pip install .`, pipx), away from the checkout: it carries its own board/,
overlays/, recipes/ and guest/ (the symlinks as a table) and checks a booth folder from any directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from appliance import ROOT

# What a build reads of the tool's own files, as a JSON line: the rendered overlays of a recipe (path, mode, link,
# digest) and the demo guest's files (a probe's link as the file it names).
PROBE = """
import hashlib, json, sys
import appliance
from appliance import config
from appliance.build import configure, guest
from appliance.identity import derive
cfg = config.load(sys.argv[1])
ctx = configure.context(cfg, derive(cfg.digest), need_secrets=False)
print(json.dumps({
    "root": str(appliance.ROOT), "checkout": appliance.checkout(),
    "overlays": [[f.rel, oct(f.mode), f.link,
                  None if f.data is None else hashlib.sha256(f.data).hexdigest()]
                 for f in configure.render_overlays(cfg, ctx)],
    "guest": {rel: hashlib.sha256(p.read_bytes()).hexdigest() for rel, p in guest.demo_files(appliance.ROOT).items()},
}))
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from the checkout, unpacked as pip installs it (its dependencies are this venv's)."""
    tmp = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(tmp / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("appliance-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], check=True,
                   capture_output=True)
    return tmp / "site"


def installed(site: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """`appliance …` of the installed copy alone: not the checkout's (which this venv has on its path)."""
    home = cwd / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("APPLIANCE_DEBUG", "XDG_CACHE_HOME", "SSH_AUTH_SOCK")}
    env.update(PYTHONPATH=str(site), HOME=str(home))
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.mark.unit
def test_the_installed_tool_checks_a_booth_folder_from_anywhere(site: Path, tmp_path: Path) -> None:
    assert not (site / "appliance" / "data" / "build").exists()
    init = installed(site, tmp_path, "-m", "appliance", "init", "mybooth")
    assert init.returncode == 0, init.stderr
    dry = installed(site, tmp_path / "mybooth", "-m", "appliance", "build", "--recipe", "booth.yaml", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "  image:    build/cubieboard2-mybooth.img" in dry.stderr.splitlines()
    shipped = installed(site, tmp_path, "-m", "appliance", "build", "--dry-run")      # the recipe it ships
    assert shipped.returncode == 0, shipped.stderr
    for task in ("bench", "test"):              # the checkout's own, which write into its build/
        refused = installed(site, tmp_path, "-m", "appliance", task)
        assert (refused.returncode, refused.stderr.splitlines()[-1:]) == (1, [
            f"appliance: ERROR: the {'benchmarks run' if task == 'bench' else 'test suite runs'} from a checkout"
            f"{' (into its build/bench/)' if task == 'bench' else ''}; {site}/appliance/data is not one"]), refused
    assert not (site / "appliance" / "data" / "build").exists()     # nothing written into the installed package
    assert not (tmp_path / "home" / ".cache" / "appliance" / "rootfs").exists()


@pytest.mark.unit
def test_the_installed_copy_builds_from_the_same_files_as_the_checkout(site: Path, tmp_path: Path) -> None:
    """Same overlays (symlinks included, from the wheel's table) and the same demo guest files, byte for byte."""
    there = installed(site, tmp_path, "-c", PROBE, "booth")
    assert there.returncode == 0, there.stderr
    theirs = json.loads(there.stdout)
    ours = json.loads(subprocess.run([sys.executable, "-c", PROBE, "booth"], cwd=ROOT, capture_output=True,
                                     text=True, check=True).stdout)
    assert (theirs["root"], theirs["checkout"]) == (str(site / "appliance" / "data"), False)
    assert (ours["root"], ours["checkout"]) == (str(ROOT), True)
    assert sum(1 for f in ours["overlays"] if f[2]) > 30      # links, as git keeps them
    assert theirs["overlays"] == ours["overlays"]
    assert theirs["guest"] == ours["guest"] and "probes/success.txt" in ours["guest"]
    assert hashlib.sha256(b"").hexdigest() not in ours["guest"].values()


@pytest.mark.unit
def test_a_wheel_made_from_the_sdist_carries_the_same_files(site: Path, tmp_path: Path) -> None:
    """The sdist replaces each link with the table (it would copy the file a link names, even the build host's
    own /lib/systemd/system/…), and a wheel made from it holds what the checkout's wheel holds."""
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "sdist")], cwd=ROOT, check=True,
                   capture_output=True)
    (sdist,) = (tmp_path / "sdist").glob("appliance-*.tar.gz")
    subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", "wheel", "--no-deps", "-w",
                    str(tmp_path / "dist"), str(sdist)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("appliance-*.whl")
    with zipfile.ZipFile(wheel) as z:
        from_sdist = {n.removeprefix("appliance/data/"): hashlib.sha256(z.read(n)).hexdigest()
                      for n in z.namelist() if n.startswith("appliance/data/")}
    data = site / "appliance" / "data"
    ours = {str(p.relative_to(data)): hashlib.sha256(p.read_bytes()).hexdigest() for p in data.rglob("*")
            if p.is_file()}
    assert from_sdist == ours
    assert "overlays/booth/etc/resolv.conf" in json.loads((data / "symlinks.json").read_text())
