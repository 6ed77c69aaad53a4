"""Pull mode, the board's side: a site follows a branch of a signed release channel (git). A check takes the tip only
if an allowed signer signed it, it fast-forwards what the board has and its serial beats any tried, and applies it
through the deploy's staging, the one validator and the blue-green switch; every step is re-runnable (README).
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from . import manifest
from .context import Context, log
from .errors import Error
from .launch import GuestFailed
from .lock import Busy
from .settings import Site
from .store import sync_dir

# A channel holds, for each site, <site>/release.json ({"serial": N}), <site>/manifest.json and the files it names.
# Serials are JSON integers compared as numbers, the only order (a crafted string cannot pass for a higher one).
# What the board has seen is in <store>/<site>/.pull/state.json (fsynced): the highest serial, the commit it follows
# from, the job in progress, the versions marked bad, the refusals and the last check.
ENV_CONFIG = "APPLIANCE_PULL"                  # the board's pull.json, rendered from the recipe's `pull:`
DEFAULT_CONFIG = "/etc/appliance/pull.json"
RELEASE = "release.json"
MANIFEST = "manifest.json"
SERIAL_MAX = 1 << 53                           # a JSON integer every reader agrees on
SMALL = 64 << 10                               # bytes: release.json and manifest.json at most
FETCH_S = 300                                  # seconds a fetch may take
ENV_FETCH_S = "APPLIANCE_PULL_FETCH_S"         # the same, where a test or a slow uplink says so
PACK_MAX = 1 << 30                             # bytes any one file git writes may reach (RLIMIT_FSIZE)
ENV_PACK_MAX = "APPLIANCE_PULL_FILE_MAX"       # the same, in bytes, where a test or a small board says so
EVERY_MIN, EVERY_MAX = 10, 7 * 86400
BACKOFF_MAX = 86400                            # seconds: the longest wait after failed checks
REFUSED_KEPT = 10
SIGNERS_MAX = 100
PROTOCOLS = "file:git:http:https:ssh"          # never ext:: or fd:: (they run commands)
URL = re.compile(r"(https?|ssh|git|file)://[^\s'\"\\]{1,400}|/[^\s'\"\\]{0,400}|[\w.-]{1,64}@[\w.-]{1,253}:[^\s'\"\\]{1,400}")
BRANCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,99}")
TRIES = 3                                      # checks in a row a job's step may fail before its version is bad


class Refused(Error):
    """A channel's commit the board will not take; the reason is kept in the site's pull state."""


# ---------------------------------------------------------------- settings


def config_path() -> Path:
    return Path(os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG)


def check_url(value: object, where: str) -> str:
    if not isinstance(value, str) or not URL.fullmatch(value) or value.startswith("-"):
        raise Error(f"{where}: url: {value!r} must be an https://, ssh://, git:// or file:// URL, user@host:path "
                    f"or an absolute path, with no spaces, quotes or backslashes")
    return value


def check_branch(value: object, where: str) -> str:
    if (not isinstance(value, str) or not BRANCH.fullmatch(value) or ".." in value or "//" in value
            or value.endswith((".lock", "/", "."))):
        raise Error(f"{where}: branch: {value!r} is not a branch name (letters, digits, '.', '_', '-', '/')")
    return value


def check_every(value: object, where: str) -> int:
    if type(value) is not int or not EVERY_MIN <= value <= EVERY_MAX:
        raise Error(f"{where}: every: {value!r} must be a whole number of seconds from {EVERY_MIN} to {EVERY_MAX}")
    return value


def check_signers(lines: object, where: str) -> list[str]:
    """An allowed_signers file's entries (comments and blank lines dropped): at least one, bounded."""
    if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
        raise Error(f"{where}: signers: must be the lines of an OpenSSH allowed_signers file")
    keep = [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]
    if not 1 <= len(keep) <= SIGNERS_MAX:
        raise Error(f"{where}: signers: {len(keep)} entries; an allowed_signers file needs 1 to {SIGNERS_MAX}")
    for x in keep:
        if len(x) > 4096 or not x.isascii() or not x.isprintable() or len(x.split()) < 2:
            raise Error(f"{where}: signers: {x[:40]!r}... is not an allowed_signers entry (PRINCIPALS [OPTIONS] "
                        f"KEYTYPE KEY, printable ASCII)")
    return keep


