"""The side-by-side tables printed at the end of a run (pure)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Row:
    metric: str
    ours: float | None
    upstream: float | None
    #: The issue's target for this row, as text, and the check of ``(ours, upstream)``.
    goal: str = ""
    check: Callable[[float, float], bool] | None = None
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.check is None or self.ours is None:
            return None
        if self.upstream is None and "upstream" in self.goal:
            return None
        return self.check(self.ours, self.upstream if self.upstream is not None else 0.0)


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def _layout(lines: list[list[str]], left: set[int]) -> str:
    """Columns padded to their widest cell; those in ``left`` left-aligned, others right."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for n, line in enumerate(lines):
        cells = [
            cell.ljust(widths[i]) if i in left else cell.rjust(widths[i])
            for i, cell in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def render(rows: list[Row]) -> str:
    lines = [["metric", "ours", "upstream", "ours/upstream", "goal"]]
    for row in rows:
        met = row.met
        mark = "" if met is None else (" ok" if met else " MISSED")
        goal = (row.goal + mark).strip()
        if row.note:
            goal = f"{goal} ({row.note})" if goal else f"({row.note})"
        lines.append(
            [row.metric, fmt(row.ours), fmt(row.upstream), ratio(row.ours, row.upstream), goal]
        )
    return _layout(lines, left={0, 4})


def render_timeline(
    events: list[tuple[str, str]], ours: dict[str, float], upstream: dict[str, float]
) -> str:
    """Median seconds from ``new_cluster()`` to each event, ours beside upstream."""
    lines = [["event (s after new_cluster() was called)", "ours", "upstream"]]
    for key, label in events:
        if key in ours or key in upstream:
            lines.append([label, fmt(ours.get(key)), fmt(upstream.get(key))])
    return _layout(lines, left={0})
