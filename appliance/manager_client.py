"""The host's one client of a board's guest manager: `appliance-guest ARGS` run over SSH and its JSON answer read.
Deploy (its status, list and rollback) and the benchmarks ask through it; a deploy's `session` is a conversation
of its own (deploy.Session) on the same command.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Sequence
from typing import Any

from .ssh import Result

COMMAND = "appliance-guest"


def ask(run: Callable[[str, float], Result], args: Sequence[str], timeout: float) -> tuple[int, dict[str, Any]]:
    """Run `appliance-guest ARGS` through run (a shell command on the board, with a timeout): its exit status and
    its JSON answer; an answer that is no JSON object is {"ok": false, "error": what it said instead}."""
    r = run(shlex.join([COMMAND, *args]), timeout)
    try:
        out = json.loads(r.out)
    except ValueError:
        out = None
    if isinstance(out, dict):
        return r.rc, out
    said = (r.err or r.out).strip()[-300:] or "no output"
    return r.rc, {"ok": False, "error": f"{COMMAND} {' '.join(args)} gave no JSON object (exit {r.rc}): {said}"}
