"""Invoke tasks: thin wrappers that parse options and call into `appliance`.

Every library error is an ApplianceError; it is printed here as one line (`appliance: ERROR: …`)
and turned into a non-zero exit. `--debug` (or APPLIANCE_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from invoke import Collection, Exit, task

from appliance import log
from appliance.errors import ApplianceError


def _cli(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a task body, printing ApplianceError as one line unless --debug."""

    @functools.wraps(fn)
    def wrapper(c: Any, *args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug")) or bool(os.environ.get("APPLIANCE_DEBUG"))
        log.set_debug(debug)
        try:
            return fn(c, *args, **kwargs)
        except ApplianceError as exc:
            if debug:
                raise
            raise Exit(f"appliance: ERROR: {exc}", code=1) from None
        except KeyboardInterrupt:
            raise Exit("appliance: interrupted", code=130) from None

    return wrapper


@task(help={"recipe": "recipe name under recipes/ or a path (default: booth)",
            "dry_run": "check recipe, board, overlays, templates and host tools; build nothing",
            "authorized_keys": "an SSH public key file to install for root",
            "debug": "show commands and tracebacks"})
@_cli
def build(c, recipe="booth", dry_run=False, authorized_keys=None, debug=False):
    """Build the SD-card image of a recipe (default: booth) into build/."""
    from appliance import build as b

    b.build(recipe, dry_run=dry_run, authorized_keys=authorized_keys)


@task(help={"all": "also drop downloaded packages and built images"})
@_cli
def clean(c, all=False, debug=False):
    """Drop the build caches (and with --all, the outputs too)."""
    from appliance import build as b

    b.clean(everything=all)


@task(positional=["device"],
      help={"device": "the card's whole disk, e.g. /dev/sdb (default: choose among removable disks)",
            "image": ".img, .img.xz, .img.gz or .img.zst to write (default: build/latest, the last built)",
            "bmap": "block map to write by (default: the image's .bmap; without one, a full write)",
            "yes": "do not ask for confirmation", "force": "also write a disk that is not removable",
            "to_file": "DEVICE is an image file to write, not a card",
            "debug": "show commands and tracebacks"})
@_cli
def flash(c, device=None, image=None, bmap=None, yes=False, force=False, to_file=False, debug=False):
    """Write an image to an SD card: checked, sparse and verified."""
    from pathlib import Path

    from appliance import flash as f

    f.flash(Path(image) if image else f.default_image(), Path(device) if device else None,
            bmap=Path(bmap) if bmap else None, yes=yes, force=force, to_file=to_file)


@task(help={"tier": "unit, image, system or all (default)", "pytest_args": "extra pytest arguments"})
def test(c, tier="all", pytest_args=""):
    """Run the test suite: every tier by default."""
    marker = "" if tier == "all" else f"-m {tier}"
    c.run(f"{sys.executable} -m pytest {marker} {pytest_args}", pty=False)


ns = Collection(build, clean, test, flash)
