"""The base rootfs: a real armhf Debian tree made by mmdebstrap under qemu-user, cached by what shapes it.

The cache key is the suite, the sources, the architecture, the package list and the options below;
changing an overlay or a recipe value reuses the tree. The initramfs is kept out of package installs
(update-initramfs is diverted to a no-op) and generated once, later, with the board's short module list.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import log
from ..config import Config, did_you_mean, rel
from ..errors import BuildError, RecipeError
from ..files import write_atomic
from ..log import run, step
from .mirror import Source, sources
from .step import Step

if TYPE_CHECKING:
    from .context import Context

# Bump when the way the tree is made changes, so old caches are not reused.
RECIPE_FORMAT = 7
# The base tree's SOURCE_DATE_EPOCH (2025-01-01), part of its cache key and never the commit's, or every commit
# would throw the cache away: with it the tree is a function of its key on any day (the accounts' last-change day
# in /etc/shadow; Python's bytecode checked by hash, not by the source's mtime, which the image clamps later).
BASE_EPOCH = 1735689600
BASE_PACKAGES = ("systemd-sysv", "udev", "kmod", "initramfs-tools", "openssh-server", "iproute2",
                 "ca-certificates", "e2fsprogs", "fdisk")
# Fetched as .deb files beside the tree (not installed): the guest's busybox.
EXTRA_DEBS = ("busybox-static",)
DPKG_EXCLUDES = ("/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*", "/usr/share/doc/*",
                 "/usr/share/lintian/*")
HOOKS = Path("/usr/share/mmdebstrap/hooks")
APT_HELPER = "/usr/lib/apt/apt-helper"
_DIVERT = ('chroot "$1" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs && '
           'printf "#!/bin/sh\\n# diverted while the image is built; the initramfs is made once at the end\\nexit 0\\n"'
           ' > "$1/usr/sbin/update-initramfs" && chmod 755 "$1/usr/sbin/update-initramfs"')
# Work whose bytes do not depend on the CPU, done once on the host after the packages are in instead of under
# qemu-user by their maintainer scripts: while they run, a no-op of the same name sits in /usr/local/sbin, put
# first on the scripts' PATH by an apt setting of the build's own (apt gives dpkg its DPkg::Path), and both go
# before the tree is cached, so the package database is the slow path's (no diversion). update-ca-certificates:
# hundreds of emulated sed/ln/readlink processes, twice (the postinst and its trigger). depmod: the kernel's
# postinst indexes its modules; the host's kmod is bookworm's too, and the tree test finds its indexes byte for
# byte the slow path's. What the stubs save is in docs/internals.md (`invoke bench` times both paths).
NATIVE = ("update-ca-certificates", "depmod")
# Work the image throws away or redoes, stubbed the same way and never done: ssh-keygen, whose only caller while the
# tree is made is openssh-server's postinst making the host keys (RSA, ECDSA, Ed25519, slow under qemu-user), which
# the configure step deletes, as each board makes its own at first boot; fake-hwclock, whose postinst saves the
# clock of the hour, which the configure step replaces with the build's epoch. The fast tree has neither file.
SKIPPED = ("ssh-keygen", "fake-hwclock")
STUBS = NATIVE + SKIPPED
NATIVE_APT = "etc/apt/apt.conf.d/00appliance-native"
_STUBS = " && ".join([
    f"echo 'DPkg::Path \"/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin\";' > \"$1/{NATIVE_APT}\"",
    *(f'printf "#!/bin/sh\\n# the build runs this natively once the packages are in, or not at all\\nexit 0\\n" > '
      f'"$1/usr/local/sbin/{c}" && chmod 755 "$1/usr/local/sbin/{c}"' for c in STUBS)])
# The certificate store's paths, bound over the host's in a mount namespace of the host's own, so the tree's
# update-ca-certificates runs with the host's sed and openssl and makes the links and bundle the slow path makes.
CERT_PATHS = ("/usr/share/ca-certificates", "/usr/local/share/ca-certificates", "/etc/ssl/certs",
              "/etc/ca-certificates.conf")
_CERTS = ('for p in ' + ' '.join(CERT_PATHS) + '; do mount --bind "$1$p" "$p"; done; '
          'exec sh "$1/usr/sbin/update-ca-certificates" --hooksdir ""')


@dataclass(frozen=True)
class Base:
    """A cached base tree and what is known about it."""

    path: Path

    @property
    def tree(self) -> Path:
        return self.path / "tree"

    @property
    def debs(self) -> Path:
        return self.path / "debs"

    @property
    def meta(self) -> dict:
        return json.loads((self.path / "meta.json").read_text())

    def deb(self, package: str) -> Path:
        found = sorted(self.debs.glob(f"{package}_*.deb"))
        if not found:
            raise BuildError(f"{package}: no .deb in the rootfs cache {self.debs}", hint="run invoke clean")
        return found[-1]


def packages(cfg: Config) -> list[str]:
    return sorted({*BASE_PACKAGES, cfg.board.kernel_package, cfg.board.xen_package, *cfg.recipe.packages,
                   *cfg.board.wifi_firmware})


def extra_debs(cfg: Config) -> list[str]:
    spl = {b.uboot.package for b in (cfg.board, *cfg.also) if b.uboot.offset is not None}
    return sorted({*spl, *EXTRA_DEBS})


def excludes(cfg: Config) -> list[str]:
    return [*DPKG_EXCLUDES, *cfg.board.exclude]


def wanted_sources(cfg: Config) -> list[Source]:
    r = cfg.recipe
    return sources(r.suite, r.components, r.mirror, r.security_mirror)


def key(cfg: Config, srcs: list[Source]) -> str:
    shape = {
        "format": RECIPE_FORMAT, "epoch": BASE_EPOCH, "arch": cfg.board.arch, "suite": cfg.recipe.suite,
        "sources": [s.line() for s in srcs], "packages": packages(cfg), "debs": extra_debs(cfg),
        "excludes": excludes(cfg),
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def cached(cfg: Config) -> Base | None:
    base = Base(cfg.cache / "rootfs" / key(cfg, wanted_sources(cfg)))
    return base if (base.path / "meta.json").exists() else None


def ensure(cfg: Config, srcs: list[Source] | None = None, *, native: bool = True) -> Base:
    """The base tree for cfg (its apt sources: srcs, or the recipe's): from the cache, or made now with
    mmdebstrap (one maker at a time). native=False makes it the slow way, every maintainer script's work under
    qemu-user (the benchmark's baseline, and what the tree test compares against); the tree is the same."""
    srcs = srcs if srcs is not None else wanted_sources(cfg)
    lock_path = cfg.cache / "rootfs" / ".lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process making the base rootfs…")
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure(cfg, srcs, native)


def _ensure(cfg: Config, srcs: list[Source], native: bool) -> Base:
    base = Base(cfg.cache / "rootfs" / key(cfg, srcs))
    if (base.path / "meta.json").exists():
        log.info(f"base rootfs from cache ({base.path.name})")
        return base
    usable, missing = probe(srcs, cfg.board.arch, index_dir(cfg, srcs))
    check_packages(cfg, srcs)     # the index is fresh now: a misspelt package is refused before mmdebstrap
    tmp = base.path.with_name(base.path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "debs").mkdir(parents=True)
    tmp.chmod(0o755)    # apt drops to _apt where it can reach the tree, which decides its partial folders' owner
    argv = [
        "mmdebstrap", f"--arch={cfg.board.arch}", "--variant=apt", "--mode=root", "--format=directory",
        f"--hook-dir={HOOKS}/merged-usr", f"--hook-dir={HOOKS}/eatmydata",
        *[f"--dpkgopt=path-exclude={p}" for p in excludes(cfg)],
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--aptopt=Acquire::Retries \"5\"",
        f"--essential-hook={_DIVERT}", *([f"--essential-hook={_STUBS}"] if native else []),
        f"--include={','.join(packages(cfg))}",
        f'--customize-hook=env --chdir="$1/../debs" APT_CONFIG="$MMDEBSTRAP_APT_CONFIG" '
        f'apt-get download -q {" ".join(extra_debs(cfg))}',
        "--customize-hook=rm -f \"$1\"/var/cache/apt/*.bin \"$1\"/var/lib/apt/lists/*_Packages",
        cfg.recipe.suite, str(tmp / "tree"), *[s.line() for s in usable],
    ]
    with step(f"Installing {len(packages(cfg))} packages into an {cfg.board.arch} {cfg.recipe.suite} tree "
              "(mmdebstrap, qemu-user)"):
        # PYTHONDONTWRITEBYTECODE: py3compile's own import of debpython would write its .pyc timestamp-based
        # before py3compile compiles them checked by hash (SOURCE_DATE_EPOCH); only the compile writes them now
        run(argv, env={"SOURCE_DATE_EPOCH": str(BASE_EPOCH), "PYTHONDONTWRITEBYTECODE": "1"}, capture=False,
            what="mmdebstrap")
    if native:
        natively(tmp / "tree")
    meta = {
        "key": base.path.name, "suite": cfg.recipe.suite, "arch": cfg.board.arch,
        "sources": [s.line() for s in srcs], "built_from": [s.line() for s in usable],
        "missing_suites": [s.suite for s in missing], "created": int(time.time()), "native": native,
        "packages": installed(tmp / "tree"),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(base.path, ignore_errors=True)
    tmp.rename(base.path)
    return base


def natively(tree: Path) -> None:
    """What the stubs left out, done on the host: the kernels' module indexes, and the certificate store (the tree's
    own script, hooks aside)."""
    (tree / NATIVE_APT).unlink()
    for c in STUBS:
        (tree / "usr/local/sbin" / c).unlink()
    for modules in sorted((tree / "usr/lib/modules").glob("*/modules.order")):
        with step(f"Indexing the modules of kernel {modules.parent.name} natively (depmod)"):
            run(["depmod", "-b", str(tree), modules.parent.name], what="depmod")
    with step("Making the certificate store natively (update-ca-certificates, the host's sed and openssl)"):
        missing = [p for p in CERT_PATHS if not (tree / p.lstrip("/")).exists() or not Path(p).exists()]
        if missing:
            raise BuildError(f"{missing[0]}: missing on the host or in the tree, so the certificate store cannot be "
                             "made natively", hint="run ./setup.sh (it installs ca-certificates)")
        run(["unshare", "--mount", "--propagation", "private", "sh", "-euc", _CERTS, "sh", str(tree)],
            what="update-ca-certificates")
        hooks = tree / "etc/ca-certificates/update.d"
        if hooks.is_dir() and any(hooks.iterdir()):
            # a package's hook (a Java keystore, say) sees the store as it would have: run by the tree itself
            run(["chroot", str(tree), "update-ca-certificates", "--fresh"], what="update-ca-certificates hooks")


def installed(tree: Path) -> dict[str, str]:
    out = run(["dpkg-query", f"--admindir={tree}/var/lib/dpkg", "-W", "-f", "${Package}\t${Version}\n"]).stdout
    return dict(line.split("\t", 1) for line in out.decode().splitlines() if "\t" in line)


def index_dir(cfg: Config, srcs: list[Source]) -> Path:
    """Where the build keeps the package indexes of these sources for the board's architecture (probe's)."""
    shape = json.dumps({"arch": cfg.board.arch, "sources": [s.line() for s in srcs]}, sort_keys=True)
    return cfg.cache / "indexes" / f"{cfg.board.arch}-{hashlib.sha256(shape.encode()).hexdigest()[:16]}"


def index_names(lists: Path) -> set[str]:
    """Every package name (and every name a package provides) in the Packages files of an apt lists folder."""
    names: set[str] = set()
    for f in sorted(lists.glob("*_Packages*")):
        # as apt stored it (plain, or compressed when the host sets Acquire::GzipIndexes): apt's own reader
        proc = subprocess.run([APT_HELPER, "cat-file", str(f)], capture_output=True, check=False)
        if proc.returncode:
            raise BuildError(f"{f}: apt cannot read this index: {proc.stderr.decode(errors='replace').strip()}")
        text = proc.stdout
        names.update(m.decode() for m in re.findall(rb"^Package: (\S+)", text, flags=re.M))
        for line in re.findall(rb"^Provides: (.*)$", text, flags=re.M):
            names.update(p.split()[0].decode() for p in line.split(b",") if p.strip())
    return names


def keep_names(index: Path) -> None:
    """The names in an index folder's lists, one a line, for the recipe's checks (`names`, read in a blink)."""
    write_atomic(index / "names", "".join(f"{n}\n" for n in sorted(index_names(index / "lists"))).encode())


def check_packages(cfg: Config, srcs: list[Source]) -> bool:
    """Refuse a recipe package that is in none of its sources' indexes (as the build last read them); False when
    no index is cached yet (the first build reads it, and checks, before mmdebstrap)."""
    names_file = index_dir(cfg, srcs) / "names"
    if not names_file.exists():
        return False
    names = set(names_file.read_text().split())
    for i, pkg in enumerate(cfg.recipe.packages):
        name = re.split(r"[:=/]", pkg, maxsplit=1)[0]
        if name not in names:
            comps = ", ".join(cfg.recipe.components)
            raise RecipeError(f"{rel(cfg.recipe_path)}: packages[{i}]: '{pkg}' is not in {cfg.recipe.suite}'s "
                              f"{cfg.board.arch} index ({comps}){did_you_mean(name, names)}")
    return True


def probe(srcs: list[Source], arch: str, keep: Path, tries: int = 3) -> tuple[list[Source], list[Source]]:
    """Check each suite's index for arch before mmdebstrap, which aborts on any failed index.

    Debian's archive can be briefly inconsistent ("File has unexpected size … Mirror sync in progress?").
    Retry with a backoff; a suite other than the main one that still fails is left out of this build
    with a warning (the image's own sources still list it, so the board gets it on its first upgrade).
    The lists are kept in `keep` (updated in place next time), with the names they hold (`names`), for the
    recipe's checks.
    """
    with step(f"Checking the {arch} package indexes of {len(srcs)} suites"):
        tmp = keep
        (tmp / "lists/partial").mkdir(parents=True, exist_ok=True)
        (tmp / "parts").mkdir(exist_ok=True)
        (tmp / "sources.list").write_text("".join(s.line() + "\n" for s in srcs))
        opts = [f"-oAPT::Architecture={arch}", f"-oAPT::Architectures={arch}", f"-oDir::State::Lists={tmp}/lists",
                f"-oDir::Etc::SourceList={tmp}/sources.list", f"-oDir::Etc::SourceParts={tmp}/parts",
                f"-oDir::Cache={tmp}", "-oDir::Cache::pkgcache=", "-oDir::Cache::srcpkgcache=",
                "-oAcquire::Languages=none", "-oAPT::Get::List-Cleanup=0"]
        failed: set[str] = set()
        for attempt in range(tries):
            proc = run(["apt-get", "update", *opts], check=False)
            text = (proc.stdout + proc.stderr).decode(errors="replace")
            failed = {s.suite for s in srcs if re.search(rf"(Err|E):.*{re.escape(s.uri)}[/ ]\S*{s.suite}[/ ]", text)}
            if proc.returncode == 0 and not failed:
                break
            if not failed:
                raise BuildError(f"apt-get update for {arch} failed: {text.strip().splitlines()[-1]}")
            if attempt + 1 < tries:
                wait = 3 * 3 ** attempt
                log.info(f"index of {', '.join(sorted(failed))} not usable yet; retrying in {wait} s")
                time.sleep(wait)
        if srcs[0].suite in failed:
            raise BuildError(f"the {srcs[0].suite} index at {srcs[0].uri} cannot be read for {arch}",
                             hint="check the mirror or set mirror: in the recipe")
        keep_names(tmp)
        missing = [s for s in srcs if s.suite in failed]
        for s in missing:
            log.warn(f"the {s.suite} index for {arch} at {s.uri} is inconsistent after {tries} tries; this "
                     f"build uses the other suites and the image still lists {s.suite} for its first upgrade")
        return [s for s in srcs if s.suite not in failed], missing


def copy_tree(src: Path, dst: Path) -> None:
    """A working copy of a cached tree (reflinks where the filesystem has them)."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    run(["cp", "-a", "--reflink=auto", str(src), str(dst)], what="copying the cached rootfs")


# Every entry the build makes in the cache (rootfs.py, initramfs.py, outputs.py): the cache may be a folder the
# user shares with other programs (~/.cache), so clean removes these names and nothing else.
CACHE_ENTRIES = ("rootfs", "initrd", "xz", "indexes")


def clean(cache: Path) -> None:
    for name in CACHE_ENTRIES:
        entry = cache / name
        if entry.is_symlink():
            entry.unlink()        # not ours to follow
        else:
            shutil.rmtree(entry, ignore_errors=True)


class Rootfs(Step):
    """The base tree, from the cache or made now, and a working copy of it in the workspace."""

    name = "rootfs"
    # mmdebstrap runs its hooks (ours diverts update-initramfs) with the host's chroot; the certificate store is
    # made with the host's unshare, sed and openssl, the modules' indexes with its depmod
    tools = ("mmdebstrap", "chroot", "apt-get", "dpkg-query", "cp", "unshare", "openssl", "depmod")

    def verify(self, ctx: Context) -> None:
        ctx.sources = wanted_sources(ctx.cfg)
        # a dry run checks the packages against the index the last build read; a build checks them against the
        # index it reads itself, before installing anything (or has them already, in the cached tree)
        if ctx.dry_run and not check_packages(ctx.cfg, ctx.sources):
            log.info(f"packages not checked: no {ctx.cfg.recipe.suite} index for {ctx.cfg.board.arch} in the cache "
                     "yet (a build reads it, and checks them, before installing anything)")

    def run(self, ctx: Context) -> None:
        ctx.base = ensure(ctx.cfg, ctx.sources, native=ctx.native)
        with step("Copying the base tree into the workspace"):
            copy_tree(ctx.base.tree, ctx.tree)
