"""The board's half of a deploy: an upload lands in /var/lib/appliance/staging/<site>/<version>/ (each file as
<file>.part until it is whole), `stage` says what already arrived intact (sha256 against the manifest) and where
each partial file can resume, `commit` checks the staged version with the one validator and renames it into the
store, `prune` drops versions beyond the site's `keep:`, never current or previous. A deploy holds the site's
deploy.lock from stage to prune (`session`), so a second one is refused, naming the first.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import manifest
from .context import Context, log
from .errors import Error
from .lock import SiteLock
from .names import MANIFEST, PART, check_version, cut
from .settings import Site
from .store import free_bytes, sync_dir


def pick_site(ctx: Context, name: str | None) -> Site:
    """The named site, or the board's first (its default, as sites.json lists them)."""
    if name:
        return ctx.settings.site(name)
    sites = list(ctx.settings.sites.values())
    if not sites:
        raise Error(f"{ctx.settings_path}: the board has no site")
    return sites[0]


def deploy_lock(ctx: Context, site: Site, version: str | None = None, *, idle: float | None = None,
                break_lock: bool = False) -> SiteLock:
    """The site's deploy.lock, naming the client's address; idle: a session's (it may be taken over once silent
    that long), break_lock: end any holder that is not mid-step."""
    client = os.environ.get("SSH_CLIENT", "").split(" ")[0]
    return SiteLock(ctx.run, site.name, f"deploy from {client}" if client else "deploy", version,
                    name="deploy.lock", idle=idle, break_lock=break_lock)


def _sha256(path: Path) -> str:
    return manifest.sha256(path)


def _sizes(value: object, m: manifest.Manifest, where: str) -> dict[str, int]:
    if not isinstance(value, dict) or sorted(value) != sorted(m.files):
        raise Error(f"{where}: sizes: must give the size of each of {', '.join(m.files)}")
    for f, n in value.items():
        if type(n) is not int or n < 0:
            raise Error(f"{where}: sizes: {f}: {n!r} must be a number of bytes")
    return dict(value)


def stage(ctx: Context, site: Site, request: object) -> dict[str, Any]:
    """Make the version's staging directory (its manifest first) and report each file: intact, partial (the
    offset and the sha256 of what arrived) or missing; refuse when the rest would not fit with the margin."""
    where = f"site {site.name}: the deploy's manifest"
    if not isinstance(request, dict) or "manifest" not in request:
        raise Error(f"{where}: the request must be an object with manifest and sizes")
    data = request["manifest"]
    m = manifest.validate({**data, "name": site.name} if isinstance(data, dict) else data, where, site.defaults())
    sizes = _sizes(request.get("sizes"), m, where)
    out: dict[str, Any] = {"ok": True, "site": site.name, "version": m.version, "current": None}
    store = ctx.store(site)
    out["current"] = store.pointer("current")
    if (store.dir / m.version).is_dir():
        have = store.load(m.version, site.defaults())       # a bad copy of that name is refused here, naming why
        if have.sha256 != m.sha256:
            raise Error(f"{store.dir / m.version}: site {site.name} already has a version {m.version} with other "
                        f"files; give the new one another version")
        return {**out, "in_store": True, "files": {f: {"state": "intact"} for f in m.files}, "need": 0}
    d = ctx.staging_root / site.name / m.version
    out["cleared"] = clear_staging(ctx, site, m.version)   # before free space is counted
    try:
        d.mkdir(parents=True, exist_ok=True)
        (d / MANIFEST).write_text(manifest.to_json(m))
        files = {f: _file_state(d, f, sizes[f], m.sha256[f]) for f in m.files}
        free = shutil.disk_usage(d).free
    except OSError as exc:
        raise Error(f"{d}: cannot stage the upload: {exc.strerror}") from None
    need = sum(sizes[f] - st.get("offset", 0) for f, st in files.items() if st["state"] != "intact")
    if need and free < need + ctx.margin:
        raise Error(f"{d}: {free >> 20} MiB free; the upload needs {_mib(need)} MiB and the store keeps "
                    f"{ctx.margin >> 20} MiB free; refused before any byte is sent")
    return {**out, "in_store": False, "staging": str(d), "files": files, "need": need, "free": free}


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def _file_state(d: Path, fname: str, size: int, digest: str) -> dict[str, Any]:
    whole, part = d / fname, d / (fname + PART)
    if whole.is_file() and not whole.is_symlink():
        if whole.stat().st_size == size and _sha256(whole) == digest:
            return {"state": "intact"}
        whole.unlink()                      # a broken copy: sent again
    if part.is_file() and not part.is_symlink() and 0 < part.stat().st_size <= size:
        return {"state": "partial", "offset": part.stat().st_size, "sha256": _sha256(part)}
    part.unlink(missing_ok=True)
    return {"state": "missing", "offset": 0}


