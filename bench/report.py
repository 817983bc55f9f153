"""One table for every benchmark: each figure's min/median/max over the runs,
next to its peer measured in the same run (bench/run prints it)."""
from __future__ import annotations

import dataclasses
import statistics


@dataclasses.dataclass
class Figure:
    group: str                      # "start-up", "port-I/O exit", "virtio-blk", "memory"
    name: str
    unit: str                       # "ms", "µs", "IOPS", "MiB"
    samples: list[float]
    peer: str = ""                  # what it is compared with, measured in the same runs
    peer_samples: list[float] = dataclasses.field(default_factory=list)
    diagnostic: bool = False        # busy time, not what a user or guest waits for
    note: str = ""


def _fmt(value: float, unit: str) -> str:
    if unit == "IOPS":
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _spread(samples: list[float], unit: str) -> str:
    if not samples:
        return "-"
    med = statistics.median(samples)
    if len(samples) == 1:
        return _fmt(med, unit)
    return f"{_fmt(med, unit)} ({_fmt(min(samples), unit)}-{_fmt(max(samples), unit)})"


def ratio(f: Figure) -> str:
    if not f.samples or not f.peer_samples:
        return ""
    a, b = statistics.median(f.samples), statistics.median(f.peer_samples)
    if b == 0:
        return ""
    if f.unit == "IOPS":
        return f"{a / b:.0%} of peer"
    return f"{a / b:.2f}x"


def table(figures: list[Figure]) -> str:
    rows = ["| group | figure | unit | median (min-max) | same-run peer | peer median (min-max) | ratio |",
            "| --- | --- | --- | ---: | --- | ---: | ---: |"]
    for f in figures:
        name = f.name + (" *(diagnostic)*" if f.diagnostic else "")
        if f.note:
            name += f" ({f.note})"
        rows.append(f"| {f.group} | {name} | {f.unit} | {_spread(f.samples, f.unit)} n={len(f.samples)} "
                    f"| {f.peer or '-'} | {_spread(f.peer_samples, f.unit) if f.peer_samples else '-'} "
                    f"| {ratio(f)} |")
    return "\n".join(rows)
