"""The wheel carries the tool's own files (board/ overlays/ recipes/ guest/) inside the package, as
appliance/data/, for an installed tool (`pip install .`, pipx) to build from any folder. A wheel holds no
symlinks, and the overlays are full of them (git keeps them): they go into data/symlinks.json, read back by
appliance.shipped_links. An editable install reads the checkout itself."""

import json
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

TOP = Path(__file__).resolve().parent
DATA = ("board", "overlays", "recipes", "guest")     # = appliance.DATA (setup.py cannot import the package)


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "appliance" / "data"
        shutil.rmtree(dest, ignore_errors=True)
        links: dict[str, str] = {}
        for top in DATA:
            for here, dirs, files in os.walk(TOP / top):
                dirs[:] = [d for d in dirs if d != "__pycache__"]
                for name in dirs + files:
                    src = Path(here) / name
                    rel = str(src.relative_to(TOP))
                    if src.is_symlink():
                        links[rel] = os.readlink(src)
                    elif src.is_file():
                        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(src, dest / rel)
        (dest / "symlinks.json").write_text(json.dumps(dict(sorted(links.items())), indent=1) + "\n")


# setuptools' scratch out of build/ itself, where the images are
setup(cmdclass={"build_py": BuildPy}, options={"build": {"build_base": "build/.wheel"}})
