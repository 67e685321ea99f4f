"""What the benchmarks' reports share: progress lines on stderr, percentiles, time formats and
markdown tables (the tables go to stdout)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence


def progress_printer(name: str) -> Callable[[str], None]:
    """A function that prints ``[name HH:MM:SS] text`` lines on stderr."""

    def progress(text: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    return progress


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile: the smallest value with at least ``fraction`` of the values
    at or below it; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def yes_no(ok: bool) -> str:
    return "**yes**" if ok else "no"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table (``|`` in a cell escaped)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)
