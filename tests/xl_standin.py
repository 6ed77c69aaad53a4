#!/usr/bin/env python3
"""A stand-in for `xl` in the namespace double of the board: `create CFG` makes a network namespace for the
domain, plugs a veth into the config's bridge with the vif's MAC, gives it the address of the cmdline's ip=,
and runs a tiny guest there whose behaviour is the tail of its "kernel" file (after the zImage header):
  serve:<page>              answers every GET with the page (and /cgi-bin/status as the demo guest does: the
                            figures dom0 posted to /cgi-bin/lifetime on the figures' port, lifetime.PORT, given back)
  busybox                   the demo guest's own httpds and CGIs (guest/site, guest/dom0) as its init starts them
  slow-start:<s>:<page>     answers only after s seconds
  never-answer              accepts connections and never answers
  crash-after:<s>           boots, never serves, and dies after s seconds (on_crash=destroy: the domain goes)
  stubborn:<page>           serves as serve: does, and ignores `xl shutdown`
A serving guest also answers GET /slow/<bytes>/<seconds> with that many bytes spread over that many seconds. On
`xl shutdown` (SIGTERM) it stops taking connections, finishes those under way (an idle one is never closed), and
powers off, as the demo guest does.
The vif joins its bridge through the board's own vif-appliance (APPLIANCE_SLOTS: the slots file it reads).
`pause` and `unpause` stop and continue the guest's processes (SIGSTOP, SIGCONT).
Its stdout is the domain's console log, <XL_STANDIN_CONSOLE>/guest-<name>.log, like xenconsoled's.
The environment: XL_STANDIN_DIR (its state), XL_STANDIN_PREFIX (namespace names), XL_STANDIN_CONSOLE,
XL_STANDIN_MEMORY (MiB Xen has for guests).
"""

from __future__ import annotations

import fcntl
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HEADER = 0x30
VIF = Path(__file__).resolve().parent.parent / "overlays/booth/etc/xen/scripts/vif-appliance"


def sh(*argv: str) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, check=False)
    if p.returncode:
        raise SystemExit(f"xl stand-in: {' '.join(argv)}: {p.stderr.strip()}")


