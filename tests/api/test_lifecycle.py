"""Transition tables, heartbeat reconciliation (§5.3) and timeout decisions (§7.2)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_gateway_api.lifecycle import (
    CLUSTER_TRANSITIONS,
    ClusterEvent,
    Heartbeat,
    HeartbeatError,
    InvalidTransition,
    Timeouts,
    WorkerEvent,
    apply_event,
    cluster_transition,
    decide_heartbeat,
    decide_timeouts,
    parse_heartbeat,
    start_failures_exceeded,
    worker_transition,
)
from dask_gateway_api.models import Cluster, ClusterStatus, Worker, WorkerStatus
from dask_gateway_api.resources import ClusterConfig

P, R, S = ClusterStatus.PENDING, ClusterStatus.RUNNING, ClusterStatus.STOPPING
STOPPED, FAILED = ClusterStatus.STOPPED, ClusterStatus.FAILED
E = ClusterEvent


def make_cluster(status: ClusterStatus = P, **kw: Any) -> Cluster:
    fields: dict[str, Any] = {
        "name": "c1",
        "username": "alice",
        "token": "t",
        "status": status,
        "options": {},
        "config": ClusterConfig(),
        "cert_pem": "",
        "key_pem": "",
        "start_time_ms": 1_000_000,
    }
    fields.update(kw)
    return Cluster(**fields)


# --- cluster transitions ----------------------------------------------------------------


@pytest.mark.parametrize(
    "status, target, event, expected",
    [
        (P, R, E.REGISTERED, (R, R)),
        (P, R, E.STOP, (S, STOPPED)),
        (R, R, E.STOP, (S, STOPPED)),
        (P, R, E.FAIL, (S, FAILED)),
        (R, R, E.FAIL, (S, FAILED)),
        (S, STOPPED, E.TORN_DOWN, (STOPPED, STOPPED)),
        (S, FAILED, E.TORN_DOWN, (FAILED, FAILED)),
        # idempotent stop / late failure: nothing changes
        (S, STOPPED, E.STOP, (S, STOPPED)),
        (S, STOPPED, E.FAIL, (S, STOPPED)),
        (S, FAILED, E.STOP, (S, FAILED)),
        (STOPPED, STOPPED, E.STOP, (STOPPED, STOPPED)),
        (STOPPED, STOPPED, E.FAIL, (STOPPED, STOPPED)),
        (FAILED, FAILED, E.STOP, (FAILED, FAILED)),
        (FAILED, FAILED, E.FAIL, (FAILED, FAILED)),
    ],
)
def test_cluster_transitions(
    status: ClusterStatus, target: ClusterStatus, event: ClusterEvent, expected: tuple
) -> None:
    assert cluster_transition(status, target, event) == expected


@pytest.mark.parametrize(
    "status, event",
    [
        (R, E.REGISTERED),
        (S, E.REGISTERED),
        (STOPPED, E.REGISTERED),
        (FAILED, E.REGISTERED),
        (P, E.TORN_DOWN),
        (R, E.TORN_DOWN),
        (STOPPED, E.TORN_DOWN),
        (FAILED, E.TORN_DOWN),
    ],
)
def test_invalid_cluster_transitions(status: ClusterStatus, event: ClusterEvent) -> None:
    with pytest.raises(InvalidTransition, match=f"{event.name} is not allowed in status"):
        cluster_transition(status, R, event)


def test_table_is_complete_or_invalid() -> None:
    """Every (status, event) pair is either in the table or raises: no silent fall-through."""
    for status, event in itertools.product(ClusterStatus, ClusterEvent):
        if (status, event) in CLUSTER_TRANSITIONS:
            new_status, new_target = cluster_transition(status, R, event)
            assert isinstance(new_status, ClusterStatus)
        else:
            with pytest.raises(InvalidTransition):
                cluster_transition(status, R, event)


def test_finished_is_absorbing() -> None:
    for status in (STOPPED, FAILED):
        for event in ClusterEvent:
            try:
                assert cluster_transition(status, status, event)[0] is status
            except InvalidTransition:
                pass


def test_apply_event_sets_times_and_reason() -> None:
    c = make_cluster(P)
    c = apply_event(c, E.REGISTERED, now_ms=2_000_000)
    assert (c.status, c.target, c.stop_time_ms) == (R, R, None)
    c = apply_event(c, E.FAIL, now_ms=3_000_000, reason="no heartbeat")
    assert (c.status, c.target, c.failure_reason) == (S, FAILED, "no heartbeat")
    assert c.stop_time_ms is None  # null until finished
    c = apply_event(c, E.FAIL, now_ms=3_500_000, reason="later")
    assert c.failure_reason == "no heartbeat"  # the first reason stays
    c = apply_event(c, E.TORN_DOWN, now_ms=4_000_000)
    assert (c.status, c.stop_time_ms) == (FAILED, 4_000_000)
    c = apply_event(c, E.STOP, now_ms=5_000_000)
    assert (c.status, c.stop_time_ms) == (FAILED, 4_000_000)


def test_apply_event_returns_a_copy() -> None:
    c = make_cluster(P)
    c2 = apply_event(c, E.STOP, now_ms=1)
    assert c.status is P and c2.status is S and c2.target is STOPPED
    assert c2.failure_reason is None


def test_user_stop_then_failure_still_ends_stopped() -> None:
    c = apply_event(make_cluster(R), E.STOP, now_ms=1)
    c = apply_event(c, E.FAIL, now_ms=2, reason="teardown hiccup")
    c = apply_event(c, E.TORN_DOWN, now_ms=3)
    assert c.status is STOPPED and c.failure_reason is None


# --- worker transitions -----------------------------------------------------------------

WP, WR, WS = WorkerStatus.PENDING, WorkerStatus.RUNNING, WorkerStatus.STOPPING
WSTOPPED, WFAILED = WorkerStatus.STOPPED, WorkerStatus.FAILED


@pytest.mark.parametrize(
    "status, event, expected",
    [
        (WP, WorkerEvent.STARTED, WR),
        (WR, WorkerEvent.STARTED, WR),
        (WP, WorkerEvent.STOP, WS),
        (WR, WorkerEvent.STOP, WS),
        (WS, WorkerEvent.EXITED, WSTOPPED),
        (WR, WorkerEvent.EXITED, WSTOPPED),
        (WP, WorkerEvent.LOST, WFAILED),
        (WR, WorkerEvent.LOST, WFAILED),
        (WS, WorkerEvent.LOST, WSTOPPED),
        (WFAILED, WorkerEvent.STOP, WFAILED),
        (WSTOPPED, WorkerEvent.LOST, WSTOPPED),
    ],
)
def test_worker_transitions(
    status: WorkerStatus, event: WorkerEvent, expected: WorkerStatus
) -> None:
    assert worker_transition(status, event) is expected


@pytest.mark.parametrize(
    "status, event",
    [(WS, WorkerEvent.STARTED), (WSTOPPED, WorkerEvent.STARTED), (WFAILED, WorkerEvent.STARTED)],
)
def test_invalid_worker_transitions(status: WorkerStatus, event: WorkerEvent) -> None:
    with pytest.raises(InvalidTransition):
        worker_transition(status, event)


# --- heartbeat parsing ------------------------------------------------------------------


def body(**kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "scheduler_address": "tls://127.0.0.1:40123",
        "dashboard_address": "http://127.0.0.1:8787",
        "api_address": "http://127.0.0.1:40124",
        "count": 2,
        "active_workers": ["a"],
        "closing_workers": [],
        "closed_workers": ["z"],
    }
    b.update(kw)
    return b


def test_parse_heartbeat() -> None:
    hb = parse_heartbeat(body())
    assert hb == Heartbeat(
        scheduler_address="tls://127.0.0.1:40123",
        dashboard_address="http://127.0.0.1:8787",
        api_address="http://127.0.0.1:40124",
        count=2,
        active_workers=frozenset({"a"}),
        closing_workers=frozenset(),
        closed_workers=frozenset({"z"}),
    )


def test_parse_heartbeat_missing_lists_and_addresses_default_to_empty() -> None:
    hb = parse_heartbeat({"count": 0})
    assert hb.active_workers == frozenset() and hb.dashboard_address == ""


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ([], "heartbeat body must be a JSON object, got list"),
        (None, "heartbeat body must be a JSON object, got NoneType"),
        (body(count=-1), "'count' must be a non-negative integer"),
        (body(count="2"), "'count' must be a non-negative integer"),
        (body(count=True), "'count' must be a non-negative integer"),
        ({"active_workers": []}, "'count' must be a non-negative integer"),
        (body(active_workers="a"), "'active_workers' must be a list of worker names"),
        (body(closed_workers=[1]), "'closed_workers' must be a list of worker names"),
        (body(scheduler_address=5), "'scheduler_address' must be a string"),
        (body(dashboard_address=None), "'dashboard_address' must be a string"),
    ],
)
def test_parse_heartbeat_errors(bad: Any, fragment: str) -> None:
    with pytest.raises(HeartbeatError) as info:
        parse_heartbeat(bad)
    assert fragment in str(info.value)
    assert info.value.status == 422


# --- heartbeat decisions ----------------------------------------------------------------


def hb(
    count: int = 0,
    active: set[str] | None = None,
    closing: set[str] | None = None,
    closed: set[str] | None = None,
) -> Heartbeat:
    return Heartbeat(
        "tls://s:1",
        "",
        "http://s:2",
        count,
        frozenset(active or ()),
        frozenset(closing or ()),
        frozenset(closed or ()),
    )


def w(name: str, status: WorkerStatus = WP, t: int = 0, **kw: Any) -> Worker:
    return Worker(name=name, cluster_name="c1", status=status, start_time_ms=t, **kw)


def test_first_heartbeat_launches_count_workers() -> None:
    d = decide_heartbeat(2, [], hb(2))
    assert d.launch == 2 and not d.cancel and not d.mark_running


def test_steady_state_does_nothing() -> None:
    d = decide_heartbeat(2, [w("a", WR), w("b", WR)], hb(2, active={"a", "b"}))
    assert d.launch == 0 and not d.cancel
    assert not (d.mark_running or d.mark_stopped or d.mark_failed or d.mark_closing)
    assert not d.reset_start_failures


def test_pending_workers_become_running_and_reset_failures() -> None:
    d = decide_heartbeat(2, [w("a", launched=True), w("b", launched=True)], hb(2, active={"a"}))
    assert d.mark_running == {"a"}
    assert d.reset_start_failures
    assert d.launch == 0  # b is still pending: no extra launch


def test_pending_workers_count_toward_the_target() -> None:
    d = decide_heartbeat(3, [w("a", WR), w("b", launched=True)], hb(3, active={"a"}))
    assert d.launch == 1


def test_closing_workers() -> None:
    workers = [w("a", WR), w("b", WR), w("c", launched=True)]
    d = decide_heartbeat(1, workers, hb(1, active={"a"}, closing={"b", "c"}))
    assert d.mark_closing == {"b", "c"}
    assert d.mark_running == {"c"}  # a pending worker reported as closing did start
    assert d.launch == 0 and not d.cancel


def test_closing_worker_already_marked_is_not_marked_again() -> None:
    d = decide_heartbeat(0, [w("b", WR, close_expected=True)], hb(0, closing={"b"}))
    assert d.mark_closing == set()


def test_closed_workers_expected_and_unexpected() -> None:
    workers = [
        w("retired", WR, close_expected=True),
        w("cancelled", WS),
        w("crashed", WR),
        w("never_started", WP, launched=True),
        w("old", WSTOPPED),
    ]
    d = decide_heartbeat(
        2, workers, hb(2, closed={"retired", "cancelled", "crashed", "never_started", "old"})
    )
    assert d.mark_stopped == {"retired", "cancelled"}
    assert d.mark_failed == {"crashed", "never_started"}
    assert d.start_failures == 1
    assert d.launch == 2  # both lost workers are replaced


def test_finished_records_are_ignored() -> None:
    workers = [w("x", WSTOPPED), w("y", WFAILED)]
    d = decide_heartbeat(1, workers, hb(1, active={"x"}))
    assert d.launch == 1 and not d.mark_running


def test_excess_pending_cancelled_unlaunched_first_then_newest() -> None:
    workers = [
        w("old_launched", t=100, launched=True),
        w("new_launched", t=300, launched=True),
        w("record_only_old", t=150),
        w("record_only_new", t=250),
        w("running", WR),
    ]
    d = decide_heartbeat(2, workers, hb(2, active={"running"}))
    # 1 active + 4 pending - 2 = 3 excess
    assert d.cancel == ["record_only_new", "record_only_old", "new_launched"]
    assert d.launch == 0


def test_scale_to_zero_cancels_all_pending_but_never_running() -> None:
    workers = [w("p1", t=1, launched=True), w("p2", t=2, launched=True), w("r", WR)]
    d = decide_heartbeat(0, workers, hb(0, active={"r"}))
    assert d.cancel == ["p2", "p1"]
    assert d.launch == 0
    # The running worker is the scheduler's to retire (it will report it as closing).
    assert "r" not in d.cancel


def test_running_but_unreported_worker_counts_as_active() -> None:
    d = decide_heartbeat(1, [w("r", WR)], hb(1))
    assert d.launch == 0 and not d.cancel and not d.mark_failed


def test_stopping_workers_are_neither_counted_nor_cancelled() -> None:
    d = decide_heartbeat(1, [w("s", WS)], hb(1, active={"s"}))
    assert d.launch == 1 and not d.cancel and not d.mark_running


@given(
    count=st.integers(0, 6),
    statuses=st.lists(st.sampled_from([WP, WR, WS, WSTOPPED, WFAILED]), max_size=8),
    data=st.data(),
)
def test_heartbeat_invariants(count: int, statuses: list[WorkerStatus], data: Any) -> None:
    workers = [
        w(f"w{i}", s, t=i, launched=data.draw(st.booleans())) for i, s in enumerate(statuses)
    ]
    names = [x.name for x in workers]
    where = {n: data.draw(st.sampled_from(["active", "closing", "closed", "none"])) for n in names}
    msg = hb(
        count,
        active={n for n, v in where.items() if v == "active"},
        closing={n for n, v in where.items() if v == "closing"},
        closed={n for n, v in where.items() if v == "closed"},
    )
    d = decide_heartbeat(count, workers, msg)
    by_name = {x.name: x for x in workers}
    # Only pending, unreported workers are ever cancelled, and no name is in two outcomes.
    for n in d.cancel:
        assert by_name[n].status is WP and where[n] == "none"
    outcomes = [d.mark_stopped, d.mark_failed, set(d.cancel)]
    assert sum(len(o) for o in outcomes) == len(set().union(*outcomes))
    assert d.launch >= 0
    # After applying the decision, the live (non-stopping, non-closing) workers plus the new
    # ones equal the desired count whenever there was no excess running.
    live = [
        x
        for x in workers
        if not x.status.is_finished
        and x.status is not WS
        and where[x.name] in ("active", "none")
        and x.name not in d.cancel
    ]
    if len(live) <= count:
        assert len(live) + d.launch == count
    else:
        assert d.launch == 0


# --- timeouts ---------------------------------------------------------------------------

T = Timeouts(
    start_timeout=60, heartbeat_timeout=30, worker_start_timeout=60, worker_start_failure_limit=3
)
START = 1_000_000


def test_pending_cluster_start_timeout() -> None:
    c = make_cluster(P, start_time_ms=START)
    assert decide_timeouts(START + 60_000, c, [], T).empty
    d = decide_timeouts(START + 60_001, c, [], T)
    assert d.fail_cluster == "cluster did not start within 60 s"


def test_running_cluster_heartbeat_timeout() -> None:
    c = make_cluster(R, start_time_ms=START, last_heartbeat=START + 100_000)
    assert decide_timeouts(START + 130_000, c, [], T).empty
    d = decide_timeouts(START + 130_001, c, [], T)
    assert d.fail_cluster == "no heartbeat from the scheduler for 30 s"


def test_running_cluster_without_recorded_heartbeat_uses_start_time() -> None:
    c = make_cluster(R, start_time_ms=START)
    assert decide_timeouts(START + 30_001, c, [], T).fail_cluster is not None


@pytest.mark.parametrize("status", [S, STOPPED, FAILED])
def test_inactive_clusters_are_not_checked(status: ClusterStatus) -> None:
    c = make_cluster(status, start_time_ms=0, last_heartbeat=0)
    assert decide_timeouts(10**12, c, [w("x", WP, t=0)], T).empty


def test_zero_disables_timeouts() -> None:
    off = Timeouts(0, 0, 0, 0)
    assert decide_timeouts(10**12, make_cluster(P, start_time_ms=0), [], off).empty
    c = make_cluster(R, start_time_ms=0, last_heartbeat=0)
    assert decide_timeouts(10**12, c, [w("x", WP, t=0)], off).empty


def test_worker_start_timeout() -> None:
    c = make_cluster(R, start_time_ms=START, last_heartbeat=START + 100_000)
    workers = [
        w("slow", WP, t=START, launched=True),
        w("fresh", WP, t=START + 50_000),
        w("running", WR, t=START),
    ]
    d = decide_timeouts(START + 100_000, c, workers, T)
    assert d.fail_workers == ["slow"]
    assert d.start_failures == 1
    assert d.fail_cluster is None


def test_worker_start_failure_limit_fails_the_cluster() -> None:
    c = make_cluster(
        R, start_time_ms=START, last_heartbeat=START + 100_000, worker_start_failures=2
    )
    d = decide_timeouts(START + 100_000, c, [w("slow", WP, t=START)], T)
    assert d.fail_workers == ["slow"]
    assert d.fail_cluster == "3 consecutive worker start failures (limit 3)"


def test_start_failures_exceeded() -> None:
    assert start_failures_exceeded(3, 3)
    assert not start_failures_exceeded(2, 3)
    assert not start_failures_exceeded(100, 0)


def test_timeouts_default_values() -> None:
    assert Timeouts() == Timeouts(60.0, 30.0, 60.0, 3)


def test_fractional_timeouts_in_messages() -> None:
    c = make_cluster(P, start_time_ms=0)
    d = decide_timeouts(10_000, c, [], Timeouts(start_timeout=0.5))
    assert d.fail_cluster == "cluster did not start within 0.5 s"
