"""The benchmarks' one report: figures gathered over a few runs, each printed as its median with the spread.

A figure is a number measured once per run; `combine` turns the runs' dictionaries into one whose numbers are
Figures (median, lowest, highest, how many runs gave one), and `report` prints it as one indented table.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import log


@dataclass(frozen=True)
class Figure:
    values: tuple[float, ...]
    runs: int                    # runs that were made; fewer values: some gave none

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def __str__(self) -> str:
        n = f"n={len(self.values)}" + (f" of {self.runs}" if len(self.values) != self.runs else "")
        return f"{_num(self.median):>10}  ({_num(min(self.values))}–{_num(max(self.values))}, {n})"


def _num(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 1e4 else f"{v:.2f}"


def combine(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One dictionary of the runs' figures: numbers become Figures, nested dictionaries are combined in turn,
    a yes/no says in how many runs it held, and anything else is kept when every run gave the same."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for r in runs for k in r):
        got = [r.get(key) for r in runs]
        if all(isinstance(v, dict) for v in got if v is not None) and any(isinstance(v, dict) for v in got):
            out[key] = combine([v for v in got if isinstance(v, dict)])
        elif all(isinstance(v, bool) for v in got):
            out[key] = f"{sum(1 for v in got if v)} of {len(got)}"
        elif any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in got):
            out[key] = Figure(tuple(float(v) for v in got if isinstance(v, (int, float))), len(got))
        else:
            out[key] = got[0] if len(set(map(str, got))) == 1 else ", ".join(map(str, got))
    return out


def report(figures: dict[str, Any], indent: int = 0) -> None:
    for key, value in figures.items():
        if isinstance(value, dict):
            log.info(f"{'  ' * indent}{key}:")
            report(value, indent + 1)
        elif isinstance(value, float):
            log.info(f"{'  ' * indent}{key:<48} {value:10.1f}")
        else:
            log.info(f"{'  ' * indent}{key:<48} {value!s:>10}")