def settings() -> dict[str, dict[str, Any]]:
    """pull.json: {"sites": {SITE: {url, branch, every, signers: [allowed_signers lines]}}}; none when the file
    is absent or empty (no site follows a channel)."""
    path = config_path()
    try:
        text = path.read_text()
        data = json.loads(text) if text.strip() else {"sites": {}}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise Error(f"{path}: cannot read the pull settings: {exc}") from None
    if not isinstance(data, dict) or set(data) != {"sites"} or not isinstance(data["sites"], dict):
        raise Error(f"{path}: must be an object {{\"sites\": {{SITE: {{url, branch, every, signers}}}}}}")
    out = {}
    for name, d in data["sites"].items():
        where = f"{path}: sites.{name}"
        if not isinstance(d, dict) or sorted(d) != ["branch", "every", "signers", "url"]:
            raise Error(f"{where}: must have exactly url, branch, every, signers")
        out[name] = {"url": check_url(d["url"], where), "branch": check_branch(d["branch"], where),
                     "every": check_every(d["every"], where), "signers": check_signers(d["signers"], where)}
    return out


def site_settings(site: Site) -> dict[str, Any] | None:
    return settings().get(site.name)


# ---------------------------------------------------------------- the site's pull state


def pull_dir(ctx: Context, site: Site) -> Path:
    return ctx.store(site).dir / ".pull"      # a dot: never listed as a version, never pruned


def read(ctx: Context, site: Site) -> dict[str, Any]:
    path = pull_dir(ctx, site) / "state.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        data = {}
    except (OSError, ValueError) as exc:
        # the highest serial lives here: a broken file must not silently reset it to 0
        raise Error(f"{path}: cannot read the site's pull state: {exc}; remove it only if no older release may be "
                    f"replayed meanwhile") from None
    base: dict[str, Any] = {"highest": 0, "base": None, "taken": None, "job": None, "bad": {}, "refused": [],
                            "last_check": None, "last_signed": None, "failures": 0, "next": 0, "following": True,
                            "branch": None}
    return {**base, **(data if isinstance(data, dict) else {})}


def write(ctx: Context, site: Site, st: dict[str, Any]) -> None:
    """One rename and an fsync of the directory: after a power cut the old state or the new, never neither."""
    d = pull_dir(ctx, site)
    path = d / "state.json"
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".state.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(json.dumps(st, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_dir(d)
    except OSError as exc:
        raise Error(f"{path}: cannot write the site's pull state: {exc.strerror}") from None


def following(ctx: Context, site: Site) -> dict[str, Any] | None:
    """The site's pull settings with the board's own branch, when it follows a channel now; else None."""
    conf = site_settings(site)
    if conf is None:
        return None
    st = read(ctx, site)
    if not st["following"]:
        return None
    return {**conf, "branch": st["branch"] or conf["branch"]}


def follow(ctx: Context, site: Site, branch: str | None) -> dict[str, Any]:
    """`appliance-guest follow SITE [--branch B]`: follow the recipe's channel again, or another of its branches.
    A new branch starts from its own tip (the serial rule still refuses anything older than what was tried)."""
    conf = site_settings(site)
    if conf is None:
        raise Error(f"{config_path()}: site {site.name} has no pull: in the recipe; nothing to follow")
    if branch is not None:
        check_branch(branch, "follow")
    with ctx.lock(site, "follow", None, name="deploy.lock", wait=5):
        st = read(ctx, site)
        new = branch or st["branch"] or conf["branch"]
        if new != (st["branch"] or conf["branch"]):
            st["base"] = None
        st.update(following=True, branch=branch if branch is not None else st["branch"], failures=0, next=0)
        write(ctx, site, st)
    return {"ok": True, "site": site.name, "following": f"{conf['url']}@{new}"}


def unfollow(ctx: Context, site: Site, why: str = "unfollow") -> dict[str, Any]:
    if site_settings(site) is None:
        return {"ok": True, "site": site.name, "following": None}
    with ctx.lock(site, why, None, name="deploy.lock", wait=5):      # not under a check's feet
        st = read(ctx, site)
        st.update(following=False, job=None,
                  last_check={"at": round(time.time()), "ok": True, "result": f"stopped following: {why}"})
        write(ctx, site, st)
    return {"ok": True, "site": site.name, "following": None}


