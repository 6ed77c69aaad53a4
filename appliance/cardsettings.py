"""A card's own settings: `appliance.txt` on the boot partition (host name, wifi, SSH keys), written by
`invoke flash` and applied once by the board's first boot. The one copy of the rules for host names, SSIDs,
passphrases and public keys, for recipes, the flasher and the board (standard library only: the board runs it).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

FILE = "appliance.txt"           # on the boot partition (FAT); the board renames it FILE + DONE once applied
DONE = ".done"
STAMP = "var/lib/appliance/card-settings"   # the board's record of what it applied (the file's sha256)
UNIT = "etc/systemd/system/sysinit.target.wants/appliance-card-settings.service"   # removed once applied
MAX_BYTES = 64 << 10             # a hand-edited file, a few keys: anything bigger is not ours
MAX_KEYS = 64

HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
PUBLIC_KEY = re.compile(r"(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp\d+|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com)"
                        r" [A-Za-z0-9+/=]+( [^\x00-\x1f\x7f]*)?")
HEADER = ("# appliance card settings (README, \"A card of its own\"): key=value lines, applied at the board's\n"
          "# first boot, then this file is renamed appliance.txt.done without the passphrase.\n")


class Error(ValueError):
    """A value or a settings file that the rules refuse; the message is one line."""


def _show(value: str) -> str:
    """A refused value as an error shows it: whole unless it would swamp the line."""
    return value if len(value) <= 80 else value[:77] + "..."


def check_hostname(value: str) -> str:
    if not HOSTNAME.fullmatch(value):
        raise Error(f"'{_show(value)}' is not a valid host name (up to 63 lower-case letters, digits and '-', "
                    f"not starting or ending with '-')")
    return value


def check_ssid(value: str) -> str:
    if not 1 <= len(value.encode()) <= 32:
        raise Error(f"'{_show(value)}' must be 1 to 32 bytes long")
    if not value.isprintable():
        raise Error(f"{_show(value)!r} must not hold control characters")
    return value


def check_passphrase(value: str, source: str) -> str:
    if not (8 <= len(value) <= 63 and all(" " <= c <= "~" for c in value)):
        raise Error(f"the passphrase in {source} must be 8 to 63 printable ASCII characters (it has {len(value)})")
    return value


def check_key(line: str) -> str:
    if not PUBLIC_KEY.fullmatch(line):
        raise Error("not an SSH public key (a private key or a typo?)")
    return line


@dataclass(frozen=True)
class Settings:
    hostname: str | None = None
    ssid: str | None = None
    passphrase: str | None = None
    authorized_keys: tuple[str, ...] = field(default=())

    def render(self) -> str:
        lines = [f"{k}={v}" for k, v in (("hostname", self.hostname), ("ssid", self.ssid),
                                          ("passphrase", self.passphrase)) if v is not None]
        return HEADER + "".join(f"{line}\n" for line in lines + [f"authorized_key={k}" for k in self.authorized_keys])


_SINGLE = ("hostname", "ssid", "passphrase")
_KEYS = (*_SINGLE, "authorized_key")


def parse(data: bytes, where: str) -> Settings:
    """The settings in a file's bytes; `where` names it in errors (`WHERE:LINE: …`)."""
    if len(data) > MAX_BYTES:
        raise Error(f"{where}: {len(data)} bytes, more than a settings file has ({MAX_BYTES})")
    try:
        text = data.decode().removeprefix("\ufeff")     # a byte-order mark: Windows' Notepad writes one
    except UnicodeDecodeError as exc:
        raise Error(f"{where}: not UTF-8 text (byte {exc.start})") from None
    values: dict[str, str] = {}
    keys: list[str] = []
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, eq, value = line.partition("=")
        name = name.strip()
        if not eq:
            raise Error(f"{where}:{n}: expected key=value, got {line[:40]!r}")
        try:
            if name not in _KEYS:
                raise Error(f"unknown key '{name[:40]}' (known: {', '.join(_KEYS)})")
            if name in values:
                raise Error(f"{name} is given twice")
            if name == "hostname":
                values[name] = check_hostname(value.strip())
            elif name == "ssid":
                values[name] = check_ssid(value)
            elif name == "passphrase":
                values[name] = check_passphrase(value, "passphrase=")
            else:
                if len(keys) == MAX_KEYS:
                    raise Error(f"more than {MAX_KEYS} authorized_key lines")
                keys.append(check_key(value.strip()))
        except Error as exc:
            raise Error(f"{where}:{n}: {exc}") from None
    return Settings(values.get("hostname"), values.get("ssid"), values.get("passphrase"), tuple(keys))


