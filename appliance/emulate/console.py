"""The serial console of the emulated board: every byte into a log file, and when each boot milestone's line first
appeared (seconds from power-on); a line after which the boot cannot go on is noted so waits can stop at once.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import IO

# The launcher's own health check, an HTTP GET to the guest across the bridge, answered 200.
GUEST_SERVED = "guest HTTP 200 on the bridge"
VISITOR_PAGE = "visitor first page"
VISITOR_GAVE_UP = "visitor gave up"
# The first console line matching each pattern marks a milestone (seconds from power-on).
MILESTONES: tuple[tuple[str, re.Pattern[bytes]], ...] = (
    ("spl", re.compile(rb"^U-Boot SPL \d{4}\.")),          # boards that boot U-Boot from the card
    ("u-boot", re.compile(rb"^U-Boot \d{4}\.")),
    ("boot.scr", re.compile(rb"appliance: booting Xen on")),
    ("xen", re.compile(rb"\(XEN\) ")),
    ("dom0 kernel", re.compile(rb"Booting Linux on physical CPU|Linux version \d")),
    ("dom0 initramfs", re.compile(rb"Run /init as init process|Loading, please wait")),
    ("dom0 systemd", re.compile(rb"systemd\[1\]: |Welcome to ")),
    ("guest started", re.compile(rb"appliance-guest: starting ")),
    (GUEST_SERVED, re.compile(rb"appliance-guest: .* answers at http")),
    ("login prompt", re.compile(rb" login: ")),
    # the bench image's simulated phone on the booth's wifi (emulate/visitor.py), from power-on
    ("visitor radio", re.compile(rb"appliance-visitor: radio ")),
    ("visitor associated", re.compile(rb"appliance-visitor: associated")),
    ("visitor lease", re.compile(rb"appliance-visitor: lease ")),
    ("visitor resolved", re.compile(rb"appliance-visitor: resolved ")),
    (VISITOR_PAGE, re.compile(rb"appliance-visitor: first page ")),
    (VISITOR_GAVE_UP, re.compile(rb"appliance-visitor: gave up")),
)
# Console lines after which waiting longer cannot help; the error quotes the console's tail.
FATAL: tuple[tuple[re.Pattern[bytes], str], ...] = (
    (re.compile(rb"BOOTP broadcast|Retrieving file: pxelinux"),
     "U-Boot found no boot.scr it could run on the disk and fell back to network boot"),
    (re.compile(rb"Wrong image format for .source. command|SCRIPT FAILED"), "U-Boot could not run boot.scr"),
    (re.compile(rb"Bad Linux ARM zImage magic"), "U-Boot did not find a zImage where boot.scr loaded Xen"),
    (re.compile(rb"\(XEN\) (Panic on CPU|\*+ PANIC)"), "Xen panicked"),
    (re.compile(rb"Kernel panic - not syncing"), "the dom0 kernel panicked"),
    (re.compile(rb"Dropping to a shell|Gave up waiting for root|appliance-initramfs: root=.* not found"),
     "dom0's initramfs did not find the root filesystem"),
    (re.compile(rb"appliance-initramfs: cannot mount"), "dom0's initramfs could not mount the root filesystem"),
    (re.compile(rb"Press any key to proceed"), "the boot waits for a key on the console (systemd-firstboot prompts)"),
)



class Console:
    """Reads QEMU's serial output into the log file, noting when each milestone first appears."""

    def __init__(self, stream: IO[bytes], log_path: Path, start: float) -> None:
        self.log_path, self.start = log_path, start
        self.milestones: dict[str, float] = {}
        self.fatal: tuple[str, bytes] | None = None
        self._stream = stream
        self._partial = b""
        self._thread = threading.Thread(target=self._pump, name="qemu-console", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        fd = self._stream.fileno()
        with open(self.log_path, "ab", buffering=0) as out:
            while chunk := os.read(fd, 65536):
                now = time.monotonic() - self.start
                out.write(chunk)
                *lines, self._partial = (self._partial + chunk).split(b"\n")
                # A prompt has no newline yet, so the unfinished line is looked at too.
                for line in [*lines, self._partial]:
                    self._note(line.rstrip(b"\r"), now)
                self._partial = self._partial[-4096:]

    def _note(self, line: bytes, now: float) -> None:
        for name, pattern in MILESTONES:
            if name not in self.milestones and pattern.search(line):
                self.milestones[name] = round(now, 2)
        if self.fatal is None:
            for pattern, why in FATAL:
                if pattern.search(line):
                    self.fatal = (why, line)

    def join(self, timeout: float = 5) -> None:
        self._thread.join(timeout)

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_bytes()[-16384:].decode(errors="replace")
        except OSError:
            return "(no console log)"
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).replace("\r\n", "\n")  # systemd's colours, CRLF
        return "\n".join(line.rstrip() for line in text.split("\n")[-lines:])


