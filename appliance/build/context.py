"""The mutable state of one build: the resolved config, where things are being made, and what each step
computed once for the steps after it (the apt sources, the rendered overlays, the base tree, the kernel, …).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Config
from ..identity import Identity

if TYPE_CHECKING:
    from .bootfiles import Kernel
    from .configure import Rendered
    from .image import Layout
    from .mirror import Source
    from .rootfs import Base


@dataclass(frozen=True)
class Outputs:
    img: Path
    bmap: Path
    xz: Path
    sums: Path
    manifest: Path


def workspace(cfg: Config) -> Path:
    """Where the tree and filesystems are made: tmpfs when it has room (the copy and mke2fs are then
    memory-bound, not disk-bound), else build/.work."""
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
        roomy = st.f_bavail * st.f_frsize > 4 << 30
    except OSError:
        roomy = False
    return (shm_dir(cfg.root) if roomy else cfg.work / ".work") / cfg.image_name


def shm_dir(root: Path) -> Path:
    """This checkout's folder of workspaces in tmpfs."""
    return Path("/dev/shm") / f"appliance-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"


@dataclass
class Context:
    """One build. The fields after `work` are set by the steps (verify or run) that compute them."""

    cfg: Config
    ident: Identity
    sde: int
    out_dir: Path
    work: Path
    start: float
    authorized_keys: str | None = None                        # --authorized-keys: a file of the user's
    native: bool = True                                       # rootfs.ensure: CPU-independent work on the host
    login: bool = True                                        # False: --no-login, an image no key opens
    dry_run: bool = True                                      # False: the steps will run after the verifies
    keys: str | None = None                                   # configure.verify: the keys root trusts
    keyless: str = ""                                         # configure.verify: why it trusts none
    durations: dict[str, float] = field(default_factory=dict)  # every log.step of this build, in seconds
    sources: list[Source] = field(init=False)                  # rootfs.verify: the image's apt sources
    rendered: list[Rendered] = field(init=False)               # configure.verify: the overlays, rendered
    base: Base = field(init=False)                             # rootfs.run: the cached base tree
    kernel: Kernel = field(init=False)                         # initramfs.run
    initrd: Path = field(init=False)                           # initramfs.run
    boot_files: dict[str, Path] = field(init=False)            # bootfiles.run: the boot partition's files
    spl: Path | None = field(init=False)                       # bootfiles.run
    layout: Layout = field(init=False)                         # image.run
    tmp_img: Path = field(init=False)                          # image.run: the image, under its partial name

    @property
    def tree(self) -> Path:
        return self.work / "rootfs"

    def outputs(self) -> Outputs:
        stem = self.out_dir / self.cfg.image_name
        return Outputs(stem.with_suffix(".img"), stem.with_suffix(".bmap"), stem.with_suffix(".img.xz"),
                       self.out_dir / f"{self.cfg.image_name}.SHA256SUMS",
                       self.out_dir / f"{self.cfg.image_name}.manifest.json")
