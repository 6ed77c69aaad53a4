"""One lock per site, /run/appliance/sites/<site>/lock (fcntl.flock): whoever starts a guest of the site holds
it, the switch and the supervisor alike, so they never fight. A deploy holds deploy.lock the same way from its
upload to its prune. The holder writes its pid, what it does and since
when into the file, and a refused caller names them.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from types import TracebackType

from .errors import Error


class Busy(Error):
    """The site's lock is held by another process."""


class SiteLock:
    def __init__(self, run: Path, site: str, what: str, version: str | None = None, wait: float = 0.0,
                 name: str = "lock") -> None:
        self.path = run / site / name   # "lock": whoever starts a guest; "deploy.lock": a deploy, all through
        self.site, self.what, self.version, self.wait = site, what, version, wait
        self.fd: int | None = None

    def holder(self) -> str:
        """Who holds the lock, from what it wrote (it writes right after taking it: retry briefly)."""
        for _ in range(20):
            try:
                info = json.loads(self.path.read_text() or "null")
            except (OSError, ValueError):
                info = None
            if isinstance(info, dict):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
                return (f"pid {info.get('pid')} ({info.get('what')} of version {info.get('version')}, since "
                        f"{since})")
            time.sleep(0.01)
        return "a process that wrote nothing in it"

    def acquire(self) -> SiteLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise Error(f"{self.path}: cannot open the site's lock: {exc.strerror}") from None
        end = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= end:
                    os.close(fd)
                    raise Busy(f"site {self.site}: busy: {self.path} is held by {self.holder()}") from None
                time.sleep(0.02)
        info = {"pid": os.getpid(), "what": self.what, "version": self.version, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        return self

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
