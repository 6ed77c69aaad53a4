"""The build: a list of steps, recipe -> rootfs -> configure -> guest -> initramfs -> boot files -> image -> outputs.

Every step's `verify` runs before any step's `run` (`--dry-run` stops there), like debos's actions; what a step
computes once is kept on the Context for the steps after it (see step.py and context.py). Outputs are written
under temporary names and renamed when complete, and the workspace is removed however the build ends, so a failed
or interrupted build leaves neither a half image where a finished one belongs nor its tree in memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from .. import ROOT, config, default_cache, log, work_dir
from ..config import Config, default_out_dir, load
from ..errors import ToolError
from ..identity import derive
from . import rootfs
from .bootfiles import BootFiles
from .configure import Configure
from .context import Context, Outputs, shm_dir, workspace
from .guest import Guest
from .image import Image
from .initramfs import Initramfs
from .outputs import WriteOutputs
from .rootfs import Rootfs
from .rootfs import clean as clean_cache
from .step import Step

__all__ = ["STEPS", "Context", "Outputs", "Step", "build", "clean", "verify"]

STEPS: tuple[Step, ...] = (Rootfs(), Configure(), Guest(), Initramfs(), BootFiles(), Image(), WriteOutputs())


def host_tools(steps: Sequence[Step] = STEPS) -> list[str]:
    return list(dict.fromkeys(t for s in steps for t in s.tools))


def source_date_epoch(cfg: Config) -> int:
    """SOURCE_DATE_EPOCH from the environment, else the recipe, else the last git commit."""
    if os.environ.get("SOURCE_DATE_EPOCH", "").isdigit():
        return int(os.environ["SOURCE_DATE_EPOCH"])
    if cfg.recipe.source_date_epoch is not None:
        return cfg.recipe.source_date_epoch
    try:
        out = subprocess.run(["git", "-C", str(cfg.root), "log", "-1", "--format=%ct"], capture_output=True,
                             text=True, check=True).stdout.strip()
        return int(out)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return int(cfg.recipe_path.stat().st_mtime)


def verify(recipe: str, authorized_keys: str | None = None, *, out_dir: Path | None = None,
           cache: str | Path | None = None, steps: Sequence[Step] = STEPS, native: bool = True,
           login: bool = True, dry_run: bool = True) -> Context:
    """Check the recipe, board, overlays, templates, bundles and host tools, running every step's verify;
    build nothing. The context holds what the verifies computed. dry_run=False: checks that a build makes anyway
    with fresher data are left to it (the packages, against the index it reads)."""
    cfg = load(recipe, cache=Path(cache) if cache else None)
    missing = [t for t in host_tools(steps) if not shutil.which(t, path=log.clean_env()["PATH"])]
    if missing:
        raise ToolError(f"host tools missing: {', '.join(missing)}", hint="run ./setup.sh")
    out = out_dir or default_out_dir(cfg.recipe_path, cfg.root)
    ctx = Context(cfg, derive(cfg.digest), source_date_epoch(cfg), out, workspace(cfg), time.monotonic(),
                  authorized_keys=authorized_keys, native=native, login=login, dry_run=dry_run)
    for s in steps:
        s.verify(ctx)
    return ctx


@contextlib.contextmanager
def exclusive(work: Path) -> Iterator[None]:
    """One build at a time per checkout (or cache): they share the rootfs cache and the workspace."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another build in this checkout to finish…")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build(recipe: str = "booth", *, dry_run: bool = False, authorized_keys: str | None = None,
          out_dir: Path | None = None, cache: str | Path | None = None,
          steps: Sequence[Step] = STEPS, native: bool = True, login: bool = True) -> Outputs | None:
    """Build a recipe's image into out_dir (default: build/), using the cache (default: default_cache()). The image
    trusts `authorized_keys`, else the recipe's, else the user's own key; none with login=False. native=False makes
    a missing base tree the slow way (see rootfs.ensure): the benchmark's baseline."""
    start = time.monotonic()
    with log.timings({}) as durations:
        with log.step(f"Checking recipe {recipe}, its boards, overlays, templates and host tools"):
            ctx = verify(recipe, authorized_keys, out_dir=out_dir, cache=cache, steps=steps, native=native,
                         login=login, dry_run=dry_run)
            ctx.start, ctx.durations = start, durations
            cfg = ctx.cfg
            if ctx.keys is None and ctx.keyless and ctx.login:
                log.warn(f"the image will trust no SSH key ({ctx.keyless}), so nobody can log in to it: give one "
                         "with --authorized-keys FILE, or make a keyless image on purpose with --no-login")
            log.info(f"{cfg.image_name}: board {cfg.board.name} (+ {', '.join(b.name for b in cfg.also) or 'none'}),"
                     f" {cfg.recipe.suite}/{cfg.board.arch}, SOURCE_DATE_EPOCH={ctx.sde}")
        if dry_run:
            log.info(f"dry run: the recipe, boards, overlays and templates check out; nothing was built. "
                     f"{cfg.image_name} would be:")
            for line in summary(ctx):
                log.info(f"  {line}")
        else:
            with exclusive(cfg.work):
                run(ctx, steps)
    if ctx.keys is None and ctx.keyless:        # the last line, where it cannot be missed
        log.warn(f"{config.rel(ctx.outputs().img)} trusts no SSH key ({ctx.keyless}): nobody can log in to it, "
                 "so deploy, status and emulate --check cannot reach it", again=True)
    return None if dry_run else ctx.outputs()


