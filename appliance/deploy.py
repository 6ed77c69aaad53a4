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
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paramiko
import yaml

from . import bundles, log, manager_client, ssh
from .build import guest as demo_guest
from .errors import ApplianceError, DeployError, GuestError, SshError
from .manager import manifest, names
from .manager.errors import Error as ManagerError
from .manager.staging import PART, digest_prefix
from .manager_client import COMMAND

CHUNK = 1 << 17
SWITCH_S = 900            # the board's switch: start, health deadline, drain
PARALLEL = 4
LAPTOP = {"memory": 64, "vcpus": 1, "port": 80, "health": {"path": "/", "deadline": 30}}  # a site's defaults
# stand-ins, for the laptop's check before it connects; the board's own come with its session's first answer
MAX_MEMBERS = 64          # entries a bundle's tarball may hold
MAX_FILE = 512 << 20      # bytes of a kernel or ramdisk taken from a tarball


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
    break_lock: bool = False      # end a deploy session that holds the site's lock (not mid-step)
    name: str | None = None       # the inventory's name of the board, for tables (default: host)

    @property
    def label(self) -> str:
        return self.name or self.host

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
        data, where, folder = bundles.bundle_data(path, name, version)
        if memory is not None and isinstance(data, dict):
            data = {**data, "memory": memory}
        bundles.check_bundle(data, where, folder, "site", LAPTOP)   # before any board is contacted
        yield Guest(data, where, folder)


def _untar(path: Path, dest: Path) -> Path:
    """A bundle's tarball read by the names its guest.yaml gives (at its top or in one directory): guest.yaml
    (capped, no aliases), then only the kernel and ramdisk it names, each a plain file of at most MAX_FILE bytes.
    Nothing else in it is extracted or read, however large it says it is."""
    try:
        with tarfile.open(path) as tar:
            members: dict[str, tarfile.TarInfo] = {}
            for n, member in enumerate(tar):
                if n >= MAX_MEMBERS:
                    raise GuestError(f"{path}: more than {MAX_MEMBERS} entries; a bundle is guest.yaml, a kernel "
                                     f"and a ramdisk")
                if member.size > MAX_FILE and not member.issparse():   # getting past it would read it whole
                    raise GuestError(f"{path}: {names.cut(member.name)}: {member.size} bytes, more than the "
                                     f"{MAX_FILE >> 20} MiB a bundle's file may be")
                parts = member.name.strip("/").split("/")
                if member.isdir() or len(parts) > 2:
                    continue
                if parts[-1] in members:
                    raise GuestError(f"{path}: {names.cut(parts[-1])} is in it twice")
                members[parts[-1]] = member

            def take(fname: str, cap: int) -> None:
                member = members.get(fname)
                if member is None:
                    raise GuestError(f"{path}: no {fname} in it")
                if not member.isfile():
                    raise GuestError(f"{path}: {names.cut(member.name)} is not a plain file")
                if member.size > cap:
                    raise GuestError(f"{path}: {names.cut(member.name)}: {member.size} bytes, more than the "
                                     f"{cap >> 20 or cap} {'MiB' if cap >> 20 else 'bytes'} a bundle's file may be")
                src = tar.extractfile(member)
                assert src is not None
                with src, open(dest / fname, "xb") as out:
                    while chunk := src.read(CHUNK):
                        out.write(chunk)

            take("guest.yaml", bundles.MAX_YAML)
            data = bundles.read_yaml(dest / "guest.yaml")
            for key in ("kernel", "ramdisk"):
                value = data.get(key) if isinstance(data, dict) else None
                if value is not None:
                    try:
                        take(names.check_file(value, f"{path}: guest.yaml: {key}"), MAX_FILE)
                    except ManagerError as exc:
                        raise GuestError(str(exc)) from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise GuestError(f"{path}: not a readable tarball ({exc})") from None
    return dest


# ---------------------------------------------------------------- the board's session


