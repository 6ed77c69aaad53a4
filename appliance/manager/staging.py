"""The board's half of a deploy: an upload lands in /var/lib/appliance/staging/<site>/<version>/ (each file as
<file>.part until it is whole), `stage` says what already arrived intact (sha256 against the manifest) and where
each partial file can resume, `commit` checks the staged version with the one validator and renames it into the
store, `prune` drops versions beyond the site's `keep:`, never current or previous. A deploy holds the site's
deploy.lock from stage to prune (`session`), so a second one is refused, naming the first.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import manifest
from .context import Context
from .errors import Error
from .lock import SiteLock
from .names import check_version
from .settings import Site
from .store import MANIFEST, sync_dir

PART = ".part"


def pick_site(ctx: Context, name: str | None) -> Site:
    """The named site, or the board's only one."""
    if name:
        return ctx.settings.site(name)
    sites = list(ctx.settings.sites.values())
    if len(sites) != 1:
        raise Error(f"{ctx.settings_path}: the board has {len(sites)} sites ({', '.join(ctx.settings.sites)}); "
                    f"name one")
    return sites[0]


def deploy_lock(ctx: Context, site: Site, version: str | None = None) -> SiteLock:
    client = os.environ.get("SSH_CLIENT", "").split(" ")[0]
    return ctx.lock(site, f"deploy from {client}" if client else "deploy", version, name="deploy.lock")


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
        os.utime(d)                                     # the store's age order (prune) is the commit order
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


def prune(ctx: Context, site: Site, keep: int | None = None) -> dict[str, Any]:
    """Remove the oldest versions beyond keep (the site's `keep:`); current and previous always stay."""
    keep = site.keep if keep is None else keep
    store = ctx.store(site)
    with ctx.lock(site, "prune", None, wait=30):     # not while a switch starts one of them
        pinned = [v for v in (store.pointer("current"), store.pointer("previous")) if v]
        others = [v for v in store.versions() if v not in pinned]
        others.sort(key=lambda v: (store.dir / v).stat().st_mtime, reverse=True)
        drop = others[max(keep - len(set(pinned)), 0):]
        for v in drop:
            gone = store.dir / f".{v}.removing"
            try:
                os.rename(store.dir / v, gone)          # out of the listing at once; the bytes after
                shutil.rmtree(gone)
            except OSError as exc:
                raise Error(f"{store.dir / v}: cannot remove it: {exc.strerror}") from None
    return {"ok": True, "site": site.name, "removed": drop, "kept": sorted(set(store.versions()))}


def free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def session(ctx: Context, name: str | None) -> None:
    """`appliance-guest session [SITE]`: hold the site's deploy lock while the deploy's SSH connection lives,
    answering one JSON request a line (op: stage, commit, switch, prune, status) with one JSON line. A dropped
    connection ends it (the lock goes with it); a switch once begun always finishes."""
    from .cli import site_status
    from .switch import switch

    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    site = pick_site(ctx, name)
    with deploy_lock(ctx, site):
        st = ctx.store(site)
        reply({"ok": True, "site": site.name, "current": st.pointer("current"), "previous": st.pointer("previous"),
                "defaults": site.defaults(), "keep": site.keep, "since": time.time()})
        for line in sys.stdin:
            try:
                req = json.loads(line)
                op = req.get("op") if isinstance(req, dict) else None
                if op == "stage":
                    out = stage(ctx, site, req)
                elif op == "commit":
                    out = commit(ctx, site, req.get("version"))
                elif op == "switch":
                    out = switch(ctx, site.name, req.get("version"), cold=req.get("cold") is True)
                elif op == "prune":
                    out = prune(ctx, site)
                elif op == "status":
                    out = {"site": site.name, **site_status(ctx, site)}
                else:
                    raise Error(f"session: unknown request {op!r} (known: stage, commit, switch, prune, status)")
            except Error as exc:
                out = {"ok": False, "error": str(exc), **({"console": exc.console} if hasattr(exc, "console") else {})}
            except ValueError:
                out = {"ok": False, "error": "session: a request must be one JSON object a line"}
            if not reply(out):
                break


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
