"""Scale/adapt request checks, per-cluster clamps (§1.2) and per-user limits (§6.5)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_gateway_api.limits import (
    InvalidRequest,
    LimitError,
    Usage,
    UserLimits,
    check_new_cluster,
    clamp_adapt,
    clamp_adapt_to_user_limits,
    clamp_scale,
    clamp_to_user_limits,
    cluster_usage,
    limit_adapt,
    limit_scale,
    total_usage,
    validate_adapt_body,
    validate_scale_body,
    validate_scale_count,
)
from dask_gateway_api.resources import ClusterConfig, resolve_cluster_config
from dask_gateway_common.errors import GatewayError

GiB = 2**30


def config(**kw: Any) -> ClusterConfig:
    return resolve_cluster_config({}, kw)


# --- request bodies ---------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [(0, 0), (3, 3), (True, 1), (False, 0)])
def test_scale_count_ok(value: Any, expected: int) -> None:
    result = validate_scale_count(value)
    assert result == expected and type(result) is int


@pytest.mark.parametrize(
    "value, shown", [(-1, "-1"), ("2", "2"), (None, "None"), (1.5, "1.5"), ([1], "[1]")]
)
def test_scale_count_bad(value: Any, shown: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_scale_count(value)
    assert str(info.value) == f"Scale expects a non-negative integer, got {shown}"
    assert info.value.status == 422 and isinstance(info.value, ValueError)


def test_scale_body() -> None:
    assert validate_scale_body({"count": 2}) == 2
    with pytest.raises(InvalidRequest, match="got None"):
        validate_scale_body({})
    with pytest.raises(InvalidRequest, match="Scale expects a JSON object body, got list"):
        validate_scale_body([2])
    with pytest.raises(InvalidRequest, match="got NoneType"):
        validate_scale_body(None)


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"minimum": None, "maximum": None, "active": True}, (None, None, True)),
        ({"minimum": 1, "maximum": 5, "active": False}, (1, 5, False)),
        ({"maximum": 5}, (None, 5, True)),
        ({}, (None, None, True)),
        (None, (None, None, True)),
        ({"minimum": 2, "maximum": 2}, (2, 2, True)),
    ],
)
def test_adapt_body_ok(body: Any, expected: tuple[Any, ...]) -> None:
    assert validate_adapt_body(body) == expected


@pytest.mark.parametrize(
    "body, message",
    [
        ([1], "Adapt expects a JSON object body, got list"),
        ({"minimum": -1}, "Adapt expects minimum to be a non-negative integer or null, got -1"),
        ({"maximum": "3"}, "Adapt expects maximum to be a non-negative integer or null, got '3'"),
        ({"maximum": True}, "Adapt expects maximum to be a non-negative integer or null, got True"),
        ({"active": "yes"}, "Adapt expects active to be true or false, got 'yes'"),
        ({"active": None}, "Adapt expects active to be true or false, got None"),
        (
            {"minimum": 3, "maximum": 2},
            "Adapt expects minimum <= maximum, got minimum=3, maximum=2",
        ),
    ],
)
def test_adapt_body_bad(body: Any, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_adapt_body(body)
    assert str(info.value) == message
    assert info.value.status == 422


# --- per-cluster clamps -----------------------------------------------------------------


def test_clamp_scale() -> None:
    assert clamp_scale(5, None) == (5, None)
    assert clamp_scale(2, 2) == (2, None)
    assert clamp_scale(0, 0) == (0, None)
    assert clamp_scale(3, 2) == (
        2,
        "Scale request of 3 workers would exceed resource limit of 2 workers. "
        "Scaling to 2 instead.",
    )
    assert clamp_scale(1, 0)[0] == 0


def test_clamp_adapt_no_limit_passes_through() -> None:
    assert clamp_adapt(None, None, None) == (None, None, None)
    assert clamp_adapt(1, 100, None) == (1, 100, None)


def test_clamp_adapt_fills_nulls_without_warning() -> None:
    assert clamp_adapt(None, None, 2) == (0, 2, None)
    assert clamp_adapt(1, None, 2) == (1, 2, None)
    assert clamp_adapt(None, 2, 2) == (0, 2, None)


def test_clamp_adapt_messages_of_scenario_16() -> None:
    # c.adapt(maximum=3) with cluster_max_workers=2
    assert clamp_adapt(None, 3, 2) == (
        0,
        2,
        "Adapt with `maximum=3, minimum=0` workers would exceed resource limit of 2 workers. "
        "Using `maximum=2, minimum=0` instead.",
    )
    # c.adapt(minimum=3, maximum=4)
    lo, hi, msg = clamp_adapt(3, 4, 2)
    assert (lo, hi) == (2, 2)
    assert msg is not None and msg.endswith("Using `maximum=2, minimum=2` instead.")
    assert msg.startswith("Adapt with `maximum=4, minimum=3` workers")


@given(
    st.integers(0, 50),
    st.one_of(st.none(), st.integers(0, 50)),
    st.one_of(st.none(), st.integers(0, 50)),
)
def test_clamp_adapt_invariants(limit: int, minimum: int | None, maximum: int | None) -> None:
    lo, hi, msg = clamp_adapt(minimum, maximum, limit)
    assert lo is not None and hi is not None
    assert 0 <= lo <= limit and 0 <= hi <= limit
    changed = (minimum is not None and minimum != lo) or (maximum is not None and maximum != hi)
    assert (msg is not None) == changed


@given(st.integers(0, 1000), st.one_of(st.none(), st.integers(0, 1000)))
def test_clamp_scale_invariants(count: int, limit: int | None) -> None:
    n, msg = clamp_scale(count, limit)
    assert n <= count and (limit is None or n <= limit)
    assert (msg is None) == (n == count)


# --- per-user limits --------------------------------------------------------------------


def test_usage_arithmetic() -> None:
    c = config(worker_cores=2, worker_memory="1 G", scheduler_cores=1, scheduler_memory="1 G")
    assert cluster_usage(c, 0) == Usage(1, 1, GiB)
    assert cluster_usage(c, 3) == Usage(1, 7, 4 * GiB)
    assert total_usage([(c, 0), (c, 3)]) == Usage(2, 8, 5 * GiB)
    assert total_usage([]) == Usage()


def test_new_cluster_within_limits() -> None:
    check_new_cluster(UserLimits(), Usage(100, 100, 100 * GiB), config())
    check_new_cluster(UserLimits(max_clusters=2), Usage(1, 1, GiB), config())
    check_new_cluster(UserLimits(max_cores=2), Usage(1, 1, GiB), config())
    check_new_cluster(UserLimits(max_memory=4 * GiB), Usage(1, 1, 2 * GiB), config())
    assert UserLimits().unlimited and not UserLimits(max_clusters=1).unlimited


@pytest.mark.parametrize(
    "limits, message",
    [
        (
            UserLimits(max_clusters=2),
            "Cannot start new cluster, would exceed user limit of 2 active clusters.",
        ),
        (UserLimits(max_cores=4), "Cannot start a new cluster, would exceed user cores limit of 4"),
        (
            UserLimits(max_cores=4.5),
            "Cannot start a new cluster, would exceed user cores limit of 4.5",
        ),
        (
            UserLimits(max_memory=5 * GiB),
            "Cannot start a new cluster, would exceed user memory limit of 5 GiB",
        ),
    ],
)
def test_new_cluster_over_limits(limits: UserLimits, message: str) -> None:
    usage = Usage(clusters=2, cores=4, memory=4 * GiB)
    with pytest.raises(LimitError) as info:
        check_new_cluster(limits, usage, config())
    assert str(info.value) == message
    assert info.value.status == 422
    assert isinstance(info.value, ValueError) and isinstance(info.value, GatewayError)


def test_clamp_to_user_cores() -> None:
    c = config(worker_cores=2, scheduler_cores=1)
    limits = UserLimits(max_cores=10)
    # other clusters hold 3 cores; this scheduler 1 -> 6 spare -> 3 workers
    assert clamp_to_user_limits(limits, Usage(1, 3, 0), c, 3) == (3, None)
    assert clamp_to_user_limits(limits, Usage(1, 3, 0), c, 5) == (
        3,
        "Scale request of 5 workers would exceed user cores limit of 10. Scaling to 3 instead.",
    )


def test_clamp_to_user_memory_binds_when_tighter() -> None:
    c = config(worker_memory="2 G", scheduler_memory="1 G", worker_cores=1)
    limits = UserLimits(max_cores=100, max_memory=8 * GiB)
    n, msg = clamp_to_user_limits(limits, Usage(1, 1, 2 * GiB), c, 10)
    assert n == 2  # 8 - 2 - 1 = 5 GiB spare -> 2 workers of 2 GiB
    assert msg == (
        "Scale request of 10 workers would exceed user memory limit of 8 GiB. Scaling to 2 instead."
    )


def test_clamp_to_user_limits_never_negative() -> None:
    c = config()
    n, msg = clamp_to_user_limits(UserLimits(max_cores=1), Usage(3, 10, 0), c, 2)
    assert n == 0 and msg is not None
    assert clamp_to_user_limits(UserLimits(), Usage(3, 10, 0), c, 50) == (50, None)


def test_clamp_adapt_to_user_limits() -> None:
    c = config(worker_cores=1, scheduler_cores=1)
    limits = UserLimits(max_cores=4)  # 3 workers spare
    assert clamp_adapt_to_user_limits(limits, Usage(), c, None, None) == (0, 3, None)
    assert clamp_adapt_to_user_limits(limits, Usage(), c, 1, 2) == (1, 2, None)
    assert clamp_adapt_to_user_limits(limits, Usage(), c, 1, 5) == (
        1,
        3,
        "Adapt with `maximum=5, minimum=1` workers would exceed user cores limit of 4. "
        "Using `maximum=3, minimum=1` instead.",
    )
    assert clamp_adapt_to_user_limits(UserLimits(), Usage(), c, None, None) == (None, None, None)


def test_limit_scale_applies_both_limits() -> None:
    c = config(cluster_max_workers=4, worker_cores=1, scheduler_cores=1)
    none = UserLimits()
    assert limit_scale(3, c, none, Usage()) == (3, None)
    n, msg = limit_scale(6, c, none, Usage())
    assert n == 4 and msg is not None and "resource limit of 4 workers" in msg
    # the user budget is tighter: the user message, naming the original request
    tight = UserLimits(max_cores=3)
    n, msg = limit_scale(6, c, tight, Usage())
    assert (n, msg) == (
        2,
        "Scale request of 6 workers would exceed user cores limit of 3. Scaling to 2 instead.",
    )
    # the user budget is looser: only the cluster message
    loose = UserLimits(max_cores=100)
    n, msg = limit_scale(6, c, loose, Usage())
    assert n == 4 and msg is not None and "resource limit" in msg


def test_limit_adapt_applies_both_limits() -> None:
    c = config(cluster_max_workers=4)
    assert limit_adapt(None, None, c, UserLimits(), Usage()) == (0, 4, None)
    lo, hi, msg = limit_adapt(None, 9, c, UserLimits(), Usage())
    assert (lo, hi) == (0, 4) and msg is not None and "resource limit of 4" in msg
    lo, hi, msg = limit_adapt(1, 9, c, UserLimits(max_cores=3), Usage())
    assert (lo, hi) == (1, 2)
    assert msg == (
        "Adapt with `maximum=9, minimum=1` workers would exceed user cores limit of 3. "
        "Using `maximum=2, minimum=1` instead."
    )
    # an unbounded request silently takes the tighter limit
    assert limit_adapt(None, None, c, UserLimits(max_cores=3), Usage()) == (0, 2, None)
    assert limit_adapt(None, None, c, UserLimits(max_cores=30), Usage()) == (0, 4, None)
    lo, hi, msg = limit_adapt(3, None, c, UserLimits(max_cores=3), Usage())
    assert (lo, hi) == (2, 2)
    assert msg is not None and msg.startswith("Adapt with `maximum=2, minimum=3` workers")
    # the cluster limit binds when it is the tighter one
    lo, hi, msg = limit_adapt(5, 9, c, UserLimits(max_cores=30), Usage())
    assert (lo, hi) == (4, 4) and msg is not None and "resource limit of 4 workers" in msg
