"""The wheel carries the tool's own files (board/ overlays/ recipes/ guest/) inside the package, as
appliance/data/, for an installed tool (`pip install .`, pipx) to build from any folder. Wheels and sdists hold
no symlinks (an sdist would even copy the build host's file a link names), and the overlays are full of them: they
go into a table, symlinks.json, read back by appliance.shipped_links. An editable install reads the checkout."""

import json
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

TOP = Path(__file__).resolve().parent
DATA = ("board", "overlays", "recipes", "guest")     # = appliance.DATA (setup.py cannot import the package)
LINKS = "symlinks.json"                              # = appliance.LINKS


def links() -> dict[str, str]:
    """The symlinks under DATA (path -> target): the table an sdist carries, else the checkout's own links."""
    if (TOP / LINKS).is_file():
        table: dict[str, str] = json.loads((TOP / LINKS).read_text())
        return table
    found = {}
    for top in DATA:
        for here, dirs, files in os.walk(TOP / top):
            for name in dirs + files:
                if (Path(here) / name).is_symlink():
                    found[str((Path(here) / name).relative_to(TOP))] = os.readlink(Path(here) / name)
    return dict(sorted(found.items()))


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        table = links()
        dest = Path(self.build_lib) / "appliance" / "data"
        shutil.rmtree(dest, ignore_errors=True)
        for top in DATA:
            if not (TOP / top).is_dir():
                raise SystemExit(f"setup.py: {TOP / top} is missing: the package would have no {top}/")
            for here, dirs, files in os.walk(TOP / top):
                dirs[:] = [d for d in dirs if d != "__pycache__"]
                for name in files:
                    src = Path(here) / name
                    rel = str(src.relative_to(TOP))
                    if rel not in table and not src.is_symlink():
                        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(src, dest / rel)
        (dest / LINKS).write_text(json.dumps(table, indent=1) + "\n")


class Sdist(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        table = links()
        for rel in table:                      # what sdist made of a link: gone, the table says what it was
            p = Path(base_dir) / rel
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        (Path(base_dir) / LINKS).write_text(json.dumps(table, indent=1) + "\n")


# setuptools' scratch out of build/ itself, where the images are
setup(cmdclass={"build_py": BuildPy, "sdist": Sdist}, options={"build": {"build_base": "build/.wheel"}})
