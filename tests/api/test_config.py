"""Settings: defaults < YAML < environment, every problem at once, secrets never shown."""

from __future__ import annotations

import base64
import re
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dask_gateway_api.config import (
    SCHEMA,
    TOP,
    Settings,
    env_var_name,
    load_settings,
    settings_from_mapping,
)
from dask_gateway_api.lifecycle import Timeouts
from dask_gateway_api.limits import UserLimits
from dask_gateway_api.options import Integer, Select
from dask_gateway_api.resources import ClusterConfig, resolve_cluster_config
from dask_gateway_common.settings import SettingsError

REPO = Path(__file__).resolve().parents[2]
TOKEN = "proxy-token-0123456789abcdef"
ENV = {"DASK_GATEWAY_PROXY_TOKEN": TOKEN}
GiB = 2**30
FERNET_KEY = base64.urlsafe_b64encode(bytes(range(32))).decode()  # test only


def problems_of(data: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(SettingsError) as info:
        settings_from_mapping(data, ENV if env is None else env)
    return info.value.problems


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


# --- defaults ---------------------------------------------------------------------------


def test_defaults() -> None:
    s = load_settings(None, ENV)
    assert s.address == "127.0.0.1:8001" and s.bind == ("127.0.0.1", 8001)
    assert s.public_url == "http://127.0.0.1:8000"
    assert s.api_url == "http://127.0.0.1:8000/api"
    assert s.prefix == ""
    assert s.proxy_token == TOKEN
    assert s.db_path == ".run/gateway.sqlite"
    assert s.encrypt_keys == ()
    assert s.stop_clusters_on_shutdown is False
    assert s.stopped_record_max_age == 86400
    assert s.log_level == "INFO"
    assert s.auth.type == "simple" and s.auth.password is None and s.auth.cookie_max_age == 300
    assert s.backend.type == "local" and s.backend.workdir == ".run/clusters"
    assert s.cluster.config == ClusterConfig()
    assert s.cluster.heartbeat_period == 15 and s.cluster.heartbeat_timeout == 30
    assert s.cluster.start_timeout == 60 and s.cluster.worker_start_timeout == 60
    assert s.cluster.worker_start_failure_limit == 3
    assert s.cluster.check_period == 15  # min(20, 30 / 2)
    assert s.cluster.scheduler_api_retries == 3
    assert s.cluster.timeouts == Timeouts(60, 30, 60, 3)
    assert s.user_limits == UserLimits()
    assert s.options.fields == () and s.options.spec.to_wire() == []


def test_proxy_token_is_required() -> None:
    problems = problems_of({}, env={})
    assert len(problems) == 1
    assert problems[0].startswith("proxy_token is required: set DASK_GATEWAY_PROXY_TOKEN")


@pytest.mark.parametrize("token", ["", "   ", "has space", "tab\there"])
def test_bad_proxy_tokens(token: str) -> None:
    problems = problems_of({}, env={"DASK_GATEWAY_PROXY_TOKEN": token})
    assert len(problems) == 1 and "proxy_token" in problems[0]
    if token.strip():
        assert token not in problems[0]


def test_settings_repr_hides_secrets() -> None:
    s = settings_from_mapping(
        {"auth": {"password": "hunter2-pw"}, "encrypt_keys": [FERNET_KEY]}, ENV
    )
    text = repr(s)
    assert TOKEN not in text and "hunter2-pw" not in text and FERNET_KEY not in text
    assert s.auth.password == "hunter2-pw"


# --- file and environment ---------------------------------------------------------------


def test_yaml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        address: 0.0.0.0:9000
        public_url: https://gw.example.org/
        prefix: /services/dask-gateway/
        proxy_token: from-the-file-123
        log_level: debug
        auth:
          password: pw
        cluster:
          worker_cores: 2
          worker_memory: 4 G
          cluster_max_workers: 10
          heartbeat_period: 5
        user_limits:
          max_clusters: 3
          max_memory: 64 G
        """,
    )
    s = load_settings(path, {})
    assert s.bind == ("0.0.0.0", 9000)
    assert s.public_url == "https://gw.example.org"
    assert s.prefix == "/services/dask-gateway"
    assert s.api_url == "https://gw.example.org/services/dask-gateway/api"
    assert s.proxy_token == "from-the-file-123"
    assert s.log_level == "DEBUG"
    assert s.auth.password == "pw"
    assert s.cluster.config.worker_cores == 2
    assert s.cluster.config.worker_memory == 4 * GiB
    assert s.cluster.config.max_workers == 10
    assert s.cluster.heartbeat_period == 5 and s.cluster.heartbeat_timeout == 10
    assert s.cluster.check_period == 5
    assert s.user_limits == UserLimits(max_clusters=3, max_memory=64 * GiB)


def test_environment_wins_over_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        proxy_token: file-token
        auth: {password: file-pw, cookie_max_age: 10}
        cluster: {worker_cores: 2}
        """,
    )
    s = load_settings(
        path,
        {
            "DASK_GATEWAY_PROXY_TOKEN": "env-token",
            "DASK_GATEWAY_AUTH__PASSWORD": "env-pw",
            "DASK_GATEWAY_CLUSTER__WORKER_CORES": "3",
        },
    )
    assert s.proxy_token == "env-token"
    assert s.auth.password == "env-pw"
    assert s.auth.cookie_max_age == 10
    assert s.cluster.config.worker_cores == 3