class Session:
    """`appliance-guest session [SITE]` on the board: one JSON request, one JSON answer."""

    def __init__(self, conn: ssh.Connection, site: str | None, break_lock: bool = False, force: bool = False) -> None:
        self.conn = conn
        # --force: a site that follows a release channel (pull mode) takes the push and stops following
        cmd = (f"{COMMAND} session" + (" --break-lock" if break_lock else "") + (" --force" if force else "")
               + (f" {shlex.quote(site)}" if site else ""))
        self.proc = conn.process(cmd)
        self.hello = self._answer(60, "session")
        for note in self.hello.get("notes") or []:     # a lock taken over or broken: said, never silent
            log.info(f"{conn.spec}: {note}")

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
            raise DeployError(f"{self.conn.spec}: {COMMAND} {what}: not JSON: {text[:200]!r}")
        if not isinstance(out, dict):
            raise DeployError(f"{self.conn.spec}: {COMMAND} {what}: not a JSON object")
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
    return bundles.check_bundle(g.data, g.where, g.folder, site, defaults)


# ---------------------------------------------------------------- upload


def upload(s: Session, m: manifest.Manifest, folder: Path, staged: dict[str, Any], sizes: dict[str, int],
           label: str, progress: Callable[[int], None] | None = None, tty: bool | None = None) -> int:
    """Send what the board lacks into its staging directory: each file as <file>.part, appended to when what
    arrived is the start of ours; the board renames it only once its size and sha256 are the manifest's (SFTP's
    pipelined writes lose their error statuses: a full or failing disk is caught there). Returns the bytes sent."""
    conn = s.conn
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
            sftp.get_channel().settimeout(max(conn.timeout, 15))   # a dead link ends the upload, never hangs it
            for f in todo:
                part = f"{d}/{f}{PART}"
                size = sizes[f]               # as checked against the manifest before the upload
                try:
                    with open(folder / f, "rb") as src, sftp.open(part, "ab" if offsets[f] else "wb") as dst:
                        dst.set_pipelined(True)
                        src.seek(offsets[f])
                        while chunk := src.read(CHUNK):
                            try:
                                dst.write(chunk)
                            except TimeoutError:
                                conn.close()    # the link is dead: nothing more waits on it (the file's close)
                                raise
                            sent += len(chunk)
                            bar.update(len(chunk))
                            if progress:
                                progress(sent)
                except TimeoutError:
                    raise SshError(f"{conn.spec}: no progress for {max(conn.timeout, 15):g} s: the link is "
                                   f"down") from None
                except (OSError, paramiko.SFTPError):
                    if conn.active:     # a write the board refused: its own account of what it holds says why
                        place(s, sftp, m.version, d, f, size)
                    raise
                place(s, sftp, m.version, d, f, size)
    except (OSError, paramiko.SSHException, paramiko.SFTPError, EOFError, SshError) as exc:
        said = "the board's disk: " if isinstance(exc, OSError) and exc.errno is not None else ""
        why = str(exc).removeprefix(f"{conn.spec}: ")
        raise DeployError(f"{conn.spec}: the upload broke off after {sent} of {total} bytes ({said}{why}); "
                          f"run the deploy again to resume") from None
    finally:
        bar.close()
    return sent


def place(s: Session, sftp: paramiko.SFTPClient, version: str, d: str, f: str, size: int) -> None:
    """The board checks <f>.part (size, sha256) and renames it. A board whose manager predates `place` gets the
    size checked here over SFTP before the rename (its commit checks every sha256 after)."""
    try:
        s.ask("place", version=version, file=f, size=size)
        return
    except DeployError as exc:
        if "unknown request 'place'" not in str(exc):
            raise
    held = sftp.stat(f"{d}/{f}{PART}").st_size
    if held != size:
        raise DeployError(f"{s.conn.spec}: {d}/{f}{PART}: the board holds {held} of its {size} bytes (a write failed "
                          f"there); not renamed, the old version keeps serving")
    sftp.posix_rename(f"{d}/{f}{PART}", f"{d}/{f}")