def push_allowed(ctx: Context, site: Site, force: bool) -> None:
    """A push deploy to a site that follows a channel is refused; with --force it goes on and the site stops
    following until `appliance-guest follow SITE`."""
    conf = following(ctx, site)
    if conf is None:
        return
    if not force:
        raise Error(f"site {site.name} follows {conf['url']}@{conf['branch']} (pull mode): a push deploy is "
                    f"refused; give --force to deploy anyway (the site then stops following until "
                    f"`appliance-guest follow {site.name}`)")
    unfollow(ctx, site, "a push deploy with --force")


# ---------------------------------------------------------------- git


def fetch_s() -> float:
    text = os.environ.get(ENV_FETCH_S, "")
    return float(text) if text.isdigit() else FETCH_S


def file_max() -> int:
    text = os.environ.get(ENV_PACK_MAX, "")
    return int(text) if text.isdigit() else PACK_MAX


def _limits() -> None:
    n = file_max()
    resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))       # a hostile channel cannot fill the disk in one file


def is_ssh(url: str) -> bool:
    return url.startswith("ssh://") or ("@" in url.split(":", 1)[0] and "://" not in url)


def board_key(ctx: Context, make: bool = True) -> Path | None:
    """The board's own SSH key for channels fetched over ssh (give the channel's server its public half, read-only),
    made at the first need; None when it is not there and make is False."""
    key = ctx.store_root.parent / "pull-key" / "id_ed25519"
    if key.exists() or not make:
        return key if key.exists() else None
    try:
        key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = key.with_name(f".id_ed25519.{os.getpid()}")
        for f in (tmp, tmp.with_suffix(tmp.suffix + ".pub")):
            f.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"appliance-pull@{os.uname().nodename}",
                        "-f", str(tmp)], check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
        os.replace(tmp.with_suffix(tmp.suffix + ".pub"), key.with_suffix(".pub"))
        os.replace(tmp, key)               # the private half last: it is what says the pair is whole
    except (OSError, subprocess.SubprocessError) as exc:
        raise Error(f"{key}: cannot make the board's pull key: {exc}") from None
    return key


def public_key(ctx: Context) -> str | None:
    """The board's pull key's public half, for `status` (made if a site follows a channel over ssh)."""
    try:
        need = any(is_ssh(c["url"]) for c in settings().values())
        key = board_key(ctx, make=need)
        return key.with_suffix(".pub").read_text().strip() if key else None
    except (Error, OSError):
        return None


def git(repo: Path, *args: str, timeout: float = 60, stdout: Any = subprocess.PIPE, check: bool = True,
        key: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """git with none of the board's or a user's config, no prompts, and only the protocols the channel may use.
    Over ssh: the board's own key only, and the server's host key trusted at the first fetch (kept per site)."""
    ident = f"-i {key} -o IdentitiesOnly=yes " if key else ""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(repo),
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_TERMINAL_PROMPT": "0",
           "GIT_ALLOW_PROTOCOL": PROTOCOLS,
           "GIT_SSH_COMMAND": f"ssh {ident}-F /dev/null -o BatchMode=yes -o ConnectTimeout=20 "
                              f"-o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={repo}/known_hosts"}
    try:
        proc = subprocess.Popen(["git", f"--git-dir={repo}", *args], stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=subprocess.PIPE, env=env, preexec_fn=_limits, start_new_session=True)
    except OSError as exc:
        raise Error(f"git: cannot run it: {exc.strerror}") from None
    tail, out = [b""], [b""]
    readers = [threading.Thread(target=_keep_tail, args=(proc.stderr, tail), daemon=True)]
    if proc.stdout:       # small: what git prints of a verified commit, or a release.json
        readers.append(threading.Thread(target=_read_all, args=(proc.stdout, out), daemon=True))
    for t in readers:
        t.start()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)                   # git and what it started (ssh, git-remote-https)
        proc.wait()
        raise Error(f"git {args[0]}: took more than {timeout:g} s") from None
    finally:
        for t in readers:
            t.join(5)
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out[0], tail[0])
    if check and (p.returncode == -signal.SIGXFSZ or f"died of signal {int(signal.SIGXFSZ)}".encode() in p.stderr):
        raise Error(f"git {args[0]}: a file it wrote reached {file_max()} bytes, the limit of one file; refused")
    if check and p.returncode and (changed := host_key_changed(p.stderr.decode(errors="replace"))):
        raise Error(changed)
    if check and p.returncode:
        last = p.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["(no message)"]
        raise Error(f"git {args[0]}: {last[0][:300]}")
    return p


