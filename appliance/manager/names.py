"""The one copy of the name rules, for the host and the board: site names, version names and the plain file
names of a version's directory. A name that passes can go into a path, an xl config or a log line as it is.
"""

from __future__ import annotations

import re

from .errors import Error

SITE = re.compile(r"[a-z][a-z0-9-]{0,30}")
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
POINTERS = ("current", "previous")   # the store's symlinks: never a version's name


def _text(name: object, where: str) -> str:
    if not isinstance(name, str):
        raise Error(f"{where}: {name!r} must be a string")
    return name


def check_site(name: object, where: str) -> str:
    if not SITE.fullmatch(_text(name, where)):
        raise Error(f"{where}: {name!r} is not a site name (a lower-case letter, then up to 30 lower-case "
                    f"letters, digits or '-')")
    return str(name)


def check_version(name: object, where: str) -> str:
    text = _text(name, where)
    if not VERSION.fullmatch(text) or text in POINTERS:
        raise Error(f"{where}: {name!r} is not a version name (a letter or digit, then up to 63 letters, digits, "
                    f"'_', '.', '+' or '-'; not 'current' or 'previous')")
    return text


def check_file(name: object, where: str) -> str:
    text = _text(name, where)
    if not FILE.fullmatch(text) or ".." in text:
        raise Error(f"{where}: {name!r} is not a plain file name (a letter or digit, then up to 127 letters, "
                    f"digits, '_', '.', '+' or '-': no '/', '..', quotes or control characters)")
    return str(name)