# ---------------------------------------------------------------- one board, a fleet


def deploy(target: Target, g: Guest, site: str | None = None, *, progress: Callable[[int], None] | None = None,
           tty: bool | None = None, prune: bool = True, row: Row | None = None, cold: bool = False,
           force: bool = False) -> Row:
    """Deploy g to one board: stage, upload, verify, commit, switch, prune, each step said as it begins. Raises
    DeployError (and SshError); row, if given, holds what was known when it did. A connection cut during the
    switch asks the board (a new connection) what it did before calling the deploy failed. cold: destroy the old
    guest before the new one starts (the old way, kept for the benchmark); force: a site that follows a release
    channel takes the push (and stops following)."""
    t0 = time.monotonic()
    row = row or Row(target.label, site or "?")

    def say(text: str) -> None:
        log.info(f"{target.label}: {text}")

    say(f"connecting to {target.host}")
    conn = target.connect()
    try:
        s = Session(conn, site, target.break_lock, force)
        row.site, row.old = s.hello["site"], s.hello.get("current")
        sites = s.hello.get("sites") or [row.site]
        if site is None and len(sites) > 1:
            say(f"site {row.site}, the board's first of {len(sites)} ({', '.join(sites)}); --site for another")
        say(f"checking {g.where} against site {row.site}'s defaults (serving: {row.old or 'nothing'})")
        m = check(g, row.site, s.hello["defaults"])
        row.new = m.version
        sizes = {f: (g.folder / f).stat().st_size for f in m.files}
        staged = s.ask("stage", manifest=manifest.as_dict(m), sizes=sizes)
        if staged.get("cleared"):
            say(f"cleared abandoned uploads from staging: {', '.join(staged['cleared'])}")
        if not staged["in_store"]:
            say(f"uploading {staged['need'] / (1 << 20):.1f} MiB of {m.version} (what the board lacks)")
            row.sent = upload(s, m, g.folder, staged, sizes, target.label, progress, tty)
            say("verifying: the board checks every sha256 and moves the version into its store")
            s.ask("commit", version=m.version)
        deadline = m.health.deadline if m.health else 0
        say(f"starting {m.version} beside {row.old or 'nothing'}; health check up to {deadline} s, then the switch "
            f"and the drain")
        try:
            out = s.ask("switch", SWITCH_S, version=m.version, **({"cold": True} if cold else {}))
        except SshError as exc:
            out = _after_cut(target, row.site, m.version, exc)
        row.detail["switch"] = out
        if out.get("changed"):
            say(f"switched: {m.version} healthy after {out.get('start_ms', 0) / 1000:.1f} s, switched in "
                f"{out.get('switch_ms', 0)} ms, old guest drained in {out.get('drain_ms', 0) / 1000:.1f} s")
        if prune and not out.get("asked_after_cut"):
            say("pruning")
            pruned = s.ask("prune")
            row.detail["pruned"] = pruned["removed"]
            if pruned["removed"]:
                say(f"pruned {', '.join(pruned['removed'])}")
        s.close()
    finally:
        conn.close()
    row.result = "deployed" if out.get("changed") else "unchanged"
    row.ok, row.seconds = True, round(time.monotonic() - t0, 1)
    return row


