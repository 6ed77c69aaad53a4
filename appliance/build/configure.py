"""Configure a working copy of the base tree: overlays, identity, users, SSH, fstab, initramfs settings.

All of it is done from the host, with no emulation, so a rebuild after an overlay edit stays fast.
Overlay files ending in `.j2` are Jinja2 templates rendered with the recipe's values; writes are
confined to the tree (a symlink never leads a write outside it).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from .. import cardsettings, log, shipped_links, sites
from .. import keys as keys_mod
from ..config import Config, overlay_dir, rel, wifi_passphrase
from ..errors import BuildError, RecipeError
from ..identity import Identity
from .mirror import Source
from .step import Step

if TYPE_CHECKING:
    from .context import Context



@dataclass(frozen=True)
class Rendered:
    """One overlay file: where it goes and its bytes (or None for a symlink/dir)."""

    rel: str
    data: bytes | None
    mode: int
    link: str | None = None


def context(cfg: Config, ident: Identity, *, need_secrets: bool = True) -> dict[str, Any]:
    rec = cfg.recipe
    passphrase = wifi_passphrase(rec, cfg.recipe_path) if need_secrets else (
        None if rec.wifi.open else "dry-run-passphrase")
    return {
        "recipe": rec, "board": cfg.board, "boards": (cfg.board, *cfg.also), "identity": ident,
        "hostname": rec.hostname or rec.name,
        **sites.template_context(rec),   # net, gnet, sites, dom0_addresses, guest_macs, sites_json
        "pull_json": sites.pull_json(rec, cfg.recipe_path), "pull_tick": sites.pull_tick(rec),
        "wifi_passphrase": passphrase,
    }


def overlay_dirs(cfg: Config) -> list[Path]:
    return [overlay_dir(name, cfg.recipe_path, cfg.root, f"overlays[{i}]")
            for i, name in enumerate(cfg.recipe.overlays)]


def render_overlays(cfg: Config, ctx: dict[str, Any]) -> list[Rendered]:
    """Render every overlay file in memory; a template error names the file and line."""
    out: list[Rendered] = []
    for d in overlay_dirs(cfg):
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(d)), undefined=jinja2.StrictUndefined,
                                 keep_trailing_newline=True, autoescape=False)
        links = shipped_links(d)      # an installed copy's, which are not on disk; nor are folders of links only
        folders = {q for name in links for q in (d / name).parents if q.is_relative_to(d) and q != d}
        for path in sorted({*d.rglob("*"), *(d / name for name in links), *folders}):
            rel = str(path.relative_to(d))
            if "__pycache__" in path.parts:
                continue
            if rel in links:
                out.append(Rendered(rel, None, 0o777, link=links[rel]))
                continue
            if path in folders and not path.is_dir():
                out.append(Rendered(rel, None, 0o755))
                continue
            mode = path.lstat().st_mode & 0o7777
            if path.is_symlink():
                out.append(Rendered(rel, None, mode, link=os.readlink(path)))
            elif path.is_dir():
                out.append(Rendered(rel, None, mode))
            elif path.suffix == ".j2":
                try:
                    text = env.get_template(rel).render(**ctx)
                except jinja2.TemplateError as exc:
                    line = getattr(exc, "lineno", None)
                    where = f"{path}:{line}" if line else str(path)
                    raise RecipeError(f"{where}: template error: {exc.message}") from None
                except RecipeError:
                    raise
                out.append(Rendered(rel[:-3], text.encode(), _declared_mode(path) or mode))
            else:
                out.append(Rendered(rel, path.read_bytes(), mode))
    return out


def _declared_mode(template: Path) -> int | None:
    """A template that holds a secret says so on its first line, `{#- mode: 0600 -#}`: git keeps no such mode,
    and the file must have it in the image itself, not only once a boot script has run."""
    with open(template) as f:
        m = re.match(r"\{#-? mode: (0[0-7]{3}) -?#\}", f.readline())
    return int(m.group(1), 8) if m else None


def _inside(tree: Path, rel: str) -> Path:
    """The path for rel in tree, refusing any that would lead outside it."""
    if rel.startswith("/") or ".." in Path(rel).parts:
        raise BuildError(f"overlay path {rel} leaves the rootfs")
    dest = tree / rel
    parent = Path(os.path.realpath(dest.parent))
    if parent != tree.resolve() and tree.resolve() not in parent.parents:
        raise BuildError(f"overlay path {rel} leads outside the rootfs through a symlink")
    return dest


def lay(tree: Path, files: list[Rendered]) -> None:
    for f in files:
        dest = _inside(tree, f.rel)
        if f.link is not None:
            if dest.is_symlink() or dest.exists():
                dest.unlink()
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f.link, dest)
        elif f.data is None:
            dest.mkdir(parents=True, exist_ok=True)
            os.chmod(dest, f.mode)
        else:
            if dest.is_symlink():
                dest.unlink()
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.data)
            os.chmod(dest, f.mode)
            os.chown(dest, 0, 0)


def authorized_keys(path: str | None, base: Path, where: str = "ssh.authorized_keys") -> str | None:
    """The public keys in the user's file (relative to base); `where` names the setting in errors."""
    if not path:
        return None
    p = Path(path).expanduser()
    p = p if p.is_absolute() else base / p
    try:
        text = p.read_text()
    except OSError as exc:
        raise RecipeError(f"{where}: cannot read {rel(p)}: {exc.strerror}") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    for n, key in enumerate(keys, 1):
        try:
            cardsettings.check_key(key)
        except cardsettings.Error as exc:
            raise RecipeError(f"{p}:{n}: {exc}") from None
    if not keys:
        raise RecipeError(f"{p}: holds no SSH public key")
    return "\n".join(keys) + "\n"


