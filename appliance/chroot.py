"""Run armhf commands inside a rootfs tree through qemu-user (binfmt), in a private mount namespace.

/proc, /sys and /dev are bound inside a fresh mount namespace, so nothing is left mounted on the host
when the command ends, however it ends. Emulated work is slow: callers keep it to a few commands.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .log import run

_SCRIPT = (
    'set -e; t="$1"; shift; '
    'mount -t proc proc "$t/proc"; mount --rbind /sys "$t/sys"; mount --rbind /dev "$t/dev"; '
    'exec chroot "$t" "$@"'
)


def chroot(tree: Path, argv: Sequence[str], *, what: str | None = None, env: dict[str, str] | None = None,
           input: bytes | None = None) -> bytes:
    """Run argv inside tree and return its stdout."""
    cmd = ["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c", _SCRIPT, "sh", str(tree), *argv]
    return run(cmd, what=what or f"{argv[0]} in the rootfs", env=env, input=input).stdout