def _after_cut(target: Target, site: str, version: str, cut: SshError) -> dict[str, Any]:
    """The connection broke during the switch, which the board finishes (or rolls back) regardless: ask it before
    calling the deploy failed. A new session gets the site's deploy lock once the old one has finished the switch;
    its first answer says which version is current. While the board answers "busy" this waits for the switch; a
    board that cannot be reached is asked again for 3 connection timeouts (a wifi drop that comes back), then
    the deploy ends with a line saying how to ask it later."""
    log.info(f"{target.label}: the connection broke during the switch ({cut}); asking the board what it did")
    end = time.monotonic() + SWITCH_S
    unreachable = None
    while True:
        try:
            conn = target.connect()
            try:
                s = Session(conn, site)
                current = s.hello.get("current")
                s.close()
            finally:
                conn.close()
            break
        except (SshError, DeployError) as exc:
            now = time.monotonic()
            if isinstance(exc, SshError):
                unreachable = unreachable or now
                if now - unreachable >= 3 * target.timeout:
                    raise DeployError(f"{target.label}: the link went down during the switch ({cut}) and the board "
                                      f"has not answered since ({exc}); it finishes the switch to {version}, or keeps "
                                      f"the old version serving, on its own: `appliance status --host "
                                      f"{target.host}` says which") from None
            else:
                unreachable = None
            if isinstance(exc, DeployError) and "busy" not in str(exc) or now > end:
                raise DeployError(f"{target.label}: the connection broke during the switch ({cut}), and the board "
                                  f"did not say what it did: {exc}") from None
            time.sleep(1)
    if current != version:
        raise DeployError(f"{target.label}: the connection broke during the switch ({cut}); the board serves "
                          f"{current or 'nothing'}, not {version}: the switch failed there, the old version serves")
    log.info(f"{target.label}: the board finished the switch: {version} is current")
    return {"changed": True, "asked_after_cut": True}


T = TypeVar("T")


def each(fn: Callable[[Target], T], targets: list[Target], parallel: int) -> list[T]:
    """fn for every target, at most `parallel` at once; one target is done in this thread, so that Ctrl-C ends it
    at once rather than after a worker's connection gives up."""
    if len(targets) == 1:
        return [fn(targets[0])]
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(targets)))) as pool:
        return list(pool.map(fn, targets))


def fleet(targets: list[Target], g: Guest, site: str | None = None, parallel: int = PARALLEL,
          force: bool = False) -> list[Row]:
    """Deploy to every board, a bounded number at once; one board's failure is its own row, nothing more."""
    many = len(targets) > 1

    def one(t: Target) -> Row:
        t0, row = time.monotonic(), Row(t.label, site or "?")
        try:
            return deploy(t, g, site, tty=False if many else None, row=row, force=force)
        except ApplianceError as exc:
            row.result, row.seconds, row.detail["error"] = "failed", round(time.monotonic() - t0, 1), str(exc)
            row.detail["destination"] = t.host
            return row

    return each(one, targets, parallel)