def trusted_keys(ctx: Context) -> str | None:
    """The keys root trusts: --authorized-keys, else the recipe's, else the user's own (saying which); none with
    --no-login, or when the user has no key (then `ctx.keyless` says why)."""
    cfg = ctx.cfg
    if not ctx.login:
        if ctx.authorized_keys:
            raise RecipeError("--no-login makes an image nobody can log in to: leave out --authorized-keys with it")
        ctx.keyless = "--no-login"
        return None
    if ctx.authorized_keys:  # the command line's path is the user's, relative to where they are
        return authorized_keys(ctx.authorized_keys, Path.cwd(), "--authorized-keys")
    if cfg.recipe.ssh.authorized_keys:
        return authorized_keys(cfg.recipe.ssh.authorized_keys, cfg.recipe_path.parent,
                               f"{rel(cfg.recipe_path)}: ssh.authorized_keys")
    own = keys_mod.own_key()
    if own is None:
        ctx.keyless = "no key of yours was found: none in ssh-agent, no ~/.ssh/id_*.pub"
        return None
    named = f" ({own.comment})" if own.comment else ""
    log.info(f"root will trust your SSH key {own.fingerprint}{named}, from {own.where}")
    return own.line + "\n"


def image_version(cfg: Config, sde: int) -> str:
    """An image's version as the board announces it: its SOURCE_DATE_EPOCH's day and the recipe's digest."""
    return f"{time.strftime('%Y%m%d', time.gmtime(sde))}-{cfg.digest[:8]}"


