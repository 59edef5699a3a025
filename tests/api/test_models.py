"""Statuses, the ?status= filter and the cluster object on the wire (§1.3)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from dask_gateway.client import ClusterReport
from dask_gateway.client import ClusterStatus as ClientStatus

from dask_gateway_api.models import (
    ACTIVE_STATUSES,
    WIRE_KEYS,
    Cluster,
    ClusterStatus,
    Worker,
    WorkerStatus,
    parse_status_filter,
    to_wire,
)
from dask_gateway_api.resources import ClusterConfig


def make_cluster(status: ClusterStatus = ClusterStatus.RUNNING, **kw: object) -> Cluster:
    fields = {
        "name": "abc123",
        "username": "alice",
        "token": "secret-token",
        "status": status,
        "options": {"worker_cores": 1, "size": "small"},
        "config": ClusterConfig(),
        "cert_pem": "-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n",
        "key_pem": "-----BEGIN PRIVATE KEY-----\nY\n-----END PRIVATE KEY-----\n",
        "start_time_ms": 1_700_000_000_000,
        "dashboard_address": "http://127.0.0.1:8787",
    }
    fields.update(kw)
    return Cluster(**fields)  # type: ignore[arg-type]


def test_status_values() -> None:
    assert [(s.name, int(s)) for s in ClusterStatus] == [
        ("PENDING", 1),
        ("RUNNING", 2),
        ("STOPPING", 3),
        ("STOPPED", 4),
        ("FAILED", 5),
    ]
    assert ACTIVE_STATUSES == {ClusterStatus.PENDING, ClusterStatus.RUNNING}
    assert [s.is_active for s in ClusterStatus] == [True, True, False, False, False]
    assert [s.is_finished for s in ClusterStatus] == [False, False, False, True, True]
    assert [s.name for s in WorkerStatus] == [s.name for s in ClusterStatus]
    assert WorkerStatus.FAILED.is_finished and not WorkerStatus.STOPPING.is_finished


def test_names_match_the_official_client() -> None:
    assert [s.name for s in ClusterStatus] == [s.name for s in ClientStatus]


@pytest.mark.parametrize(
    "value, expected",
    [
        ("RUNNING", {ClusterStatus.RUNNING}),
        ("running", {ClusterStatus.RUNNING}),
        ("Running,PENDING", {ClusterStatus.RUNNING, ClusterStatus.PENDING}),
        ("stopped, failed", {ClusterStatus.STOPPED, ClusterStatus.FAILED}),
        ("RUNNING,RUNNING", {ClusterStatus.RUNNING}),
        ("PENDING,RUNNING,STOPPING,STOPPED,FAILED", set(ClusterStatus)),
    ],
)
def test_parse_status_filter(value: str, expected: set[ClusterStatus]) -> None:
    assert parse_status_filter(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("bogus", "'bogus' is not a valid ClusterStatus"),
        ("RUNNING,nope", "'nope' is not a valid ClusterStatus"),
        ("", "'' is not a valid ClusterStatus"),
        ("RUNNING,", "'' is not a valid ClusterStatus"),
        ("2", "'2' is not a valid ClusterStatus"),
        ("STARTING", "'STARTING' is not a valid ClusterStatus"),
    ],
)
def test_parse_status_filter_errors(value: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_status_filter(value)
    assert str(info.value) == message


def test_wire_running() -> None:
    c = make_cluster()
    assert to_wire(c) == {
        "name": "abc123",
        "status": "RUNNING",
        "dashboard_route": "/clusters/abc123/status",
        "start_time": 1_700_000_000_000,
        "stop_time": None,
        "options": {"worker_cores": 1, "size": "small"},
        "tls_cert": c.cert_pem,
        "tls_key": c.key_pem,
    }


def test_wire_running_without_dashboard() -> None:
    wire = to_wire(make_cluster(dashboard_address=""))
    assert wire["dashboard_route"] is None
    assert wire["tls_cert"] is not None


@pytest.mark.parametrize(
    "status", [ClusterStatus.PENDING, ClusterStatus.STOPPING, ClusterStatus.STOPPED]
)
def test_wire_not_running_hides_tls_and_dashboard(status: ClusterStatus) -> None:
    wire = to_wire(make_cluster(status, stop_time_ms=1_700_000_001_000))
    assert wire["status"] == status.name
    assert wire["dashboard_route"] is None
    assert wire["tls_cert"] is None and wire["tls_key"] is None
    assert wire["stop_time"] == 1_700_000_001_000


def test_wire_without_tls_keys() -> None:
    wire = to_wire(make_cluster(), include_tls=False)
    assert set(wire) == WIRE_KEYS - {"tls_cert", "tls_key"}


@pytest.mark.parametrize("status", list(ClusterStatus))
def test_wire_has_only_allowed_keys_and_the_client_accepts_it(status: ClusterStatus) -> None:
    # A cluster full of internal state must still produce exactly the allowed keys.
    c = make_cluster(
        status,
        scheduler_address="tls://127.0.0.1:1",
        api_address="http://127.0.0.1:2",
        count=3,
        adaptive=True,
        last_heartbeat=5,
        state={"pid": 1},
        failure_reason="boom",
    )
    wire = json.loads(json.dumps(to_wire(c)))
    assert set(wire) == WIRE_KEYS
    assert isinstance(wire["status"], str)
    # The official client turns every key into a constructor argument: extra keys crash it.
    report = ClusterReport._from_json("http://public", "gateway://proxy:8786", wire)
    assert report.status.name == status.name
    assert report.options == c.options
    if status is ClusterStatus.RUNNING:
        assert report.scheduler_address == "gateway://proxy:8786/abc123"
        assert report.dashboard_link == "http://public/clusters/abc123/status"
        assert report.security is not None
    else:
        assert report.scheduler_address is None
        assert report.dashboard_link is None
        assert report.security is None


def test_secrets_stay_out_of_repr() -> None:
    c = make_cluster()
    text = repr(c)
    assert "secret-token" not in text and "PRIVATE KEY" not in text
    assert "abc123" in text


def test_worker_defaults() -> None:
    w = Worker(name="w1", cluster_name="abc123")
    assert w.status is WorkerStatus.PENDING
    assert not w.close_expected and not w.launched
    assert w.stop_time_ms is None and w.state == {}
    # records are independent: no shared mutable defaults
    w2 = Worker(name="w2", cluster_name="abc123")
    w.state["pid"] = 1
    assert w2.state == {}


def test_cluster_defaults() -> None:
    c = make_cluster(ClusterStatus.PENDING)
    assert c.target is ClusterStatus.RUNNING
    assert c.count == 0 and c.worker_start_failures == 0 and c.last_heartbeat is None
    assert c.is_active
    assert dataclasses.replace(c, status=ClusterStatus.FAILED).is_active is False
