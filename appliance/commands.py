"""The tasks of `invoke` in a checkout and of the installed `appliance` command: thin wrappers that check
their options, call into the library and print its ApplianceError as one line (`appliance: ERROR: …`);
`--debug` (or APPLIANCE_DEBUG=1) shows the traceback instead. How a task is declared: see `command`.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from invoke import Collection, Exit, Task, task

from . import log
from .errors import ApplianceError, OptionError

# The only short flags, the same meaning on every task (README, "Tasks"); --debug has none.
SHORT_FLAGS = {"dry_run": "n", "yes": "y"}
TIERS = ("unit", "root", "ssh", "browser", "image", "system", "all")


class _Task(Task):
    """An invoke Task whose short flags come from SHORT_FLAGS alone."""

    def arg_opts(self, name: str, default: str, taken_names: set[str]) -> dict[str, Any]:
        opts = super().arg_opts(name, default, taken_names)
        if name in SHORT_FLAGS:
            opts["names"].append(SHORT_FLAGS[name])
        return opts


def command(*, help: dict[str, str], positional: Iterable[str] = (), optional_positional: str | None = None,
            iterable: Iterable[str] = ()) -> Callable[[Callable[..., Any]], Task]:
    """Declare a task: `help` for every option, `positional` names, at most one `optional_positional` (given or not
    on the command line, see _positional_given), `iterable` options that may be repeated.

    Options default to None, False or a string: numbers are parsed in the body with `number()` (invoke's own
    conversion would end in a traceback). Every task has `debug` and prints ApplianceError as one line.
    """

    def wrap(fn: Callable[..., Any]) -> Task:
        params = list(inspect.signature(fn).parameters.values())[1:]
        for p in params:
            if not (p.default is None or isinstance(p.default, bool | str)):
                raise TypeError(f"task {fn.__name__}: --{p.name} defaults to {p.default!r}; parse it with number()")
        pos = list(positional)
        if optional_positional and _positional_given(fn.__name__, _valued(params)):
            pos.append(optional_positional)
        return task(klass=_Task, auto_shortflags=False, positional=pos, iterable=list(iterable),
                    help=dict(help))(_cli(fn))

    return wrap


def _valued(params: list[inspect.Parameter]) -> set[str]:
    """The flags of these parameters that take a value (every one that is not a bool)."""
    flags: set[str] = set()
    for p in params:
        if not isinstance(p.default, bool):
            flags.add("--" + p.name.replace("_", "-"))
            if p.name in SHORT_FLAGS:
                flags.add("-" + SHORT_FLAGS[p.name])
    return flags


def _positional_given(name: str, valued: set[str], argv: list[str] | None = None) -> bool:
    """Whether a positional value follows task `name` on this command line (`invoke …` or `appliance …`).

    invoke cannot make a positional argument optional, yet `flash` alone must offer the removable disks while
    `flash /dev/sdX` names one; so the task's positional list is chosen from argv. (A pending positional would
    take `--help` as its value, so help leaves it out; the task's docstring shows it.)
    """
    argv = sys.argv[1:] if argv is None else argv
    if name not in argv:
        return True
    rest, skip = argv[argv.index(name) + 1:], False
    for tok in rest:
        if skip:
            skip = False
            continue
        if tok in valued:
            skip = True
            continue
        if not tok.startswith("-"):
            return True
    return False


def _cli(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a task body, printing ApplianceError as one line unless --debug; Ctrl-C exits 130."""

    @functools.wraps(fn)
    def wrapper(c: Any, *args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug")) or bool(os.environ.get("APPLIANCE_DEBUG"))
        log.set_debug(debug)
        log.again()      # a task's last line repeats its own warnings only
        try:
            return fn(c, *args, **kwargs)
        except ApplianceError as exc:
            if debug:
                raise
            raise Exit(f"appliance: ERROR: {exc}", code=exc.exit_code) from None
        except KeyboardInterrupt:
            raise Exit("appliance: interrupted", code=130) from None

    return wrapper


def number(option: str, value: str | None, *, kind: type[int] | type[float] = int, minimum: float = 1,
           maximum: float | None = None, default: float | None = None) -> Any:
    """An option's value as an int (or float) within [minimum, maximum]; None gives `default`."""
    if value is None:
        return default
    flag = "--" + option.replace("_", "-")
    try:
        n = kind(value)
    except ValueError:
        raise OptionError(f"{flag}: '{value}' is not a {'whole number' if kind is int else 'number'}") from None
    if not math.isfinite(n) or n < minimum or (maximum is not None and n > maximum):
        bounds = f"from {minimum:g} to {maximum:g}" if maximum is not None else f"at least {minimum:g}"
        raise OptionError(f"{flag}: {value} is out of range (give a number {bounds})")
    return n


def choice(option: str, value: str, choices: Iterable[str]) -> str:
    options = tuple(choices)
    if value not in options:
        raise OptionError(f"--{option.replace('_', '-')}: '{value}' is not one of {', '.join(options)}")
    return value


_DEBUG = "show commands and tracebacks"


@command(help={"recipe": "recipe name under recipes/ or a path (default: booth)",
               "dry_run": "check recipe, board, overlays, templates and host tools; build nothing",
               "authorized_keys": "an SSH public key file for root (default: the recipe's, else your own key: "
                                  "ssh-agent's first, else ~/.ssh/id_*.pub)",
               "output_dir": "where the image goes (default: build/ in the checkout, or build/ beside a recipe "
                             "elsewhere)",
               "no_login": "trust no SSH key: an image nobody can log in to, on purpose (default: your own key)",
               "debug": _DEBUG})
def build(c, recipe="booth", dry_run=False, authorized_keys=None, output_dir=None, no_login=False, debug=False):
    """Build the SD-card image of a recipe (default: booth) into build/."""
    from appliance import build as b

    out = b.build(recipe, dry_run=dry_run, authorized_keys=authorized_keys, cache=_cache(c),
                  out_dir=Path(output_dir).absolute() if output_dir else None, login=not no_login)
    if out is not None:
        log.info(next_step(out.img, log.again()))


@command(positional=["dir"], help={"dir": "the folder to make (absent or empty)", "debug": _DEBUG})
def init(c, dir=None, debug=False):
    """Write a booth folder of your own: a recipe naming the shipped sites, a static site to edit, a README.

    init DIR
    """
    from appliance import starter

    if not dir:
        raise OptionError("init DIR: name the folder to make")
    recipe = starter.init(Path(dir))
    print(f"wrote {recipe.parent}/ (booth.yaml, site/index.html, README.md); check it with: "
          f"{_program()} build --recipe {recipe} --dry-run")


def next_step(img: Path, warnings: list[str], program: str | None = None) -> str:
    """A build's last line: what to do next, and any warning that matters for it (an image nobody can log in to)."""
    from appliance import latest_image

    program = program or _program()
    image = "" if img.parent.resolve() == latest_image().parent.resolve() else f" --image {img}"
    return f"next: {program} flash{image} /dev/sdX (the card's whole disk)" + "".join(
        f"; WARNING: {w}" for w in warnings)


def _program() -> str:
    from appliance import invoked_as

    return invoked_as()


@command(help={"all": "also drop the outputs (build/)", "debug": _DEBUG})
def clean(c, all=False, debug=False):
    """Drop what the builds cached (and with --all, the outputs too)."""
    from appliance import build as b

    b.clean(everything=all, cache=_cache(c))


@command(optional_positional="device",
         help={"device": "DEVICE, the card's whole disk, e.g. /dev/sdb (default: choose among the removable disks)",
               "image": ".img, .img.xz, .img.gz or .img.zst to write (default: build/latest, the last built)",
               "bmap": "block map to write by (default: the image's .bmap; without one, a full write)",
               "yes": "do not ask for confirmation",
               "force": "also write a disk that is not removable, or (--to-file) over an existing file",
               "to_file": "DEVICE is an image file to write, not a card",
               "hostname": "this card's host name (appliance.txt on its boot partition, applied at first boot)",
               "ssid": "this card's wifi name", "passphrase_file": "a file holding this card's WPA2 passphrase",
               "authorized_keys": "a file of SSH public keys this card also trusts for root", "debug": _DEBUG})
def flash(c, device=None, image=None, bmap=None, yes=False, force=False, to_file=False, hostname=None, ssid=None,
          passphrase_file=None, authorized_keys=None, debug=False):
    """Write an image to an SD card: checked, sparse and verified; then the card's own settings, if given.

    flash [DEVICE] [--image FILE] [--bmap FILE] [--yes] [--force] [--to-file] [--hostname NAME] [--ssid S] [--passphrase-file F] [--authorized-keys F]
    """
    from pathlib import Path

    from appliance import flash as f
    from appliance.flash import settings as s

    card = s.from_options(hostname, ssid, Path(passphrase_file) if passphrase_file else None,
                          Path(authorized_keys) if authorized_keys else None)
    f.flash(Path(image) if image else f.default_image(), Path(device) if device else None,
            bmap=Path(bmap) if bmap else None, yes=yes, force=force, to_file=to_file, settings=card)


@command(help={"image": "the .img to boot (default: build/latest, the last built)",
               "board": "qemu-virt or orangepi-pc (default: what the image's manifest says QEMU can boot)",
               "log": "console to this file instead of the terminal; waits for SSH and prints the ports",
               "key": "SSH private key the image trusts (for --log/--check; default: the test suite's key, else "
                      "yours in ~/.ssh or ssh-agent that the image's manifest lists)",
               "timeout": "power off after this many seconds (with --log/--check: also the deadline for SSH)",
               "check": "boot to a log, wait for dom0's SSH, print the milestones and power off", "debug": _DEBUG})
def emulate(c, image=None, board=None, log=None, key=None, timeout=None, check=False, debug=False):
    """Boot the image under QEMU through its own U-Boot script, Xen and dom0; never modifies the image."""
    from pathlib import Path

    from appliance import emulate as e
    from appliance import flash as f

    secs = number("timeout", timeout, kind=float)
    img = Path(image) if image else f.default_image()
    if not log and not check:
        raise Exit(code=e.interactive(img, board=board, timeout=secs))
    k = Path(key) if key else e.default_key(img)
    e.check_key(e.check_image(img), k)   # keyless, a key it does not trust, none in ssh-agent: said at once
    marks = e.headless(img, key=k, log_path=Path(log or "build/emulate-console.log"), board=board,
                       timeout=secs or 600, stay=0 if check else secs)
    print("milestones (s from power-on): " + ", ".join(f"{n} {t:.1f}" for n, t in marks.items()))


@command(help={"recipe": "recipe name under recipes/ or a path (default: booth)",
               "static": "a folder of static files (index.html, …) for the guest to serve instead of the game",
               "debug": _DEBUG})
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
             "site": "the board's site (default: its first, said in the output)", "debug": _DEBUG}


