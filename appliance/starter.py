"""`init DIR`: a booth folder of one's own to start from: a recipe naming the sites the tool ships, a static site of
its own to edit, and a short README. Written beside DIR and renamed into place, so DIR is whole or absent.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from . import ROOT
from .errors import RecipeError

RECIPE = "booth.yaml"

SITES = """\
sites:                                   # what visitors reach; the first is where every unknown name leads
  - name: home                           # your own site: edit the files in site/ (a folder with an index.html)
    names: [home.booth]
    address: 10.42.0.2                   # the service address, outside the DHCP range
    static: ./site                       # a path is relative to this folder
    memory_mib: 64
  - name: demo                           # the game the tool ships, woken when a visitor asks
    names: [demo.booth]
    address: 10.42.0.3
    on_demand: {idle: 120, stop: destroy}
  - name: about                          # a bare name not in this folder: the site the tool ships
    names: [about.booth]
    address: 10.42.0.4
    static: about
    memory_mib: 64
  - name: make
    names: [make.booth]
    address: 10.42.0.5
    static: make
    memory_mib: 64
    on_demand: {idle: 120, stop: pause}
"""

INDEX = """\
<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{name}</title></head>
<body>
<h1>Welcome to {name}</h1>
<p>This page is <code>site/index.html</code> in your booth folder. Edit it, add pages and pictures beside it,
and build again, or send it to a running board with <code>appliance deploy --host root@HOST --site home --static site</code>.</p>
</body>
</html>
"""

README = """\
# {name}

A booth folder: `booth.yaml` is the recipe, `site/` the static site visitors land on (the `home` site).
From this folder:

    appliance build --recipe booth.yaml --dry-run   # check it: one line per mistake, then a summary
    appliance build --recipe booth.yaml             # the image goes to build/ here (build/latest)
    appliance flash /dev/sdX --hostname NAME        # build/latest onto a card
    appliance emulate --log build/console.log       # or boot it under QEMU: prints how to log in and deploy
    appliance deploy --host root@NAME.local --site home --static site   # this site to a running board

(From the tool's checkout: `invoke build --recipe {recipe}`.)

Paths in the recipe are this folder's: `static: ./site`, a passphrase file, a bundle. A bare name is looked
for here first and is otherwise the tool's own: `overlays: [base, booth, NAME]` takes `overlays/NAME/` from
this folder if there is one (files copied into the image; `.j2` files are Jinja2 templates), and
`static: about` is the tool's about site unless this folder has an `about/`.
"""


def _name(folder: Path) -> str:
    """The recipe's name (so the image's, cubieboard2-NAME.img) from the folder's, when it makes a valid one."""
    name = re.sub(r"[^a-z0-9-]+", "-", folder.name.lower()).strip("-")[:31]
    return name if re.fullmatch(r"[a-z0-9][a-z0-9-]*", name) else "booth"


def recipe_text(name: str) -> str:
    """The shipped booth recipe, with its comments, as this folder's: its name, and the sites above."""
    text = (ROOT / "recipes" / "booth.yaml").read_text()
    head, _, _ = text.partition("\nsites:")
    head = re.sub(r"^name: .*$", f"name: {name}", head, count=1, flags=re.M)
    body = head.split("\nname:", 1)[1]
    return (f"# {name}: a booth of one's own, made by `appliance init` from the shipped recipe (recipes/booth.yaml).\n"
            f"name:{body}\n{SITES}")


def init(folder: Path) -> Path:
    """Write a starter booth folder at `folder` (absent or empty); the recipe's path."""
    folder = folder.absolute()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise RecipeError(f"{folder}: already exists and is not an empty folder (init writes a new booth folder)")
    name = _name(folder)
    tmp = folder.with_name(f".{folder.name}.init-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "site").mkdir(parents=True)
        (tmp / RECIPE).write_text(recipe_text(name))
        (tmp / "site" / "index.html").write_text(INDEX.format(name=name))
        (tmp / "README.md").write_text(README.format(name=name, recipe=folder / RECIPE))
        if folder.exists():
            folder.rmdir()
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / RECIPE