def test_environment_conversions() -> None:
    env = {
        **ENV,
        "DASK_GATEWAY_STOP_CLUSTERS_ON_SHUTDOWN": "yes",
        "DASK_GATEWAY_STOPPED_RECORD_MAX_AGE": "60.5",
        "DASK_GATEWAY_CLUSTER__WORKER_MEMORY": "1.5 GiB",
        "DASK_GATEWAY_CLUSTER__ENVIRONMENT": '{"OMP_NUM_THREADS": "1"}',
        "DASK_GATEWAY_CLUSTER__EXTRA": "image: foo",
        "DASK_GATEWAY_CLUSTER__SCHEDULER_CMD": "python -m distributed.cli.dask_scheduler",
        "DASK_GATEWAY_CLUSTER__CLUSTER_MAX_CORES": "8",
        "DASK_GATEWAY_ENCRYPT_KEYS": f" {FERNET_KEY} ;; {FERNET_KEY};",
        "DASK_GATEWAY_USER_LIMITS__MAX_CORES": "4.5",
        "DASK_GATEWAY_OPTIONS__FIELDS": '[{"field": "worker_cores", "type": "int", "min": 1, "max": 4}]',
        "DASK_GATEWAY_LOG_LEVEL": "warning",
    }
    s = load_settings(None, env)
    assert s.stop_clusters_on_shutdown is True
    assert s.stopped_record_max_age == 60.5
    assert s.cluster.config.worker_memory == int(1.5 * GiB)
    assert s.cluster.config.environment == {"OMP_NUM_THREADS": "1"}
    assert s.cluster.config.extra == {"image": "foo"}
    assert s.cluster.config.scheduler_argv == ("python", "-m", "distributed.cli.dask_scheduler")
    assert s.cluster.config.cluster_max_cores == 8.0
    assert s.encrypt_keys == (FERNET_KEY, FERNET_KEY)
    assert s.user_limits.max_cores == 4.5
    assert [f.field for f in s.options.fields] == ["worker_cores"]
    assert s.log_level == "WARNING"


@pytest.mark.parametrize(
    "text, expected", [("true", True), ("ON", True), ("0", False), ("no", False)]
)
def test_environment_booleans(text: str, expected: bool) -> None:
    s = load_settings(None, {**ENV, "DASK_GATEWAY_STOP_CLUSTERS_ON_SHUTDOWN": text})
    assert s.stop_clusters_on_shutdown is expected


def test_empty_environment_value_unsets_optional_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "auth: {password: pw}\ncluster: {cluster_max_workers: 3}\n")
    s = load_settings(
        path,
        {
            **ENV,
            "DASK_GATEWAY_AUTH__PASSWORD": "",
            "DASK_GATEWAY_CLUSTER__CLUSTER_MAX_WORKERS": "null",
        },
    )
    assert s.auth.password is None
    assert s.cluster.config.cluster_max_workers is None