def table(rows: list[Row]) -> str:
    """host, site, old, new, result, seconds: one line a board; then one line per failed board with its reason
    (its first line, cut at 200 characters)."""
    head = ("host", "site", "old", "new", "result", "seconds")
    cells = [head] + [(r.host, r.site, r.old or "-", r.new or "-", r.result, f"{r.seconds:.1f}") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells]
    for r in rows:
        if not r.ok and r.detail.get("error"):
            why = str(r.detail["error"]).splitlines()[0]
            why = why.removeprefix(f"{r.detail.get('destination', r.host)}: ").removeprefix(f"{r.host}: ")
            lines.append(f"{r.host}: {why if len(why) <= 200 else why[:199] + '…'}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the other commands


def _ask(target: Target, args: tuple[str, ...], timeout: float) -> dict[str, Any]:
    """Run `appliance-guest ARGS` on the board: its JSON answer (ok false, with an error, when it gave none)."""
    conn = target.connect()
    try:
        return manager_client.ask(lambda cmd, t: conn.run(cmd, timeout=t), args, timeout)[1]
    finally:
        conn.close()


def manager(target: Target, *args: str, timeout: float = SWITCH_S) -> dict[str, Any]:
    """Run `appliance-guest ARGS` on the board: its JSON answer, or DeployError with its error."""
    out = _ask(target, args, timeout)
    if not out.get("ok"):
        raise failure(target.host, out)
    return out


def default_site(target: Target, site: str | None) -> str:
    """The site named, or the board's first (its default), said in a line when the board has more than one."""
    if site:
        return site
    sites = [str(x) for x in manager(target, "list", timeout=60)["sites"]]
    if not sites:
        raise DeployError(f"{target.host}: the board has no site")
    if len(sites) > 1:
        log.info(f"{target.label}: site {sites[0]}, the board's first of {len(sites)} ({', '.join(sites)}); "
                 f"--site for another")
    return sites[0]


def rollback(target: Target, site: str | None = None, version: str | None = None) -> dict[str, Any]:
    name = default_site(target, site)
    return manager(target, "rollback", name, *([version] if version else []))


def status(target: Target) -> dict[str, Any]:
    """The board's `appliance-guest status`: every site, whatever its health (ok false when one is failing);
    DeployError only when the board gives no status at all."""
    out = _ask(target, ("status",), 60)
    if not isinstance(out.get("sites"), dict):
        raise failure(target.host, out)
    return out


def fleet_status(targets: list[Target], parallel: int = PARALLEL) -> dict[str, dict[str, Any]]:
    """Each board's status by its label; a board that gives none is {"ok": false, "error": ...}."""
    def one(t: Target) -> dict[str, Any]:
        try:
            return status(t)
        except ApplianceError as exc:
            return {"ok": False, "error": str(exc), "sites": {}}

    return dict(zip([t.label for t in targets], each(one, targets, parallel), strict=True))


def _state(st: dict[str, Any]) -> str:
    state = st.get("state")
    if state in ("asleep", "paused") and not st.get("error"):
        return "asleep" if state == "asleep" else "asleep (paused)"
    if st.get("ok"):
        return "serving"
    return "FAILING"


def status_table(boards: dict[str, dict[str, Any]]) -> str:
    """One row a site of every board, whatever its health: host, site, state, version, health, uptime, previous,
    versions kept, free space; then a line per site that follows a release channel (pull mode), and one line per
    failure with its reason."""
    from .manager.pull import summary_text as pull_summary

    head = ("host", "site", "state", "version", "health", "up", "previous", "kept", "free")
    rows, why, pulls = [head], [], []
    for host, out in boards.items():
        if not out.get("sites"):
            rows.append((host, "-", "FAILING", "-", "-", "-", "-", "-", "-"))
            why.append(f"{host}: {out.get('error', 'no status')}")
        for name, st in out.get("sites", {}).items():
            state = _state(st)
            health = "asleep" if state.startswith("asleep") else \
                {True: "healthy", False: "UNHEALTHY", None: "unknown"}[st.get("healthy")]
            free = st.get("free_bytes")
            rows.append((host, name, state, st.get("version") or st.get("current") or "-", health,
                         f"{st['uptime_s']} s" if st.get("uptime_s") is not None else "-", st.get("previous") or "-",
                         f"{len(st.get('versions', []))}/{st.get('keep')}", "?" if free is None else f"{free >> 20} MiB"))
            if state == "FAILING" or st.get("error"):
                why.append(f"{host} {name}: " + names.cut(st.get("error") or st.get("note") or "not serving", 200)
                           .strip("'\""))
            if st.get("pull"):
                pulls.append(f"{host} {name}: {pull_summary(st['pull'])}")
        if out.get("pull_key"):
            pulls.append(f"{host}: its key for release channels over ssh (give it read access): {out['pull_key']}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    table = "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(len(head))).rstrip() for r in rows)
    return "\n".join([table, *pulls, *why])


def guests(target: Target, site: str | None = None) -> dict[str, Any]:
    return manager(target, "list", *([site] if site else []), timeout=60)


MAX_INVENTORY = 1 << 20     # bytes of a hosts file read
MAX_HOSTS = 4096            # hosts it may name (ranges expanded)
RANGE = re.compile(r"\[([0-9]+|[a-z]):([0-9]+|[a-z])(?::([0-9]+))?\]")