def commit(ctx: Context, site: Site, version: str) -> dict[str, Any]:
    """Check the staged version with the shared validator and its files, then rename it into the store."""
    check_version(version, f"site {site.name}: version")
    d = ctx.staging_root / site.name / version
    store = ctx.store(site)
    dest = store.dir / version
    if dest.is_dir() and not (d / MANIFEST).exists():
        store.load(version, site.defaults())
        return {"ok": True, "site": site.name, "version": version, "path": str(dest), "already": True}
    m = manifest.read(d / MANIFEST, site.defaults())
    if (m.name, m.version) != (site.name, version):
        raise Error(f"{d / MANIFEST}: it is {m.name} {m.version}, not {site.name} {version}")
    manifest.check_files(m, d, str(d / MANIFEST))
    try:
        for extra in os.listdir(d):
            if extra not in (*m.files, MANIFEST):
                os.unlink(d / extra)
        store.dir.mkdir(parents=True, exist_ok=True)
        record_commit(store.dir, version)               # prune's age order: the board's own record, not mtimes
        try:
            os.rename(d, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            incoming = store.dir / f".{version}.incoming"   # another filesystem: a copy, then one rename
            shutil.rmtree(incoming, ignore_errors=True)
            shutil.copytree(d, incoming)
            os.rename(incoming, dest)
            shutil.rmtree(d)
        sync_dir(store.dir)
    except OSError as exc:
        raise Error(f"{d}: cannot move it into {dest}: {exc.strerror}") from None
    store.load(version, site.defaults())
    return {"ok": True, "site": site.name, "version": version, "path": str(dest), "already": False}


ORDER = ".committed"      # in a site's store: its versions, one a line, in the order they were committed
MAX_ORDER = 256          # lines kept: more than any keep:


def record_commit(store_dir: Path, version: str) -> None:
    """Append version to the store's commit record (rewritten whole, one rename, at most MAX_ORDER lines)."""
    path = store_dir / ORDER
    try:
        lines = [v for v in path.read_text().split() if v != version]
    except (FileNotFoundError, UnicodeDecodeError):
        lines = []
    tmp = store_dir / (ORDER + ".tmp")
    tmp.write_text("".join(f"{v}\n" for v in [*lines, version][-MAX_ORDER:]))
    os.replace(tmp, path)


def commit_order(store_dir: Path) -> Any:
    """A sort key: a version's place in the commit record; versions it lacks (laid in by the image build,
    committed before the record existed) come first, by name."""
    try:
        order = {v: i for i, v in enumerate(dict.fromkeys((store_dir / ORDER).read_text().split()))}
    except (OSError, UnicodeDecodeError):
        order = {}
    return lambda v: (v in order, order.get(v, 0), v)


def clear_staging(ctx: Context, site: Site, uploading: object = None) -> list[str]:
    """Remove the site's staging of every version but the one being uploaded: abandoned uploads (their .part
    files) never hold the disk. Only under deploy.lock, so no other upload is running."""
    cleared = []
    with contextlib.suppress(FileNotFoundError):
        for d in sorted((ctx.staging_root / site.name).iterdir()):
            if d.name != uploading:
                try:
                    shutil.rmtree(d) if d.is_dir() and not d.is_symlink() else d.unlink()
                except OSError as exc:
                    raise Error(f"{d}: cannot clear it from staging: {exc.strerror}") from None
                cleared.append(d.name)
    return cleared


def prune(ctx: Context, site: Site, keep: int | None = None, uploading: object = None) -> dict[str, Any]:
    """Remove the oldest versions beyond keep (the site's `keep:`); current and previous always stay. Staging
    is cleared too, but for the version being uploaded (the caller holds deploy.lock: no other upload runs), so
    an abandoned upload's .part files never fill the disk."""
    keep = site.keep if keep is None else keep
    cleared = clear_staging(ctx, site, uploading)
    store = ctx.store(site)
    with ctx.lock(site, "prune", None, wait=30):     # not while a switch starts one of them
        pinned = [v for v in (store.pointer("current"), store.pointer("previous")) if v]
        others = [v for v in store.versions() if v not in pinned]
        others.sort(key=commit_order(store.dir), reverse=True)
        drop = others[max(keep - len(set(pinned)), 0):]
        for v in drop:
            gone = store.dir / f".{v}.removing"
            try:
                os.rename(store.dir / v, gone)          # out of the listing at once; the bytes after
                shutil.rmtree(gone)
            except OSError as exc:
                raise Error(f"{store.dir / v}: cannot remove it: {exc.strerror}") from None
    return {"ok": True, "site": site.name, "removed": drop, "kept": sorted(set(store.versions())),
            "cleared": cleared}


IDLE_S = 120.0          # a session that hears nothing (no request, no upload byte) this long ends
MAX_LINE = 1 << 20      # a request line longer than this ends the session
TICK_S = 1.0


def idle_seconds() -> float:
    text = os.environ.get("APPLIANCE_SESSION_IDLE", "")
    try:
        value = float(text) if text else IDLE_S
    except ValueError:
        value = -1
    if not 0 < value <= 86400:
        raise Error(f"APPLIANCE_SESSION_IDLE: {text!r} must be a number of seconds from 0 to 86400")
    return value


def _uploading(ctx: Context, site: Site) -> float:
    """When a byte last arrived in the site's staging (an upload runs over SFTP, beside the session)."""
    newest = 0.0
    with contextlib.suppress(OSError):
        for d in (ctx.staging_root / site.name).iterdir():
            for f in d.iterdir():
                with contextlib.suppress(OSError):
                    newest = max(newest, f.stat().st_mtime)
    return newest


def _requests(ctx: Context, site: Site, lock: SiteLock, idle: float) -> Iterator[str]:
    """The session's request lines from stdin; ends at EOF, at a line too long, or after idle seconds in which
    neither a request nor an upload byte arrived (a client whose link died, which sshd has not noticed yet)."""
    fd = sys.stdin.fileno()
    buf = b""
    heard = time.time()
    while True:
        ready, _, _ = select.select([fd], [], [], min(TICK_S, idle))
        now = time.time()
        if not ready:
            arrived = _uploading(ctx, site)
            if arrived > heard:
                heard = min(arrived, now)
                lock.touch()
            elif now - heard > idle:
                log(f"site {site.name}: the deploy's client was silent for {now - heard:.0f} s (more than "
                    f"{idle:g} s); its session ends and frees {lock.path}")
                return
            continue
        data = os.read(fd, 65536)
        if not data:
            return
        heard = now
        lock.touch()
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode(errors="replace")
        if len(buf) > MAX_LINE:
            reply({"ok": False, "error": f"session: a request line longer than {MAX_LINE} bytes; the session ends"})
            return


class _Ending(Exception):
    """SIGTERM (another deploy taking the lock over) while the session waits: it ends at once."""


def session(ctx: Context, name: str | None, break_lock: bool = False, *,
            report: Callable[[Context, Site], dict[str, Any]]) -> None:
    """`appliance-guest session [SITE]`: hold the site's deploy lock while the deploy's SSH connection lives,
    answering one JSON request a line (op: stage, place, commit, switch, prune, status) with one JSON line. A
    dropped or silent connection ends it (the lock goes with it); a step once begun always finishes."""
    from .switch import switch

    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    site = pick_site(ctx, name)
    idle = idle_seconds()
    stepping = False
    told: list[int] = []

    def term(signum: int, _frame: object) -> None:
        told.append(signum)
        if not stepping:
            raise _Ending

    lock = deploy_lock(ctx, site, idle=idle, break_lock=break_lock)
    signal.signal(signal.SIGTERM, term)
    try:
        with lock:
            st = ctx.store(site)
            reply({"ok": True, "site": site.name, "current": st.pointer("current"),
                   "previous": st.pointer("previous"), "defaults": site.defaults(), "keep": site.keep,
                   "since": time.time(), "idle": idle, "notes": lock.notes, "sites": list(ctx.settings.sites)})
            for line in _requests(ctx, site, lock, idle):
                try:
                    req = json.loads(line)
                    op = req.get("op") if isinstance(req, dict) else None
                    stepping = True
                    lock.touch(op if isinstance(op, str) else None)
                    if op == "stage":
                        out = stage(ctx, site, req)
                    elif op == "place":
                        out = place(ctx, site, req.get("version"), req.get("file"), req.get("size"))
                    elif op == "commit":
                        out = commit(ctx, site, req.get("version"))
                    elif op == "switch":
                        out = switch(ctx, site.name, req.get("version"), cold=req.get("cold") is True)
                    elif op == "prune":
                        out = prune(ctx, site, uploading=req.get("uploading"))
                    elif op == "status":
                        out = {"site": site.name, **report(ctx, site)}
                    else:
                        raise Error(f"session: unknown request {cut(op)} (known: stage, place, commit, switch, "
                                    f"prune, status)")
                except Error as exc:
                    out = {"ok": False, "error": str(exc),
                           **({"console": exc.console} if hasattr(exc, "console") else {})}
                except ValueError:
                    out = {"ok": False, "error": "session: a request must be one JSON object a line"}
                finally:
                    stepping = False
                lock.touch()
                if told or not reply(out):
                    break
    except _Ending:
        pass


def place(ctx: Context, site: Site, version: object, fname: object, size: object) -> dict[str, Any]:
    """An uploaded <file>.part checked against the staged manifest (its size, then its sha256) and only then
    renamed to its name: a write the board's disk lost (full, failing) is never taken for a whole file."""
    version = check_version(version, f"site {site.name}: version")
    d = ctx.staging_root / site.name / version
    m = manifest.read(d / MANIFEST, site.defaults())
    if fname not in m.files:
        raise Error(f"{d}: {cut(fname)} is not a file of version {version} ({', '.join(m.files)})")
    if type(size) is not int or size < 0:
        raise Error(f"site {site.name}: place: size: {cut(size)} must be a number of bytes")
    assert isinstance(fname, str)
    part = d / (fname + PART)
    try:
        held = part.stat().st_size
        digest = _sha256(part)
    except OSError as exc:
        raise Error(f"{part}: cannot read what arrived: {exc.strerror}") from None
    if held != size or digest != m.sha256[fname]:
        free = free_bytes(d)
        why = (f"the board holds {held} of its {size} bytes" if held != size
               else f"the board holds its {held} bytes but their sha256 does not match the manifest")
        full = f" (its disk has {_mib(free)} MiB free: a write failed there)" if free is not None and \
            free < ctx.margin else ""
        if held >= size:
            part.unlink(missing_ok=True)         # as long as it should be but wrong: sent again from the start
        raise Error(f"{part}: {why}{full}; not renamed, the old version keeps serving")
    try:
        os.rename(part, d / fname)
        sync_dir(d)
    except OSError as exc:
        raise Error(f"{part}: cannot rename it to {fname}: {exc.strerror}") from None
    return {"ok": True, "file": fname, "size": held, "sha256": digest}


def reply(out: dict[str, Any]) -> bool:
    try:
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
        return True
    except OSError:     # the deploy's connection is gone; what was asked has been done
        return False


def digest_prefix(path: Path, length: int) -> str:
    """The sha256 of a file's first length bytes (the host's side of a resume check)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = length
        while left > 0 and (chunk := f.read(min(left, 1 << 20))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()
