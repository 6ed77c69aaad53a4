"""The build's driver: every step's verify runs before any step's run, `--dry-run` runs only the verifies, step
durations land on the build's context, and a failed, interrupted or terminated build removes its workspace
(tmpfs or disk) and its partial outputs. The steps here are stand-ins; the real ones are built in the image tier.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import ROOT, build, log
from appliance.build.context import Context
from appliance.build.step import Step
from appliance.config import load
from appliance.errors import BuildError
from appliance.identity import derive

pytestmark = pytest.mark.unit
WORKSPACES = {"tmpfs": Path("/dev/shm"), "disk": None}


class Recorder(Step):
    def __init__(self, name: str, calls: list[str], title: str | None = None) -> None:
        self.name, self.calls, self.title = name, calls, title

    def verify(self, ctx: Context) -> None:
        self.calls.append(f"verify {self.name}")

    def run(self, ctx: Context) -> None:
        self.calls.append(f"run {self.name}")
        with log.step(f"inner of {self.name}"):
            pass


class MakesFiles(Step):
    """Fills the workspace and leaves a partial output, as a real build does before its outputs are complete."""

    name = "makes files"

    def run(self, ctx: Context) -> None:
        (ctx.work / "rootfs/etc").mkdir(parents=True)
        (ctx.work / "rootfs/etc/hostname").write_text("booth\n")
        (ctx.out_dir / f".{ctx.cfg.image_name}.img.partial").write_bytes(b"half an image")


class Fails(Step):
    def __init__(self, exc: BaseException) -> None:
        self.name, self.exc = "fails", exc

    def run(self, ctx: Context) -> None:
        raise self.exc


def _workspaces(tmp_path: Path, where: str) -> Path:
    return (WORKSPACES[where] or tmp_path) / f"appliance-test-{tmp_path.parent.name}-{tmp_path.name}"


def context(tmp_path: Path, where: str) -> Context:
    cfg = load("booth")
    return Context(cfg, derive(cfg.digest), 0, tmp_path / "out", _workspaces(tmp_path, where) / cfg.image_name,
                   time.monotonic())


@pytest.fixture(autouse=True)
def _no_leftovers(tmp_path: Path) -> Iterator[None]:
    """A failing test must not leave its tree in memory either."""
    yield
    shutil.rmtree(_workspaces(tmp_path, "tmpfs"), ignore_errors=True)


def test_every_verify_runs_before_any_run_and_dry_run_runs_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_WIFI_PASSPHRASE", "a passphrase for the test")
    calls: list[str] = []
    steps = [Recorder("a", calls), Recorder("b", calls, "B and C"), Recorder("c", calls, "B and C")]
    assert build.build("booth", dry_run=True, steps=steps) is None
    assert calls == ["verify a", "verify b", "verify c"]


def test_steps_run_in_order_and_their_durations_are_the_contexts(tmp_path: Path) -> None:
    calls: list[str] = []
    ctx = context(tmp_path, "disk")
    steps = [Recorder("a", calls), Recorder("b", calls, "B and C"), Recorder("c", calls, "B and C")]
    with log.timings(ctx.durations):
        build.run(ctx, steps)
    assert calls == ["run a", "run b", "run c"]
    assert list(ctx.durations) == ["inner of a", "inner of b", "inner of c", "B and C"]   # B and C share a step
    with log.step("outside any build"):
        pass
    assert "outside any build" not in ctx.durations


@pytest.mark.parametrize("where", WORKSPACES)
@pytest.mark.parametrize("exc", [BuildError("simulated failure"), KeyboardInterrupt()], ids=["failed", "interrupted"])
def test_a_failed_or_interrupted_build_removes_its_workspace(tmp_path: Path, where: str, exc: BaseException) -> None:
    ctx = context(tmp_path, where)
    with pytest.raises(type(exc)):
        build.run(ctx, [MakesFiles(), Fails(exc)])
    assert not ctx.work.exists() and not ctx.work.parent.exists()
    assert list(ctx.out_dir.iterdir()) == []       # the partial image is gone too


def test_a_finished_build_removes_its_workspace(tmp_path: Path) -> None:
    ctx = context(tmp_path, "tmpfs")
    build.run(ctx, [MakesFiles()])
    assert not ctx.work.parent.exists()


# Run by the test below as a process of its own: a build whose second step waits until it is terminated.
_TERMINATED = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_build import MakesFiles, Step, build, context

class Waits(Step):
    name = "waits"
    def run(self, ctx):
        print(ctx.work, flush=True)
        sys.stdin.read()          # until the test's end of the pipe closes; the SIGTERM comes first
        raise AssertionError("not terminated")

build.run(context(Path(sys.argv[2]), sys.argv[3]), [MakesFiles(), Waits()])
"""


@pytest.mark.parametrize("where", WORKSPACES)
def test_a_terminated_build_removes_its_workspace(tmp_path: Path, where: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _TERMINATED, str(ROOT / "tests"), str(tmp_path), where],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None and proc.stdin is not None
    work = Path(proc.stdout.readline().strip())
    assert (work / "rootfs/etc/hostname").exists()      # the build is under way
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    proc.stdin.close()
    assert not work.exists() and not work.parent.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_the_xz_is_the_same_bytes_however_it_is_made(tmp_path, monkeypatch):
    """The .xz of an image: the same bytes from an empty chunk cache with one worker or many, and from a warm cache,
    and it decompresses to the image (a series of independent streams, one per chunk)."""
    import lzma
    import random

    from appliance.build import compress

    rng = random.Random(14)
    data = b"".join(bytes(rng.randrange(4) for _ in range(1 << 16)) * 40 + bytes(1 << 20) for _ in range(3))
    image = tmp_path / "a.img"
    image.write_bytes(data)
    made = []
    for workers, cache in ((1, "one"), (8, "many"), (8, "many")):
        monkeypatch.setattr(compress.os, "cpu_count", lambda n=workers: n)
        out = tmp_path / f"{cache}-{len(made)}.xz"
        compress.xz(image, out, tmp_path / cache)
        made.append(out.read_bytes())
    assert made[0] == made[1] == made[2]
    assert lzma.decompress(made[0]) == data
    assert compress.xz(image, tmp_path / "again.xz", tmp_path / "many") == (2, 0)   # all from the cache