def test_jupyterhub_variables_are_fallbacks(tmp_path: Path) -> None:
    hub_env = {
        **ENV,
        "JUPYTERHUB_API_URL": "http://hub:8081/hub/api",
        "JUPYTERHUB_API_TOKEN": "hub-token",
        "JUPYTERHUB_SERVICE_NAME": "dask-gateway",
    }
    s = settings_from_mapping({"auth": {"type": "jupyterhub"}}, hub_env)
    assert s.auth.jupyterhub_api_url == "http://hub:8081/hub/api"
    assert s.auth.jupyterhub_api_token == "hub-token"
    assert s.auth.jupyterhub_service_name == "dask-gateway"
    # the file wins over the standard variable ...
    s = settings_from_mapping(
        {"auth": {"type": "jupyterhub", "jupyterhub_api_url": "http://other/hub/api"}}, hub_env
    )
    assert s.auth.jupyterhub_api_url == "http://other/hub/api"
    # ... and our own variable wins over both
    s = settings_from_mapping(
        {"auth": {"jupyterhub_api_url": "http://other/hub/api"}},
        {**hub_env, "DASK_GATEWAY_AUTH__JUPYTERHUB_API_URL": "http://mine/hub/api"},
    )
    assert s.auth.jupyterhub_api_url == "http://mine/hub/api"


def test_jupyterhub_requires_an_api_url() -> None:
    problems = problems_of({"auth": {"type": "jupyterhub"}})
    assert problems == [
        "auth.jupyterhub_api_url is required with auth.type jupyterhub (or set JUPYTERHUB_API_URL)"
    ]


def test_other_variables_are_ignored() -> None:
    env = {
        **ENV,
        "DASK_GATEWAY__ADDRESS": "x",
        "DASK_GATEWAY_BOGUS": "1",
        "DASK_GATEWAY_AUTH__X": "y",
    }
    assert load_settings(None, env).address == "127.0.0.1:8001"


def test_unparsable_environment_yaml() -> None:
    problems = problems_of({}, env={**ENV, "DASK_GATEWAY_OPTIONS__FIELDS": "[unclosed"})
    assert problems == ["DASK_GATEWAY_OPTIONS__FIELDS: expected a list, got '[unclosed'"]


def test_env_var_names() -> None:
    assert env_var_name(TOP, "proxy_token") == "DASK_GATEWAY_PROXY_TOKEN"
    assert env_var_name(TOP, "encrypt_keys") == "DASK_GATEWAY_ENCRYPT_KEYS"
    assert env_var_name("auth", "password") == "DASK_GATEWAY_AUTH__PASSWORD"
    assert env_var_name("user_limits", "max_cores") == "DASK_GATEWAY_USER_LIMITS__MAX_CORES"


# --- problems ---------------------------------------------------------------------------