def _ssh_help(*leave_out: str, **more: str) -> dict[str, str]:
    return {**{k: v for k, v in _SSH_HELP.items() if k not in leave_out}, **more}


def _targets(host, hosts=None, accept_new=False, ssh_config=None, known_hosts=None, break_lock=False, limit=None):
    from pathlib import Path

    from appliance import deploy as d

    if limit and not hosts:
        raise OptionError("--limit picks hosts of a --hosts FILE")
    named = [(None, n) for n in (host if isinstance(host, list) else [host] if host else [])]
    named += d.hosts_file(Path(hosts), limit) if hosts else []
    if not named:
        raise OptionError("name the board with --host HOST (or --hosts FILE)")
    return [d.Target(dest, Path(ssh_config) if ssh_config else None, Path(known_hosts) if known_hosts else None,
                     accept_new, break_lock=break_lock, name=label) for label, dest in named]


@command(optional_positional="guest", iterable=["host"],
         help={**_ssh_help(), "guest": "a bundle directory, a .tar/.tar.gz of one, or a bare zImage / .xen kernel",
               "memory": "MiB for a bare kernel (default: the site's)", "name": "a bare kernel's name",
               "version": "the version (default: name and content hash)",
               "static": "deploy a folder of static files, served by the demo guest's kernel and httpd",
               "parallel": "boards deployed at once (default 4, at most 64)",
               "recipe": "the recipe --static builds for",
               "break_lock": "end the deploy that holds the site's lock (named in the output; never one mid-step)",
               "limit": "only these hosts or groups of --hosts (Ansible's --limit: names, globs, ',' between, "
                        "'!' out)",
               "force": "deploy to a site that follows a release channel (it stops following; README, Pull mode)"})
