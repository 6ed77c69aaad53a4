"""The card's own settings (`appliance.txt`, appliance.cardsettings) after the verified write: checked before a
byte is written, copied onto the boot partition's FAT with mtools (no mount), and read back past the page cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

from .. import cardsettings, log
from ..cardsettings import Settings
from ..errors import FlashError, ToolError
from .source import Image

FAT_TYPES = {0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0E}
BLKFLSBUF = 0x1261
ENV = {"MTOOLS_SKIP_CHECK": "1"}   # the image's FAT is ours: no complaint about its geometry


def _check(option: str, fn, *args):  # type: ignore[no-untyped-def]
    try:
        return fn(*args)
    except cardsettings.Error as exc:
        raise FlashError(f"{option}: {exc}") from None


def _read(option: str, path: Path) -> str:
    try:
        with open(path.expanduser(), "rb") as f:
            data = f.read(cardsettings.MAX_BYTES + 1)
    except OSError as exc:
        raise FlashError(f"{option}: cannot read {path}: {exc.strerror}") from None
    if len(data) > cardsettings.MAX_BYTES:
        raise FlashError(f"{option}: {path} is bigger than {cardsettings.MAX_BYTES} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise FlashError(f"{option}: {path} is not UTF-8 text") from None


def from_options(hostname: str | None = None, ssid: str | None = None, passphrase_file: Path | None = None,
                 authorized_keys: Path | None = None) -> Settings | None:
    """The settings `invoke flash` was given, each checked by the board's own rules; None when none was."""
    if hostname is None and ssid is None and passphrase_file is None and authorized_keys is None:
        return None
    passphrase = keys = None
    if passphrase_file is not None:
        passphrase = _check("--passphrase-file", cardsettings.check_passphrase,
                            _read("--passphrase-file", passphrase_file).strip("\r\n"), str(passphrase_file))
    if authorized_keys is not None:
        lines = [(n, ln.strip()) for n, ln in enumerate(_read("--authorized-keys", authorized_keys).splitlines(), 1)]
        keys = tuple(_check(f"--authorized-keys: {authorized_keys}:{n}", cardsettings.check_key, ln)
                     for n, ln in lines if ln and not ln.startswith("#"))
        if not keys:
            raise FlashError(f"--authorized-keys: {authorized_keys} holds no SSH public key")
        if len(keys) > cardsettings.MAX_KEYS:
            raise FlashError(f"--authorized-keys: {authorized_keys} holds more than {cardsettings.MAX_KEYS} keys")
    return Settings(hostname=_check("--hostname", cardsettings.check_hostname, hostname) if hostname else None,
                    ssid=_check("--ssid", cardsettings.check_ssid, ssid) if ssid is not None else None,
                    passphrase=passphrase, authorized_keys=keys or ())


def _fat_offset(mbr: bytes, what: object) -> int:
    """The byte offset of the first FAT partition in an MBR (the image's boot partition)."""
    if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
        raise FlashError(f"{what} has no MBR partition table: there is no boot partition for the card's settings")
    for i in range(4):
        entry = mbr[446 + 16 * i: 446 + 16 * (i + 1)]
        if entry[4] in FAT_TYPES:
            return int.from_bytes(entry[8:12], "little") * 512
    raise FlashError(f"{what} has no FAT partition for the card's settings (the image's boot partition)")


def boot_partition(target: Path) -> int:
    with open(target, "rb") as f:
        return _fat_offset(f.read(512), target)


def check_image(image: Path) -> None:
    """Refuse, before a byte is written, an image with no boot partition to hold the card's settings."""
    source = Image(image)
    try:
        _fat_offset(source.read(0, 512), image)
    finally:
        source.close()


def _drop_cache(target: Path) -> None:
    """What was written reaches the card, and what is read next comes from it, not from the page cache."""
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        if target.is_block_device():
            fcntl.ioctl(fd, BLKFLSBUF)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read(target: Path) -> bytes | None:
    """The settings file on the target's boot partition, or None when there is none."""
    fat = f"{target}@@{boot_partition(target)}"
    listing = log.run(["mdir", "-b", "-i", fat, "::/"], env=ENV, what=f"mdir on {target}'s boot partition")
    if f"::/{cardsettings.FILE}" not in listing.stdout.decode(errors="replace").lower().splitlines():
        return None
    return log.run(["mcopy", "-n", "-i", fat, f"::/{cardsettings.FILE}", "-"], env=ENV,
                   what=f"reading {cardsettings.FILE} back from {target}").stdout


def write(target: Path, settings: Settings) -> None:
    """Copy the settings onto the target's boot partition and read them back; raise FlashError if they differ."""
    data = settings.render().encode()
    fat = f"{target}@@{boot_partition(target)}"
    with tempfile.TemporaryDirectory(prefix="appliance-card-") as tmp:
        src = Path(tmp) / cardsettings.FILE
        src.write_bytes(data)
        try:
            log.run(["mcopy", "-o", "-m", "-i", fat, src, f"::/{cardsettings.FILE}"], env=ENV,
                    what=f"writing {cardsettings.FILE} to {target}'s boot partition")
        except ToolError as exc:
            raise FlashError(f"{exc}; the image is written and verified, but the card's settings are not "
                             f"(flash again)") from None
    with contextlib.suppress(OSError):
        _drop_cache(target)
    if read(target) != data:
        raise FlashError(f"verification failed: {cardsettings.FILE} on {target}'s boot partition differs from what "
                         f"was written (flash again)")
    what = [f"host name {settings.hostname}" if settings.hostname else "",
            f"SSID {settings.ssid}" if settings.ssid is not None else "",
            "WPA2 passphrase" if settings.passphrase else "",
            f"{len(settings.authorized_keys)} SSH key(s)" if settings.authorized_keys else ""]
    log.info(f"card settings written to {cardsettings.FILE} on the boot partition ({', '.join(w for w in what if w)}), "
             f"verified; the board applies them at its first boot")
