"""Fixed identities derived from the recipe, so that two builds of the same inputs are bit-identical.

The disk signature, filesystem UUIDs, the FAT volume id and the ext4 hash seed all come from the
recipe's digest instead of a random source.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    disk_id: str       # MBR disk signature, 8 hex digits
    root_uuid: str
    hash_seed: str
    boot_volid: str    # FAT volume id, 8 hex digits

    @property
    def root_partuuid(self) -> str:
        return f"{self.disk_id}-02"

    @property
    def boot_uuid(self) -> str:
        """The FAT volume id as blkid and fstab spell it (XXXX-XXXX)."""
        return f"{self.boot_volid[:4]}-{self.boot_volid[4:]}".upper()


def derive(digest: str) -> Identity:
    def h(label: str) -> bytes:
        return hashlib.sha256(f"{digest}:{label}".encode()).digest()

    return Identity(
        disk_id=h("disk").hex()[:8],
        root_uuid=str(uuid.UUID(bytes=h("root")[:16], version=4)),
        hash_seed=str(uuid.UUID(bytes=h("seed")[:16], version=4)),
        boot_volid=h("boot").hex()[:8],
    )