# ---------------------------------------------------------------- the board's side


def _write(path: Path, text: str, mode: int | None) -> None:
    """Whole or not at all: a power cut leaves the old file or the new one. Mode None: a FAT file (the mount's)."""
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode or 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if mode is not None:
        os.chmod(tmp, mode)     # not the umask's
    os.replace(tmp, path)


def _hostapd(conf: str, ssid: str | None, passphrase: str | None) -> str:
    """The access point's configuration with another SSID and (an open network made) WPA2 with another passphrase."""
    lines = conf.splitlines()
    if ssid is not None:
        lines = [f"ssid={ssid}" if ln.startswith("ssid=") else ln for ln in lines]
    if passphrase is not None:
        lines = [ln for ln in lines if not ln.startswith(("wpa=", "wpa_key_mgmt=", "rsn_pairwise=", "wpa_passphrase="))
                 and ln != "# open network (wifi.open: true): no encryption"]
        lines += ["# WPA2-PSK (CCMP): the passphrase came from the card's appliance.txt", "wpa=2",
                  "wpa_key_mgmt=WPA-PSK", "rsn_pairwise=CCMP", f"wpa_passphrase={passphrase}"]
    return "\n".join(lines) + "\n"


def apply(s: Settings, root: Path) -> list[str]:
    """Apply settings to the tree at `root` (the board's / at boot); returns what changed, a line each."""
    conf = root / "etc/hostapd/appliance.conf"
    if (s.ssid is not None or s.passphrase is not None) and not conf.is_file():
        raise Error(f"ssid= and passphrase= need the booth's access point, and this image has none ({conf})")
    done = []
    if s.hostname:
        _write(root / "etc/hostname", s.hostname + "\n", 0o644)
        hosts = root / "etc/hosts"
        text = hosts.read_text() if hosts.exists() else "127.0.0.1\tlocalhost\n"
        if re.search(r"^127\.0\.1\.1\s", text, flags=re.M):
            text = re.sub(r"^127\.0\.1\.1\s.*$", f"127.0.1.1\t{s.hostname}", text, flags=re.M)
        else:
            text += f"127.0.1.1\t{s.hostname}\n"
        _write(hosts, text, 0o644)
        # appliance-hostname's record: a host name given on the card wins over NAME-xxxxxx from the MAC
        _write(root / "var/lib/appliance/hostname-set", s.hostname + "\n", 0o644)
        done.append(f"host name {s.hostname}")
    if s.ssid is not None or s.passphrase is not None:
        _write(conf, _hostapd(conf.read_text(), s.ssid, s.passphrase), 0o600)
        done += [f"wifi SSID {s.ssid}"] if s.ssid is not None else []
        done += ["wifi WPA2 passphrase"] if s.passphrase is not None else []
    if s.authorized_keys:
        path = root / "root/.ssh/authorized_keys"
        have = path.read_text().splitlines() if path.exists() else []
        new = [k for k in dict.fromkeys(s.authorized_keys) if k not in have]
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        _write(path, "".join(f"{k}\n" for k in [*have, *new]), 0o600)
        done.append(f"{len(new)} SSH key(s) trusted for root")
    return done


def apply_card(boot: Path, root: Path) -> list[str]:
    """The board's first boot: apply `boot`/appliance.txt to `root` once, then rename it (minus the passphrase)."""
    src = boot / FILE
    if not src.is_file():
        (root / UNIT).unlink(missing_ok=True)
        return []
    with open(src, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    digest = hashlib.sha256(data).hexdigest()
    stamp = root / STAMP
    if stamp.is_file() and stamp.read_text().strip() == digest:
        done = []            # applied, but the power went before the rename: only the rename is left
    else:
        done = apply(parse(data, str(src)), root)
        _write(stamp, digest + "\n", 0o644)
    kept = b"".join(ln for ln in data.splitlines(keepends=True) if not ln.lstrip().startswith(b"passphrase"))
    _write(boot / (FILE + DONE), kept.decode(errors="replace"), None)
    src.unlink()
    # later boots do not wait for the boot partition's mount (and so for udev) before the host name and networkd
    (root / UNIT).unlink(missing_ok=True)
    return done
