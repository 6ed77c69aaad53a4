"""A version's manifest.json: read it strictly, check it against the board's limits, and check the files it
names. The host validates with the same code before it copies a bundle, and writes the manifest with to_json;
on the board it is the only manifest reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Error
from .names import check_file, check_site, check_version, cut

ZIMAGE_MAGIC = 0x016F2818   # little-endian at 0x24 of every ARM zImage: Linux, Mini-OS, MirageOS .xen
MAX_MEMORY = 2048           # MiB: more than any supported board has; the board checks `xl info` free memory too
MAX_VCPUS = 4
MAX_CMDLINE = 1024
PLACEHOLDERS = ("address", "gateway", "netmask", "prefix", "domain", "port", "site", "version", "mac")
DEFAULT_CMDLINE = "console=hvc0 ip={address}::{gateway}:{netmask}:{domain}:eth0:off appliance.port={port}"
KEYS = ("name", "version", "kernel", "ramdisk", "sha256", "memory", "vcpus", "port", "cmdline", "health")
UNSAFE = re.compile(r"[\"'\\\x00-\x1f\x7f]")
HEALTH_PATH = re.compile(r"/[\x21-\x7e]{0,255}")
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Health:
    path: str
    deadline: int


@dataclass(frozen=True)
class Manifest:
    name: str                      # the site
    version: str
    kernel: str
    ramdisk: str | None
    sha256: dict[str, str] = field(hash=False)
    memory: int
    vcpus: int
    port: int                      # the guest's own port
    cmdline: str                   # with its placeholders
    health: Health | None

    @property
    def files(self) -> list[str]:
        return [self.kernel, *([self.ramdisk] if self.ramdisk else [])]

    def render(self, values: dict[str, Any], where: str = "cmdline") -> str:
        """The kernel command line with the slot's values; refused if a value would break the xl config."""
        text = self.cmdline.format_map({k: values[k] for k in PLACEHOLDERS})
        if UNSAFE.search(text) or not text.isascii():
            raise Error(f"{where}: {cut(text)} must not hold quotes, backslashes, control or non-ASCII characters")
        return text


def _int(data: dict[str, Any], key: str, where: str, low: int, high: int, what: str) -> int:
    value = data[key]
    if type(value) is not int or not low <= value <= high:
        raise Error(f"{where}: {key}: {cut(value)} must be {what} from {low} to {high}")
    return value


