"""appliance-guest: the board's guest manager. `run` is the systemd unit's supervisor; the other commands
print one JSON object on stdout and exit 0 when it says ok. A bad sites.json, store or manifest is
{"ok": false, "error": "..."}, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any, NoReturn

from . import supervisor
from .context import Context
from .errors import Error
from .launch import GuestFailed
from .overview import listing, site_status, status
from .switch import rollback, switch
from .xl import config


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise Error(f"{self.prog}: {message}")


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="appliance-guest", description="The board's guest manager: sites, versions, the switch.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    sub.add_parser("run", help="keep every site serving (the systemd unit's command)")
    for name, text in (("status", "what serves each site now"), ("list", "the versions in each site's store")):
        sub.add_parser(name, help=text).add_argument("site", nargs="?")
    sw = sub.add_parser("switch", help="blue-green switch of SITE to VERSION (or --cold: destroy, then create)")
    sw.add_argument("--cold", action="store_true")
    sw.add_argument("site")
    sw.add_argument("version")
    rb = sub.add_parser("rollback", help="switch SITE back to its previous version (or to VERSION)")
    rb.add_argument("site")
    rb.add_argument("version", nargs="?")
    cf = sub.add_parser("config", help="the xl config of SITE's serving (or given) version")
    cf.add_argument("site")
    cf.add_argument("version", nargs="?")
    sub.add_parser("stage", help="stage an upload: {manifest, sizes} on stdin; what arrived intact, what is missing"
                   ).add_argument("site")
    cm = sub.add_parser("commit", help="check SITE's staged VERSION and move it into the store")
    cm.add_argument("site")
    cm.add_argument("version")
    pr = sub.add_parser("prune", help="remove SITE's versions beyond its keep: (never current or previous)")
    pr.add_argument("site")
    pr.add_argument("--keep", type=int)
    od = sub.add_parser("on-demand", help="change an on-demand SITE's idle seconds or stop mode on the board")
    od.add_argument("site")
    od.add_argument("--idle", type=float)
    od.add_argument("--stop", choices=("destroy", "pause"))
    se = sub.add_parser("session", help="a deploy: hold SITE's deploy lock, one JSON request a line on stdin")
    se.add_argument("site", nargs="?")
    se.add_argument("--break-lock", action="store_true", help="end the deploy that holds the lock (not mid-step)")
    se.add_argument("--force", action="store_true", help="deploy to a site that follows a channel (it stops)")
    pl = sub.add_parser("pull", help="one check of SITE's (or every following site's) release channel")
    pl.add_argument("site", nargs="?")
    pl.add_argument("--timer", action="store_true", help="only the sites that are due (the systemd timer's)")
    fo = sub.add_parser("follow", help="SITE follows its release channel again (or another --branch of it)")
    fo.add_argument("site")
    fo.add_argument("--branch")
    sub.add_parser("unfollow", help="SITE stops following its release channel").add_argument("site")
    return ap


def show_config(ctx: Context, name: str, version: str | None) -> dict[str, Any]:
    site = ctx.settings.site(name)
    store = ctx.store(site)
    slot, served = ctx.served(site)
    version = version or served or store.pointer("current")
    if version is None:
        raise Error(f"{store.dir}/current: site {name} has no current version")
    slot = slot or site.slots[0]
    m = store.load(version, site.defaults())
    return {"ok": True, "site": name, "version": version, "slot": slot.name,
            "config": config(site, slot, m, store.dir / version, ctx.settings.guests)}


def run(ctx: Context) -> dict[str, Any]:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    supervisor.run(ctx, stop)
    return {"ok": True, "stopped": True}


def _stdin_json() -> object:
    try:
        return json.loads(sys.stdin.read())
    except ValueError as exc:
        raise Error(f"stdin: not JSON: {exc}") from None


def uploads(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    """A deploy's commands (staging.py), imported only for them: not by `run`, on the way to the first guest."""
    from . import pull, staging

    if args.cmd == "session":
        try:
            pull.push_allowed(ctx, staging.pick_site(ctx, args.site), args.force)
            staging.session(ctx, args.site, args.break_lock, report=site_status)
            return {"ok": True, "quiet": True}
        except Error as exc:     # before the first answer: one line, as every answer of a session
            staging.reply({"ok": False, "error": str(exc)})
            return {"ok": False, "quiet": True}
    site = ctx.settings.site(args.site)
    with staging.deploy_lock(ctx, site, getattr(args, "version", None)):
        if args.cmd == "stage":
            return staging.stage(ctx, site, _stdin_json())
        if args.cmd == "commit":
            return staging.commit(ctx, site, args.version)
        return staging.prune(ctx, site, args.keep)


def following(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    """Pull mode's commands (pull.py)."""
    from . import pull

    if args.cmd == "pull":
        return pull.check_all(ctx, args.site, args.timer)
    site = ctx.settings.site(args.site)
    if args.cmd == "follow":
        return pull.follow(ctx, site, args.branch)
    return pull.unfollow(ctx, site)


def main(argv: list[str] | None = None) -> int:
    out: dict[str, Any]
    try:
        args = parser().parse_args(argv)
        ctx = Context.from_env()
        if args.cmd == "run":
            out = run(ctx)
        elif args.cmd in ("stage", "commit", "prune", "session"):
            out = uploads(ctx, args)
        elif args.cmd in ("pull", "follow", "unfollow"):
            out = following(ctx, args)
        elif args.cmd == "status":
            out = status(ctx, args.site)
        elif args.cmd == "list":
            out = listing(ctx, args.site)
        elif args.cmd == "switch":
            out = switch(ctx, args.site, args.version, cold=args.cold)
        elif args.cmd == "rollback":
            out = rollback(ctx, args.site, args.version)
        elif args.cmd == "on-demand":
            site = ctx.settings.site(args.site)
            out = {"ok": True, "site": site.name, "on_demand": ctx.set_on_demand(site, args.idle, args.stop)}
        else:
            out = show_config(ctx, args.site, args.version)
    except GuestFailed as exc:
        out = {"ok": False, "error": str(exc), "console": exc.console}
    except Error as exc:
        out = {"ok": False, "error": str(exc)}
    except KeyboardInterrupt:
        out = {"ok": False, "error": "interrupted"}
    except Exception as exc:   # never a traceback on the board's console  # noqa: BLE001
        out = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
    if out.pop("quiet", False):      # a session has given its answers itself
        return 0 if out.get("ok") else 1
    print(json.dumps(out, indent=1), flush=True)
    return 0 if out.get("ok") else 1