def summary(ctx: Context) -> list[str]:
    """What the build makes, in a few lines (as `mkosi summary`), from what the verifies computed."""
    from .. import keys
    from .guest import static_dir

    cfg, rec = ctx.cfg, ctx.cfg.recipe
    sites = []
    for i, s in enumerate(rec.sites):
        folder = static_dir(cfg, i)
        shipped = folder is not None and folder.parent == cfg.root / "guest"
        how = (f"bundle {rec.sites[i].bundle}" if s.bundle else f"the tool's {folder.name} site" if shipped and folder
               else f"static {config.rel(folder)}" if folder else "the demo game")
        sites.append(f"{s.name} ({how}{', on demand' if s.on_demand else ''})")
    w = rec.wifi
    trusted = keys.fingerprints(ctx.keys) if ctx.keys else []
    return [
        f"board:    {cfg.board.name}" + (f" (also boots {', '.join(b.name for b in cfg.also)})" if cfg.also else ""),
        f"suite:    {rec.suite} {cfg.board.arch} ({', '.join(rec.components)}), {len(rootfs.packages(cfg))} "
        f"packages ({len(rec.packages)} of the recipe's)",
        f"sites:    {', '.join(sites)}",
        f"wifi:     '{w.ssid}', " + ("open" if w.open else "WPA2") + f", channel {w.channel}, {w.country}",
        "login:    " + (f"root by SSH key: {', '.join(trusted)}" if trusted else f"none ({ctx.keyless or 'not checked'})"),
        f"image:    {config.rel(ctx.outputs().img)}",
    ]


def run(ctx: Context, steps: Sequence[Step] = STEPS) -> None:
    """Run the verified steps. However they end, the workspace goes; unless they all succeed, so do the partial
    outputs, and the last finished image stays as it was."""
    _drop_partial(ctx.out_dir)
    try:
        with _terminate_as_exit():
            for title, group in itertools.groupby(steps, key=lambda s: s.title):
                with log.step(title) if title else contextlib.nullcontext():
                    for s in group:
                        s.run(ctx)
    except BaseException:
        _drop_partial(ctx.out_dir)
        raise
    finally:
        remove_workspace(ctx.work)


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM (a CI timeout, `kill`) ends the build as Ctrl-C does, through the cleanup, not past it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def remove_workspace(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):
        work.parent.rmdir()       # the checkout's folder of workspaces, when no other image's is in it


def _drop_partial(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in out_dir.glob(".*.partial"):
        p.unlink()


def clean(everything: bool = False, root: Path = ROOT, cache: str | Path | None = None) -> None:
    """Drop the cache's entries the build made (never the rest of its folder), the workspaces, and with
    `everything` the outputs; after any build running in this checkout has finished."""
    cached = Path(cache) if cache else default_cache(root)
    work = work_dir(root, cached)
    with log.step("Dropping caches" + (" and outputs" if everything else "")), exclusive(work):
        clean_cache(cached)
        shutil.rmtree(work / ".work", ignore_errors=True)
        shutil.rmtree(shm_dir(root), ignore_errors=True)
        if everything:
            shutil.rmtree(work, ignore_errors=True)