def deploy(c, guest=None, host=None, hosts=None, site=None, memory=None, name=None, version=None, static=None,
           accept_new=False, ssh_config=None, known_hosts=None, parallel=None, recipe="booth", break_lock=False,
           limit=None, force=False, debug=False):
    """Replace a board's (or a fleet's) served guest: upload (resumable), verify, blue-green switch, prune.

    deploy --host HOST [--host HOST2 …] | --hosts FILE [--limit L] [--site SITE] [--memory MIB] [--name NAME] [--parallel N] [--break-lock] [--force] GUEST | --static DIR
    """
    from pathlib import Path

    from appliance import deploy as d

    mib = number("memory", memory)
    at_once = number("parallel", parallel, maximum=64, default=4)
    if not guest and not static:
        raise OptionError("deploy what? Give GUEST (a bundle, tarball or kernel) or --static DIR")
    targets = _targets(host, hosts, accept_new, ssh_config, known_hosts, break_lock, limit)
    with d.source(Path(guest or "."), name=name, version=version, memory=mib,
                  static=Path(static) if static else None, recipe=recipe) as g:
        rows = d.fleet(targets, g, site, at_once, force=force)
    print(d.table(rows))
    failed = [r for r in rows if not r.ok]
    if len(rows) == 1 and failed:
        raise Exit(f"appliance: ERROR: {failed[0].detail['error']}", code=1)
    if failed:
        raise Exit(f"appliance: ERROR: {len(failed)} of {len(rows)} boards failed: "
                   f"{', '.join(r.host for r in failed)}", code=1)


