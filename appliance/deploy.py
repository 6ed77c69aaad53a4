"""`invoke deploy`: replace a board's served guest over SSH, to one board or a fleet.

A deploy opens the board's `appliance-guest session` (which holds the site's deploy lock while the connection
lives), checks the guest with the board's own validator and the site's defaults, stages it (the board says what
already arrived intact and where a partial file resumes), uploads the rest over SFTP, has the board verify every
sha256 and commit it into its store, switches (blue-green, health-checked: on failure the old version keeps
serving) and prunes. Every board-side step is a JSON request to the guest manager; no shell is assembled here.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from . import guest, log, ssh
from .build import guest as demo_guest
from .errors import ApplianceError, DeployError, GuestError, SshError
from .manager import manifest, names
from .manager.staging import PART, digest_prefix

MANAGER = "appliance-guest"
CHUNK = 1 << 17
SWITCH_S = 900            # the board's switch: start, health deadline, drain
PARALLEL = 4


@dataclass(frozen=True)
class Guest:
    """What to deploy, as given: its manifest (not yet checked against a site) and the folder of its files."""

    data: Any
    where: str
    folder: Path


@dataclass
class Target:
    """How to reach one board: an OpenSSH destination and the SSH layer's options."""

    host: str
    ssh_config: Path | None = None
    known_hosts: Path | None = None
    accept_new: bool = False
    key: Path | None = None
    timeout: float = 30

    def connect(self) -> ssh.Connection:
        return ssh.Connection(self.host, ssh_config=self.ssh_config, known_hosts=self.known_hosts, key=self.key,
                              host_keys="accept-new" if self.accept_new else None, timeout=self.timeout).open()


@dataclass
class Row:
    """One board's line of the final table."""

    host: str
    site: str = "?"
    old: str | None = None
    new: str | None = None
    result: str = "failed"
    seconds: float = 0.0
    sent: int = 0                 # bytes uploaded this time
    ok: bool = False
    detail: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- what to deploy


@contextlib.contextmanager
def source(path: Path, *, name: str | None = None, version: str | None = None, memory: int | None = None,
           static: Path | None = None, recipe: str = "booth") -> Iterator[Guest]:
    """The guest a deploy names: a bundle directory, a .tar/.tar.gz of one, a bare kernel, or `--static DIR`
    (the demo guest serving DIR, built here)."""
    with tempfile.TemporaryDirectory(prefix="appliance-deploy-") as tmp:
        if static is not None:
            path = demo_guest.build_task(recipe, static=Path(static)).path
        elif not path.exists():
            raise GuestError(f"{path}: no such bundle, tarball or kernel")
        elif path.is_file() and re.search(r"\.(tar|tar\.gz|tgz)$", path.name):
            path = _untar(path, Path(tmp))
        data, where, folder = guest.bundle_data(path, name, version)
        if memory is not None and isinstance(data, dict):
            data = {**data, "memory": memory}
        yield Guest(data, where, folder)


def _untar(path: Path, dest: Path) -> Path:
    """A bundle's tarball, its plain files only (at its top or in one directory), into dest."""
    try:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                parts = member.name.strip("/").split("/")
                if member.isdir():
                    continue
                if not member.isfile() or len(parts) > 2 or parts[-1] in ("", ".", ".."):
                    raise GuestError(f"{path}: {member.name}: a bundle's tarball holds only plain files "
                                     f"(guest.yaml, the kernel, a ramdisk)")
                try:
                    names.check_file(parts[-1], f"{path}: {member.name}")
                except names.Error as exc:
                    raise GuestError(str(exc)) from None
                src = tar.extractfile(member)
                assert src is not None
                with src, open(dest / parts[-1], "xb") as out:
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
    except FileExistsError as exc:
        raise GuestError(f"{path}: {Path(str(exc.filename)).name} is in it twice") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise GuestError(f"{path}: not a readable tarball ({exc})") from None
    if not (dest / "guest.yaml").is_file():
        raise GuestError(f"{path}: no guest.yaml in it")
    return dest


# ---------------------------------------------------------------- the board's session


class Session:
    """`appliance-guest session [SITE]` on the board: one JSON request, one JSON answer."""

    def __init__(self, conn: ssh.Connection, site: str | None, force: bool = False) -> None:
        self.conn = conn
        # --force: a site that follows a release channel (pull mode) takes the push and stops following
        cmd = f"{MANAGER} session" + (" --force" if force else "") + (f" {shlex.quote(site)}" if site else "")
        self.proc = conn.process(cmd)
        self.hello = self._answer(60, "session")

    def _answer(self, timeout: float, what: str) -> dict[str, Any]:
        text = ""
        for _ in range(400):     # one line, or an older manager's indented JSON
            text += self.proc.receive(timeout)
            try:
                out = json.loads(text)
                break
            except ValueError:
                continue
        else:
            raise DeployError(f"{self.conn.spec}: {MANAGER} {what}: not JSON: {text[:200]!r}")
        if not isinstance(out, dict):
            raise DeployError(f"{self.conn.spec}: {MANAGER} {what}: not a JSON object")
        if not out.get("ok"):
            raise failure(self.conn.spec, out)
        return out

    def ask(self, op: str, timeout: float = 120, **args: Any) -> dict[str, Any]:
        self.proc.send(json.dumps({"op": op, **args}))
        return self._answer(timeout, op)

    def close(self) -> None:
        self.proc.close()


