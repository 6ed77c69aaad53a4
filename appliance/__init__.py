"""appliance: build, flash, emulate and update SD-card images of a Xen appliance for small ARM boards.

The data flows one way: recipe -> rootfs -> boot files -> image -> flash | emulate | deploy.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
