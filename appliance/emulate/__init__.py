"""Boot an image file under QEMU the way a card boots: U-Boot -> the image's own boot.scr -> Xen -> dom0 -> guest.

The image is never written (QEMU keeps the board's writes in a throw-away overlay). dom0's SSH is forwarded
to a free host port, the guest's HTTP to another (through that SSH, as the guest sits on dom0's bridge), and
the serial console goes to the terminal or to a log whose boot milestones are timed from power-on.

By job: `qemu` (the command line, firmware, SD card copy), `console` (the console log and its milestones),
`board` (the running board: SSH through appliance.ssh, the tunnel, HTTP), `images` (what an image says about
itself); this module boots and powers off.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .. import ROOT, invoked_as, keys, log, proc, work_dir
from ..config import BoardSpec, load_board
from ..errors import EmulateError
from ..ssh import Result
from . import qemu
from .board import Board, wait_for
from .console import FATAL, GUEST_SERVED, MILESTONES, VISITOR_GAVE_UP, VISITOR_PAGE, Console
from .images import DEFAULT_BOARD, board_for, check_image, guest_of, manifest, recipe_of
from .qemu import bios, free_port, qemu_argv, scratch_copy, sd_card, spawn

__all__ = ["DEFAULT_BOARD", "FATAL", "GUEST_SERVED", "MILESTONES", "Board", "Console", "EmulateError", "Result",
           "bios", "board_for", "boot", "check_image", "check_key", "default_key", "free_port", "guest_of",
           "headless", "interactive", "qemu", "qemu_argv", "recipe_of", "sd_card", "start", "VISITOR_GAVE_UP",
           "VISITOR_PAGE", "wait_for"]


def _ssh_config(log_path: Path, key: Path | None) -> Path:
    """The emulated board's ssh_config, for ssh -F and deploy --ssh-config: its host keys are new at every first
    boot, so they are not checked; the key is the one the board was booted to trust (None: ssh-agent's)."""
    path = log_path.with_name(log_path.name + ".ssh_config")
    path.write_text("Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n" +
                    (f"  IdentityFile {shlex.quote(str(key.absolute()))}\n" if key is not None else ""))
    return path


@contextlib.contextmanager
def boot(img: Path, *, log_path: Path, key: Path | None, board: str | None = None, timeout: float = 600,
         extra_args: Sequence[str] = (), persistent: bool = False, settled: bool = False) -> Iterator[Board]:
    """Boot img under QEMU, wait until root can log in over SSH, yield the Board; power off on exit.
    settled: wait for the rest of the boot too (systemd's queue empty), here and after a reboot or power cut.

    board: which emulated board (default: the image's own if QEMU has it, else one its card also boots).
    persistent: the board writes to a scratch copy of img (beside the log, removed at power-off) instead of a
    throw-away overlay, so that Board.power_cut() can boot it again with what reached its disk.
    """
    img = check_image(img)
    spec = load_board(board or board_for(img))
    key = None if key is None else Path(key)         # None: a key ssh-agent holds
    if key is not None and not key.is_file():
        raise EmulateError(f"{key}: no such SSH private key")
    check_key(img, key)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    b = start(spec, img, log_path, key, extra_args, persistent=persistent)
    try:
        took = b.wait_ssh(timeout)
        b.mark("ssh")
        if settled:
            b.settled = True
            b.settle(timeout - took)
        assert b._tunnel is not None
        b._tunnel.start()
        log.info(f"{spec.name}: dom0 answers SSH on 127.0.0.1:{b.ssh_port} after {b.milestones['ssh']:.1f} s; "
                 f"the guest's HTTP is on 127.0.0.1:{b.http_port}; console in {log_path}")
        yield b
    finally:
        b.stop()


def start(spec: BoardSpec, img: Path, log_path: Path, key: Path | None, extra_args: Sequence[str] = (), *,
          persistent: bool = False) -> Board:
    """Start QEMU (not waiting for anything); if the SSH port was taken meanwhile, try again with another."""
    guest = guest_of(img)
    sd = bool(spec.qemu and spec.qemu.disk == "sd")
    disk = sd_card(img, log_path.parent) if sd else scratch_copy(img, log_path.parent) if persistent else img
    for attempt in range(3):
        ssh_port = free_port()
        argv = [*qemu_argv(spec, disk, ssh_port, serial="stdio", persistent=persistent), "-monitor", "none",
                *extra_args]
        log_path.write_bytes(b"")
        t0 = time.monotonic()
        proc = spawn(argv)
        assert proc.stdout is not None
        console = Console(proc.stdout, log_path, t0)
        b = Board(proc, spec, img, ssh_port, key, log_path, t0, _ssh_config(log_path, key), guest, console,
                  scratch=disk if disk != img else None, argv=argv)
        # QEMU refuses a taken port at once; past a second it is booting.
        try:
            proc.wait(timeout=1.5)
        except subprocess.TimeoutExpired:
            return b
        b.stop()
        if b"host forwarding rule" in log_path.read_bytes() and attempt < 2:
            continue
        raise b.fail(f"QEMU exited with status {proc.returncode} at start")
    raise AssertionError("unreachable")


def interactive(img: Path, *, board: str | None = None, timeout: float | None = None) -> int:
    """Boot img with the serial console on this terminal (Ctrl-A X quits); QEMU's exit status."""
    img = check_image(img)
    spec = load_board(board or board_for(img))
    ssh_port = free_port()
    address, port = guest_of(img)
    disk = sd_card(img, work_dir()) if spec.qemu and spec.qemu.disk == "sd" else img
    argv = qemu_argv(spec, disk, ssh_port, serial="mon:stdio")
    ssh = f"ssh -p {ssh_port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
    log.info(f"{img.name} on {spec.name}; the image file is not modified")
    log.info(f"  dom0:  {ssh} root@127.0.0.1")
    log.info(f"  guest: {ssh} -N -L 8080:{address}:{port} root@127.0.0.1, then http://127.0.0.1:8080/")
    log.info("  console: Ctrl-A X quits QEMU, Ctrl-A C its monitor; Ctrl-A three times switches Xen/dom0")
    log.debug(f"+ {shlex.join(argv)}")
    try:
        qemu_proc = subprocess.Popen(argv, env=log.clean_env(), preexec_fn=proc.die_with_parent())
    except FileNotFoundError:
        raise EmulateError(f"{argv[0]} is not installed on this machine", hint="apt-get install qemu-system-arm") \
            from None
    try:
        return qemu_proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.info(f"--timeout {timeout:.0f} s reached: powering off")
        qemu_proc.terminate()
        return qemu_proc.wait()
    finally:
        if qemu_proc.poll() is None:
            qemu_proc.kill()
            qemu_proc.wait()
        if disk != img:
            disk.unlink(missing_ok=True)


def headless(img: Path, *, key: Path | None, log_path: Path, board: str | None = None, timeout: float = 600,
             stay: float | None = None) -> dict[str, float]:
    """Boot img with the console to a log, print how to reach it, and keep it running for `stay` seconds
    (None: until interrupted; 0: power off once SSH answers). Returns the milestones."""
    with boot(img, log_path=log_path, key=key, board=board, timeout=timeout) as b:
        print(f"dom0:    {b.ssh_command()}\nguest:   http://127.0.0.1:{b.http_port}/\nconsole: {b.console}\n"
              f"deploy:  {invoked_as()} deploy --host root@127.0.0.1:{b.ssh_port} --ssh-config {b.ssh_config} "
              "--site SITE --static DIR", flush=True)
        end = None if stay is None else time.monotonic() + stay
        while end is None or time.monotonic() < end:
            if not b.alive():
                raise b.fail(f"QEMU exited with status {b.proc.returncode}")
            time.sleep(1.0 if end is None else min(1.0, max(0.0, end - time.monotonic())))
        return b.milestones


def check_key(img: Path, key: Path | None) -> None:
    """Refuse at once a key the image does not trust (its manifest's fingerprints), rather than waiting out the
    deadline for a login that cannot succeed (key None: ssh-agent must hold one it trusts). An image whose manifest
    has no list (built before manifests had one) is let be."""
    trusted = manifest(img).get("authorized_keys")
    if not isinstance(trusted, list):
        return
    if not trusted:
        raise EmulateError(f"{img.name} trusts no SSH key (its manifest lists none), so nobody can log in to it",
                           hint=f"build it with your key: {invoked_as()} build, or --authorized-keys FILE")
    if key is None:
        if not any(keys.fingerprint(line) in trusted for line in keys.agent_keys()):
            raise EmulateError(f"no key of yours that {img.name} trusts ({', '.join(trusted)}): none in ssh-agent, "
                               "none in ~/.ssh", hint="give the private key with --key FILE")
        return
    fp = keys.private_fingerprint(key)
    if fp is not None and fp not in trusted:
        raise EmulateError(f"{key}: its public key {fp} is not one {img.name} trusts ({', '.join(trusted)})")


def default_key(img: Path | None = None) -> Path | None:
    """The first of the test suite's key (the images `invoke test` builds trust it) and the user's own in ~/.ssh
    that the image's manifest lists, else None when ssh-agent holds one it lists (the agent logs in); without a
    list, or with none of them on it, the first of them."""
    test_key = ROOT / "build" / "test" / "id_ed25519"
    found = [*([test_key] if test_key.exists() else []), *keys.own_private_keys()]
    trusted = manifest(check_image(img)).get("authorized_keys") if img is not None else None
    if isinstance(trusted, list):
        for key in found:
            if keys.private_fingerprint(key) in trusted:
                return key
        if any(keys.fingerprint(line) in trusted for line in keys.agent_keys()):
            return None
    return found[0] if found else None      # boot() then says why it cannot log in with it