def test_every_problem_is_listed_at_once() -> None:
    data = {
        "adress": "x",
        "prefix": "no-slash",
        "public_url": "ftp://x",
        "log_level": "LOUD",
        "encrypt_keys": ["not-a-key"],
        "auth": {"pasword": "x", "type": "ldap", "cookie_max_age": 0},
        "backend": {"type": "yarn", "status_period": -1},
        "cluster": {"worker_cores": 0, "worker_memory": "lots", "start_timeout": -1},
        "user_limits": {"max_clusters": -1},
        "options": {"fields": [{"field": "x", "type": "integer", "min": 5, "default": 1}]},
        "extra_section": {},
    }
    problems = problems_of(data, env={**ENV, "DASK_GATEWAY_CLUSTER__WORKER_THREADS": "many"})
    expected = [
        "unknown key 'adress' (did you mean 'address'?)",
        "unknown key 'auth.pasword' (did you mean 'password'?)",
        "unknown key 'extra_section'",
        "DASK_GATEWAY_CLUSTER__WORKER_THREADS: expected an integer, got 'many'",
        "public_url: expected an http:// or https:// URL, got 'ftp://x'",
        "prefix: must start with '/', got 'no-slash'",
        "encrypt_keys[0]: not a valid Fernet key",
        "log_level: log level must be one of",
        "auth.type: must be one of simple, jupyterhub, kerberos, got 'ldap'",
        "auth.cookie_max_age: must be > 0, got 0",
        "backend.type: must be one of local, kubernetes, got 'yarn'",
        "backend.status_period: must be > 0, got -1",
        "cluster: worker_cores must be an integer >= 1, got 0",
        "cluster: worker_memory: invalid memory size 'lots'",
        "cluster.start_timeout: must be >= 0, got -1",
        "user_limits.max_clusters: must be >= 0, got -1",
        "options.fields[0] (x): invalid default: x must be >= 5.000000, got 1",
    ]
    assert len(problems) == len(expected), problems
    for fragment in expected:
        assert any(fragment in p for p in problems), (fragment, problems)


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"address": "nohost"}, "address: expected HOST:PORT"),
        ({"address": "127.0.0.1:99999"}, "port 99999 out of range"),
        ({"address": 8000}, "address: expected a string, got 8000"),
        ({"public_url": "http://"}, "public_url: expected an http:// or https:// URL"),
        ({"public_url": "http://x/?a"}, "must not contain spaces, '?' or '#'"),
        ({"api_url": "http://api:8001/api/v1"}, "api_url: must end in '/api'"),
        ({"prefix": "/a b"}, "prefix: must be a plain path"),
        ({"prefix": "/a//b"}, "prefix: must be a plain path"),
        ({"db_path": " "}, "db_path: must not be empty"),
        ({"stopped_record_max_age": -1}, "stopped_record_max_age: must be >= 0"),
        ({"stop_clusters_on_shutdown": "yes"}, "expected true or false, got 'yes'"),
        ({"auth": "simple"}, "auth: expected a mapping of settings, got 'simple'"),
        (
            {"auth": {"password": 1234}},
            "auth.password: expected a string, got a value of the wrong type",
        ),
        ({"encrypt_keys": 5}, "encrypt_keys: expected a list of keys"),
        ({"backend": {"workdir": ""}}, "backend.workdir: must not be empty"),
        ({"backend": {"stop_grace": -1}}, "backend.stop_grace: must be >= 0"),
        (
            {"cluster": {"worker_corse": 1}},
            "unknown key 'cluster.worker_corse' (did you mean 'worker_cores'?)",
        ),
        ({"cluster": {"environment": ["A=1"]}}, "cluster.environment: expected a mapping"),
        ({"cluster": {"scheduler_cmd": []}}, "cluster.scheduler_cmd: expected a command"),
        (
            {"cluster": {"cluster_max_memory": "1 G"}},
            "cluster: Scheduler memory request of 2 GiB exceeds cluster memory limit of 1 GiB",
        ),
        (
            {"cluster": {"heartbeat_period": 10, "heartbeat_timeout": 10}},
            "must be longer than cluster.heartbeat_period",
        ),
        ({"cluster": {"check_period": 0}}, "cluster.check_period: must be > 0"),
        ({"cluster": {"scheduler_api_retries": 0}}, "cluster.scheduler_api_retries: must be > 0"),
        ({"cluster": {"worker_start_failure_limit": 1.5}}, "expected an integer, got 1.5"),
        ({"cluster": {"idle_timeout": float("nan")}}, "cluster.idle_timeout: expected a number"),
        ({"user_limits": {"max_memory": [1]}}, "user_limits.max_memory: expected a memory size"),
        ({"user_limits": {"max_memory": "2 X"}}, "user_limits.max_memory: invalid memory size"),
        ({"options": {"fields": {"a": 1}}}, "options.fields: expected a list"),
        (
            {"options": {"fields": ["x"]}},
            "options.fields[0]: a field declaration must be a mapping",
        ),
        ({"options": {"groups": {"g": "worker_cores"}}}, "options.groups: each entry must map"),
        (
            {"options": {"handler": "nope"}},
            "options.handler: handler must look like 'module:function'",
        ),
    ],
)
def test_single_problems(data: dict[str, Any], fragment: str) -> None:
    problems = problems_of(data)
    assert any(fragment in p for p in problems), problems


def test_secret_values_never_appear_in_problems() -> None:
    problems = problems_of(
        {"encrypt_keys": ["super-secret-key-value"], "auth": {"password": ["s3cr3t-pw"]}},
        env={"DASK_GATEWAY_PROXY_TOKEN": "bad token-value"},
    )
    text = "\n".join(problems)
    assert len(problems) == 3
    for secret in ("super-secret-key-value", "s3cr3t-pw", "token-value"):
        assert secret not in text