def expand(name: str, where: str) -> list[str]:
    """An Ansible host range: booth-[01:03] is booth-01, booth-02, booth-03 (widths kept; [a:c] for letters)."""
    m = RANGE.search(name)
    if not m:
        return [name]
    lo, hi, step = m.group(1), m.group(2), int(m.group(3) or 1)
    if lo.isdigit() != hi.isdigit() or step < 1:
        raise DeployError(f"{where}: {names.cut(name)}: a range is [START:END] of numbers or of letters")
    if lo.isdigit():
        width = len(lo) if lo.startswith("0") else 0
        values = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1, step)]
    else:
        values = [chr(i) for i in range(ord(lo), ord(hi) + 1, step)]
    if not values or len(values) > MAX_HOSTS:
        raise DeployError(f"{where}: {names.cut(name)}: the range names {len(values)} hosts (1 to {MAX_HOSTS})")
    out = [h for v in values for h in expand(name[:m.start()] + v + name[m.end():], where)]
    if len(out) > MAX_HOSTS:
        raise DeployError(f"{where}: {names.cut(name)}: more than {MAX_HOSTS} hosts")
    return out


@dataclass
class _Inventory:
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)      # name: its own vars
    groups: dict[str, set[str]] = field(default_factory=dict)           # group: hosts listed in it
    children: dict[str, list[str]] = field(default_factory=dict)
    vars: dict[str, dict[str, Any]] = field(default_factory=dict)       # group: its vars

    def add(self, group: str, name: str, hostvars: dict[str, Any]) -> None:
        self.hosts.setdefault(name, {}).update(hostvars)
        self.groups.setdefault(group, set()).add(name)
        if len(self.hosts) > MAX_HOSTS:
            raise DeployError(f"more than {MAX_HOSTS} hosts")

    def members(self, group: str, seen: frozenset[str] = frozenset()) -> set[str]:
        if group == "all":
            return set(self.hosts)
        out = set(self.groups.get(group, set()))
        for child in self.children.get(group, []):
            if child not in seen:
                out |= self.members(child, seen | {group})
        return out

    def depth(self, group: str) -> int:
        parents = [g for g, kids in self.children.items() if group in kids]
        return 1 + max((self.depth(p) for p in parents if p != group), default=0) if parents else 1

    def resolved(self, name: str) -> dict[str, Any]:
        """A host's vars as Ansible ranks them: all's, then its groups' (parents before children), then its own."""
        out = dict(self.vars.get("all", {}))
        mine = sorted((g for g in {*self.groups, *self.children, *self.vars} if g != "all"
                       and name in self.members(g)), key=lambda g: (self.depth(g), g))
        for g in mine:
            out.update(self.vars.get(g, {}))
        return {**out, **self.hosts[name]}


def _ini(path: Path, text: str) -> _Inventory:
    inv = _Inventory()
    section = "ungrouped"
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].split(" ;", 1)[0].strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        where = f"{path}:{n}"
        group, _, kind = section.partition(":")
        if kind == "vars":
            key, eq, value = line.partition("=")
            if not eq:
                raise DeployError(f"{where}: {names.cut(raw.strip())} is not key=value")
            inv.vars.setdefault(group, {})[key.strip()] = value.strip()
        elif kind == "children":
            inv.children.setdefault(group, []).append(line)
        else:
            name, *opts = line.split()
            if any("=" not in o for o in opts) or not re.fullmatch(r"[A-Za-z0-9_.@:\[\]%-]+", name):
                raise DeployError(f"{where}: {names.cut(raw.strip())} is not a host (a name, then key=value options)")
            for h in expand(name, where):
                inv.add(group, h, dict(o.split("=", 1) for o in opts))
    return inv