def failure(host: str, out: dict[str, Any]) -> DeployError:
    """The board's refusal as one error: its reason, and the tail of a failed guest's console."""
    console = out.get("console") or []
    tail = "; the new guest's console ends:\n  " + "\n  ".join(console[-10:]) if console else ""
    return DeployError(f"{host}: {out.get('error', 'failed')}{tail}")


def check(g: Guest, site: str, defaults: dict[str, Any]) -> manifest.Manifest:
    """The guest checked by the board's validator with the site's own defaults (what the board will check)."""
    return guest.check_bundle(g.data, g.where, g.folder, site, defaults)


# ---------------------------------------------------------------- upload


def upload(conn: ssh.Connection, m: manifest.Manifest, folder: Path, staged: dict[str, Any], label: str,
           progress: Callable[[int], None] | None = None, tty: bool | None = None) -> int:
    """Send what the board lacks into its staging directory: each file as <file>.part, appended to when what
    arrived is the start of ours, then renamed whole. Returns the bytes sent."""
    d = staged["staging"]
    todo = {f: st for f, st in staged["files"].items() if st["state"] != "intact"}
    offsets = {}
    for f, st in todo.items():
        off = int(st.get("offset", 0))
        offsets[f] = off if off and digest_prefix(folder / f, off) == st.get("sha256") else 0
    total = sum((folder / f).stat().st_size - offsets[f] for f in todo)
    if not total:
        return 0
    bar = log.Progress(f"{label}: uploading", total)
    if tty is not None:
        bar.tty = tty
    sent = 0
    try:
        with conn.sftp() as sftp:
            for f in todo:
                part = f"{d}/{f}{PART}"
                with open(folder / f, "rb") as src, sftp.open(part, "ab" if offsets[f] else "wb") as dst:
                    dst.set_pipelined(True)
                    src.seek(offsets[f])
                    while chunk := src.read(CHUNK):
                        dst.write(chunk)
                        sent += len(chunk)
                        bar.update(len(chunk))
                        if progress:
                            progress(sent)
                sftp.posix_rename(part, f"{d}/{f}")
    except (OSError, paramiko.SSHException, EOFError, SshError) as exc:
        raise DeployError(f"{conn.spec}: the upload broke off after {sent} of {total} bytes ({exc}); "
                          f"run the deploy again to resume") from None
    finally:
        bar.close()
    return sent


# ---------------------------------------------------------------- one board, a fleet


def deploy(target: Target, g: Guest, site: str | None = None, *, progress: Callable[[int], None] | None = None,
           tty: bool | None = None, prune: bool = True, row: Row | None = None, cold: bool = False,
           force: bool = False) -> Row:
    """Deploy g to one board: stage, upload, verify, commit, switch, prune. Raises DeployError (and SshError);
    row, if given, holds what was known when it did. cold: destroy the old guest before the new one starts (the
    old way, kept for the benchmark)."""
    t0 = time.monotonic()
    row = row or Row(target.host, site or "?")
    conn = target.connect()
    try:
        s = Session(conn, site, force)
        row.site, row.old = s.hello["site"], s.hello.get("current")
        m = check(g, row.site, s.hello["defaults"])
        row.new = m.version
        sizes = {f: (g.folder / f).stat().st_size for f in m.files}
        staged = s.ask("stage", manifest=manifest.as_dict(m), sizes=sizes)
        if not staged["in_store"]:
            row.sent = upload(conn, m, g.folder, staged, target.host, progress, tty)
            s.ask("commit", version=m.version)
        out = s.ask("switch", SWITCH_S, version=m.version, **({"cold": True} if cold else {}))
        row.detail["switch"] = out
        if prune:
            row.detail["pruned"] = s.ask("prune")["removed"]
        s.close()
    finally:
        conn.close()
    row.result = "deployed" if out.get("changed") else "unchanged"
    row.ok, row.seconds = True, round(time.monotonic() - t0, 1)
    return row


def fleet(targets: list[Target], g: Guest, site: str | None = None, parallel: int = PARALLEL,
          force: bool = False) -> list[Row]:
    """Deploy to every board, a bounded number at once; one board's failure is its own row, nothing more."""
    many = len(targets) > 1
    printing = threading.Lock()

    def one(t: Target) -> Row:
        t0, row = time.monotonic(), Row(t.host, site or "?")
        try:
            return deploy(t, g, site, tty=False if many else None, row=row, force=force)
        except ApplianceError as exc:
            if many:
                with printing:
                    log.info(f"{t.host}: FAILED: {exc}")
            row.result, row.seconds, row.detail["error"] = f"failed: {exc}", round(time.monotonic() - t0, 1), str(exc)
            return row

    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(targets)))) as pool:
        return list(pool.map(one, targets))


