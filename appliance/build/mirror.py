"""Where packages come from: the recipe's `mirror:`, else the build host's own apt sources.

No archive host name is ever written in this repository; the build host already knows its mirror.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import RecipeError


@dataclass(frozen=True)
class Source:
    uri: str
    suite: str
    components: tuple[str, ...]

    def line(self) -> str:
        return f"deb {self.uri} {self.suite} {' '.join(self.components)}"


def _deb822(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for raw in text.splitlines() + [""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if cur:
                stanzas.append(cur)
            cur = {}
            continue
        if raw[0] in " \t" and cur:
            continue  # continuation lines (keys) are not needed here
        key, _, value = raw.partition(":")
        cur[key.strip().lower()] = value.strip()
    return stanzas


def host_entries(etc: Path = Path("/etc/apt")) -> list[tuple[str, list[str]]]:
    """(uri, suites) of every enabled binary source on the build host."""
    out: list[tuple[str, list[str]]] = []
    for f in sorted((etc / "sources.list.d").glob("*.sources")):
        for st in _deb822(f.read_text(errors="replace")):
            if st.get("enabled", "yes").lower() == "no" or "deb" not in st.get("types", "").split():
                continue
            for uri in st.get("uris", "").split():
                out.append((uri.rstrip("/"), st.get("suites", "").split()))
    lists = [etc / "sources.list"] + sorted((etc / "sources.list.d").glob("*.list"))
    for f in lists:
        if not f.exists():
            continue
        for raw in f.read_text(errors="replace").splitlines():
            line = re.sub(r"\[[^]]*\]", "", raw.split("#", 1)[0]).split()
            if len(line) >= 3 and line[0] == "deb":
                out.append((line[1].rstrip("/"), [line[2]]))
    return out


def sources(suite: str, components: tuple[str, ...], mirror: str | None = None,
            security_mirror: str | None = None, etc: Path = Path("/etc/apt")) -> list[Source]:
    """The suite, its -updates and its -security, each from the recipe or the host's apt sources."""
    entries = host_entries(etc)

    def find(name: str) -> str | None:
        return next((uri for uri, suites in entries if name in suites), None)

    main = mirror or find(suite)
    if not main:
        raise RecipeError(f"no apt source for '{suite}' in the build host's /etc/apt/sources.list(.d)",
                          hint="set mirror: in the recipe")
    security = security_mirror or find(f"{suite}-security")
    out = [Source(main.rstrip("/"), suite, components), Source(main.rstrip("/"), f"{suite}-updates", components)]
    if security:
        out.append(Source(security.rstrip("/"), f"{suite}-security", components))
    return out