def test_bad_secret_in_environment_is_not_echoed() -> None:
    # an int-typed key from the environment echoes the value; a secret one must not
    problems = problems_of({}, env={**ENV, "DASK_GATEWAY_ENCRYPT_KEYS": "not-a-key"})
    assert problems == [
        "encrypt_keys[0]: not a valid Fernet key (expected 32 bytes, url-safe base64-encoded)"
    ]


# --- the file itself --------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(str(tmp_path / "nope.yaml"), ENV)
    assert info.value.problems == [
        f"cannot read config file {tmp_path / 'nope.yaml'}: No such file or directory"
    ]


def test_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "a: [1,\nb: 2\n")
    with pytest.raises(SettingsError) as info:
        load_settings(path, ENV)
    (problem,) = info.value.problems
    assert problem.startswith(f"config file {path} is not valid YAML (line ")


def test_yaml_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="must hold a mapping of settings, got list"):
        load_settings(write(tmp_path, "- a\n- b\n"), ENV)


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "# nothing\n"), ENV) == load_settings(None, ENV)


def test_empty_sections_are_fine(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "auth:\ncluster:\n"), ENV)
    assert s.auth.type == "simple"


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"prefix: \xff\xfe\n")
    with pytest.raises(SettingsError, match="is not UTF-8 text"):
        load_settings(str(path), ENV)


# --- derived values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix, public_url, expected_prefix, expected_api",
    [
        ("", "http://h:8000", "", "http://h:8000/api"),
        ("/", "http://h:8000/", "", "http://h:8000/api"),
        ("/svc/", "http://h:8000", "/svc", "http://h:8000/svc/api"),
        ("/a/b", "https://h", "/a/b", "https://h/a/b/api"),
    ],
)
def test_prefix_and_api_url(
    prefix: str, public_url: str, expected_prefix: str, expected_api: str
) -> None:
    s = settings_from_mapping({"prefix": prefix, "public_url": public_url}, ENV)
    assert s.prefix == expected_prefix
    assert s.api_url == expected_api


def test_explicit_api_url() -> None:
    s = settings_from_mapping({"api_url": "http://api.internal:8001/api/", "prefix": "/x"}, ENV)
    assert s.api_url == "http://api.internal:8001/api"


def test_heartbeat_period_zero_disables_the_default_timeout() -> None:
    s = settings_from_mapping({"cluster": {"heartbeat_period": 0}}, ENV)
    assert s.cluster.heartbeat_timeout == 0
    assert s.cluster.check_period == 20  # min(20, 60 / 2, 60 / 2)


def test_check_period_follows_the_smallest_timeout() -> None:
    s = settings_from_mapping({"cluster": {"start_timeout": 4, "heartbeat_timeout": 100}}, ENV)
    assert s.cluster.check_period == 2
    s = settings_from_mapping({"cluster": {"check_period": 0.5}}, ENV)
    assert s.cluster.check_period == 0.5


def test_zero_user_limits_mean_unlimited() -> None:
    s = settings_from_mapping(
        {"user_limits": {"max_clusters": 0, "max_cores": 0, "max_memory": 0}}, ENV
    )
    assert s.user_limits == UserLimits()


# --- options ----------------------------------------------------------------------------


def test_options_fields_and_groups() -> None:
    s = settings_from_mapping(
        {
            "options": {
                "fields": [
                    {"field": "worker_cores", "type": "integer", "min": 1, "max": 4},
                    {
                        "field": "size",
                        "type": "select",
                        "target": "environment",
                        "options": [
                            {"key": "small", "value": {}},
                            ["big", {"BIG": "1"}],
                        ],
                    },
                ],
                "groups": {"ml": ["size"]},
            }
        },
        ENV,
    )
    a, b = s.options.fields
    assert isinstance(a, Integer) and a.default == 1
    assert isinstance(b, Select) and b.options == {"small": {}, "big": {"BIG": "1"}}
    assert s.options.groups == {"ml": ("size",)}


def test_option_targets_must_be_cluster_keys_without_a_handler() -> None:
    problems = problems_of(
        {
            "cluster": {"extra": {"image": "x"}},
            "options": {
                "fields": [
                    {"field": "image", "type": "string", "default": "y"},
                    {"field": "size", "type": "select", "options": ["a"]},
                ]
            },
        }
    )
    assert problems == [
        "options.fields[1] (size): target 'size' is not a cluster config key; set 'target' to "
        "one (e.g. worker_cores) or configure options.handler"
    ]


