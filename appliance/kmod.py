"""Kernel modules for an initramfs: the named ones and what they depend on (modules.dep) or want first
(modules.softdep, through modules.alias), read from the base tree; and their index, made by the host's depmod
(it reads armhf modules), so busybox modprobe finds them. The archive itself is cpio.py's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .cpio import Entry, file
from .errors import BuildError
from .log import run


def _name(path: str) -> str:
    """A module's name as modprobe and modules.softdep spell it: kernel/fs/ext4/ext4.ko -> ext4, - as _."""
    return Path(path).name.split(".ko")[0].replace("-", "_")


def module_paths(moddir: Path, names: list[str]) -> list[str]:
    """The named modules (file names like `ext4` or paths like `kernel/fs/ext4/ext4.ko`) and what they depend
    on, from the tree's modules.dep, as paths relative to moddir in load order (dependencies first)."""
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        name, _, rest = line.partition(":")
        deps[name] = rest.split()
    by_name = {_name(p): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path not in order:
            for d in deps.get(path, []):
                visit(d)
            order.append(path)

    for name in names:
        path = name if name in deps else by_name.get(name.replace("-", "_"))
        if path is None:
            raise BuildError(f"{moddir}/modules.dep: no module {name} (is it built into this kernel?)")
        visit(path)
    return order


def softdeps(moddir: Path, paths: list[str]) -> list[str]:
    """Module names the given modules want loaded before them (modules.softdep's `pre:`, aliases resolved
    by modules.alias): ext4 asks the kernel for crypto-crc32c, which only a modprobe run could resolve."""
    names = {_name(p) for p in paths}
    aliases: dict[str, list[str]] = {}
    for line in (moddir / "modules.alias").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "alias":
            aliases.setdefault(parts[1], []).append(parts[2])
    wanted: list[str] = []
    for line in (moddir / "modules.softdep").read_text().splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[0] == "softdep" and parts[2] == "pre:" and parts[1].replace("-", "_") in names:
            pre = parts[3:parts.index("post:")] if "post:" in parts else parts[3:]
            wanted += [m for a in pre for m in aliases.get(a, [a]) if m not in wanted]
    return wanted


def modules(kver: str, sources: dict[str, Path], work: Path) -> list[Entry]:
    """Entries for lib/modules/KVER with these modules (path under it -> the file) and their modules.dep,
    made by the host's depmod; pack() adds the directories."""
    root = work / "modules"
    lib = root / "lib/modules" / kver
    for rel, src in sources.items():
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, lib / rel)
    run(["depmod", "-b", root, kver], what=f"depmod for {len(sources)} modules")
    out = [file(str(p.relative_to(root)), p.read_bytes()) for p in sorted(lib.rglob("*")) if p.is_file()]
    shutil.rmtree(root)
    return out
