"""Logging, timed steps, progress and the one `run()` helper every host command goes through.

`step("Doing X")` prints what is being done, indents what happens inside it, and prints how long it
took; inside `timings(d)` the durations are also kept in d (the build's context, for its manifest). Progress bars fit the
terminal and redraw at most 5 times a second; off a TTY (CI, a log) they are a plain line every 10 %.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from .errors import ToolError

DEBUG = bool(os.environ.get("APPLIANCE_DEBUG"))
_depth = 0
_timings: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("timings", default=None)
_again: list[str] = []
HEARTBEAT = 60.0        # seconds between the "still working" lines of a long quiet command (mmdebstrap)


def set_debug(on: bool) -> None:
    global DEBUG
    DEBUG = on


def info(message: str) -> None:
    print(f"{'  ' * _depth}{message}", file=sys.stderr, flush=True)


def warn(message: str, *, again: bool = False) -> None:
    """Warn now; with `again`, the task's last line repeats it (see again())."""
    info(f"WARNING: {message}")
    if again:
        _again.append(message)


def again() -> list[str]:
    """The warnings to repeat in the task's last line (and forget them)."""
    out = list(_again)
    _again.clear()
    return out


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


def _stream(cmd: list[str], env: Mapping[str, str] | None, cwd: Path | None, *, every: float | None = None,
            say: Callable[[str], None] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a long command, keeping its last lines for an error message. Its own lines are shown (indented) only
    when debugging; a line every `every` seconds (HEARTBEAT) says it is still at work, so a log is never silent."""
    say = say or info
    tail: deque[bytes] = deque(maxlen=20)
    with subprocess.Popen(cmd, env=clean_env(env), cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        out = proc.stdout

        def pump() -> None:
            for raw in out:
                tail.append(raw)
                if DEBUG:
                    say(f"  | {raw.decode(errors='replace').rstrip()}")

        reader = threading.Thread(target=pump, name=f"{Path(cmd[0]).name} output", daemon=True)
        start = time.monotonic()
        reader.start()
        while True:
            reader.join(every or HEARTBEAT)
            if not reader.is_alive():
                break
            last = tail[-1].decode(errors="replace").strip()[:60] if tail and not DEBUG else ""
            say(f"  … {Path(cmd[0]).name} still working ({_duration(time.monotonic() - start)})"
                + (f", last: {last}" if last else ""))
    return subprocess.CompletedProcess(cmd, proc.returncode, b"", b"".join(tail))


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m} min {s} s" if m else f"{s} s"


class Progress:
    """A progress bar with rate and ETA that fits the terminal and redraws at most `REDRAW` times a second on a
    TTY; elsewhere a plain line every 10 %. `clock`, `stream`, `tty` and `width` are there for the tests."""

    REDRAW = 5

    def __init__(self, label: str, total: int, unit: str = "MiB", scale: int = 1 << 20, *,
                 clock: Callable[[], float] = time.monotonic, stream: TextIO | None = None,
                 tty: bool | None = None, width: int | None = None) -> None:
        self.label, self.total, self.unit, self.scale = label, max(total, 1), unit, scale
        self.clock, self.stream = clock, stream or sys.stderr
        self.done = 0
        self.start = clock()
        self.tty = (sys.stderr.isatty() and sys.stdout.isatty()) if tty is None else tty
        self.width = width
        self._last_pct = -10
        self._drawn = -1.0     # when the bar was last drawn
        self._shown = 0        # the length of what was last drawn, to blank its tail

    def update(self, n: int) -> None:
        self.done += n
        pct = min(100, self.done * 100 // self.total)
        now = self.clock()
        rate = self.done / self.scale / max(now - self.start, 1e-6)
        if self.tty:
            if self._drawn < 0 or now - self._drawn >= 1 / self.REDRAW or self.done >= self.total:
                self._drawn = now
                self._draw(pct, rate)
        elif pct - pct % 10 > self._last_pct:       # the first update, then each 10 % passed
            self._last_pct = pct - pct % 10
            line = (f"{self.label}: {pct}% ({self.done // self.scale} of {self.total // self.scale} {self.unit},"
                    f" {rate:.1f} {self.unit}/s)")
            print(f"{'  ' * _depth}{line}", file=self.stream, flush=True)

    def _draw(self, pct: int, rate: float) -> None:
        # one column short of the width: a line that reaches the last column wraps on some terminals, and \r then
        # returns to the wrapped line's start, leaving one line per redraw
        width = (self.width or shutil.get_terminal_size((80, 24)).columns) - 1
        left = (self.total - self.done) / self.scale / rate if rate > 0 else 0.0
        head = f"{'  ' * _depth}{self.label} "
        tail = f" {pct:3d}% {rate:6.1f} {self.unit}/s ETA {left:4.0f} s"
        room = width - len(head) - len(tail) - 2
        if room < 10:       # narrow: drop the label first, then the bar
            head, room = "", width - len(tail) - 2
        text = (head + (f"[{'#' * (pct * room // 100):<{room}}]" if room >= 10 else "") + tail)[:width]
        self.stream.write("\r" + text.ljust(self._shown))
        self._shown = len(text)
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            if self._drawn >= 0:
                self.stream.write("\n")
            self.stream.flush()
