"""One lock per site, /run/appliance/sites/<site>/lock (fcntl.flock): whoever starts a guest of the site holds
it, the switch and the supervisor alike, so they never fight. A deploy holds deploy.lock the same way from its
upload to its prune. The holder writes its pid, what it does and since when into the file, and a refused caller
names them; a deploy session also writes when it last heard from its client, so a holder gone silent can be taken
over (and any holder that is not mid-step broken with --break-lock).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import Error

KILL_WAIT_S = 10.0      # a holder told to go (SIGTERM) gets this long before SIGKILL


class Busy(Error):
    """The site's lock is held by another process."""


def _when(t: object) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t if isinstance(t, (int, float)) else 0))


def describe(info: dict[str, Any]) -> str:
    """pid N (what of version V, since T), as a refusal or a takeover names a holder."""
    return (f"pid {info.get('pid')} ({info.get('what')} of version {info.get('version')}, since "
            f"{_when(info.get('since'))})")


def _alive(pid: object) -> bool:
    if type(pid) is not int or pid <= 1:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SiteLock:
    def __init__(self, run: Path, site: str, what: str, version: str | None = None, wait: float = 0.0,
                 name: str = "lock", idle: float | None = None, break_lock: bool = False) -> None:
        self.path = run / site / name   # "lock": whoever starts a guest; "deploy.lock": a deploy, all through
        self.site, self.what, self.version, self.wait = site, what, version, wait
        self.idle = idle                # a holder silent this long (and not mid-step) may be taken over
        self.break_lock = break_lock
        self.fd: int | None = None
        self.notes: list[str] = []      # what acquiring did to an earlier holder, said to the user
        self._info: dict[str, Any] = {}

    def info(self) -> dict[str, Any] | None:
        """What the holder wrote (it writes right after taking the lock: retry briefly)."""
        for _ in range(20):
            try:
                info = json.loads(self.path.read_text() or "null")
            except (OSError, ValueError):
                info = None
            if isinstance(info, dict):
                return info
            time.sleep(0.01)
        return None

    def holder(self) -> str:
        info = self.info()
        return describe(info) if info else "a process that wrote nothing in it"

    def _stale(self, info: dict[str, Any]) -> str | None:
        """Why the holder counts as gone: silent for longer than its own idle time, and not mid-step."""
        idle, active = info.get("idle"), info.get("active")
        if not isinstance(idle, (int, float)) or not isinstance(active, (int, float)) or info.get("op"):
            return None
        silent = time.time() - active
        return f"silent for {silent:.0f} s, more than its {idle:g} s" if silent > idle else None

    def _take(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _evict(self, fd: int, info: dict[str, Any]) -> bool:
        """Tell the holder to go (SIGTERM; a stopped one is continued first), then SIGKILL; whether the lock came."""
        pid = info.get("pid")
        for sig, wait in ((signal.SIGTERM, KILL_WAIT_S), (signal.SIGKILL, KILL_WAIT_S)):
            if not _alive(pid):
                break
            assert isinstance(pid, int)
            try:
                os.kill(pid, sig)
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            end = time.monotonic() + wait
            while time.monotonic() < end:
                if self._take(fd):
                    return True
                time.sleep(0.05)
        end = time.monotonic() + 2
        while time.monotonic() < end:
            if self._take(fd):
                return True
            time.sleep(0.05)
        return False

    def acquire(self) -> SiteLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise Error(f"{self.path}: cannot open the site's lock: {exc.strerror}") from None
        end = time.monotonic() + self.wait
        while not self._take(fd):
            if time.monotonic() < end:
                time.sleep(0.02)
                continue
            info = self.info() or {}
            why = self._stale(info)
            if why or self.break_lock:
                if info.get("op"):
                    os.close(fd)
                    raise Busy(f"site {self.site}: busy: {self.path} is held by {describe(info)}, which is in its "
                               f"{info['op']} step; --break-lock never cuts a step, it ends on its own") from None
                if self._evict(fd, info):
                    self.notes.append(f"site {self.site}: took over {self.path} from {describe(info)}: "
                                      + (why or "broken with --break-lock"))
                    break
                os.close(fd)
                raise Busy(f"site {self.site}: busy: {self.path} is held by {describe(info)}, which did not end "
                           f"when told to") from None
            os.close(fd)
            hint = "; if that deploy is gone, run yours with --break-lock" if self.idle is not None else ""
            raise Busy(f"site {self.site}: busy: {self.path} is held by "
                       f"{describe(info) if info else 'a process that wrote nothing in it'}{hint}") from None
        left = self._left(fd)
        if left and not self.notes:
            self.notes.append(f"site {self.site}: {self.path} was left by {describe(left)}, which is gone")
        self.fd = fd
        self._info = {"pid": os.getpid(), "what": self.what, "version": self.version, "since": time.time()}
        if self.idle is not None:
            self._info.update(idle=self.idle, active=time.time(), op=None)
        self._write()
        return self

    @staticmethod
    def _left(fd: int) -> dict[str, Any] | None:
        """What a holder that died without releasing (SIGKILL, a power cut) left in the file."""
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            return None
        return info if isinstance(info, dict) and info.get("pid") != os.getpid() else None

    def _write(self) -> None:
        if self.fd is not None:
            data = (json.dumps(self._info) + "\n").encode()
            os.pwrite(self.fd, data, 0)
            os.ftruncate(self.fd, len(data))

    def touch(self, op: str | None = None) -> None:
        """A deploy session heard from its client (op: the step it now runs, None when it waits again)."""
        if self.idle is not None:
            self._info.update(active=time.time(), op=op)
            self._write()

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> SiteLock:
        return self.acquire()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
