"""Invoke tasks: thin wrappers that parse options and call into `appliance`.

Every library error is an ApplianceError; it is printed here as one line (`appliance: ERROR: …`)
and turned into a non-zero exit. `--debug` (or APPLIANCE_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from invoke import Collection, Exit, task

from appliance import log
from appliance.errors import ApplianceError


def _cli(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a task body, printing ApplianceError as one line unless --debug."""

    @functools.wraps(fn)
    def wrapper(c: Any, *args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug")) or bool(os.environ.get("APPLIANCE_DEBUG"))
        log.set_debug(debug)
        try:
            return fn(c, *args, **kwargs)
        except ApplianceError as exc:
            if debug:
                raise
            raise Exit(f"appliance: ERROR: {exc}", code=1) from None
        except KeyboardInterrupt:
            raise Exit("appliance: interrupted", code=130) from None

    return wrapper


@task(help={"recipe": "recipe name under recipes/ or a path (default: booth)",
            "dry_run": "check recipe, board, overlays, templates and host tools; build nothing",
            "authorized_keys": "an SSH public key file to install for root",
            "debug": "show commands and tracebacks"})
@_cli
def build(c, recipe="booth", dry_run=False, authorized_keys=None, debug=False):
    """Build the SD-card image of a recipe (default: booth) into build/."""
    from appliance import build as b

    b.build(recipe, dry_run=dry_run, authorized_keys=authorized_keys, cache=_cache(c))


@task(help={"all": "also drop downloaded packages and built images"})
@_cli
def clean(c, all=False, debug=False):
    """Drop the build caches (and with --all, the outputs too)."""
    from appliance import build as b

    b.clean(everything=all, cache=_cache(c))


def _positional_given(name: str, valued: set[str]) -> bool:
    """Whether a positional value follows task `name` on this command line.

    invoke cannot make a positional argument optional, yet `invoke flash` alone must offer the removable
    disks while `invoke flash /dev/sdX` names one; so the task's positional list is chosen from argv.
    """
    argv = sys.argv[1:]
    if name not in argv:
        return True  # --list, --help: show DEVICE as the positional it normally is
    rest, skip = argv[argv.index(name) + 1:], False
    for tok in rest:
        if skip or tok in valued:
            skip = not skip
            continue
        if not tok.startswith("-"):
            return True
    return False


@task(positional=["device"] if _positional_given("flash", {"--image", "-i", "--bmap", "-b", "--hostname", "-h", "--ssid",
                                                            "-s", "--passphrase-file", "-p", "--authorized-keys",
                                                            "-a"}) else [],
      help={"device": "the card's whole disk, e.g. /dev/sdb (default: choose among the removable disks)",
            "image": ".img, .img.xz, .img.gz or .img.zst to write (default: build/latest, the last built)",
            "bmap": "block map to write by (default: the image's .bmap; without one, a full write)",
            "yes": "do not ask for confirmation", "force": "also write a disk that is not removable",
            "to_file": "DEVICE is an image file to write, not a card",
            "hostname": "this card's host name (appliance.txt on its boot partition, applied at first boot)",
            "ssid": "this card's wifi name", "passphrase_file": "a file holding this card's WPA2 passphrase",
            "authorized_keys": "a file of SSH public keys this card also trusts for root",
            "debug": "show commands and tracebacks"})
@_cli
def flash(c, device=None, image=None, bmap=None, yes=False, force=False, to_file=False, hostname=None, ssid=None,
          passphrase_file=None, authorized_keys=None, debug=False):
    """Write an image to an SD card: checked, sparse and verified; then the card's own settings, if given."""
    from pathlib import Path

    from appliance import flash as f
    from appliance.flash import settings as s

    card = s.from_options(hostname, ssid, Path(passphrase_file) if passphrase_file else None,
                          Path(authorized_keys) if authorized_keys else None)
    f.flash(Path(image) if image else f.default_image(), Path(device) if device else None,
            bmap=Path(bmap) if bmap else None, yes=yes, force=force, to_file=to_file, settings=card)


@task(help={"image": "the .img to boot (default: build/latest, the last built)",
            "board": "qemu-virt or orangepi-pc (default: what the image's manifest says QEMU can boot)",
            "log": "console to this file instead of the terminal; waits for SSH and prints the ports",
            "key": "SSH private key the image trusts (for --log/--check; default: the test suite's key)",
            "timeout": "power off after this many seconds (with --log/--check: also the deadline for SSH)",
            "check": "boot to a log, wait for dom0's SSH, print the milestones and power off",
            "debug": "show commands and tracebacks"})
@_cli
def emulate(c, image=None, board=None, log=None, key=None, timeout=None, check=False, debug=False):
    """Boot the image under QEMU through its own U-Boot script, Xen and dom0; never modifies the image."""
    from pathlib import Path

    from appliance import emulate as e
    from appliance import flash as f

    img = Path(image) if image else f.default_image()
    secs = float(timeout) if timeout else None
    if not log and not check:
        raise Exit(code=e.interactive(img, board=board, timeout=secs))
    k = Path(key) if key else e.default_key()
    if k is None:
        raise Exit("appliance: ERROR: --log and --check need --key, the SSH private key the image trusts", code=1)
    marks = e.headless(img, key=k, log_path=Path(log or "build/emulate-console.log"), board=board,
                       timeout=secs or 600, stay=0 if check else secs)
    print("milestones (s from power-on): " + ", ".join(f"{n} {t:.1f}" for n, t in marks.items()))


@task(help={"recipe": "recipe name under recipes/ or a path (default: booth)",
            "static": "a folder of static files (index.html, …) for the guest to serve instead of the game",
            "debug": "show commands and tracebacks"})
@_cli
def guest(c, recipe="booth", static=None, debug=False):
    """Build the demo guest bundle (zImage + busybox httpd initramfs + the game, or --static DIR) into build/guests/."""
    from pathlib import Path

    from appliance.build import guest as g

    print(g.build_task(recipe, cache=_cache(c), static=Path(static) if static else None).path)


_SSH_HELP = {"host": "the board: user@name, name:port or an ~/.ssh/config alias (deploy: may be repeated)",
             "hosts": "a file of hosts, one a line, or an Ansible INI inventory",
             "accept_new": "trust an unknown host key and remember it (a changed key is always refused)",
             "ssh_config": "read this ssh_config instead of ~/.ssh/config and /etc/ssh/ssh_config",
             "known_hosts": "the known_hosts file (default: the ssh_config's, else ~/.ssh/known_hosts)",
             "site": "the board's site (default: its only one)", "debug": "show commands and tracebacks"}


def _ssh_help(*leave_out: str, **more: str) -> dict[str, str]:
    return {**{k: v for k, v in _SSH_HELP.items() if k not in leave_out}, **more}


def _targets(host, hosts=None, accept_new=False, ssh_config=None, known_hosts=None):
    from pathlib import Path

    from appliance import deploy as d

    names = list(host if isinstance(host, list) else [host] if host else [])
    names += d.hosts_file(Path(hosts)) if hosts else []
    if not names:
        raise Exit("appliance: ERROR: name the board with --host HOST (or --hosts FILE)", code=1)
    return [d.Target(n, Path(ssh_config) if ssh_config else None, Path(known_hosts) if known_hosts else None,
                     accept_new) for n in names]


@task(iterable=["host"], auto_shortflags=False,
      positional=["guest"] if _positional_given("deploy", {"--host", "--hosts", "--site", "--memory", "--name",
                                                           "--version", "--static", "--ssh-config", "--known-hosts",
                                                           "--parallel", "--recipe"}) else [],
      help={**_ssh_help(), "guest": "a bundle directory, a .tar/.tar.gz of one, or a bare zImage / .xen kernel",
            "memory": "MiB for a bare kernel (default: the site's)", "name": "a bare kernel's name",
            "version": "the version (default: name and content hash)",
            "static": "deploy a folder of static files, served by the demo guest's kernel and httpd",
            "parallel": "boards deployed at once (default 4)", "recipe": "the recipe --static builds for"})
@_cli
def deploy(c, guest=None, host=None, hosts=None, site=None, memory=None, name=None, version=None, static=None,
           accept_new=False, ssh_config=None, known_hosts=None, parallel=4, recipe="booth", debug=False):
    """Replace a board's (or a fleet's) served guest: upload (resumable), verify, blue-green switch, prune."""
    from pathlib import Path

    from appliance import deploy as d

    if not guest and not static:
        raise Exit("appliance: ERROR: deploy what? Give GUEST (a bundle, tarball or kernel) or --static DIR", code=1)
    targets = _targets(host, hosts, accept_new, ssh_config, known_hosts)
    with d.source(Path(guest or "."), name=name, version=version, memory=int(memory) if memory else None,
                  static=Path(static) if static else None, recipe=recipe) as g:
        rows = d.fleet(targets, g, site, int(parallel))
    print(d.table(rows))
    failed = [r for r in rows if not r.ok]
    if len(rows) == 1 and failed:
        raise Exit(f"appliance: ERROR: {failed[0].detail['error']}", code=1)
    if failed:
        raise Exit(f"appliance: ERROR: {len(failed)} of {len(rows)} boards failed: "
                   f"{', '.join(r.host for r in failed)}", code=1)


@task(auto_shortflags=False, positional=["version"] if _positional_given("rollback", {
    "--host", "--site", "--ssh-config", "--known-hosts"}) else [],
      help=_ssh_help("hosts", host="the board", version="the version to go back to (default: the previous)"))
@_cli
def rollback(c, version=None, host=None, site=None, accept_new=False, ssh_config=None, known_hosts=None,
             debug=False):
    """Switch a board's site back to its previous version (or VERSION), blue-green."""
    from appliance import deploy as d

    (t,) = _targets(host, None, accept_new, ssh_config, known_hosts)
    out = d.rollback(t, site, version)
    print(f"{t.host}: {out['site']} {out.get('from') or '-'} -> {out['version']}")


@task(auto_shortflags=False, help=_ssh_help("hosts", "site", host="the board", json="print the board's JSON"))
@_cli
def status(c, host=None, accept_new=False, ssh_config=None, known_hosts=None, json=False, debug=False):
    """Each site of a board: active version, domain, uptime, health, versions kept, free space."""
    import json as j

    from appliance import deploy as d

    (t,) = _targets(host, None, accept_new, ssh_config, known_hosts)
    out = d.status(t)
    print(j.dumps(out, indent=1) if json else d.status_text(t.host, out))


@task(auto_shortflags=False, help=_ssh_help("hosts", host="the board"))
@_cli
def guests(c, host=None, site=None, accept_new=False, ssh_config=None, known_hosts=None, debug=False):
    """The versions a board keeps for its sites (a bad one listed as bad, with why)."""
    from appliance import deploy as d

    (t,) = _targets(host, None, accept_new, ssh_config, known_hosts)
    print(d.guests_text(d.guests(t, site)))


@task(help={"timeout": "seconds to wait for answers (default 3)", "json": "print JSON",
            "debug": "show commands and tracebacks"})
@_cli
def boards(c, timeout=None, json=False, debug=False):
    """The boards on the local network (mDNS): name, address, image, version and SSH host key fingerprint."""
    import json as j

    from appliance import boards as b

    found = b.browse(b.seconds(timeout or 3, "--timeout"))
    print(j.dumps([x.as_dict() for x in found], indent=1) if json else b.table(found))


@task(help={"tier": "unit, root, ssh, browser, image, system or all (default)", "pytest_args": "extra pytest arguments"})
def test(c, tier="all", pytest_args=""):
    """Run the test suite: every tier by default."""
    marker = "" if tier == "all" else f"-m {tier}"
    c.run(f"{sys.executable} -m pytest {marker} {pytest_args}", pty=False)


@task(help={"skip_cold": "skip the cold build (it takes minutes)", "skip_flash": "skip the flash benchmark",
            "skip_boot": "skip the QEMU boot benchmark",
            "authorized_keys": "an SSH public key file for the images (default: a throwaway key made for the run)",
            "runs": "runs of each benchmark (default 3): a figure is their median, printed with the spread",
            "debug": "show commands and tracebacks"})
@_cli
def bench(c, skip_cold=False, skip_flash=False, skip_boot=False, authorized_keys=None, runs=3, debug=False):
    """Print the benchmark figures: build times, image sizes, flash and boot speed (into build/bench/)."""
    from appliance import bench as b

    b.report(b.run(cold=not skip_cold, flash=not skip_flash, boot=not skip_boot, keys=authorized_keys,
                   runs=int(runs)))


def _cache(c: Any) -> str | None:
    """The cache directory setting (`appliance.cache` in invoke.yaml, or INVOKE_APPLIANCE_CACHE); None: .cache."""
    return c.config.appliance.cache


ns = Collection(build, clean, test, flash, emulate, bench, guest, deploy, rollback, status, guests, boards)
ns.configure({"appliance": {"cache": None}})