def system(tree: Path, cfg: Config, ident: Identity, srcs: list[Source], keys: str | None, sde: int) -> None:
    """Identity, users, SSH and mounts: the parts every image has, whatever its overlays."""
    hostname = cfg.recipe.hostname or cfg.recipe.name
    (tree / "etc/hostname").write_text(hostname + "\n")
    (tree / "etc/hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n"
                                    "::1\t\tlocalhost ip6-localhost ip6-loopback\n")
    (tree / "etc/fstab").write_text(
        "# <file system>\t<mount point>\t<type>\t<options>\t<dump>\t<pass>\n"
        f"UUID={ident.root_uuid}\t/\text4\tdefaults,noatime,errors=remount-ro\t0\t1\n"
        f"UUID={ident.boot_uuid}\t/boot/firmware\tvfat\tdefaults,noatime,nofail,umask=0077\t0\t2\n")
    (tree / "boot/firmware").mkdir(parents=True, exist_ok=True)
    (tree / "etc/apt/sources.list").write_text("".join(s.line() + "\n" for s in srcs))
    # No password for root, and none can be used: '*' locks it; SSH keys are the only way in.
    shadow = tree / "etc/shadow"
    shadow.write_text(re.sub(r"^root:[^:]*:", "root:*:", shadow.read_text(), flags=re.M))
    # What the board announces over mDNS beside its SSH host keys (appliance-ssh-hostkeys), for `invoke boards`.
    (tree / "etc/appliance").mkdir(parents=True, exist_ok=True)
    (tree / "etc/appliance/image").write_text(f"NAME={cfg.image_name}\nVERSION={image_version(cfg, sde)}\n")
    # Host keys are made on each board at its first boot (appliance-ssh-hostkeys.service).
    for key in (tree / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    # A board without an RTC battery starts from the last saved clock; the image's is its build date (the base tree
    # made natively has none: fake-hwclock's own save is skipped, rootfs.SKIPPED).
    clock = tree / "etc/fake-hwclock.data"
    if clock.exists() or (tree / "usr/sbin/fake-hwclock").exists():
        clock.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n", time.gmtime(sde)))
        clock.chmod(0o644)
    # An empty machine id: systemd makes one at the board's first boot and systemd-machine-id-commit keeps it.
    # Not "uninitialized": that also means ConditionFirstBoot, and systemd then applies every unit's preset on
    # a root that is still read-only, which fails after half a minute of work on an emulated board. No unit
    # here needs ConditionFirstBoot; the first-boot work keys on its own results (host keys, the grown root).
    (tree / "etc/machine-id").write_text("")
    dbus_id = tree / "var/lib/dbus/machine-id"
    if dbus_id.exists() or dbus_id.is_symlink():
        dbus_id.unlink()
    ssh_dir = tree / "root/.ssh"
    if keys:
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(keys)
        os.chmod(ssh_dir / "authorized_keys", 0o600)
    else:
        shutil.rmtree(ssh_dir, ignore_errors=True)
    # The initramfs is made once, with a short module list (see bootfiles.initramfs).
    modules = sorted({m for b in (cfg.board, *cfg.also) for m in b.modules})
    (tree / "etc/initramfs-tools/modules").write_text(
        "# written by appliance: what the boards of this image need to find their root\n" + "\n".join(modules) + "\n")
    (tree / "etc/initramfs-tools/conf.d/appliance.conf").write_text("MODULES=list\nCOMPRESS=gzip\n")
    for leftover in ("var/log/dpkg.log", "var/log/apt/history.log", "var/log/apt/term.log",
                     "var/log/alternatives.log", "var/log/bootstrap.log", "var/cache/debconf/config.dat-old",
                     "var/cache/debconf/templates.dat-old", "var/lib/dpkg/status-old"):
        p = tree / leftover
        if p.exists():
            p.unlink()


def undivert_initramfs(tree: Path) -> None:
    """Put the real update-initramfs back (it was diverted while packages were installed)."""
    real = tree / "usr/sbin/update-initramfs.distrib"
    if real.exists():
        real.replace(tree / "usr/sbin/update-initramfs")
    diversions = tree / "var/lib/dpkg/diversions"
    lines = diversions.read_text().splitlines(keepends=True)
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "/usr/sbin/update-initramfs" and i + 2 < len(lines) + 1:
            i += 3  # path, divert-to, package (":" for --local)
            continue
        out.append(lines[i])
        i += 1
    diversions.write_text("".join(out))


TITLE = "Configuring the rootfs (overlays, users, SSH, fstab)"


class Configure(Step):
    """The working tree made this image's: identity, users, SSH, fstab, the overlays; update-initramfs back."""

    name = "configure"
    title = TITLE

    def verify(self, ctx: Context) -> None:
        cfg = ctx.cfg
        ctx.keys = trusted_keys(ctx)
        ctx.rendered = render_overlays(cfg, context(cfg, ctx.ident))

    def run(self, ctx: Context) -> None:
        system(ctx.tree, ctx.cfg, ctx.ident, ctx.sources, ctx.keys, ctx.sde)
        lay(ctx.tree, ctx.rendered)
        undivert_initramfs(ctx.tree)
