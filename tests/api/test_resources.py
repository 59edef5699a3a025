"""Memory sizes, ClusterConfig resolution and the §6.4 max_workers derivation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_gateway_api.resources import (
    CLUSTER_CONFIG_FIELDS,
    ClusterConfig,
    ClusterConfigError,
    check_cluster_config,
    format_cores,
    format_memory,
    parse_memory,
    resolve_cluster_config,
)
from dask_gateway_common.errors import GatewayError

GiB = 2**30
MiB = 2**20


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2 G", 2 * GiB),
        ("2G", 2 * GiB),
        ("2g", 2 * GiB),
        ("512M", 512 * MiB),
        ("512 MiB", 512 * MiB),
        ("1.5 GiB", int(1.5 * GiB)),
        ("1.5GB", int(1.5 * GiB)),
        ("64kb", 64 * 1024),
        ("64 Ki", 64 * 1024),
        ("1T", 2**40),
        ("1 P", 2**50),
        ("100", 100),
        ("100B", 100),
        (" 3 G ", 3 * GiB),
        (".5 K", 512),
        ("0", 0),
    ],
)
def test_parse_memory_strings(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


def test_parse_memory_numbers() -> None:
    assert parse_memory(4096) == 4096
    assert parse_memory(0) == 0
    assert parse_memory(2e9) == 2_000_000_000


@pytest.mark.parametrize(
    "bad", ["", "G", "2 X", "two G", "-1 G", "1.2.3 G", "2 GG", "5 i", "2 G extra", "nan"]
)
def test_parse_memory_rejects_bad_strings(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid memory size") as info:
        parse_memory(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", [-1, True, None, [1], float("inf"), float("nan"), -0.5])
def test_parse_memory_rejects_bad_values(bad: object) -> None:
    with pytest.raises(ValueError, match="invalid memory size"):
        parse_memory(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (512, "512 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (512 * MiB, "512 MiB"),
        (2 * GiB, "2 GiB"),
        (int(1.5 * GiB), "1.5 GiB"),
        (GiB + 1, "1 GiB"),
        (3 * 2**40, "3 TiB"),
        (2**50, "1 PiB"),
    ],
)
def test_format_memory(n: int, text: str) -> None:
    assert format_memory(n) == text


@given(st.integers(min_value=0, max_value=2**60))
def test_format_memory_round_trips_within_rounding(n: int) -> None:
    back = parse_memory(format_memory(n))
    # Two decimals of the unit (≤ 0.5 % of n), plus parse_memory truncating to whole bytes.
    assert abs(back - n) <= n * 0.005 + 1


def test_format_cores() -> None:
    assert format_cores(4.0) == "4"
    assert format_cores(1.5) == "1.5"
    assert format_cores(3) == "3"


def test_defaults() -> None:
    c = ClusterConfig()
    assert c.scheduler_cmd == "dask scheduler"
    assert c.worker_cmd == "dask worker"
    assert c.scheduler_argv == ("dask", "scheduler")
    assert c.worker_argv == ("dask", "worker")
    assert c.worker_cores == 1 and c.threads == 1
    assert c.worker_memory == 2 * GiB and c.scheduler_memory == 2 * GiB
    assert c.adaptive_period == 3.0 and c.idle_timeout == 0.0
    assert c.max_workers is None
    assert resolve_cluster_config({}, {}) == c


def test_threads_default_to_cores() -> None:
    assert resolve_cluster_config({}, {"worker_cores": 4}).threads == 4
    assert resolve_cluster_config({}, {"worker_cores": 4, "worker_threads": 2}).threads == 2


def test_overrides_win_and_memory_strings_are_parsed() -> None:
    c = resolve_cluster_config(
        {"worker_cores": 2, "worker_memory": "4 G"},
        {"worker_memory": "1.5 GiB", "scheduler_cmd": ["python", "-m", "x y"]},
    )
    assert c.worker_cores == 2
    assert c.worker_memory == int(1.5 * GiB)
    assert c.scheduler_cmd == "python -m 'x y'"
    assert c.scheduler_argv == ("python", "-m", "x y")


def test_environment_overrides_merge() -> None:
    c = resolve_cluster_config(
        {"environment": {"A": "1", "B": "2"}}, {"environment": {"B": "3", "C": "4"}}
    )
    assert c.environment == {"A": "1", "B": "3", "C": "4"}


def test_unknown_override_keys() -> None:
    with pytest.raises(ClusterConfigError) as info:
        resolve_cluster_config({}, {"worker_corse": 1, "bogus": 2})
    assert str(info.value) == "Unknown cluster config fields ['bogus', 'worker_corse']"
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, GatewayError) and info.value.status == 422


def test_extra_keys_must_be_declared_in_defaults() -> None:
    defaults = {"extra": {"image": "daskgateway/dask:latest"}}
    c = resolve_cluster_config(defaults, {"image": "custom:1"})
    assert c.extra == {"image": "custom:1"}
    assert resolve_cluster_config(defaults, {}).extra == {"image": "daskgateway/dask:latest"}
    c2 = resolve_cluster_config(defaults, {"extra": {"node_selector": "gpu"}})
    assert c2.extra == {"image": "daskgateway/dask:latest", "node_selector": "gpu"}
    with pytest.raises(ClusterConfigError, match=r"Unknown cluster config fields \['tag'\]"):
        resolve_cluster_config(defaults, {"tag": "x"})


def test_scheduler_memory_over_cluster_limit() -> None:
    with pytest.raises(ClusterConfigError) as info:
        resolve_cluster_config({"cluster_max_memory": "1 G"}, {})
    assert str(info.value) == (
        "Scheduler memory request of 2 GiB exceeds cluster memory limit of 1 GiB"
    )


def test_scheduler_cores_over_cluster_limit() -> None:
    with pytest.raises(ClusterConfigError) as info:
        resolve_cluster_config({"cluster_max_cores": 1.5}, {"scheduler_cores": 2})
    assert str(info.value) == "Scheduler cores request of 2 exceeds cluster cores limit of 1.5"


def test_both_scheduler_limits_reported() -> None:
    with pytest.raises(ClusterConfigError) as info:
        resolve_cluster_config({}, {"cluster_max_cores": 0, "cluster_max_memory": 1024})
    message = str(info.value)
    assert "Scheduler memory request of 2 GiB exceeds cluster memory limit of 1 KiB" in message
    assert "Scheduler cores request of 1 exceeds cluster cores limit of 0" in message


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"worker_cores": 0}, "worker_cores must be an integer >= 1, got 0"),
        ({"worker_cores": 1.5}, "worker_cores must be an integer >= 1, got 1.5"),
        ({"worker_cores": True}, "worker_cores must be an integer >= 1, got True"),
        ({"worker_threads": 0}, "worker_threads must be an integer >= 1, got 0"),
        ({"scheduler_cores": "2"}, "scheduler_cores must be an integer >= 1, got '2'"),
        ({"worker_memory": "lots"}, "worker_memory: invalid memory size 'lots'"),
        ({"worker_memory": 0}, "worker_memory must be more than 0 bytes"),
        ({"scheduler_memory": 0}, "scheduler_memory must be more than 0 bytes"),
        ({"adaptive_period": 0}, "adaptive_period must be a number > 0, got 0"),
        ({"idle_timeout": -1}, "idle_timeout must be a number >= 0, got -1"),
        ({"cluster_max_workers": -1}, "cluster_max_workers must be an integer >= 0, got -1"),
        ({"cluster_max_cores": "x"}, "cluster_max_cores must be a number >= 0, got 'x'"),
        ({"cluster_max_memory": "x"}, "cluster_max_memory: invalid memory size 'x'"),
        ({"environment": {"A": 1}}, "environment must be a mapping of strings to strings"),
        ({"environment": "A=1"}, "environment must be a mapping of strings to strings"),
        ({"scheduler_cmd": ""}, "scheduler_cmd must not be empty"),
        ({"worker_cmd": "dask 'worker"}, "worker_cmd is not a valid command line"),
        ({"worker_cmd": 5}, "worker_cmd must be a command string, got 5"),
    ],
)
def test_bad_values(overrides: dict[str, object], fragment: str) -> None:
    with pytest.raises(ClusterConfigError) as info:
        resolve_cluster_config({}, overrides)
    assert fragment in str(info.value)


def test_check_lists_every_problem() -> None:
    config, problems = check_cluster_config(
        {"worker_cores": 0, "worker_memory": "x", "idle_timeout": -1, "nope": 1}
    )
    assert config is None
    assert len(problems) == 4
    assert problems[0] == "Unknown cluster config fields ['nope']"


@pytest.mark.parametrize(
    "values, expected",
    [
        ({}, None),
        ({"cluster_max_workers": 5}, 5),
        ({"cluster_max_workers": 0}, 0),
        # §11 scenario 17: 6 cores, 2 per worker, 1 for the scheduler -> floor(5 / 2) = 2
        ({"cluster_max_cores": 6, "worker_cores": 2, "scheduler_cores": 1}, 2),
        ({"cluster_max_cores": 5, "worker_cores": 2}, 2),
        ({"cluster_max_cores": 1}, 0),
        ({"cluster_max_memory": "10 G", "worker_memory": "2 G", "scheduler_memory": "2 G"}, 4),
        ({"cluster_max_memory": "9 G", "worker_memory": "2 G", "scheduler_memory": "2 G"}, 3),
        # the smallest of the three limits wins
        ({"cluster_max_workers": 3, "cluster_max_cores": 100, "cluster_max_memory": "100 G"}, 3),
        ({"cluster_max_workers": 30, "cluster_max_cores": 5, "cluster_max_memory": "100 G"}, 4),
        ({"cluster_max_workers": 30, "cluster_max_cores": 50, "cluster_max_memory": "6 G"}, 2),
        ({"cluster_max_cores": 1.3, "worker_cores": 1, "scheduler_cores": 1}, 0),
    ],
)
def test_max_workers_derivation(values: dict[str, object], expected: int | None) -> None:
    assert resolve_cluster_config({}, values).max_workers == expected


def test_max_workers_never_negative() -> None:
    # A scheduler exactly at the limit leaves room for no worker, never a negative count.
    c = resolve_cluster_config({}, {"cluster_max_memory": "2 G", "cluster_max_cores": 1})
    assert c.max_workers == 0


def test_round_trip_through_dict() -> None:
    c = resolve_cluster_config(
        {"extra": {"image": "x"}},
        {
            "worker_cores": 3,
            "worker_memory": "3 G",
            "environment": {"A": "b"},
            "cluster_max_workers": 7,
            "idle_timeout": 10,
        },
    )
    d = c.to_dict()
    assert set(d) == set(CLUSTER_CONFIG_FIELDS)
    assert ClusterConfig.from_dict(d) == c
    # to_dict copies: mutating the dict does not touch the frozen config
    d["environment"]["A"] = "changed"
    assert c.environment == {"A": "b"}


def test_defaults_may_be_a_config() -> None:
    base = resolve_cluster_config({}, {"worker_cores": 2, "environment": {"X": "1"}})
    c = resolve_cluster_config(base, {"worker_memory": "1 G", "environment": {"Y": "2"}})
    assert c.worker_cores == 2
    assert c.worker_memory == GiB
    assert c.environment == {"X": "1", "Y": "2"}