def _yaml(path: Path, text: str) -> _Inventory:
    """An Ansible YAML inventory: groups with hosts (name: vars), vars and children, from `all` down."""
    inv = _Inventory()
    try:
        data = yaml.load(text, Loader=bundles._PlainLoader)  # noqa: S506 - a SafeLoader without aliases
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise DeployError(f"{path}: not valid YAML" + (f" at line {mark.line + 1}" if mark else "")) from None
    if not isinstance(data, dict):
        raise DeployError(f"{path}: an inventory is a mapping of groups (all: hosts:, vars:, children:)")

    def group(name: str, body: object, trail: str) -> None:
        if body is None:
            return
        if not isinstance(body, dict) or set(body) - {"hosts", "vars", "children"}:
            raise DeployError(f"{path}: {trail}: a group has hosts, vars and children only")
        for h, hv in (body.get("hosts") or {}).items():
            if hv is not None and not isinstance(hv, dict):
                raise DeployError(f"{path}: {trail}.hosts.{h}: a host's vars are a mapping")
            for one in expand(str(h), f"{path}: {trail}.hosts"):
                inv.add(name, one, dict(hv or {}))
        if body.get("vars") is not None:
            if not isinstance(body["vars"], dict):
                raise DeployError(f"{path}: {trail}.vars: must be a mapping")
            inv.vars.setdefault(name, {}).update(body["vars"])
        for child, cb in (body.get("children") or {}).items():
            inv.children.setdefault(name, []).append(str(child))
            group(str(child), cb, f"{trail}.children.{child}")

    for name, body in data.items():
        group(str(name), body, str(name))
    return inv


def hosts_file(path: Path, limit: str | None = None) -> list[tuple[str, str]]:
    """The boards a file names, as (name, SSH destination): one a line, or an Ansible inventory, INI or YAML as
    ansible-inventory reads it (groups, children, [group:vars] and [all:vars], host ranges like booth-[01:03];
    ansible_host, ansible_user and ansible_port make the destination). limit: Ansible's --limit (host or group
    names or globs, ',' or ':' between them, '!' to leave out)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_INVENTORY + 1)
        text = raw.decode()
    except OSError as exc:
        raise DeployError(f"{path}: cannot read the hosts file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise DeployError(f"{path}: not UTF-8 text") from None
    if len(raw) > MAX_INVENTORY:
        raise DeployError(f"{path}: more than {MAX_INVENTORY >> 20} MiB")
    try:
        yamlish = path.suffix in (".yml", ".yaml") or re.match(r"(---\s*\n)?\s*[A-Za-z0-9_-]+:\s*\n", text)
        inv = _yaml(path, text) if yamlish else _ini(path, text)
    except DeployError as exc:
        msg = str(exc)
        raise DeployError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    chosen = list(inv.hosts)
    if limit:
        import fnmatch

        def match(pattern: str) -> set[str]:
            groups = {*inv.groups, *inv.children, *inv.vars, "all"}
            return ({h for h in inv.hosts if fnmatch.fnmatchcase(h, pattern)}
                    | {h for g in groups if fnmatch.fnmatchcase(g, pattern) for h in inv.members(g)})

        pats = [p for p in re.split(r"[,:]", limit) if p]
        keep = set().union(*(match(p) for p in pats if not p.startswith("!"))) if any(
            not p.startswith("!") for p in pats) else set(inv.hosts)
        for p in pats:
            if p.startswith("!"):
                keep -= match(p[1:])
        chosen = [h for h in chosen if h in keep]
        if not chosen:
            raise DeployError(f"{path}: --limit {names.cut(limit)} leaves no host")
    if not chosen:
        raise DeployError(f"{path}: names no host")
    out = []
    for name in chosen:
        v = inv.resolved(name)
        host, user, port = str(v.get("ansible_host", name)), v.get("ansible_user"), v.get("ansible_port")
        host = f"{user}@{host}" if user and "@" not in host else host
        out.append((name, f"{host}:{port}" if port else host))
    return out


def guests_text(out: dict[str, Any]) -> str:
    sites = out["sites"] if "sites" in out else {out["site"]: out}
    lines = []
    for name, s in sites.items():
        for v in s.get("versions", []):
            mark = "current" if v.get("current") else "previous" if v.get("previous") else ""
            what = f"{v.get('bytes', 0) >> 10} KiB, {v.get('memory')} MiB" if v.get("ok") else f"BAD: {v.get('error')}"
            lines.append(f"{name}  {v['version']}  {mark:8}  {what}")
    return "\n".join(lines) or "no versions"
