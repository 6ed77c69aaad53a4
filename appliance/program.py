"""The installed `appliance` command: invoke's own Program serving the tasks of appliance/commands.py, the same
ones `invoke` runs in a checkout, from any directory; `appliance --version` adds the checkout's commit.
"""

from __future__ import annotations

import subprocess
from importlib import metadata

from invoke import Program

from . import ROOT
from .commands import ns


def version() -> str:
    """The package's version, and in a git checkout (an editable install) the commit, e.g. `0.1.0 (git 3c40e9c)`."""
    try:
        text = metadata.version("appliance")
    except metadata.PackageNotFoundError:
        text = "unknown"
    if (ROOT / ".git").exists():
        try:
            p = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=7"],
                               capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return text
        if p.returncode == 0 and p.stdout.strip():
            text += f" (git {p.stdout.strip()})"
    return text


class _Program(Program):
    def print_version(self) -> None:
        print(f"{self.name} {version()}")   # asked for, not worked out at every start


program = _Program(name="appliance", binary="appliance", namespace=ns)


def main() -> None:
    program.run()
