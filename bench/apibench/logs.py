"""Where the time of a cold start goes: timestamps from the servers' and dask's logs (pure).

Three log formats, all in local time with millisecond resolution:

- ours (``dask_gateway_common.logs``): ``[2026-11-30 03:33:42,516 I dask_gateway.api.manager] msg``
- upstream (traitlets, coloured): ``\\x1b[32m[I 2026-11-30 03:34:45.288 DaskGateway]\\x1b[0m msg``
- dask's processes: ``2026-11-30 03:33:52,892 - distributed.scheduler - INFO - msg``

:func:`server_events` and :func:`dask_events` turn the lines about one cluster into named
events (epoch seconds); a missing event is simply absent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime

ANSI = re.compile(r"\x1b\[[0-9;]*m")
OURS_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d{3}) \w [\w.]+\] (.*)$")
UPSTREAM_LINE = re.compile(r"^\[\w (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d{3}) \w+\] (.*)$")
DASK_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d{3}) - [\w.]+ - \w+ - (.*)$")

#: Event names, in the order of a cold start, with what they mean.
EVENTS = {
    "created": "API recorded the cluster",
    "scheduler_launched": "scheduler process launched",
    "scheduler_listening": "scheduler listening (dask log)",
    "running": "API saw the first heartbeat: RUNNING",
    "worker_launched": "first worker process launched",
    "nanny_up": "nanny listening (dask log)",
    "worker_up": "worker process listening (dask log)",
    "worker_registered": "scheduler registered the worker (dask log)",
    "second_worker_registered": "scheduler registered a 2nd worker (dask log)",
}


def parse_time(text: str) -> float:
    """Epoch seconds of a local ``YYYY-mm-dd HH:MM:SS,mmm`` (or ``.mmm``) timestamp."""
    return datetime.strptime(text.replace(",", "."), "%Y-%m-%d %H:%M:%S.%f").timestamp()


def parse_lines(lines: Iterable[str], pattern: re.Pattern[str]) -> list[tuple[float, str]]:
    """``(time, message)`` of every line matching ``pattern`` (colours stripped)."""
    out = []
    for line in lines:
        m = pattern.match(ANSI.sub("", line.rstrip("\n")))
        if m:
            try:
                out.append((parse_time(m.group(1)), m.group(2)))
            except ValueError:
                continue
    return out


def _first(records: list[tuple[float, str]], regex: str) -> tuple[float, re.Match[str]] | None:
    compiled = re.compile(regex)
    for t, msg in records:
        m = compiled.search(msg)
        if m:
            return t, m
    return None


def server_events(kind: str, lines: Iterable[str], cluster: str) -> dict[str, float]:
    """Events of ``cluster`` in an API log; ``kind`` is ``"ours"`` or ``"upstream"``."""
    name = re.escape(cluster)
    if kind == "ours":
        records = parse_lines(lines, OURS_LINE)
        patterns = {
            "created": rf"cluster {name}: created for user",
            "scheduler_launched": rf"cluster {name}: scheduler started, pid",
            "running": rf"cluster {name}: RUNNING at",
            "worker_launched": rf"cluster {name}: worker \w+ started, pid",
        }
    elif kind == "upstream":
        records = parse_lines(lines, UPSTREAM_LINE)
        patterns = {
            "created": rf"Created cluster {name} for user",
            "scheduler_launched": rf"Cluster {name} submitted",
            "running": rf"Cluster {name} is running",
        }
    else:
        raise ValueError(f"unknown log kind {kind!r}")
    events = {}
    for event, regex in patterns.items():
        found = _first(records, regex)
        if found:
            events[event] = found[0]
    if kind == "upstream":
        worker = _first(records, rf"Created worker (\w+) for cluster {name}")
        if worker:
            submitted = _first(records, rf"Worker {re.escape(worker[1].group(1))} submitted")
            if submitted:
                events["worker_launched"] = submitted[0]
    return events


def dask_events(scheduler_lines: Iterable[str], worker_lines: Iterable[str]) -> dict[str, float]:
    """Events from a scheduler log and the log of its first worker."""
    sched = parse_lines(scheduler_lines, DASK_LINE)
    worker = parse_lines(worker_lines, DASK_LINE)
    events = {}
    for event, records, regex in (
        ("scheduler_listening", sched, r"Scheduler at:"),
        ("nanny_up", worker, r"Start Nanny at:"),
        ("worker_up", worker, r"Start worker at:"),
    ):
        found = _first(records, regex)
        if found:
            events[event] = found[0]
    registered = [t for t, msg in sched if re.search(r"Register worker", msg)]
    if registered:
        events["worker_registered"] = registered[0]
    if len(registered) > 1:
        events["second_worker_registered"] = registered[1]
    return events
