"""`invoke release`: publish a version of a site's guest to a release channel (a git repository) that boards in
pull mode follow: the bundle's files, its manifest (checked by the board's validator) and release.json with the next
serial under the site's folder, in one commit signed with an SSH key (git's gpg.format=ssh), pushed without force.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .errors import ReleaseError
from .manager import manifest
from .manager.pull import MANIFEST, RELEASE, SERIAL_MAX, check_branch, serial_of
from .manager.pull import Refused as _Refused

GIT_S = 300


def _git(work: Path, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
    try:
        p = subprocess.run(["git", "-C", str(work), *args], capture_output=True, text=True, env=env, check=False,
                           timeout=GIT_S, input=input, stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ReleaseError(f"git {args[0]}: took more than {GIT_S} s") from None
    except OSError as exc:
        raise ReleaseError(f"git: cannot run it: {exc.strerror}") from None
    if check and p.returncode:
        tail = (p.stderr.strip().splitlines() or ["(no message)"])[-1]
        verb = next(a for i, a in enumerate(args) if a != "-c" and (i == 0 or args[i - 1] != "-c"))
        raise ReleaseError(f"git {verb}: {tail}")
    return p


def signing_key(key: Path | None) -> str:
    """user.signingkey: the key file given, else the first key ssh-agent holds (git signs through the agent)."""
    if key is not None:
        if not key.is_file():
            raise ReleaseError(f"{key}: no such key file")
        return str(key.resolve())      # git signs in a clone elsewhere: a relative path would name nothing there
    try:
        p = subprocess.run(["ssh-add", "-L"], capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ReleaseError(f"ssh-add -L: {exc}") from None
    first = p.stdout.strip().splitlines()[:1]
    if p.returncode or not first:
        raise ReleaseError("no signing key: give --key FILE (an SSH private key) or add one to ssh-agent",
                           hint="a release is signed; boards take only what an allowed signer signed")
    return "key::" + first[0]


def last_serial(work: Path, site: str, where: str) -> int:
    path = work / site / RELEASE
    if not path.exists():
        return 0
    try:
        return serial_of(json.loads(path.read_text()), where)
    except (OSError, ValueError, _Refused) as exc:
        raise ReleaseError(f"{where}: {site}/{RELEASE}: {exc}") from None


def release(channel: str, site: str, m: manifest.Manifest, folder: Path, *, branch: str = "stable",
            key: Path | None = None, serial: int | None = None, signers: Path | None = None,
            message: str | None = None) -> dict[str, Any]:
    """One signed commit that makes m the site's release on the channel's branch, pushed; returns what it did."""
    check_branch(branch, "release")
    sign = signing_key(key)
    where = f"{channel}@{branch}"
    # a local channel named relative to here: git clones from a temporary folder, where it would name nothing
    source = str(Path(channel).resolve()) if "://" not in channel and Path(channel).exists() else channel
    with tempfile.TemporaryDirectory(prefix="appliance-release-") as tmp:
        work = Path(tmp) / "channel"
        _git(Path(tmp), "clone", "--quiet", "--no-checkout", "--", source, str(work))
        if _git(work, "rev-parse", "--verify", "--quiet", f"refs/remotes/origin/{branch}", check=False).returncode:
            _git(work, "checkout", "--quiet", "--orphan", branch)          # the branch's first release
        else:
            _git(work, "checkout", "--quiet", "-B", branch, f"origin/{branch}")
        last = last_serial(work, site, where)
        serial = last + 1 if serial is None else serial
        if type(serial) is not int or not last < serial <= SERIAL_MAX:
            raise ReleaseError(f"{where}: serial {serial} must be higher than {last}, the channel's last for {site} "
                               f"(and at most {SERIAL_MAX})")
        d = work / site
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        for f in m.files:
            shutil.copyfile(folder / f, d / f)
        (d / MANIFEST).write_text(manifest.to_json(m))
        (d / RELEASE).write_text(json.dumps({"serial": serial}) + "\n")
        _git(work, "add", "-A", "--", site)
        who = [] if _git(work, "config", "user.name", check=False).stdout.strip() else [
            "-c", "user.name=appliance release", "-c", "user.email=release@appliance.invalid"]
        _git(work, *who, "-c", "gpg.format=ssh", "-c", f"user.signingkey={sign}", "commit", "--quiet", "-S",
             "--allow-empty", "-m", message or f"{site} {m.version} (serial {serial})")
        commit = _git(work, "rev-parse", "HEAD").stdout.strip()
        if signers is not None:        # what the boards will check, before anything leaves this machine
            p = _git(work, "-c", f"gpg.ssh.allowedSignersFile={signers.resolve()}", "verify-commit", commit,
                     check=False)
            if p.returncode:
                raise ReleaseError(f"{signers}: the release's signature does not verify with these allowed signers "
                                   f"({(p.stderr.strip().splitlines() or ['?'])[-1]}); nothing was pushed")
        p = _git(work, "push", "--quiet", "origin", f"HEAD:refs/heads/{branch}", check=False)
        if p.returncode:
            raise ReleaseError(f"{where}: the push was refused ({(p.stderr.strip().splitlines() or ['?'])[-1]}); "
                               f"if someone released meanwhile, release again")
    return {"channel": channel, "branch": branch, "site": site, "version": m.version, "serial": serial,
            "commit": commit}


def publish(channel: str, bundle: Path | None, *, site: str | None = None, static: Path | None = None,
            recipe: str = "booth", branch: str = "stable", key: Path | None = None, serial: int | None = None,
            signers: Path | None = None, name: str | None = None, version: str | None = None) -> dict[str, Any]:
    """The task's whole body: the recipe's site (default: its first), the guest checked with the board's
    validator and the site's defaults, released. signers defaults to the site's `pull: signers:` in the recipe."""
    from . import bundles, config, deploy

    cfg = config.load(recipe)
    rec = cfg.recipe
    spec = rec.sites[0] if site is None else next((s for s in rec.sites if s.name == site), None)
    if spec is None:
        raise ReleaseError(f"{recipe}: no site {site!r} (sites: {', '.join(s.name for s in rec.sites)})")
    pull = getattr(spec, "pull", None)
    if signers is None and pull is not None:
        signers = (cfg.recipe_path.parent / pull.signers).resolve()
    with deploy.source(bundle or Path("."), name=name, version=version, static=static, recipe=recipe) as g:
        m = bundles.check_bundle(g.data, g.where, g.folder, spec.name, bundles.defaults(spec))
        return release(channel, spec.name, m, g.folder, branch=branch, key=key, serial=serial, signers=signers)