def test_option_defaults_must_give_a_valid_cluster() -> None:
    problems = problems_of(
        {
            "options": {
                "fields": [
                    {"field": "mem", "type": "string", "default": "lots", "target": "worker_memory"}
                ]
            }
        }
    )
    assert len(problems) == 1
    assert problems[0].startswith("options: the option defaults give an invalid cluster: ")
    assert "invalid memory size 'lots'" in problems[0]


def test_group_with_unknown_field() -> None:
    problems = problems_of(
        {
            "options": {
                "fields": [{"field": "worker_cores", "type": "int", "min": 1}],
                "groups": {"ml": ["gpu"]},
            }
        }
    )
    assert problems == ["options: group 'ml' lists unknown fields ['gpu']"]


@pytest.fixture
def handler_module() -> Iterator[str]:
    mod = types.ModuleType("gw_config_test_handler")

    def handler(options: Any, user: Any) -> dict[str, Any]:
        return {"worker_cores": options.size}

    mod.handler = handler
    sys.modules[mod.__name__] = mod
    try:
        yield mod.__name__
    finally:
        del sys.modules[mod.__name__]


def test_handler_is_loaded_and_lifts_the_target_check(handler_module: str) -> None:
    s = settings_from_mapping(
        {
            "options": {
                "fields": [{"field": "size", "type": "integer", "default": 2}],
                "handler": f"{handler_module}:handler",
            }
        },
        ENV,
    )
    spec = s.options.spec
    assert spec.overrides_for(spec.validate({}), object()) == {"worker_cores": 2}


def test_unimportable_handler_is_a_problem() -> None:
    problems = problems_of({"options": {"handler": "no_such_module_qq:f"}})
    assert problems == [
        "options.handler: cannot import handler module 'no_such_module_qq': "
        "ModuleNotFoundError: No module named 'no_such_module_qq'"
    ]


# --- the shipped example and the documentation ------------------------------------------


def test_example_config_loads() -> None:
    s = load_settings(str(REPO / "examples" / "gateway.yaml"), ENV)
    assert isinstance(s, Settings)
    wire = s.options.spec.to_wire()
    assert [f["field"] for f in wire] == ["worker_cores", "worker_memory"]
    spec = s.options.spec
    overrides = spec.overrides_for(spec.validate({"worker_memory": "4 GiB"}), object())
    config = resolve_cluster_config(s.cluster.config, overrides)
    assert config.worker_memory == 4 * GiB


def test_every_key_is_documented() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()
    for section, keys in SCHEMA.items():
        if section != TOP:
            assert f"## `{section}`" in doc, section
        for key in keys:
            assert re.search(rf"^\| `{key}` \|", doc, re.MULTILINE), (section, key)
            assert env_var_name(section, key) in doc, (section, key)


def test_internal_url_is_validated_and_trimmed() -> None:
    from dask_gateway_api.config import settings_from_mapping

    env = {"DASK_GATEWAY_PROXY_TOKEN": "t" * 32}
    settings = settings_from_mapping({"internal_url": "http://api.ns:8001/"}, env)
    assert settings.internal_url == "http://api.ns:8001"
    assert settings_from_mapping({}, env).internal_url is None
    with pytest.raises(SettingsError) as info:
        settings_from_mapping({"internal_url": "ftp://x"}, env)
    assert any("internal_url" in p for p in info.value.problems)


def test_fork_server_switch() -> None:
    from dask_gateway_api.config import settings_from_mapping

    env = {"DASK_GATEWAY_PROXY_TOKEN": "t" * 32}
    assert settings_from_mapping({}, env).backend.fork_server is True
    assert (
        settings_from_mapping({"backend": {"fork_server": False}}, env).backend.fork_server is False
    )
    off = dict(env, DASK_GATEWAY_BACKEND__FORK_SERVER="false")
    assert settings_from_mapping({}, off).backend.fork_server is False
    with pytest.raises(SettingsError):
        settings_from_mapping({"backend": {"fork_server": "maybe"}}, env)
