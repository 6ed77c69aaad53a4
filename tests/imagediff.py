"""Where two images differ, in words: the partition, and in the root filesystem the files (data blocks) or the
inodes (inode tables) that hold the differing 4 KiB blocks. For a reproducibility test's failure message."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

BLOCK = 4096


def _blocks(a: Path, b: Path) -> list[int]:
    """Byte offsets of the 4 KiB blocks that differ (a size difference counts as the tail's blocks)."""
    out: list[int] = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if not x and not y:
                return out
            if x != y:
                out += [off + i for i in range(0, max(len(x), len(y)), BLOCK) if x[i:i + BLOCK] != y[i:i + BLOCK]]
            off += max(len(x), len(y))


def _part(img: Path, index: int, dest: Path) -> tuple[int, int]:
    """Copy partition `index` of img to dest; its (start, size) in bytes."""
    table = json.loads(subprocess.run(["sfdisk", "-J", str(img)], check=True, capture_output=True,
                                      text=True).stdout)["partitiontable"]["partitions"]
    start, size = table[index]["start"] * 512, table[index]["size"] * 512
    with open(img, "rb") as src, open(dest, "wb") as dst:
        done = 0
        while done < size:
            n = os.copy_file_range(src.fileno(), dst.fileno(), size - done, start + done, done)
            if n == 0:
                break
            done += n
    return start, size


def _debugfs(fs: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(fs)], check=False, capture_output=True, text=True).stdout


def _inode_tables(fs: Path) -> tuple[int, int, list[tuple[int, int]]]:
    """(inodes per group, inode size, each group's inode table as (first, last) block)."""
    out = subprocess.run(["dumpe2fs", str(fs)], check=False, capture_output=True, text=True).stdout
    ipg = int(re.search(r"Inodes per group:\s+(\d+)", out).group(1))         # type: ignore[union-attr]
    size = int(re.search(r"Inode size:\s+(\d+)", out).group(1))              # type: ignore[union-attr]
    tables = [(int(m.group(1)), int(m.group(2))) for m in re.finditer(r"Inode table at (\d+)-(\d+)", out)]
    return ipg, size, tables


def _names(fs: Path, inodes: list[int]) -> dict[int, str]:
    out = _debugfs(fs, "ncheck " + " ".join(map(str, inodes))) if inodes else ""
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^(\d+)\s+(\S.*)$", out, re.M)}


def _boot(a: Path, b: Path, work: Path) -> list[str]:
    """The boot partitions' listings (names, sizes, times) and files that differ."""
    seen: list[dict[str, str]] = []
    for img, name in ((a, "a.vfat"), (b, "b.vfat")):
        part = work / name
        _part(img, 0, part)
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        listing = subprocess.run(["mdir", "-a", "-/", "-i", str(part), "::/"], check=False, capture_output=True, text=True,
                                 env=env).stdout.splitlines()
        files = {}
        for line in listing:
            files[f"listing: {line.strip()}"] = ""
        for path in re.findall(r"^(::/\S+)$", subprocess.run(["mdir", "-b", "-/", "-i", str(part), "::/"],
                                                             check=False, capture_output=True, text=True, env=env).stdout, re.M):
            data = subprocess.run(["mtype", "-i", str(part), path], check=False, capture_output=True, env=env).stdout
            files[f"file {path}"] = hashlib.sha256(data).hexdigest()
        seen.append(files)
        part.unlink()
    lines = [f"boot partition, only in the first: {k}" for k in seen[0] if k not in seen[1]]
    lines += [f"boot partition, only in the second: {k}" for k in seen[1] if k not in seen[0]]
    lines += [f"boot partition, {k}: content differs" for k in seen[0] if k in seen[1] and seen[0][k] != seen[1][k]]
    return lines


def differences(a: Path, b: Path, work: Path, most: int = 40) -> list[str]:
    """One line per differing place (at most `most`), read from image b's root filesystem."""
    blocks = _blocks(a, b)
    if not blocks:
        return []
    work.mkdir(parents=True, exist_ok=True)
    fs_a, fs_b = work / "a.ext4", work / "b.ext4"
    start, size = _part(b, 1, fs_b)
    _part(a, 1, fs_a)
    lines = [f"{len(blocks)} blocks of 4 KiB differ"]
    in_root = [(o - start) // BLOCK for o in blocks if start <= o < start + size][:most]
    outside = [o for o in blocks if not start <= o < start + size]
    if outside:
        lines.append(f"{len(outside)} outside the root filesystem, the first at {outside[0]:#x}")
        lines += _boot(a, b, work)
    if in_root:
        ipg, isize, tables = _inode_tables(fs_b)
        found = re.findall(r"^(\d+)\s+(\d+)$", _debugfs(fs_b, "icheck " + " ".join(map(str, in_root))), re.M)
        data = {int(blk): int(ino) for blk, ino in found}
        names = _names(fs_b, sorted(set(data.values())))
        for blk in in_root:
            if blk in data:
                lines.append(f"root block {blk}: data of {names.get(data[blk], f'inode {data[blk]}')}")
                continue
            group = next((g for g, (lo, hi) in enumerate(tables) if lo <= blk <= hi), None)
            if group is None:
                lines.append(f"root block {blk}: metadata (superblock, bitmaps, journal or a directory index)")
                continue
            per = BLOCK // isize
            first = group * ipg + (blk - tables[group][0]) * per + 1
            inodes = list(range(first, first + per))
            for ino, name in sorted(_names(fs_b, inodes).items()):
                sa, sb = _debugfs(fs_a, f"stat <{ino}>"), _debugfs(fs_b, f"stat <{ino}>")
                if sa != sb:
                    changed = [x for x, y in zip(sa.splitlines(), sb.splitlines(), strict=False) if x != y][:2]
                    lines.append(f"root inode {ino} {name}: {' | '.join(changed)}")
        fs_a.unlink()
        fs_b.unlink()
    return lines[:most]
