"""One function per workload: run it against one target, return its metrics.

A target is where the load generator connects (the backend itself for "direct", or a
proxy) plus the process trees whose CPU and memory are accounted as "proxy" and "backend".
CPU utilisation of each side (load generator, backend, proxy) is reported in percent of one
core so a reader can see which side saturated the machine.
"""

from __future__ import annotations

import ssl
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from . import load
from .measure import CpuWindow, RssSampler, median, percentile

GiB = 1 << 30
MB = 1e6


@dataclass
class Target:
    label: str
    addr: tuple[str, int]
    proxy_pids: list[int] = field(default_factory=list)
    backend_pids: list[int] = field(default_factory=list)


@dataclass
class Measurement:
    """Metric name -> value (``None`` when not applicable), and the CPU split."""

    values: dict[str, float | None]
    busy: dict[str, float]  # side -> % of one core


def _measure(
    target: Target, fn: Callable, args_list: list[tuple], timeout: float
) -> tuple[list[load.ChildResult], CpuWindow, RssSampler]:
    window = CpuWindow({"proxy": target.proxy_pids, "backend": target.backend_pids})
    sampler = RssSampler(target.proxy_pids)
    results = load.run_children(
        fn,
        args_list,
        on_go=lambda: (window.start(), sampler.__enter__()),
        on_done=lambda: (window.stop(), sampler.__exit__()),
        timeout=timeout,
    )
    return results, window, sampler


def _busy(window: CpuWindow, results: list[load.ChildResult]) -> dict[str, float]:
    wall = max(window.wall, 1e-9)
    busy = {
        "load": 100 * sum(r.cpu for r in results) / wall,
        "backend": 100 * window.used["backend"] / wall,
        "proxy": 100 * window.used["proxy"] / wall if window.groups["proxy"] else 0.0,
    }
    # Everything else the machine did meanwhile: other processes, interrupts, softirqs.
    busy["rest"] = max(0.0, 100 * window.machine / wall - sum(busy.values()))
    return busy


def _proxy_value(target: Target, value: float) -> float | None:
    return value if target.proxy_pids else None


def _merge_busy(items: list[dict[str, float]]) -> dict[str, float]:
    return {k: median([b[k] for b in items]) for k in items[0]}


def bulk(target: Target, ctx: ssl.SSLContext, sni: str, nbytes: int, upload: bool) -> Measurement:
    fn = load.bulk_upload if upload else load.bulk_download
    results, window, _ = _measure(target, fn, [(target.addr, ctx, sni, nbytes)], 600)
    r = results[0]
    return Measurement(
        {
            "MB/s": r.nbytes / r.seconds / MB,
            "proxy CPU s/GiB": _proxy_value(target, window.used["proxy"] / (r.nbytes / GiB)),
        },
        _busy(window, results),
    )


def handshakes(target: Target, ctx: ssl.SSLContext, sni: str, count: int) -> Measurement:
    results, window, _ = _measure(target, load.handshakes, [(target.addr, ctx, sni, count)], 600)
    r = results[0]
    lat = sorted(r.latencies)
    return Measurement(
        {
            "p50 ms": percentile(lat, 50) * 1e3,
            "p99 ms": percentile(lat, 99) * 1e3,
            "conn/s": r.count / r.seconds,
            "proxy CPU ms/conn": _proxy_value(target, window.used["proxy"] / r.count * 1e3),
        },
        _busy(window, results),
    )


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def concurrent(
    target: Target, ctx: ssl.SSLContext, sni: str, conns: int, duration: float, procs: int
) -> Measurement:
    args = [(target.addr, ctx, sni, n, duration) for n in _split(conns, procs)]
    results, window, sampler = _measure(target, load.concurrent_rtt, args, duration + 300)
    return _rate_measurement(target, results, window, sampler)


def http_gets(target: Target, path: str, conns: int, duration: float, procs: int) -> Measurement:
    args = [(target.addr, path, n, duration) for n in _split(conns, procs)]
    results, window, sampler = _measure(target, load.http_gets, args, duration + 120)
    return _rate_measurement(target, results, window, sampler)


def _rate_measurement(target, results, window, sampler) -> Measurement:
    count = sum(r.count for r in results)
    seconds = max(r.seconds for r in results)
    lat = array("d")
    for r in results:
        lat.extend(r.latencies)
    lat_sorted = sorted(lat)
    return Measurement(
        {
            "req/s": count / seconds,
            "p50 ms": percentile(lat_sorted, 50) * 1e3,
            "p99 ms": percentile(lat_sorted, 99) * 1e3,
            "proxy CPU us/req": _proxy_value(target, window.used["proxy"] / count * 1e6),
            "proxy RSS MB": _proxy_value(target, sampler.peak / MB),
        },
        _busy(window, results),
    )


def http_download(target: Target, path: str, nbytes: int) -> Measurement:
    results, window, sampler = _measure(
        target, load.http_download, [(target.addr, path, nbytes)], 600
    )
    r = results[0]
    return Measurement(
        {
            "MB/s": r.nbytes / r.seconds / MB,
            "proxy CPU s/GiB": _proxy_value(target, window.used["proxy"] / (r.nbytes / GiB)),
            "proxy RSS MB": _proxy_value(target, sampler.peak / MB),
        },
        _busy(window, results),
    )


def median_of(runs: list[Measurement]) -> Measurement:
    """Per-metric median over repeated runs (``None`` stays ``None``)."""
    values: dict[str, float | None] = {}
    for key in runs[0].values:
        xs = [r.values[key] for r in runs if r.values[key] is not None]
        values[key] = median(xs) if xs else None  # type: ignore[arg-type]
    return Measurement(values, _merge_busy([r.busy for r in runs]))
