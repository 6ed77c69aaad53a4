"""A child started with appliance.proc.die_with_parent() ends when its parent is killed (SIGKILL, as a CI timeout
does), the way emulate starts QEMU: its own session, its stdin and stdout piped. Without it the child outlives
the parent, which is what the test would see if the helper did nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance import ROOT

pytestmark = pytest.mark.unit

# The parent: starts a stand-in for QEMU (runs until signalled; not ended by its stdin closing), prints its pid,
# and waits.
_PARENT = """
import subprocess, sys
from appliance import proc
extra = {"preexec_fn": proc.die_with_parent()} if sys.argv[1] == "yes" else {}
child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **extra)
print(child.pid, flush=True)
child.wait()
"""


def _running(pid: int) -> bool:
    """Whether pid is a live process (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("helper", [True, False], ids=["die-with-parent", "without"])
def test_the_child_ends_with_its_killed_parent(helper: bool) -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, "yes" if helper else "no"], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert _running(child)
        parent.kill()
        assert parent.wait(timeout=30) == -signal.SIGKILL
        if helper:
            assert _gone_within(child, 10), "the child outlived its killed parent"
        else:
            assert _running(child)    # nothing else would have ended it
    finally:
        if _running(child):
            os.kill(child, signal.SIGKILL)