def table(rows: list[Row]) -> str:
    """host, site, old, new, result, seconds: one line a board (a failure's reason cut to its first line)."""
    head = ("host", "site", "old", "new", "result", "seconds")
    cells = [head] + [(r.host, r.site, r.old or "-", r.new or "-", r.result.splitlines()[0][:100],
                       f"{r.seconds:.1f}") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells)


# ---------------------------------------------------------------- the other commands


def manager(target: Target, *args: str, timeout: float = SWITCH_S) -> dict[str, Any]:
    """Run `appliance-guest ARGS` on the board: its JSON answer, or DeployError with its error."""
    conn = target.connect()
    try:
        r = conn.run(shlex.join([MANAGER, *args]), timeout=timeout)
    finally:
        conn.close()
    try:
        out = json.loads(r.out)
    except ValueError:
        raise DeployError(f"{target.host}: {MANAGER} {' '.join(args)} gave no JSON (exit {r.rc}): "
                          f"{(r.err or r.out).strip()[-300:] or 'no output'}") from None
    if not isinstance(out, dict) or not out.get("ok"):
        raise failure(target.host, out if isinstance(out, dict) else {})
    return out


def only_site(target: Target, site: str | None) -> str:
    if site:
        return site
    sites = list(manager(target, "list", timeout=60)["sites"])
    if len(sites) != 1:
        raise DeployError(f"{target.host}: the board has {len(sites)} sites ({', '.join(sites)}); give --site")
    return str(sites[0])


def rollback(target: Target, site: str | None = None, version: str | None = None) -> dict[str, Any]:
    name = only_site(target, site)
    return manager(target, "rollback", name, *([version] if version else []))


def status(target: Target) -> dict[str, Any]:
    out = manager(target, "status", timeout=60)
    out.pop("ok", None)
    return out


def guests(target: Target, site: str | None = None) -> dict[str, Any]:
    return manager(target, "list", *([site] if site else []), timeout=60)


def hosts_file(path: Path) -> list[str]:
    """The hosts a file names: one a line, or an Ansible INI inventory's hosts (ansible_host, ansible_user and
    ansible_port honoured; group headers, :vars and :children sections skipped)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DeployError(f"{path}: cannot read the hosts file: {exc.strerror}") from None
    out: list[str] = []
    section = ""
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip() if not raw.lstrip().startswith(("#", ";")) else ""
        if not line:
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section.endswith((":vars", ":children")):
            continue
        name, *opts = line.split()
        kv = dict(o.split("=", 1) for o in opts if "=" in o)
        if any("=" not in o for o in opts) or not re.fullmatch(r"[A-Za-z0-9_.@:\[\]%-]+", name):
            raise DeployError(f"{path}:{n}: {raw.strip()!r} is not a host (a name, then key=value options)")
        host = kv.get("ansible_host", name)
        user = kv.get("ansible_user")
        port = kv.get("ansible_port")
        host = f"{user}@{host}" if user and "@" not in host else host
        out.append(f"{host}:{port}" if port else host)
    if not out:
        raise DeployError(f"{path}: names no host")
    return list(dict.fromkeys(out))


def status_text(host: str, out: dict[str, Any]) -> str:
    lines = []
    for name, st in out.get("sites", {}).items():
        up = f"up {st['uptime_s']} s" if st.get("uptime_s") is not None else "not serving"
        health = {True: "healthy", False: "UNHEALTHY", None: "health unknown"}[st.get("healthy")]
        free = st.get("free_bytes")
        lines.append(f"{host} {name}: {st.get('version') or st.get('current') or '-'} in {st.get('domain') or '-'}, "
                     f"{up}, {health}; previous {st.get('previous') or '-'}; kept "
                     f"{', '.join(st.get('versions', [])) or 'none'} (keep {st.get('keep')}); "
                     f"{'?' if free is None else free >> 20} MiB free" + (f"; {st['error']}" if st.get("error") else ""))
        if st.get("pull"):
            from .manager.pull import summary_text

            lines.append(f"{host} {name}: {summary_text(st['pull'])}")
    if out.get("pull_key"):
        lines.append(f"{host}: its key for release channels over ssh (give it read access): {out['pull_key']}")
    return "\n".join(lines)


def guests_text(out: dict[str, Any]) -> str:
    sites = out["sites"] if "sites" in out else {out["site"]: out}
    lines = []
    for name, s in sites.items():
        for v in s.get("versions", []):
            mark = "current" if v.get("current") else "previous" if v.get("previous") else ""
            what = f"{v.get('bytes', 0) >> 10} KiB, {v.get('memory')} MiB" if v.get("ok") else f"BAD: {v.get('error')}"
            lines.append(f"{name}  {v['version']}  {mark:8}  {what}")
    return "\n".join(lines) or "no versions"