def host_key_changed(stderr: str) -> str | None:
    """ssh's many-line warning about a channel server's changed host key as one line (None if it is not that).
    ssh refused it already (accept-new trusts a first key only); the board keeps serving what it has."""
    host = re.search(r"Host key for (\S+) has changed", stderr)
    if not host:
        return None
    sent = re.search(r"The fingerprint for the (\S+) key sent by the remote host is\s+(\S+?)\.?\s", stderr)
    held = re.search(r"Offending \S+ key in (.+):(\d+)", stderr)
    what = f"{sent[1]} {sent[2]}" if sent else "another key"
    where = f"line {held[2]} of {held[1]}" if held else "its known_hosts"
    return (f"{host[1]}: the host key of the channel's server has CHANGED ({what}, not the key on {where}); "
            f"refused, as it could be another machine; if the server was re-installed, delete that line and the "
            f"next check trusts its new key")


def _read_all(pipe: Any, out: list[bytes]) -> None:
    out[0] = pipe.read()


def _keep_tail(pipe: Any, tail: list[bytes], keep: int = 4096) -> None:
    """Read git's stderr to its end, keeping its last bytes (a server's messages are not bounded otherwise)."""
    while chunk := pipe.read(4096):
        tail[0] = (tail[0] + chunk)[-keep:]


def repo(ctx: Context, site: Site) -> Path:
    r = pull_dir(ctx, site) / "channel.git"
    if not (r / "HEAD").exists():
        r.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "init", "-q", "--bare", str(r)], check=True, capture_output=True,
                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_CONFIG_NOSYSTEM": "1",
                            "GIT_CONFIG_GLOBAL": "/dev/null", "HOME": str(r.parent)})
    return r


def fetch(r: Path, url: str, branch: str, key: Path | None = None) -> str:
    """The branch's tip as the channel says now (any history: the fast-forward rule is ours, after). A partial
    fetch: commits and trees only, and a file's bytes when a verified tip's folder is read (git fetches them then
    from the same remote), so the board never downloads old releases; a server that cannot filter sends it all."""
    for k, v in (("core.repositoryformatversion", "1"), ("extensions.partialClone", "channel"),
                 ("remote.channel.url", url), ("remote.channel.promisor", "true"),
                 ("remote.channel.partialclonefilter", "blob:none")):
        git(r, "config", k, v)
    git(r, "fetch", "--quiet", "--filter=blob:none", "--no-tags", "--no-write-fetch-head", "channel",
        f"+refs/heads/{branch}:refs/channel/tip", timeout=fetch_s(), key=key)
    return git(r, "rev-parse", "--verify", "refs/channel/tip^{commit}").stdout.decode().strip()


