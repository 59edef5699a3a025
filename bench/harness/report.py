"""The side-by-side table printed at the end of a run."""

from __future__ import annotations

from dataclasses import dataclass, field

from .workloads import Measurement


@dataclass
class Row:
    workload: str
    by_target: dict[str, Measurement] = field(default_factory=dict)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if value < 1 else f"{value:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def render(rows: list[Row], targets: list[str], ours: str = "ours", go: str = "go") -> str:
    header = ["workload", "metric", *targets]
    ratio_cols = []
    if ours in targets and "direct" in targets:
        ratio_cols.append(("ours/direct", ours, "direct"))
    if ours in targets and go in targets:
        ratio_cols.append(("ours/go", ours, go))
    header += [name for name, _, _ in ratio_cols]
    lines: list[list[str]] = [header]
    for row in rows:
        first = True
        present = [t for t in targets if t in row.by_target]
        if not present:
            continue
        metrics = list(row.by_target[present[0]].values)
        for metric in metrics:
            vals = {
                t: row.by_target[t].values.get(metric) if t in row.by_target else None
                for t in targets
            }
            cells = [row.workload if first else "", metric]
            cells += [_fmt(vals[t]) for t in targets]
            cells += [_ratio(vals[a], vals[b]) for _, a, b in ratio_cols]
            lines.append(cells)
            first = False
        busy = [
            "/".join(
                f"{row.by_target[t].busy[k]:.0f}" for k in ("load", "backend", "proxy", "rest")
            )
            if t in row.by_target
            else "-"
            for t in targets
        ]
        lines.append(["", "CPU% load/backend/proxy/rest", *busy, *[""] * len(ratio_cols)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        out.append(
            "  ".join(
                cell.ljust(widths[j]) if j < 2 else cell.rjust(widths[j])
                for j, cell in enumerate(line)
            ).rstrip()
        )
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
