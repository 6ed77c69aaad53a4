"""What a build step is: a small unit that checks its inputs (`verify`) before any step runs, then does its work.

The build is a list of steps (see `appliance.build.STEPS`). Every step's `verify` runs first, so a wrong recipe,
overlay, template, bundle or missing host tool stops the build before any work; `--dry-run` stops there. What a
step computes once for the steps after it is kept on the build's Context.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import Context


class Step:
    name: str = ""
    # The log.step this step runs in; consecutive steps with the same title share one (and its timing).
    # None: the step announces its own parts, or says one line.
    title: str | None = None
    tools: tuple[str, ...] = ()      # host commands it runs, checked before any step runs

    def verify(self, ctx: Context) -> None:
        """Check the step's inputs and keep what it computes for later steps; write nothing."""

    def run(self, ctx: Context) -> None:
        raise NotImplementedError
