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
MANIFEST = "manifest.json"           # a version's own manifest, beside its files
PART = ".part"                       # an upload's file until the board has checked it whole
CUT = 80                             # a value quoted in a message is cut to this many characters


def cut(value: object, limit: int = CUT) -> str:
    """A value as a message quotes it: its repr, cut at limit characters with an ellipsis (a 1 MB version string
    makes a one-line error, not a megabyte)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _text(name: object, where: str) -> str:
    if not isinstance(name, str):
        raise Error(f"{where}: {cut(name)} must be a string")
    return name


def check_site(name: object, where: str) -> str:
    if not SITE.fullmatch(_text(name, where)):
        raise Error(f"{where}: {cut(name)} is not a site name (a lower-case letter, then up to 30 lower-case "
                    f"letters, digits or '-')")
    return str(name)


def check_version(name: object, where: str) -> str:
    text = _text(name, where)
    if not VERSION.fullmatch(text) or text in POINTERS:
        raise Error(f"{where}: {cut(name)} is not a version name (a letter or digit, then up to 63 letters, digits, "
                    f"'_', '.', '+' or '-'; not 'current' or 'previous')")
    return text


def check_file(name: object, where: str) -> str:
    """A file of a version: a plain name, and none the board uses itself (its manifest, an upload's .part)."""
    text = _text(name, where)
    if not FILE.fullmatch(text) or ".." in text:
        raise Error(f"{where}: {cut(name)} is not a plain file name (a letter or digit, then up to 127 letters, "
                    f"digits, '_', '.', '+' or '-': no '/', '..', quotes or control characters)")
    if text == MANIFEST or text.endswith(PART):
        raise Error(f"{where}: {cut(name)} is a name the board uses itself (a version's {MANIFEST}, an upload's "
                    f"*{PART}); give the file another name")
    return text