@command(optional_positional="guest",
         help={"guest": "a bundle directory, a .tar/.tar.gz of one, or a bare zImage / .xen kernel",
               "channel": "the release channel: a git URL or a local repository",
               "site": "the recipe's site (default: its first)", "branch": "the channel's branch (default: stable)",
               "key": "the SSH private key to sign with (default: ssh-agent's)",
               "serial": "the release's serial (default: the channel's last for the site + 1)",
               "signers": "check the signature with this allowed_signers file before pushing (default: the site's "
                          "pull: signers)",
               "static": "release a folder of static files, served by the demo guest",
               "recipe": "the recipe (default: booth)", "name": "a bare kernel's name",
               "version": "the version (default: name and content hash)", "debug": _DEBUG})
def release(c, guest=None, channel=None, site=None, branch="stable", key=None, serial=None, signers=None, static=None,
            recipe="booth", name=None, version=None, debug=False):
    """Publish a guest to a release channel (pull mode): one signed commit, pushed; boards following it take it.

    release --channel DIR_OR_GIT_URL [--site SITE] [--branch B] [--key FILE] [--serial N] GUEST | --static DIR
    """
    from pathlib import Path

    from appliance import release as r

    n = number("serial", serial, maximum=2**53)
    if not channel or not (guest or static):
        raise OptionError("give --channel DIR_OR_GIT_URL and GUEST (a bundle) or --static DIR")
    out = r.publish(channel, Path(guest) if guest else None, site=site, static=Path(static) if static else None,
                    recipe=recipe, branch=branch, key=Path(key) if key else None, serial=n,
                    signers=Path(signers) if signers else None, name=name, version=version)
    print(f"{out['channel']}@{out['branch']}: {out['site']} {out['version']} (serial {out['serial']}) "
          f"{out['commit'][:12]}")


@command(optional_positional="version",
         help=_ssh_help("hosts", host="the board", version="the version to go back to (default: the previous)"))
def rollback(c, version=None, host=None, site=None, accept_new=False, ssh_config=None, known_hosts=None,
             debug=False):
    """Switch a board's site back to its previous version (or VERSION), blue-green.

    rollback --host HOST [--site SITE] [VERSION]
    """
    from appliance import deploy as d

    (t,) = _targets(host, None, accept_new, ssh_config, known_hosts)
    out = d.rollback(t, site, version)
    print(f"{t.host}: {out['site']} {out.get('from') or '-'} -> {out['version']}")


@command(iterable=["host"],
         help=_ssh_help("site", json="print the whole JSON (one board's object; for several, one per board)",
                        parallel="boards asked at once (default 4, at most 64)",
                        limit="only these hosts or groups of --hosts"))
