"""Child processes that die with the process that started them: a QEMU left behind by a killed test run or
`invoke emulate` (SIGKILL, a CI timeout) keeps a core busy until someone finds it.

`die_with_parent()` is a `preexec_fn` for subprocess.Popen that asks the kernel (prctl PR_SET_PDEATHSIG) to
signal the child when its parent goes, however the parent ends. The kernel means the parent *thread*: start
such a child from a thread that lives as long as the child should (the main thread).
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
# Looked up now, in the parent: between fork and exec the child only calls it (no loading, no locks taken).
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A preexec_fn: the child gets `sig` when the process that started it ends, even by SIGKILL."""
    parent = os.getpid()

    def preexec() -> None:
        if _prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:    # the parent ended before the request took effect
            os.kill(os.getpid(), sig)

    return preexec
