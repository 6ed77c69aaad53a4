"""Logging, timed steps, progress and the one `run()` helper every host command goes through.

`step("Doing X")` prints what is being done, indents what happens inside it, and prints how long it
took; inside `timings(d)` the durations are also kept in d (the build's context, for its manifest). Progress bars are drawn only when
stderr is a TTY; elsewhere (CI) plain lines are printed at most every few percent.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from .errors import ToolError

DEBUG = bool(os.environ.get("APPLIANCE_DEBUG"))
_depth = 0
_timings: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("timings", default=None)


def set_debug(on: bool) -> None:
    global DEBUG
    DEBUG = on


def info(message: str) -> None:
    print(f"{'  ' * _depth}{message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    info(f"WARNING: {message}")


def debug(message: str) -> None:
    if DEBUG:
        info(message)


@contextlib.contextmanager
def timings(into: dict[str, float]) -> Iterator[dict[str, float]]:
    """Keep the duration of every step() run inside this block in `into`, by title."""
    token = _timings.set(into)
    try:
        yield into
    finally:
        _timings.reset(token)


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    """Announce, indent and time one piece of work."""
    global _depth
    info(f"▸ {title}")
    start = time.monotonic()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        took = time.monotonic() - start
        kept = _timings.get()
        if kept is not None:
            kept[title] = round(took, 2)
        info(f"  ✓ {title} ({took:.1f} s)" if sys.exc_info()[0] is None else f"  ✗ {title} ({took:.1f} s)")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": os.environ.get("HOME", "/root"),
    }
    for key in ("SOURCE_DATE_EPOCH", "TMPDIR", "http_proxy", "https_proxy"):
        if key in os.environ:
            env[key] = os.environ[key]
    env.update(extra or {})
    return env


def run(
    argv: Sequence[str | Path],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    capture: bool = True,
    input: bytes | None = None,
    check: bool = True,
    what: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run one host command from an argv list; raise ToolError with the tail of its stderr on failure.

    Output is captured (and shown when debugging) unless `capture` is False, when it streams through
    with each line prefixed by the step's indent.
    """
    cmd = [str(a) for a in argv]
    debug(f"+ {shlex.join(cmd)}")
    try:
        if capture:
            proc = subprocess.run(
                cmd, env=clean_env(env), cwd=cwd, input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True, check=False,
            )
            if DEBUG and proc.stderr:
                for line in proc.stderr.decode(errors="replace").splitlines()[-20:]:
                    info(f"  | {line}")
        else:
            proc = _stream(cmd, env, cwd)
    except FileNotFoundError as exc:
        raise ToolError(f"{cmd[0]} is not installed on this machine.", hint="run ./setup.sh") from exc
    if check and proc.returncode != 0:
        tail = (proc.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        detail = " / ".join(line.strip() for line in tail) or f"exit status {proc.returncode}"
        raise ToolError(f"{what or cmd[0]} failed: {detail}")
    return proc


def _stream(cmd: list[str], env: Mapping[str, str] | None, cwd: Path | None) -> subprocess.CompletedProcess[bytes]:
    """Stream a long command's output, indented, keeping the last lines for an error message."""
    tail: list[bytes] = []
    with subprocess.Popen(cmd, env=clean_env(env), cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            tail = (tail + [raw])[-20:]
            info(f"  | {raw.decode(errors='replace').rstrip()}")
    return subprocess.CompletedProcess(cmd, proc.returncode, b"", b"".join(tail))


class Progress:
    """A progress bar with rate and ETA on a TTY, plain percentage lines otherwise."""

    def __init__(self, label: str, total: int, unit: str = "MiB", scale: int = 1 << 20) -> None:
        self.label, self.total, self.unit, self.scale = label, max(total, 1), unit, scale
        self.done = 0
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty() and sys.stdout.isatty()
        self._last_pct = -1

    def update(self, n: int) -> None:
        self.done += n
        pct = min(100, self.done * 100 // self.total)
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = self.done / self.scale / elapsed
        if self.tty:
            left = (self.total - self.done) / self.scale / rate if rate > 0 else 0.0
            bar = "#" * (pct * 30 // 100)
            sys.stderr.write(f"\r{'  ' * _depth}{self.label} [{bar:<30}] {pct:3d}% "
                             f"{rate:6.1f} {self.unit}/s ETA {left:4.0f} s")
            sys.stderr.flush()
        elif pct >= self._last_pct + 10 or (pct == 100 and self._last_pct != 100):
            self._last_pct = pct
            info(f"{self.label}: {pct}% ({self.done // self.scale} of {self.total // self.scale} {self.unit},"
                 f" {rate:.1f} {self.unit}/s)")

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