def status(c, host=None, hosts=None, accept_new=False, ssh_config=None, known_hosts=None, json=False, parallel=None,
           limit=None, debug=False):
    """Every site of a board (or a fleet), whatever its health: state (asleep shown as asleep), version, health,
    uptime, previous, versions kept, free space; exits non-zero when one is failing."""
    import json as j

    from appliance import deploy as d

    at_once = number("parallel", parallel, maximum=64, default=4)
    targets = _targets(host, hosts, accept_new, ssh_config, known_hosts, limit=limit)
    boards = d.fleet_status(targets, at_once)
    print(j.dumps(next(iter(boards.values())) if len(boards) == 1 else boards, indent=1) if json
          else d.status_table(boards))
    failing = [h for h, out in boards.items() if not out.get("ok")]
    if failing:
        raise Exit(f"appliance: ERROR: {len(failing)} of {len(boards)} boards have a failing site: "
                   f"{', '.join(failing)}", code=1)


@command(help=_ssh_help("hosts", host="the board"))
def guests(c, host=None, site=None, accept_new=False, ssh_config=None, known_hosts=None, debug=False):
    """The versions a board keeps for its sites (a bad one listed as bad, with why)."""
    from appliance import deploy as d

    (t,) = _targets(host, None, accept_new, ssh_config, known_hosts)
    print(d.guests_text(d.guests(t, site)))


@command(help={"timeout": "seconds to wait for answers (default 3)", "json": "print JSON", "debug": _DEBUG})
def boards(c, timeout=None, json=False, debug=False):
    """The boards on the local network (mDNS): name, address, image, version and SSH host key fingerprint."""
    import json as j

    from appliance import boards as b

    found = b.browse(number("timeout", timeout, kind=float, minimum=0.1, maximum=60, default=3.0))
    print(j.dumps([x.as_dict() for x in found], indent=1) if json else b.table(found))


@command(help={"tier": "unit, root, ssh, browser, image, system or all (default)",
               "pytest_args": "extra pytest arguments", "debug": _DEBUG})
def test(c, tier="all", pytest_args="", debug=False):
    """Run the test suite (from the checkout): every tier by default."""
    from appliance import ROOT, checkout

    marker = "" if choice("tier", tier, TIERS) == "all" else f"-m {tier}"
    if not checkout():
        raise OptionError(f"the test suite runs from a checkout; {ROOT} is not one")
    with c.cd(str(ROOT)):
        c.run(f"{sys.executable} -m pytest {marker} {pytest_args}", pty=False)


@command(help={"skip_cold": "skip the cold build (it takes minutes)", "skip_flash": "skip the flash benchmark",
               "skip_boot": "skip the QEMU boot benchmark",
               "authorized_keys": "an SSH public key file for the images (default: a throwaway key made for the run)",
               "runs": "runs of each benchmark (default 3): a figure is their median, printed with the spread",
               "only": "only these sections of the emulated board's benchmark, comma-separated (switch, deploy, "
                       "pull, wake), on one boot of --image: no build, flash or boot figures",
               "image": "with --only: the .img to boot (default: build/latest, the last built)",
               "key": "with --only: the SSH private key the image trusts (default: as `emulate` picks it)",
               "debug": _DEBUG})
def bench(c, skip_cold=False, skip_flash=False, skip_boot=False, authorized_keys=None, runs=None, only=None,
          image=None, key=None, debug=False):
    """Print the benchmark figures: build times, image sizes, flash and boot speed (into build/bench/)."""
    from pathlib import Path

    from appliance import ROOT, checkout
    from appliance import bench as b

    n = number("runs", runs, maximum=100, default=3)
    if not checkout():
        raise OptionError(f"the benchmarks run from a checkout (into its build/bench/); {ROOT} is not one")
    if only is None:
        if image or key:
            raise OptionError("--image and --key go with --only (the whole benchmark builds its own images)")
        b.report(b.run(cold=not skip_cold, flash=not skip_flash, boot=not skip_boot, keys=authorized_keys, runs=n))
        return
    sections = [choice("only", x.strip(), b.SECTIONS) for x in only.split(",")]
    from appliance import emulate as e
    from appliance import flash as f

    img = Path(image) if image else f.default_image()
    k = Path(key) if key else e.default_key(img)
    e.check_key(e.check_image(img), k)
    if k is None:
        raise OptionError("--only needs --key, the SSH private key the image trusts")
    b.report(b.sections(img, k, sections, runs=n))


def _cache(c: Any) -> str | None:
    """The cache directory setting (`appliance.cache` in invoke.yaml, or INVOKE_APPLIANCE_CACHE); None: default."""
    return c.config.appliance.cache


ns = Collection(build, init, clean, test, flash, emulate, bench, guest, deploy, release, rollback, status, guests, boards)
ns.configure({"appliance": {"cache": None}})
