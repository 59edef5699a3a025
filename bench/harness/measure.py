"""CPU and memory accounting from /proc, and small statistics helpers.

CPU is ``utime + stime`` of every process in a tree (a proxy may fork workers), read from
``/proc/<pid>/stat`` in clock ticks; memory is the summed resident set from
``/proc/<pid>/statm``. An :class:`RssSampler` thread records the peak RSS of a tree while a
workload runs. Processes that exit mid-window simply stop counting.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections.abc import Iterable, Sequence

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _read_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _read_stat(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def cpu_seconds(pids: Iterable[int]) -> float:
    """Summed user + system CPU seconds of ``pids`` (missing processes count 0)."""
    total = 0
    for pid in pids:
        fields = _read_stat(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def rss_bytes(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            pass
    return total


def tree_cpu(roots: Sequence[int]) -> float:
    return cpu_seconds(pid for root in roots for pid in process_tree(root))


class RssSampler:
    """Samples the summed RSS of the trees under ``roots`` every ``interval`` s (a thread)."""

    def __init__(self, roots: Sequence[int], interval: float = 0.1) -> None:
        self.roots = list(roots)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        pids = [pid for root in self.roots for pid in process_tree(root)]
        self.peak = max(self.peak, rss_bytes(pids))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        if self.roots:
            self._sample()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.roots:
            self._stop.set()
            self._thread.join()
            self._sample()


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already included in user
    return (total - idle) / CLK_TCK, total / CLK_TCK


class CpuWindow:
    """CPU seconds used by groups of process trees between ``start()`` and ``stop()``,
    plus the whole machine's busy CPU seconds (``machine``) over the same window."""

    def __init__(self, groups: dict[str, Sequence[int]]) -> None:
        self.groups = {name: list(roots) for name, roots in groups.items()}
        self._start: dict[str, float] = {}
        self._t0 = 0.0
        self.used: dict[str, float] = {}
        self.machine = 0.0
        self._machine0 = 0.0
        self.wall = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._start = {name: tree_cpu(roots) for name, roots in self.groups.items()}
        self._machine0 = machine_busy_seconds()[0]

    def stop(self) -> None:
        self.wall = time.perf_counter() - self._t0
        self.used = {
            name: tree_cpu(roots) - self._start[name] for name, roots in self.groups.items()
        }
        self.machine = machine_busy_seconds()[0] - self._machine0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (``q`` in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = min(len(sorted_values), max(1, math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
