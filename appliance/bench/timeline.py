"""Timelines to look at, as standalone SVG: the boot (the console's milestones on one time axis, a row per phase,
coloured by its lane: the boot loader, Xen, dom0, the guest and a visitor on the wifi, with dom0's slowest systemd
units below them) and the build's steps.

`invoke bench` writes build/bench/boot.svg and build/bench/build.svg; the README shows a boot one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import escape

# (lane, label, from milestone(s), to milestone(s)): the first milestone of each tuple the boot reached counts.
PHASES: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("boot loader", "U-Boot", ("spl", "u-boot"), ("boot.scr",)),
    ("boot loader", "boot.scr", ("boot.scr",), ("xen",)),
    ("Xen", "Xen until dom0", ("xen",), ("dom0 kernel",)),
    ("dom0", "kernel", ("dom0 kernel",), ("dom0 initramfs",)),
    ("dom0", "initramfs", ("dom0 initramfs",), ("dom0 systemd",)),
    ("dom0", "systemd until SSH", ("dom0 systemd",), ("ssh",)),
    ("guest", "boots until its page", ("guest started",), ("guest HTTP 200 on the bridge",
                                                           "guest HTTP 200, polled over SSH")),
    # the simulated phone: from its radio's appearing in dom0 to the default site's page (emulate/visitor.py)
    ("visitor", "joins the wifi", ("visitor radio",), ("visitor associated",)),
    ("visitor", "gets a lease", ("visitor associated",), ("visitor lease",)),
    ("visitor", "resolves the name", ("visitor lease",), ("visitor resolved",)),
    ("visitor", "loads the page", ("visitor resolved",), ("visitor first page",)),
)
COLOURS = {"boot loader": "#8f7a66", "Xen": "#d9534f", "dom0": "#3e7cb1", "guest": "#5cb85c", "visitor": "#9b59b6",
           "unit": "#9bbbd9", "step": "#edc22e"}
UNITS = 8               # dom0's slowest units shown
W, LEFT, RIGHT, ROW, TOP = 980, 250, 70, 24, 56
MARK_LINE, CHAR_W = 14, 7.0    # a mark's label line height, and a generous character width (12 px sans-serif)


def units(show: str, dom0_kernel: float, top: int = UNITS) -> list[tuple[str, float, float]]:
    """dom0's slowest units as (name, start, end) in seconds from power-on, from `systemctl show -p Id -p
    InactiveExitTimestampMonotonic -p ActiveEnterTimestampMonotonic '*'` (microseconds since dom0's kernel
    started, which the console saw at dom0_kernel)."""
    found = []
    for block in show.split("\n\n"):
        kv = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        try:
            start, end = int(kv["InactiveExitTimestampMonotonic"]), int(kv["ActiveEnterTimestampMonotonic"])
        except (KeyError, ValueError):
            continue
        if 0 < start < end and not kv.get("Id", "").endswith((".target", ".slice", ".device", ".scope")):
            found.append((kv["Id"], dom0_kernel + start / 1e6, dom0_kernel + end / 1e6))
    return sorted(found, key=lambda u: u[1] - u[2])[:top]


def _first(milestones: Mapping[str, float], names: tuple[str, ...]) -> float | None:
    return next((milestones[n] for n in names if milestones.get(n) is not None), None)


class _Svg:
    def __init__(self, title: str, end: float, rows: int) -> None:
        self.end, self.rows = max(end, 1.0), rows
        self.height = TOP + rows * ROW + 40
        self.labels: list[tuple[float, float, int]] = []   # marks' labels drawn so far: (x from, x to, line)
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{self.height}" '
                      f'font-family="sans-serif" font-size="12">', f"<title>{escape(title)}</title>",
                      '<rect width="100%" height="100%" fill="#fff"/>',
                      f'<text x="10" y="22" font-size="15" font-weight="bold">{escape(title)}</text>']
        self.axis()

    def x(self, t: float) -> float:
        return round(LEFT + (W - LEFT - RIGHT) * t / self.end, 1)

    def axis(self) -> None:
        step = next(s for s in (1, 2, 5, 10, 20, 30, 60, 120, 300, 600) if self.end / s <= 12)
        bottom = TOP + self.rows * ROW
        for i in range(int(self.end // step) + 1):
            x = self.x(i * step)
            self.parts.append(f'<line x1="{x}" y1="{TOP}" x2="{x}" y2="{bottom}" stroke="#eee"/>'
                              f'<text x="{x}" y="{bottom + 16}" text-anchor="middle" fill="#666">{i * step} s</text>')

    def label(self, row: int, text: str) -> None:
        self.parts.append(f'<text x="{LEFT - 8}" y="{TOP + row * ROW + 17}" text-anchor="end">{escape(text)}</text>')

    def bar(self, row: int, start: float, end: float, colour: str, text: str = "") -> None:
        x0, x1 = self.x(start), self.x(max(end, start))
        y = TOP + row * ROW + 4
        self.parts.append(f'<rect x="{x0}" y="{y}" width="{max(x1 - x0, 1.5)}" height="{ROW - 8}" fill="{colour}">'
                          f'<title>{escape(text)}: {start:.1f}-{end:.1f} s</title></rect>')
        if text:
            inside = (x1 - x0) > 7 * len(text)
            self.parts.append(f'<text x="{x0 + 4 if inside else x1 + 4}" y="{y + 13}" '
                              f'fill="{"#fff" if inside else "#333"}">{escape(text)}</text>')

    def mark(self, t: float, text: str, colour: str = "#333") -> None:
        """A dashed line at t, labelled above the rows; a label that would overlap one already drawn goes a line
        higher (two lines fit under the title), and one near the right edge ends at its line instead."""
        x = self.x(t)
        width = CHAR_W * len(text)
        x0 = x + 3 if x + 3 + width <= W else x - 3 - width
        line = next(n for n in range(len(self.labels) + 1)
                    if all(n != m or b < x0 or x0 + width < a for a, b, m in self.labels))
        self.labels.append((x0, x0 + width, line))
        y = TOP - 6 - line * MARK_LINE
        self.parts.append(f'<line x1="{x}" y1="{y + 2}" x2="{x}" y2="{TOP + self.rows * ROW}" stroke="{colour}" '
                          f'stroke-dasharray="4 3"/><text x="{round(x0, 1)}" y="{y}" fill="{colour}">'
                          f'{escape(text)}</text>')

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join([*self.parts, "</svg>"]) + "\n")
        return path


def boot_svg(milestones: Mapping[str, float], path: Path, *, slow_units: Sequence[tuple[str, float, float]] = (),
             goal: float | None = None, title: str = "Boot under QEMU") -> Path:
    """The boot's phases in their lanes, the guest's first HTTP 200, the visitor's first page and the goal marked,
    dom0's slowest units below."""
    served = _first(milestones, ("guest HTTP 200 on the bridge", "guest HTTP 200, polled over SSH"))
    end = max([*milestones.values(), *(u[2] for u in slow_units), goal or 0])
    # the visitor's lane only for a boot that had one (the bench image's)
    phases = [p for p in PHASES if p[0] != "visitor" or "visitor radio" in milestones]
    svg = _Svg(title, end * 1.04, len(phases) + len(slow_units))
    for row, (lane, text, a, b) in enumerate(phases):
        svg.label(row, text if lane == "Xen" else f"{lane}: {text}")
        start, stop = _first(milestones, a), _first(milestones, b)
        if start is not None and stop is not None:
            svg.bar(row, start, stop, COLOURS[lane], f"{stop - start:.1f} s")
    for row, (name, start, stop) in enumerate(slow_units, len(phases)):
        svg.label(row, f"unit {name}")
        svg.bar(row, start, stop, COLOURS["unit"], f"{stop - start:.1f} s")
    if goal is not None:
        svg.mark(goal, f"goal {goal:g} s", "#999")
    if served is not None:
        svg.mark(served, f"guest's 200 {served:.1f} s", COLOURS["guest"])
    page = milestones.get("visitor first page")
    if page is not None:
        svg.mark(page, f"visitor's page {page:.1f} s", COLOURS["visitor"])
    return svg.write(path)


def build_svg(steps: Mapping[str, float], path: Path, title: str = "Build steps") -> Path:
    """The build's steps one after another (they run in order), each labelled with its seconds."""
    names = list(steps)
    svg = _Svg(f"{title}: {sum(steps.values()):.0f} s", sum(steps.values()) * 1.04, len(names))
    t = 0.0
    for row, name in enumerate(names):
        svg.label(row, name if len(name) <= 28 else name[:27] + "…")
        svg.bar(row, t, t + steps[name], COLOURS["step"], f"{steps[name]:.1f} s")
        t += steps[name]
    return svg.write(path)
