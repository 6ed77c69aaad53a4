"""A site's store on the board: /var/lib/appliance/sites/<site>/<version>/ (manifest.json and its files) and the
`current` and `previous` symlinks, each replaced by one rename and an fsync of the directory, so a power cut
leaves the old pointer or the new one, never neither. A bad version is listed as bad; it never raises there.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import manifest
from .errors import Error
from .names import MANIFEST, POINTERS, check_version

ROOT = "/var/lib/appliance/sites"     # the board's stores, a site's in ROOT/<site>/ (APPLIANCE_STORE to move it)


def sync_dir(path: Path) -> None:
    """fsync a directory, so a rename in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Store:
    root: Path      # the store of every site
    site: str

    @property
    def dir(self) -> Path:
        return self.root / self.site

    def versions(self) -> list[str]:
        """Every version directory's name, valid or not (a bad name is listed, and refused when loaded)."""
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise Error(f"{self.dir}: cannot list the store: {exc.strerror}") from None
        return sorted(e.name for e in entries
                      if e.is_dir(follow_symlinks=False) and not e.name.startswith(".") and e.name not in POINTERS)

    def pointer(self, which: str) -> str | None:
        try:
            target = os.readlink(self.dir / which)
        except (FileNotFoundError, OSError):
            return None
        return target.rstrip("/").rsplit("/", 1)[-1] or None

    def set_pointer(self, which: str, version: str) -> None:
        if which not in POINTERS:
            raise Error(f"{self.dir}: {which!r} is not a pointer (pointers: {', '.join(POINTERS)})")
        check_version(version, f"{self.dir}/{which}")
        tmp = self.dir / f".{which}.{os.getpid()}"
        try:
            tmp.unlink(missing_ok=True)
            os.symlink(version, tmp)
            os.replace(tmp, self.dir / which)
            sync_dir(self.dir)
        except OSError as exc:
            raise Error(f"{self.dir}/{which}: cannot point it at {version}: {exc.strerror}") from None

    def make_current(self, version: str) -> str | None:
        """version becomes current and the old current previous; returns the old current. previous is written
        first: a power cut between the two leaves current as it was."""
        old = self.pointer("current")
        if old and old != version:
            self.set_pointer("previous", old)
        self.set_pointer("current", version)
        return old

    def load(self, version: str, defaults: dict[str, Any] | None = None, **limits: int) -> manifest.Manifest:
        """One version's manifest, checked, with its files checked too; refused as one Error."""
        check_version(version, f"{self.dir}: version")
        directory = self.dir / version
        if directory.is_symlink() or not directory.is_dir():
            have = ", ".join(self.versions()) or "none"
            raise Error(f"{directory}: no such version of site {self.site} (have: {have})")
        path = directory / MANIFEST
        m = manifest.read(path, defaults, **limits)
        if m.name != self.site:
            raise Error(f"{path}: name: {m.name!r} is not this store's site {self.site!r}")
        if m.version != version:
            raise Error(f"{path}: version: {m.version!r} does not match its directory {version!r}")
        manifest.check_files(m, directory, str(path))
        return m

    def listing(self, defaults: dict[str, Any] | None = None, **limits: int) -> list[dict[str, Any]]:
        cur, prev = self.pointer("current"), self.pointer("previous")
        out = []
        for v in self.versions():
            item: dict[str, Any] = {"version": v, "current": v == cur, "previous": v == prev}
            try:
                m = self.load(v, defaults, **limits)
                item.update(ok=True, memory=m.memory, vcpus=m.vcpus,
                            bytes=sum((self.dir / v / f).stat().st_size for f in m.files))
            except Error as exc:
                item.update(ok=False, error=str(exc))
            except OSError as exc:
                item.update(ok=False, error=f"{self.dir / v}: {exc.strerror}")
            out.append(item)
        return out


def free_bytes(path: Path) -> int | None:
    """Free space where path is, or None when it cannot be told."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None