def signers_file(ctx: Context, site: Site, lines: list[str]) -> str:
    """pull.json's allowed signers as the file git hands to ssh-keygen (rewritten when they change)."""
    path = pull_dir(ctx, site) / "allowed_signers"
    text = "".join(x + "\n" for x in lines)
    try:
        if not path.exists() or path.read_text() != text:
            tmp = path.with_name(".allowed_signers.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
    except OSError as exc:
        raise Error(f"{path}: cannot write the allowed signers: {exc.strerror}") from None
    return str(path)


def verify(r: Path, commit: str, signers: str) -> dict[str, Any]:
    """The commit's SSH signature against the allowed signers, before anything it signs is read."""
    sign = ("-c", f"gpg.ssh.allowedSignersFile={signers}")
    p = git(r, *sign, "verify-commit", commit, check=False)
    fmt = git(r, *sign, "log", "-1", "--format=%G?%x00%GS%x00%GF%x00%ct", commit).stdout.decode().strip()
    good, signer, key, date = (fmt.split("\0") + ["", "", "", "0"])[:4]
    if p.returncode or good != "G":
        why = {"N": "it is not signed", "U": "it is signed by a key not in the allowed signers"}.get(
            good, "its signature does not verify")
        raise Refused(f"commit {commit[:12]}: {why}")
    return {"signer": signer, "key": key, "date": int(date)}


def tree(r: Path, commit: str, site: Site, key: Path | None) -> dict[str, tuple[str, int]]:
    """The site's folder in a verified commit: plain files only, name -> (blob, size)."""
    out = git(r, "ls-tree", "-l", "-z", "--full-tree", commit, "--", f"{site.name}/", timeout=fetch_s(),
              key=key).stdout.decode()
    files = {}
    for entry in filter(None, out.split("\0")):
        meta, _, path = entry.partition("\t")
        mode, kind, oid, size = meta.split()
        name = path[len(site.name) + 1:]
        if kind != "blob" or mode not in ("100644", "100755") or "/" in name:
            raise Refused(f"commit {commit[:12]}: {path}: a site's folder holds plain files only")
        files[name] = (oid, int(size))
    if RELEASE not in files or MANIFEST not in files:
        raise Refused(f"commit {commit[:12]}: {site.name}/ has no {RELEASE} and {MANIFEST}")
    return files


def small_json(r: Path, files: dict[str, tuple[str, int]], name: str, where: str, key: Path | None) -> Any:
    oid, size = files[name]
    if size > SMALL:
        raise Refused(f"{where}: {name}: {size} bytes, more than {SMALL}")
    try:
        return json.loads(git(r, "cat-file", "blob", oid, timeout=fetch_s(), key=key).stdout.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Refused(f"{where}: {name}: not UTF-8 JSON: {exc}") from None


def serial_of(data: object, where: str) -> int:
    if not isinstance(data, dict) or list(data) != ["serial"]:
        raise Refused(f"{where}: {RELEASE}: must be {{\"serial\": N}}")
    n = data["serial"]
    if type(n) is not int or not 1 <= n <= SERIAL_MAX:
        raise Refused(f"{where}: {RELEASE}: serial: {n!r} must be a whole number from 1 to {SERIAL_MAX}")
    return n


# ---------------------------------------------------------------- one check


def _crash(step: str) -> None:
    """A power cut at a step, for the tests only (APPLIANCE_PULL_CRASH=STEP): the process dies there at once."""
    if os.environ.get("APPLIANCE_PULL_CRASH") == step:
        os.kill(os.getpid(), 9)


def check(ctx: Context, site: Site, timer: bool = False) -> dict[str, Any]:
    """One check of the site's channel; with timer, only when it is due (its interval, grown after failures)."""
    conf = following(ctx, site)
    if conf is None:
        return {"ok": True, "site": site.name, "result": "not following"}
    st = read(ctx, site)
    now = time.time()
    if timer and now < st["next"]:
        return {"ok": True, "site": site.name, "result": f"not due for {round(st['next'] - now)} s"}
    try:
        with ctx.lock(site, "pull", None, name="deploy.lock"):
            st = read(ctx, site)
            try:
                result = _check(ctx, site, conf, st)
                st["failures"], ok = 0, True
            except Refused as exc:
                result, ok = f"refused: {exc}", True      # the channel was reached; what it offers is refused
                commit = getattr(exc, "commit", None)
                if not any(x["reason"] == str(exc) for x in st["refused"]):
                    st["refused"] = [*st["refused"], {"at": round(time.time()), "commit": commit,
                                                      "reason": str(exc)}][-REFUSED_KEPT:]
                log(f"site {site.name}: {result}")
            except Error as exc:
                st["failures"] += 1
                result, ok = f"failed: {exc}", False
                log(f"site {site.name}: pull {result}")
            wait = min(conf["every"] * 2 ** min(st["failures"], 12), BACKOFF_MAX)
            st.update(last_check={"at": round(time.time()), "ok": ok, "result": result},
                      next=round(time.time() + wait * random.uniform(0.9, 1.1)))
            write(ctx, site, st)
    except Busy as exc:
        return {"ok": False, "site": site.name, "result": f"busy: {exc}"}
    return {"ok": ok, "site": site.name, "result": result, "next_in_s": round(wait), "failures": st["failures"],
            "serving": st["taken"], "highest": st["highest"]}


def _refuse(commit: str, exc: Refused) -> Refused:
    exc.commit = commit      # type: ignore[attr-defined]
    return exc


def _check(ctx: Context, site: Site, conf: dict[str, Any], st: dict[str, Any]) -> str:
    """Fetch, verify, then resume or start a job. st is updated in place (and written at each step)."""
    r = repo(ctx, site)
    if st["job"]:                                   # a power cut in the middle of a take: finish it first
        return _resume(ctx, site, r, st)
    key = board_key(ctx) if is_ssh(conf["url"]) else None
    tip = fetch(r, conf["url"], conf["branch"], key)
    if tip == st["base"]:
        return f"up to date at {tip[:12]}"
    try:
        if st["base"] and git(r, "merge-base", "--is-ancestor", st["base"], tip, check=False).returncode:
            raise Refused(f"commit {tip[:12]} is not a fast-forward of {st['base'][:12]}, which the board has "
                          f"(the channel's history was rewritten)")
        sig = verify(r, tip, signers_file(ctx, site, conf["signers"]))   # nothing the commit signs is read before
        st["last_signed"] = {"commit": tip, "date": sig["date"], "signer": sig["signer"]}
        files = tree(r, tip, site, key)
        where = f"commit {tip[:12]}: {site.name}"
        serial = serial_of(small_json(r, files, RELEASE, where, key), where)
        data = small_json(r, files, MANIFEST, where, key)
        m = manifest.validate({**data, "name": site.name} if isinstance(data, dict) else data,
                              f"{where}/{MANIFEST}", site.defaults())
        taken = st["taken"] or {}
        if serial == st["highest"] and taken.get("serial") == serial and taken.get("version") == m.version:
            st["base"] = tip                            # another site's release, or the same one again
            write(ctx, site, st)
            return f"up to date at {tip[:12]} (serial {serial}, {m.version})"
        if serial <= st["highest"]:
            raise Refused(f"{where}: serial {serial} ({m.version}) is not higher than {st['highest']}, the highest "
                          f"this board has tried (an older release replayed)")
        if m.version in st["bad"]:
            raise Refused(f"{where}: version {m.version} failed on this board before: {st['bad'][m.version]}")
        have = ctx.store(site).dir / m.version
        if have.is_dir() and ctx.store(site).load(m.version, site.defaults()).sha256 != m.sha256:
            raise Refused(f"{where}: the board already has a version {m.version} with other files")
        if sorted(files) != sorted([RELEASE, MANIFEST, *m.files]):
            raise Refused(f"{where}: holds {', '.join(sorted(files))}; a release is {RELEASE}, {MANIFEST} and "
                          f"{', '.join(m.files)}")
    except Refused as exc:
        raise _refuse(tip, exc) from None
    # from here the job is the board's: the serial is spent (a replay of it, or anything older, is refused)
    st.update(highest=serial, job={"commit": tip, "serial": serial, "version": m.version, "step": "stage",
                                   "files": {f: files[f] for f in m.files}, "manifest": data, **sig})
    write(ctx, site, st)
    _crash("verified")
    return _resume(ctx, site, r, st)


def _resume(ctx: Context, site: Site, r: Path, st: dict[str, Any]) -> str:
    """The job's steps; one that fails TRIES checks in a row (a release whose files do not match its manifest, a
    kernel that is not a zImage, a store that stays full) marks the version bad, and the job is dropped."""
    job = st["job"]
    try:
        return _take(ctx, site, r, st)
    except Refused:
        raise
    except Error as exc:
        job["tries"] = job.get("tries", 0) + 1
        if job["tries"] < TRIES:
            write(ctx, site, st)
            raise
        st["bad"][job["version"]] = str(exc)[:500]
        st.update(base=job["commit"], job=None)
        write(ctx, site, st)
        raise _refuse(job["commit"], Refused(f"version {job['version']} (serial {job['serial']}) failed {TRIES} "
                                             f"times at its {job['step']} step and is marked bad: {exc}")) from None


def _take(ctx: Context, site: Site, r: Path, st: dict[str, Any]) -> str:
    """The job's steps from where it stands: stage (the files out of git, as an upload), commit (the one
    validator, into the store), switch (blue-green, health-gated), done."""
    from . import staging
    from .switch import switch

    job = st["job"]
    version = job["version"]
    if job["step"] == "stage":
        sizes = {f: size for f, (_oid, size) in job["files"].items()}
        staged = staging.stage(ctx, site, {"manifest": job["manifest"], "sizes": sizes})
        if not staged["in_store"]:
            d = Path(staged["staging"])
            for f, state in staged["files"].items():
                if state["state"] != "intact":
                    _extract(r, job["files"][f][0], d / f, board_key(ctx, make=False))
        _crash("staged")
        staging.commit(ctx, site, version)
        _step(ctx, site, st, "switch")
        _crash("committed")
    if job["step"] == "switch":
        try:
            switch(ctx, site.name, version)
        except GuestFailed as exc:
            st["bad"][version] = str(exc)[:500]
            st.update(base=job["commit"], job=None)
            write(ctx, site, st)
            raise _refuse(job["commit"], Refused(f"version {version} (serial {job['serial']}) failed its health "
                                                 f"check and is marked bad: {exc}")) from None
        _step(ctx, site, st, "done")
        _crash("switched")
    st.update(base=job["commit"], job=None,
              taken={k: job[k] for k in ("commit", "serial", "version", "signer", "key", "date")})
    write(ctx, site, st)
    try:
        staging.prune(ctx, site)
    except Error as exc:
        log(f"site {site.name}: {exc}")
    return f"took {version} (serial {job['serial']}) from {job['commit'][:12]}, signed by {job['signer']}"


def _step(ctx: Context, site: Site, st: dict[str, Any], step: str) -> None:
    st["job"]["step"] = step
    write(ctx, site, st)


def _extract(r: Path, oid: str, dest: Path, key: Path | None) -> None:
    """A blob into the staging directory as the deploy's upload would leave it: .part, then the whole file."""
    part = dest.with_name(dest.name + ".part")
    with open(part, "wb") as f:
        git(r, "cat-file", "blob", oid, stdout=f, timeout=fetch_s(), key=key)   # fetched now if it is not yet
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, dest)


def check_all(ctx: Context, name: str | None, timer: bool) -> dict[str, Any]:
    """`appliance-guest pull [SITE] [--timer]`: one check of the site, or of every site that follows."""
    if name:
        return check(ctx, ctx.settings.site(name), timer)
    sites = {s.name: check(ctx, s, timer) for s in ctx.settings.sites.values() if site_settings(s)}
    return {"ok": all(s["ok"] for s in sites.values()), "sites": sites}


def summary(ctx: Context, site: Site) -> dict[str, Any] | None:
    """What status shows of a site's pull mode (a broken pull.json or pull state is shown, not raised)."""
    try:
        conf = site_settings(site)
        if conf is None:
            return None
        st = read(ctx, site)
    except Error as exc:
        return {"error": str(exc)}
    now = time.time()
    signed = st["last_signed"]
    return {"following": f"{conf['url']}@{st['branch'] or conf['branch']}" if st["following"] else None,
            "serving": st["taken"], "highest": st["highest"], "job": st["job"] and st["job"]["step"],
            "last_check": st["last_check"], "failures": st["failures"],
            "next_in_s": max(0, round(st["next"] - now)) if st["following"] else None,
            "last_signed": signed and {**signed, "age_s": round(now - signed["date"])},
            "bad": st["bad"], "refused": st["refused"]}


def _age(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f} {unit}"
    return f"{round(seconds)} s"


def summary_text(p: dict[str, Any]) -> str:
    """status's line for a site's pull mode (the host's `invoke status` prints it too)."""
    if p.get("error"):
        return f"pull mode: {p['error']}"
    serving = p.get("serving") or {}
    check = p.get("last_check") or {}
    signed = p.get("last_signed") or {}
    parts = [f"following {p['following']}" if p.get("following") else "not following",
             f"serving {serving['version']} (serial {serving['serial']}, {serving['commit'][:12]}, signed by "
             f"{serving['signer']})" if serving else "serving nothing it pulled",
             f"last check {_age(time.time() - check['at'])} ago: {check['result']}" if check else "never checked",
             f"last signed commit {signed['commit'][:12]} dated {_age(signed['age_s'])} ago" if signed else "",
             f"refused {len(p['refused'])}: {p['refused'][-1]['reason']}" if p.get("refused") else "",
             f"bad: {', '.join(p['bad'])}" if p.get("bad") else ""]
    return "; ".join(x for x in parts if x)