def _cmdline(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise Error(f"{where}: cmdline: {cut(value)} must be a string")
    if len(value) > MAX_CMDLINE:
        raise Error(f"{where}: cmdline: {len(value)} characters, more than {MAX_CMDLINE}")
    try:
        parts = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise Error(f"{where}: cmdline: {cut(value)}: {exc} (write a brace as '{{{{' or '}}}}')") from None
    for literal, name, spec, conv in parts:
        if UNSAFE.search(literal) or not literal.isascii():
            raise Error(f"{where}: cmdline: {cut(value)} must not hold quotes, backslashes, control or non-ASCII "
                        f"characters")
        if name is not None and (name not in PLACEHOLDERS or spec or conv):
            raise Error(f"{where}: cmdline: unknown placeholder {{{name}{'!' + conv if conv else ''}"
                        f"{':' + spec if spec else ''}}} (known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})")
    return value


def _health(value: object, where: str, default: object) -> Health | None:
    """A version's health check: the site's, with the path or deadline a bundle changes. A bundle can never switch
    it off (`health: null` is refused where the site has one): a guest that never answers must not replace one."""
    if value is None:
        if isinstance(default, dict):
            raise Error(f"{where}: health: null would switch off the site's health check; a bundle may change its "
                        f"path or deadline, never switch it off")
        return None
    if not isinstance(value, dict):
        raise Error(f"{where}: health: {cut(value)} must be null or a mapping with path and deadline")
    base = default if isinstance(default, dict) else {}
    for key in value:
        if key not in ("path", "deadline"):
            raise Error(f"{where}: health: unknown key {cut(key)} (known: path, deadline)")
    h = {**base, **value}
    for key in ("path", "deadline"):
        if key not in h:
            raise Error(f"{where}: health: {key} is missing")
    path = h["path"]
    if not isinstance(path, str) or not HEALTH_PATH.fullmatch(path):
        raise Error(f"{where}: health: path: {cut(path)} must be a URL path: '/' then up to 255 printable ASCII "
                    f"characters, no spaces")
    return Health(path, _int(h, "deadline", where + ": health", 5, 3600, "a whole number of seconds"))


def validate(data: object, where: str, defaults: dict[str, Any] | None = None, *,
             max_memory: int = MAX_MEMORY, max_vcpus: int = MAX_VCPUS) -> Manifest:
    """Check a parsed manifest.json; defaults fill in the keys it leaves out (the site's memory, vcpus, port,
    cmdline, health). `where` starts every message (the file's path)."""
    if not isinstance(data, dict):
        raise Error(f"{where}: must be a JSON object of {', '.join(KEYS)}")
    for key in data:
        if key not in KEYS:
            raise Error(f"{where}: unknown key {cut(key)} (known: {', '.join(KEYS)})")
    d = {"cmdline": DEFAULT_CMDLINE, "ramdisk": None, **(defaults or {}), **data}
    for key in KEYS:
        if key not in d:
            raise Error(f"{where}: {key} is missing")
    name = check_site(d["name"], f"{where}: name")
    version = check_version(d["version"], f"{where}: version")
    kernel = check_file(d["kernel"], f"{where}: kernel")
    ramdisk = None if d["ramdisk"] is None else check_file(d["ramdisk"], f"{where}: ramdisk")
    if ramdisk == kernel:
        raise Error(f"{where}: ramdisk: {cut(ramdisk)} is the kernel's file too")
    sums = d["sha256"]
    if not isinstance(sums, dict):
        raise Error(f"{where}: sha256: {cut(sums)} must be a mapping of file name to sha256")
    for fname in sums:
        if fname not in (kernel, ramdisk):
            raise Error(f"{where}: sha256: {cut(fname)} is neither the kernel nor the ramdisk")
    for fname in (kernel, ramdisk):
        if fname is None:
            continue
        if fname not in sums:
            raise Error(f"{where}: sha256: no sha256 for {cut(fname)}")
        if not isinstance(sums[fname], str) or not SHA256.fullmatch(sums[fname]):
            raise Error(f"{where}: sha256: {fname}: {cut(sums[fname])} must be 64 lower-case hex digits")
    memory = _int(d, "memory", where, 16, max_memory, "a whole number of MiB")
    vcpus = _int(d, "vcpus", where, 1, max_vcpus, "a whole number of vcpus")
    port = _int(d, "port", where, 1, 65535, "a TCP port")
    m = Manifest(name, version, kernel, ramdisk, dict(sums), memory, vcpus, port, _cmdline(d["cmdline"], where),
                 _health(d["health"], where, (defaults or {}).get("health")))
    m.render(SAMPLE, f"{where}: cmdline")
    return m


# values shaped like a slot's, to check that a rendered command line stays one plain string
SAMPLE = {"address": "10.42.100.10", "gateway": "10.42.100.1", "netmask": "255.255.255.0", "prefix": 24,
          "domain": "site.blue", "port": 80, "site": "site", "version": "1.0", "mac": "00:16:3e:2a:64:0a"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_files(m: Manifest, directory: Path, where: str) -> None:
    """Each file a regular file of the directory itself (no symlink), with its sha256; the kernel a zImage."""
    for fname in m.files:
        path = directory / fname
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise Error(f"{where}: {fname}: missing from {directory}") from None
        except OSError as exc:
            if os.path.islink(path):
                raise Error(f"{where}: {fname}: is a symlink (a version's files are regular files in its "
                            f"directory)") from None
            raise Error(f"{where}: {fname}: cannot open {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise Error(f"{where}: {fname}: {path} is not a regular file")
            h = hashlib.sha256()
            head = f.read(0x28)
            h.update(head)
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != m.sha256[fname]:
            raise Error(f"{where}: {fname}: sha256 does not match the manifest (a broken or changed copy)")
        if fname == m.kernel and (len(head) < 0x28 or int.from_bytes(head[0x24:0x28], "little") != ZIMAGE_MAGIC):
            raise Error(f"{where}: kernel: {fname} is not an ARM zImage (a Xen ARM guest kernel: Linux zImage, "
                        f"Mini-OS or MirageOS .xen)")


def as_dict(m: Manifest) -> dict[str, Any]:
    out: dict[str, Any] = {"name": m.name, "version": m.version, "kernel": m.kernel}
    if m.ramdisk:
        out["ramdisk"] = m.ramdisk
    out.update(sha256=dict(m.sha256), memory=m.memory, vcpus=m.vcpus, port=m.port, cmdline=m.cmdline,
               health=None if m.health is None else {"path": m.health.path, "deadline": m.health.deadline})
    return out


def to_json(m: Manifest) -> str:
    return json.dumps(as_dict(m), indent=1) + "\n"


def read(path: Path, defaults: dict[str, Any] | None = None, **limits: int) -> Manifest:
    """Read and validate one manifest.json file (strict UTF-8 JSON), naming the file in every error."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise Error(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Error(f"{path}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        msg = getattr(exc, "msg", str(exc))
        line, col = getattr(exc, "lineno", 0), getattr(exc, "colno", 0)
        raise Error(f"{path}: not JSON: {msg} (line {line}, column {col})") from None
    return validate(data, str(path), defaults, **limits)
