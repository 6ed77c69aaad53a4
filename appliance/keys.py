"""SSH public keys: the user's own (ssh-agent's first, else ~/.ssh/id_*.pub), which an image trusts by default,
and fingerprints written as `ssh-keygen -l` prints them (SHA256:…), which the image's manifest records.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .cardsettings import PUBLIC_KEY


def is_key(line: str) -> bool:
    """Whether a (stripped) line is a public key: the one rule, cardsettings', which the board applies too."""
    return PUBLIC_KEY.fullmatch(line) is not None


# ~/.ssh/id_*.pub in the order ssh itself tries them (ssh_config(5), IdentityFile), the rest after, by name
_ORDER = ("id_rsa", "id_ecdsa", "id_ecdsa_sk", "id_ed25519", "id_ed25519_sk", "id_xmss", "id_dsa")


@dataclass(frozen=True)
class Key:
    line: str        # as in authorized_keys: type, base64 blob, comment
    where: str       # where it was found, for the user: "ssh-agent (its first key)", "~/.ssh/id_ed25519.pub"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.line)

    @property
    def comment(self) -> str:
        parts = self.line.split(None, 2)
        return parts[2] if len(parts) > 2 else ""


def fingerprint(line: str) -> str:
    """SHA256:… of a public key line, as `ssh-keygen -lf` prints it (unpadded base64 of the blob's SHA-256)."""
    try:
        blob = base64.b64decode(line.split()[1], validate=True)
    except (IndexError, binascii.Error):
        raise ValueError(f"not an SSH public key: {line[:40]!r}") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def fingerprints(text: str) -> list[str]:
    """The fingerprints of an authorized_keys text's keys, in its order."""
    return [fingerprint(line) for line in text.splitlines() if is_key(line.strip())]


def _tilde(p: Path, home: Path) -> str:
    return f"~/{p.relative_to(home)}" if p.is_relative_to(home) else str(p)


def agent_keys() -> list[str]:
    """The public keys ssh-agent holds (`ssh-add -L`), in its order; none without an agent that answers."""
    if not os.environ.get("SSH_AUTH_SOCK"):
        return []
    try:
        out = subprocess.run(["ssh-add", "-L"], capture_output=True, text=True, timeout=10, check=False,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return []      # no ssh-add, or an agent that does not answer
    return [x.strip() for x in out.stdout.splitlines() if is_key(x.strip())] if out.returncode == 0 else []


def own_key() -> Key | None:
    """The user's own public key: ssh-agent's first (`ssh-add -L`), else the first ~/.ssh/id_*.pub in the
    order ssh tries them; None when there is neither."""
    for line in agent_keys()[:1]:
        return Key(line, "ssh-agent (its first key)")
    home = Path.home()
    found = sorted((home / ".ssh").glob("id_*.pub"),
                   key=lambda p: (_ORDER.index(p.stem) if p.stem in _ORDER else len(_ORDER), p.name))
    for p in found:
        try:
            lines = [x.strip() for x in p.read_text().splitlines() if is_key(x.strip())]
        except OSError:
            continue
        if lines:
            return Key(lines[0], _tilde(p, home))
    return None


def private_fingerprint(key: Path) -> str | None:
    """The fingerprint of a private key's public half (KEY.pub beside it, else derived by ssh-keygen); None when
    neither works (a key with a passphrase and no .pub)."""
    pub = key.with_name(key.name + ".pub")
    try:
        text = pub.read_text() if pub.is_file() else subprocess.run(
            ["ssh-keygen", "-y", "-P", "", "-f", str(key)], capture_output=True, text=True, timeout=10,
            check=True, stdin=subprocess.DEVNULL).stdout
        found = fingerprints(text)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return found[0] if found else None


def own_private_keys() -> list[Path]:
    """The user's private keys in ~/.ssh (id_* with a .pub beside), in the order ssh tries them."""
    ssh = Path.home() / ".ssh"
    pubs = sorted(ssh.glob("id_*.pub"), key=lambda p: (_ORDER.index(p.stem) if p.stem in _ORDER else len(_ORDER),
                                                         p.name))
    return [p.with_suffix("") for p in pubs if p.with_suffix("").is_file()]