class Domains:
    def __init__(self) -> None:
        self.dir = Path(os.environ["XL_STANDIN_DIR"])
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix = os.environ.get("XL_STANDIN_PREFIX", "xls")
        self.lock = open(self.dir / "lock", "w")
        fcntl.flock(self.lock, fcntl.LOCK_EX)     # one xl at a time, as xl itself takes a lock

    def all(self) -> dict[str, dict]:
        out = {}
        for p in self.dir.glob("*.json"):
            d = json.loads(p.read_text())
            if self.alive(d):
                out[d["name"]] = d
            else:
                self.remove(d)                     # crashed: on_crash = "destroy"
        return out

    @staticmethod
    def alive(d: dict) -> bool:
        try:
            cmd = Path(f"/proc/{d['pid']}/cmdline").read_bytes()
            state = Path(f"/proc/{d['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        # cmdline reads empty while `ip netns exec` is exec'ing the guest: that is not a dead domain
        return (not cmd or b"xl_standin" in cmd) and state != "Z"

    def remove(self, d: dict) -> None:
        try:
            os.killpg(d["pid"], signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        subprocess.run(["ip", "netns", "del", d["netns"]], capture_output=True, check=False)
        if "domid" in d:
            hotplug(self, "offline", d["domid"], f"vif{d['domid']}.0")
        (self.dir / f"{d['name']}.json").unlink(missing_ok=True)

    def next_id(self) -> int:
        p = self.dir / "next-domid"
        n = int(p.read_text()) if p.exists() else 1
        p.write_text(str(n + 1))
        return n


def hotplug(doms: Domains, action: str, domid: int, vif: str, **backend: str) -> None:
    """Run the board's own vif script (VIF, as xl would: XENBUS_PATH and vif in its environment) with xenstore-read
    and xenstore-write stand-ins on a folder of files; online must end with hotplug-status "connected"."""
    store, bin_ = doms.dir / "xenstore", doms.dir / "bin"
    if not bin_.exists():
        bin_.mkdir()
        (bin_ / "xenstore-read").write_text('#!/bin/sh\nfor p; do cat "$XENSTORE/$p" || exit 1; echo; done\n')
        (bin_ / "xenstore-write").write_text('#!/bin/sh\nprintf %s "$2" > "$XENSTORE/$1"\n')
        for f in bin_.iterdir():
            f.chmod(0o755)
    path = f"backend/vif/{domid}/0"
    (store / path).mkdir(parents=True, exist_ok=True)
    for key, value in backend.items():
        (store / path / key).write_text(value)
    env = {**os.environ, "XENSTORE": str(store), "XENBUS_PATH": path, "vif": vif,
           "PATH": f"{bin_}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    p = subprocess.run(["/bin/sh", str(VIF), action], env=env, capture_output=True, text=True, check=False)
    if action == "online" and (p.returncode or not (store / path / "hotplug-status").exists()):
        raise SystemExit(f"xl stand-in: vif-appliance online {vif}: {p.stderr.strip() or p.returncode}")


def create(cfg: Path) -> None:
    text = cfg.read_text()

    def value(key: str) -> str:
        m = re.search(rf'^{key} = "(.*)"$', text, re.M)
        if not m:
            raise SystemExit(f"xl stand-in: {cfg}: no {key}")
        return m.group(1)

    name, kernel, extra = value("name"), value("kernel"), value("extra")
    memory = int(re.search(r"^memory = (\d+)$", text, re.M).group(1))   # type: ignore[union-attr]
    vif = re.search(r"^vif = \['mac=([0-9a-f:]+),bridge=([\w.-]+)'\]$", text, re.M)
    ip = re.search(r"\bip=([\d.]+)::([\d.]+):([\d.]+):", extra)
    port = re.search(r"\bappliance\.port=(\d+)", extra)
    if not (vif and ip and port):
        raise SystemExit(f"xl stand-in: {cfg}: vif, ip= or appliance.port= missing")
    doms = Domains()
    have = doms.all()
    if name in have:
        raise SystemExit(f"xl stand-in: domain {name} already exists")
    free = int(os.environ.get("XL_STANDIN_MEMORY", "1024")) - sum(d["memory"] for d in have.values())
    if memory > free:
        raise SystemExit(f"xl stand-in: not enough memory for {name}: {memory} > {free}")
    domid = doms.next_id()
    ns, host = f"{doms.prefix}{domid}", f"vif{domid}.0"
    prefix = sum(bin(int(b)).count("1") for b in ip.group(3).split("."))
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
    hotplug(doms, "online", domid, host, mac=vif.group(1), bridge=vif.group(2))
    sh("ip", "-n", ns, "link", "set", "eth0", "address", vif.group(1))
    sh("ip", "-n", ns, "addr", "add", f"{ip.group(1)}/{prefix}", "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", ns, "route", "add", "default", "via", ip.group(2))
    console = Path(os.environ.get("XL_STANDIN_CONSOLE", "/tmp")) / f"guest-{name}.log"
    console.parent.mkdir(parents=True, exist_ok=True)
    with open(console, "ab") as log:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "guest",
                                 kernel, port.group(1), name, ip.group(2)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    d = {"name": name, "domid": domid, "pid": proc.pid, "netns": ns, "memory": memory,
         "nice": os.nice(0)}    # the priority xl create ran at (a wake at boot runs below the visitors' path)
    (doms.dir / f"{name}.json").write_text(json.dumps(d))


FIGURES_PORT = 8901     # appliance.manager.lifetime.PORT (this script runs without the package on its path)


def busybox_guest(port: int, name: str, gateway: str) -> None:
    """The demo guest's httpds as guest/init starts them, on the host's busybox (its sh runs the CGIs)."""
    import shutil

    src, root = Path(__file__).resolve().parent.parent / "guest", Path(os.environ["XL_STANDIN_DIR"]) / f"guest-{name}"
    busybox = shutil.which("busybox") or "busybox"
    shutil.rmtree(root, ignore_errors=True)
    for tree in ("site", "dom0"):
        shutil.copytree(src / tree, root / ("www" if tree == "site" else tree))
    for script in [*(root / "www/cgi-bin").iterdir(), *(root / "dom0/cgi-bin").iterdir()]:
        script.write_text(f"#!{busybox} sh\n" + script.read_text().split("\n", 1)[1])
    (root / "state").mkdir()
    (root / "state/dom0").write_text(gateway + "\n")
    (root / "httpd.conf").write_text(f"E404:{root}/www/index.html\n")
    env = {"PATH": "/usr/bin:/bin", "APPLIANCE_GUEST_STATE": str(root / "state")}
    for args in (["-p", str(port), "-h", str(root / "www"), "-c", str(root / "httpd.conf")],
                 ["-p", str(FIGURES_PORT), "-h", str(root / "dom0")]):
        subprocess.Popen([busybox, "httpd", "-f", *args], env=env)
    print(f"stand-in guest: busybox httpd on ports {port} and {FIGURES_PORT}", flush=True)
    signal.sigwait({signal.SIGTERM})


def guest(kernel: str, port: int, name: str, gateway: str) -> None:
    """The guest itself, inside its namespace."""
    what = Path(kernel).read_bytes()[HEADER:].decode()
    print(f"Booting Linux on physical CPU 0x0 (stand-in {name})", flush=True)
    print(f"stand-in guest: {what}", flush=True)
    kind, _, rest = what.partition(":")
    if kind == "busybox":
        busybox_guest(port, name, gateway)
        return
    if kind == "crash-after":
        time.sleep(float(rest))
        print("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100", flush=True)
        os._exit(1)
    asked = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: asked.set())
    if kind == "slow-start":
        delay, _, rest = rest.partition(":")
        time.sleep(float(delay))
        kind = "serve"
    page = rest.encode()
    if kind == "never-answer":
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", port))
        s.listen(64)
        held = []
        while True:
            held.append(s.accept()[0])

    told: dict = {}

    class Page(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            slow = re.fullmatch(r"/slow/(\d+)/([\d.]+)", self.path)
            if slow:
                size, seconds = int(slow.group(1)), float(slow.group(2))
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                chunks = max(1, int(seconds * 20))
                for i in range(chunks):
                    self.wfile.write(b"x" * (size * (i + 1) // chunks - size * i // chunks))
                    self.wfile.flush()
                    time.sleep(seconds / chunks)
                return
            body = page
            if self.path == "/cgi-bin/status":     # as the demo guest's: its name and what dom0 last told it
                body = json.dumps({"name": name, **told}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            figures = self.server.server_address[1] == FIGURES_PORT
            ok = figures and self.path == "/cgi-bin/lifetime" and self.client_address[0] == gateway
            if ok:
                told.clear()
                told.update(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200 if ok else 403 if figures else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    busy = [0]

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 128
        daemon_threads = True

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            busy[0] += 1
            try:
                super().process_request_thread(request, client_address)
            finally:
                busy[0] -= 1

    servers = [Server(("", p), Page) for p in {port, FIGURES_PORT}]
    print(f"stand-in guest: serving on port {port}", flush=True)
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    while True:
        asked.wait()
        if kind != "stubborn":
            break
        print("stand-in guest: a shutdown request, ignored", flush=True)
        asked.clear()
    print("stand-in guest: shutting down: no new connections, finishing those under way", flush=True)
    time.sleep(1)                 # as the demo guest: a connection that raced the switch is still taken
    for server in servers:
        server.shutdown()
        server.socket.close()
    while busy[0]:
        time.sleep(0.05)
    print("reboot: Power down", flush=True)


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "guest":
        guest(args[0], int(args[1]), args[2], args[3])
        return
    if cmd == "create":
        create(Path(args[0]))
        return
    if cmd == "plug":          # the tests' own guests (a hostile one): VIF MAC BRIDGE DOMID, plugged as xl would
        hotplug(Domains(), "online", int(args[3]), args[0], mac=args[1], bridge=args[2])
        return
    doms = Domains()
    have = doms.all()
    if cmd == "domid":
        if args[0] not in have:
            raise SystemExit(f"Can't get domid of domain name '{args[0]}', maybe this domain does not exist.")
        print(have[args[0]]["domid"])
    elif cmd == "destroy":
        if args[0] not in have:
            raise SystemExit(f"xl stand-in: no domain {args[0]}")
        doms.remove(have[args[0]])
    elif cmd == "shutdown":                       # the guest's own business: it powers off when it is done
        if args[0] not in have:
            raise SystemExit(f"xl stand-in: no domain {args[0]}")
        try:
            os.kill(have[args[0]]["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    elif cmd in ("pause", "unpause"):
        if args[0] not in have:
            raise SystemExit(f"xl stand-in: no domain {args[0]}")
        if cmd == "unpause" and not have[args[0]].get("paused"):
            raise SystemExit("libxl: error: unpausing domain: Invalid argument")   # as Xen's EINVAL
        os.killpg(have[args[0]]["pid"], signal.SIGSTOP if cmd == "pause" else signal.SIGCONT)
        have[args[0]]["paused"] = cmd == "pause"
        (doms.dir / f"{args[0]}.json").write_text(json.dumps(have[args[0]]))
    elif cmd == "list":
        if args and args[0] not in have:
            raise SystemExit(f"xl stand-in: no domain {args[0]}")
        print("Name                                        ID   Mem VCPUs\tState\tTime(s)")
        if not args:
            print("Domain-0                                     0   512     2     r-----      1.0")
        for d in have.values():
            if not args or d["name"] == args[0]:
                state = "--p---" if d.get("paused") else "-b----"
                print(f"{d['name']:<40} {d['domid']:>5} {d['memory']:>5}     1     {state}      0.1")
    elif cmd == "info":
        free = int(os.environ.get("XL_STANDIN_MEMORY", "1024")) - sum(d["memory"] for d in have.values())
        print(f"host                   : stand-in\nfree_memory            : {free}")
    else:
        raise SystemExit(f"xl stand-in: {cmd}: not a command it knows")


if __name__ == "__main__":
    main(sys.argv[1:])
