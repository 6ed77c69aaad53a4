"""The guests step: each site's guest (its bundle, else the demo guest) and the board's guest manager laid into
the image's store, checked first by the board's own validator (the bundles themselves: appliance.guest).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import guest as bundles
from .configure import TITLE
from .step import Step

if TYPE_CHECKING:
    from .context import Context


class Guest(Step):
    name = "guest"
    title = TITLE      # part of configuring the rootfs, as the user sees it

    def verify(self, ctx: Context) -> None:
        bundles.check(ctx.cfg)

    def run(self, ctx: Context) -> None:
        bundles.install(ctx.cfg, ctx.base, ctx.tree)
