"""Assertions on the manifests the real Helm renders from the charts (helm template)."""

from __future__ import annotations

import pytest
import yaml

from tests.charts.chart_tools import (
    API,
    AUTOSCALED,
    CLASSIC,
    DEFAULT,
    FULL,
    HUB_TOKEN,
    KERBEROS,
    NAMESPACE,
    PASSWORD,
    SCALED,
    SCENARIOS,
    SCHED,
    TOKEN,
    UMBRELLA,
    WEB,
    Rendered,
    annotations,
    merge,
    pod_spec,
    render,
    render_error,
)

API_DEPLOY = "gateway-api-gw"
SCHED_DEPLOY = "scheduler-proxy-gw"
WEB_DEPLOY = "web-proxy-gw"
ALL_DEPLOYS = (API_DEPLOY, SCHED_DEPLOY, WEB_DEPLOY)


def _port_by_name(container: dict, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    return ports[name]


def _selects(service: dict, deployment: dict) -> bool:
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    return all(pod_labels.get(k) == v for k, v in service["spec"]["selector"].items())


# ---------------------------------------------------------------- Services


@pytest.mark.parametrize(
    ("service", "svc_type", "port", "deployment", "target"),
    [
        ("web-public-gw", "LoadBalancer", 80, WEB_DEPLOY, 8000),
        ("scheduler-public-gw", "LoadBalancer", 8786, SCHED_DEPLOY, 8786),
        ("web-api-gw", "ClusterIP", 8001, WEB_DEPLOY, 8001),
        ("scheduler-api-gw", "ClusterIP", 8001, SCHED_DEPLOY, 8001),
        ("gateway-api-gw", "ClusterIP", 8001, API_DEPLOY, 8001),
    ],
)
def test_services_names_types_ports(
    service: str, svc_type: str, port: int, deployment: str, target: int
) -> None:
    out = render(UMBRELLA, DEFAULT)
    svc = out.get("Service", service)
    assert svc["metadata"]["namespace"] == NAMESPACE
    assert svc["spec"]["type"] == svc_type
    [svc_port] = svc["spec"]["ports"]
    assert svc_port["port"] == port
    assert svc_port["protocol"] == "TCP"
    # The named target port resolves to the container port the program listens on.
    container = out.container(deployment)
    assert _port_by_name(container, svc_port["targetPort"]) == target
    assert _selects(svc, out.deployment(deployment))
    # ... and only that Deployment.
    others = [d for d in ALL_DEPLOYS if d != deployment]
    assert not any(_selects(svc, out.deployment(d)) for d in others)


def test_exactly_the_expected_objects() -> None:
    out = render(UMBRELLA, DEFAULT)
    assert sorted(out.names()) == sorted(
        [
            "ServiceAccount/gateway-api-gw",
            "Secret/gateway-secret-gw",
            "ConfigMap/gateway-api-gw",
            "Role/gateway-api-gw",
            "RoleBinding/gateway-api-gw",
            "Service/gateway-api-gw",
            "Service/scheduler-public-gw",
            "Service/scheduler-api-gw",
            "Service/web-public-gw",
            "Service/web-api-gw",
            "Deployment/gateway-api-gw",
            "Deployment/scheduler-proxy-gw",
            "Deployment/web-proxy-gw",
        ]
    )
    assert all(d["metadata"]["namespace"] == NAMESPACE for d in out.docs)


def test_programs_listen_where_the_services_point() -> None:
    out = render(UMBRELLA, DEFAULT)
    sched = out.container(SCHED_DEPLOY)
    assert sched["command"] == ["dask-gateway-scheduler-proxy"]
    assert "--address=:8786" in sched["args"]
    assert "--admin-address=:8001" in sched["args"]
    web = out.container(WEB_DEPLOY)
    assert web["command"] == ["dask-gateway-web-proxy"]
    assert "--address=:8000" in web["args"]
    assert "--admin-address=:8001" in web["args"]
    api = out.container(API_DEPLOY)
    assert api["command"][0] == "dask-gateway-api"
    assert out.api_config()["address"] == ":8001"


def test_public_service_options() -> None:
    out = render(UMBRELLA, FULL)
    sched = out.get("Service", "scheduler-public-gw")["spec"]
    assert sched["type"] == "NodePort"
    assert sched["ports"][0]["nodePort"] == 30786
    assert sched["externalTrafficPolicy"] == "Local"
    assert out.get("Service", "scheduler-public-gw")["metadata"]["annotations"] == {"lb": "nlb"}
    web = out.get("Service", "web-public-gw")["spec"]
    assert web["type"] == "LoadBalancer"
    assert web["ports"][0]["port"] == 443
    assert web["loadBalancerIP"] == "203.0.113.20"
    assert web["loadBalancerSourceRanges"] == ["10.0.0.0/8"]


# ---------------------------------------------------------------- wiring


def test_proxies_find_the_api_and_the_token() -> None:
    out = render(UMBRELLA, DEFAULT)
    cm = out.get("ConfigMap", "gateway-api-gw")
    assert cm["data"]["routes-url"] == "http://gateway-api-gw:8001/api/v1/routes"
    secret = out.secret_data("gateway-secret-gw")
    assert secret["proxy-token"] == TOKEN
    for deploy in (SCHED_DEPLOY, WEB_DEPLOY):
        container = out.container(deploy)
        assert "--api-url=$(DASK_GATEWAY_ROUTES_URL)" in container["args"]
        [env] = [e for e in container["env"] if e["name"] == "DASK_GATEWAY_ROUTES_URL"]
        assert env["valueFrom"]["configMapKeyRef"] == {
            "name": "gateway-api-gw",
            "key": "routes-url",
        }
        assert "--api-token-file=/etc/dask-gateway/proxy-token/token" in container["args"]
        volumes = {v["name"]: v for v in pod_spec(out.deployment(deploy))["volumes"]}
        assert volumes["proxy-token"]["secret"]["secretName"] == "gateway-secret-gw"
        assert volumes["proxy-token"]["secret"]["items"] == [
            {"key": "proxy-token", "path": "token"}
        ]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["proxy-token"] == "/etc/dask-gateway/proxy-token"


def test_api_reaches_itself_through_its_service() -> None:
    out = render(UMBRELLA, FULL)
    config = out.api_config()
    # The API publishes "<prefix>/" -> its internal_url: the Service's cluster DNS name,
    # so the web proxies resolve it from any namespace.
    assert config["internal_url"] == f"http://gateway-api-gw.{NAMESPACE}:8001"
    assert config["prefix"] == "/services/dask-gateway"
    assert config["api_url"] == f"http://gateway-api-gw.{NAMESPACE}:8001/services/dask-gateway/api"
    assert (
        out.get("ConfigMap", "gateway-api-gw")["data"]["routes-url"]
        == "http://gateway-api-gw:8001/services/dask-gateway/api/v1/routes"
    )
    assert config["public_url"] == "https://dask.example.com"


def test_api_config_and_secret_env() -> None:
    out = render(UMBRELLA, DEFAULT)
    container = out.container(API_DEPLOY)
    assert container["command"] == [
        "dask-gateway-api",
        "--config",
        "/etc/dask-gateway/config/config.yaml",
    ]
    env = {e["name"]: e for e in container["env"]}
    assert env["DASK_GATEWAY_PROXY_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "gateway-secret-gw",
        "key": "proxy-token",
    }
    # No optional secret without its value.
    assert "DASK_GATEWAY_AUTH__PASSWORD" not in env
    assert "DASK_GATEWAY_AUTH__JUPYTERHUB_API_TOKEN" not in env
    assert "DASK_GATEWAY_ENCRYPT_KEYS" not in env
    assert set(out.secret_data("gateway-secret-gw")) == {"proxy-token"}
    config = out.api_config()
    assert config["auth"] == {"type": "simple", "cookie_max_age": 300}
    assert config["db_path"].startswith("/var/lib/dask-gateway/")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(out.deployment(API_DEPLOY))["volumes"]}
    assert "emptyDir" in volumes[mounts["/var/lib/dask-gateway"]]


def test_classic_jupyterhub_config() -> None:
    out = render(UMBRELLA, CLASSIC)
    auth = out.api_config()["auth"]
    assert auth["type"] == "jupyterhub"
    assert auth["jupyterhub_api_url"] == "http://hub:8081/hub/api"
    env = {e["name"]: e for e in out.container(API_DEPLOY)["env"]}
    assert env["DASK_GATEWAY_AUTH__JUPYTERHUB_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "gateway-secret-gw",
        "key": "jupyterhub-api-token",
    }
    assert out.secret_data("gateway-secret-gw")["jupyterhub-api-token"] == HUB_TOKEN
    custom = render(
        UMBRELLA,
        merge(
            CLASSIC,
            {"gateway": {"auth": {"jupyterhub": {"apiUrl": "http://hub.jhub:8081/hub/api"}}}},
        ),
    )
    assert custom.api_config()["auth"]["jupyterhub_api_url"] == "http://hub.jhub:8081/hub/api"
    scoped = render(
        UMBRELLA,
        merge(
            CLASSIC,
            {
                "gateway": {
                    "auth": {"jupyterhub": {"serviceName": "dask-gateway"}},
                    "extraConfig": {"auth": {"jupyterhub_cache_ttl": 30}},
                }
            },
        ),
    ).api_config()["auth"]
    assert scoped["jupyterhub_service_name"] == "dask-gateway"
    assert scoped["jupyterhub_cache_ttl"] == 30  # extraConfig merges into the section
    assert scoped["jupyterhub_api_url"] == "http://hub:8081/hub/api"


def test_simple_password_and_encrypt_keys_reach_the_api_from_the_secret() -> None:
    out = render(UMBRELLA, FULL)
    env = {e["name"]: e for e in out.container(API_DEPLOY)["env"]}
    assert (
        env["DASK_GATEWAY_AUTH__PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "simple-password"
    )
    assert env["DASK_GATEWAY_ENCRYPT_KEYS"]["valueFrom"]["secretKeyRef"]["key"] == "encrypt-keys"
    data = out.secret_data("gateway-secret-gw")
    assert data["simple-password"] == PASSWORD
    assert data["encrypt-keys"] == FULL["gateway"]["encryptKeys"][0]


def test_kerberos_keytab_is_mounted_from_the_secret() -> None:
    out = render(UMBRELLA, KERBEROS)
    auth = out.api_config()["auth"]
    assert auth["type"] == "kerberos"
    assert auth["kerberos_keytab"] == "/etc/dask-gateway/kerberos/dask_gateway.keytab"
    assert out.secret_data("gateway-secret-gw")["kerberos.keytab"] == "not-a-real-keytab"
    volumes = {v["name"]: v for v in pod_spec(out.deployment(API_DEPLOY))["volumes"]}
    assert volumes["kerberos"]["secret"]["items"] == [
        {"key": "kerberos.keytab", "path": "dask_gateway.keytab"}
    ]


def test_backend_block() -> None:
    default = render(UMBRELLA, DEFAULT).api_config()
    assert default["backend"]["type"] == "kubernetes"
    kube = default["backend"]["kubernetes"]
    assert kube["namespace"] == NAMESPACE
    assert kube["image"] == "ghcr.io/dask-gateway-trio/cluster:0.1.0"
    assert default["cluster"]["worker_cores"] == 1
    assert "worker_threads" not in default["cluster"]

    full = render(UMBRELLA, FULL).api_config()
    kube = full["backend"]["kubernetes"]
    assert kube["namespace"] == "dask-clusters"
    assert kube["image_pull_secrets"] == ["regcred"]
    assert kube["service_account"] == "dask-pods"
    assert kube["node_selector"] == {"pool": "dask"}
    assert kube["tolerations"][0]["key"] == "dask"
    assert kube["api_concurrency"] == 8  # backend.kubernetes passed through verbatim
    assert kube["instance"] == "gw"  # one gateway's objects never mix with another's
    cluster = full["cluster"]
    assert cluster["scheduler_cores"] == 2
    assert cluster["scheduler_memory"] == "4 G"
    assert cluster["worker_cores"] == 4
    assert cluster["worker_memory"] == "8 G"
    assert cluster["worker_threads"] == 2
    assert cluster["environment"] == {"OMP_NUM_THREADS": "1"}
    assert cluster["idle_timeout"] == 3600
    assert full["user_limits"] == {"max_clusters": 4, "max_cores": 16}
    assert [f["field"] for f in full["options"]["fields"]] == ["worker_cores", "worker_memory"]
    assert full["stopped_record_max_age"] == 600  # extraConfig


# ---------------------------------------------------------------- RBAC


def test_only_the_api_has_rbac() -> None:
    out = render(UMBRELLA, DEFAULT)
    assert not out.of_kind("ClusterRole")
    assert not out.of_kind("ClusterRoleBinding")
    [role] = out.of_kind("Role")
    assert role["metadata"]["name"] == "gateway-api-gw"
    assert role["metadata"]["namespace"] == NAMESPACE
    [rule] = role["rules"]
    assert rule["apiGroups"] == [""]
    assert sorted(rule["resources"]) == ["pods", "secrets", "services"]
    assert sorted(rule["verbs"]) == sorted(
        ["get", "list", "watch", "create", "delete", "patch", "update"]
    )
    assert "*" not in rule["verbs"] and "*" not in rule["resources"]
    [binding] = out.of_kind("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "gateway-api-gw",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "gateway-api-gw", "namespace": NAMESPACE}
    ]
    [account] = out.of_kind("ServiceAccount")
    assert account["metadata"]["name"] == "gateway-api-gw"
    assert pod_spec(out.deployment(API_DEPLOY))["serviceAccountName"] == "gateway-api-gw"
    for deploy in (SCHED_DEPLOY, WEB_DEPLOY):
        spec = pod_spec(out.deployment(deploy))
        assert spec["automountServiceAccountToken"] is False
        assert "serviceAccountName" not in spec


def test_role_lives_in_the_backend_namespace() -> None:
    out = render(UMBRELLA, FULL)
    role = out.get("Role", "gateway-api-gw")
    binding = out.get("RoleBinding", "gateway-api-gw")
    assert role["metadata"]["namespace"] == "dask-clusters"
    assert binding["metadata"]["namespace"] == "dask-clusters"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "dask-gateway-api", "namespace": NAMESPACE}
    ]
    assert pod_spec(out.deployment(API_DEPLOY))["serviceAccountName"] == "dask-gateway-api"


def test_rbac_can_be_left_to_the_operator() -> None:
    out = render(
        UMBRELLA,
        merge(
            DEFAULT,
            {
                "gateway": {
                    "rbac": {"create": False},
                    "serviceAccount": {"create": False, "name": "mine"},
                }
            },
        ),
    )
    assert not out.of_kind("Role") and not out.of_kind("RoleBinding")
    assert not out.of_kind("ServiceAccount")
    assert pod_spec(out.deployment(API_DEPLOY))["serviceAccountName"] == "mine"


# ---------------------------------------------------------------- pods


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_pods_are_locked_down(scenario: str) -> None:
    out = render(UMBRELLA, SCENARIOS[scenario])
    for deploy in out.of_kind("Deployment"):
        spec = pod_spec(deploy)
        name = deploy["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == 1000, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, name
            assert sc["runAsUser"] == 1000, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], name
        # Secret files are root-owned with group fsGroup: the group must be able to read.
        assert spec["securityContext"]["fsGroup"] == 1000, name
        for volume in volumes.values():
            if "secret" in volume:
                assert volume["secret"]["defaultMode"] & 0o040, (name, volume["name"])
            resources = container["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"], name
            assert resources["limits"]["cpu"] and resources["limits"]["memory"], name


@pytest.mark.parametrize(
    ("deployment", "liveness", "readiness", "port"),
    [
        (API_DEPLOY, "/api/health", "/api/health", "http"),
        (SCHED_DEPLOY, "/healthz", "/readyz", "admin"),
        (WEB_DEPLOY, "/healthz", "/readyz", "admin"),
    ],
)
def test_probes(deployment: str, liveness: str, readiness: str, port: str) -> None:
    out = render(UMBRELLA, DEFAULT)
    container = out.container(deployment)
    assert container["livenessProbe"]["httpGet"] == {"path": liveness, "port": port}
    assert container["readinessProbe"]["httpGet"] == {"path": readiness, "port": port}
    assert container["livenessProbe"]["failureThreshold"] >= 1
    assert port in {p["name"] for p in container["ports"]}


def test_api_probes_follow_the_prefix() -> None:
    container = render(UMBRELLA, FULL).container(API_DEPLOY)
    assert container["livenessProbe"]["httpGet"]["path"] == "/services/dask-gateway/api/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/services/dask-gateway/api/health"


def test_api_is_one_replica_recreated() -> None:
    out = render(UMBRELLA, SCALED)
    deploy = out.deployment(API_DEPLOY)
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}


# ---------------------------------------------------------------- secrets


def _secrets_of(values: dict) -> list[str]:
    secrets = [values["gateway"]["proxyToken"]]
    auth = values["gateway"].get("auth", {})
    if auth.get("type") == "jupyterhub":
        secrets.append(auth["jupyterhub"]["apiToken"])
    if auth.get("type") == "simple" and auth.get("simple", {}).get("password"):
        secrets.append(auth["simple"]["password"])
    return secrets + values["gateway"].get("encryptKeys", [])


def _leaks(out: Rendered, secrets: list[str]) -> list[str]:
    """``kind/name`` of every non-Secret object whose text holds one of ``secrets``."""
    leaks = []
    for doc in out.docs:
        if doc["kind"] != "Secret" and any(s in yaml.safe_dump(doc) for s in secrets):
            leaks.append(f"{doc['kind']}/{doc['metadata']['name']}")
    return leaks


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_no_secret_outside_secrets(scenario: str) -> None:
    values = SCENARIOS[scenario]
    out = render(UMBRELLA, values)
    secrets = _secrets_of(values)
    # They are all in the Secret ...
    assert set(secrets) <= set(out.secret_data("gateway-secret-gw").values())
    # ... and nowhere else: not in a ConfigMap, nor in any other object.
    assert out.of_kind("ConfigMap")
    assert _leaks(out, secrets) == []


def test_leak_detector_detects() -> None:
    # extraConfig is documented as "no secrets here": a secret put there lands in the
    # ConfigMap, and the check above would see it.
    out = render(UMBRELLA, merge(CLASSIC, {"gateway": {"extraConfig": {"leak": HUB_TOKEN}}}))
    assert _leaks(out, _secrets_of(CLASSIC)) == ["ConfigMap/gateway-api-gw"]


# ---------------------------------------------------------------- restarts


def _checksums(values: dict) -> dict[str, dict[str, str]]:
    out = render(UMBRELLA, values)
    return {
        name: {
            k: v for k, v in annotations(out.deployment(name)).items() if k.startswith("checksum/")
        }
        for name in ALL_DEPLOYS
    }


def test_checksum_annotations_present() -> None:
    sums = _checksums(DEFAULT)
    assert set(sums[API_DEPLOY]) == {"checksum/config", "checksum/secret"}
    assert set(sums[SCHED_DEPLOY]) == {"checksum/config"}
    assert set(sums[WEB_DEPLOY]) == {"checksum/config"}
    for per_deploy in sums.values():
        assert all(len(v) == 64 for v in per_deploy.values())


def test_checksums_change_with_config() -> None:
    base = _checksums(DEFAULT)
    setting = _checksums(merge(DEFAULT, {"gateway": {"userLimits": {"max_clusters": 2}}}))
    assert setting[API_DEPLOY]["checksum/config"] != base[API_DEPLOY]["checksum/config"]
    assert setting[API_DEPLOY]["checksum/secret"] == base[API_DEPLOY]["checksum/secret"]
    assert setting[SCHED_DEPLOY] == base[SCHED_DEPLOY]

    token = _checksums(merge(DEFAULT, {"gateway": {"proxyToken": "another-token"}}))
    assert token[API_DEPLOY]["checksum/secret"] != base[API_DEPLOY]["checksum/secret"]
    assert token[API_DEPLOY]["checksum/config"] == base[API_DEPLOY]["checksum/config"]

    sched = _checksums(merge(DEFAULT, {"schedulerProxy": {"connectTimeout": 3}}))
    assert sched[SCHED_DEPLOY] != base[SCHED_DEPLOY]
    assert sched[WEB_DEPLOY] == base[WEB_DEPLOY]
    assert sched[API_DEPLOY] == base[API_DEPLOY]

    web = _checksums(merge(DEFAULT, {"webProxy": {"tls": {"secretName": "t"}}}))
    assert web[WEB_DEPLOY] != base[WEB_DEPLOY]
    # Scaling is not a config change: no restart.
    scaled = _checksums(merge(DEFAULT, {"webProxy": {"replicas": 4}}))
    assert scaled == base


# ---------------------------------------------------------------- failures


def test_missing_proxy_token_fails_clearly() -> None:
    for values in ({}, {"gateway": {"proxyToken": ""}}):
        err = render_error(UMBRELLA, values)
        assert "proxyToken is required (gateway.proxyToken in the dask-gateway chart)" in err
        assert "openssl rand -hex 32" in err
    err = render_error(API, {})
    assert "proxyToken is required" in err


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (merge(DEFAULT, {"gateway": {"auth": {"type": "ldap"}}}), "/auth/type"),
        (merge(DEFAULT, {"gateway": {"proxyToken": "has space"}}), "/proxyToken"),
        (merge(DEFAULT, {"gateway": {"prefix": "no-slash"}}), "/prefix"),
        (
            merge(DEFAULT, {"gateway": {"backend": {"worker": {"cores": "2"}}}}),
            "/backend/worker/cores",
        ),
        (merge(DEFAULT, {"schedulerProxy": {"replica": 3}}), "'replica' not allowed"),
        (merge(DEFAULT, {"webProxy": {"service": {"type": "Ingress"}}}), "/service/type"),
        (merge(DEFAULT, {"webProxy": {"replicas": -1}}), "/replicas"),
    ],
)
def test_schema_rejects_bad_values(values: dict, message: str) -> None:
    err = render_error(UMBRELLA, values)
    assert "values don't meet the specifications of the schema" in err
    assert message in err


# ---------------------------------------------------------------- scaling


def test_replicas_honoured() -> None:
    out = render(UMBRELLA, SCALED)
    for deploy in (SCHED_DEPLOY, WEB_DEPLOY):
        assert out.deployment(deploy)["spec"]["replicas"] == 3
        strategy = out.deployment(deploy)["spec"]["strategy"]
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0
        pdb = out.get("PodDisruptionBudget", deploy)
        assert pdb["spec"]["minAvailable"] == 1
        assert pdb["spec"]["selector"]["matchLabels"].items() <= (
            out.deployment(deploy)["spec"]["template"]["metadata"]["labels"].items()
        )
    assert not out.of_kind("HorizontalPodAutoscaler")
    assert render(UMBRELLA, DEFAULT).deployment(SCHED_DEPLOY)["spec"]["replicas"] == 1
    assert not render(UMBRELLA, DEFAULT).of_kind("PodDisruptionBudget")


def test_autoscaling() -> None:
    out = render(UMBRELLA, AUTOSCALED)
    for deploy in (SCHED_DEPLOY, WEB_DEPLOY):
        # The HPA owns the replica count: the Deployment must not fight it on upgrade.
        assert "replicas" not in out.deployment(deploy)["spec"]
        hpa = out.get("HorizontalPodAutoscaler", deploy)
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": deploy,
        }
        assert hpa["spec"]["minReplicas"] == 3
        assert hpa["spec"]["maxReplicas"] == 9
        [metric] = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
    sched_pdb = out.get("PodDisruptionBudget", SCHED_DEPLOY)["spec"]
    assert sched_pdb["maxUnavailable"] == 1 and "minAvailable" not in sched_pdb


def test_parts_can_be_disabled() -> None:
    out = render(UMBRELLA, merge(DEFAULT, {"webProxy": {"enabled": False}}))
    assert [d["metadata"]["name"] for d in out.of_kind("Deployment")] == [API_DEPLOY, SCHED_DEPLOY]
    assert not [s for s in out.of_kind("Service") if s["metadata"]["name"].startswith("web-")]


# ---------------------------------------------------------------- each part alone


def test_api_alone() -> None:
    out = render(API, {"proxyToken": TOKEN}, release="gw-api")
    assert sorted(d["metadata"]["name"] for d in out.of_kind("Service")) == ["gateway-api-gw-api"]
    assert out.get("ConfigMap", "gateway-api-gw-api")["data"]["routes-url"] == (
        "http://gateway-api-gw-api:8001/api/v1/routes"
    )
    assert out.secret_data("gateway-secret-gw-api") == {"proxy-token": TOKEN}
    assert [d["metadata"]["name"] for d in out.of_kind("Deployment")] == ["gateway-api-gw-api"]


def test_scheduler_proxy_alone_follows_another_release() -> None:
    out = render(SCHED, {"gateway": {"release": "gw-api"}, "replicas": 2}, release="gw-sched")
    assert sorted(s["metadata"]["name"] for s in out.of_kind("Service")) == [
        "scheduler-api-gw-sched",
        "scheduler-public-gw-sched",
    ]
    deploy = out.deployment("scheduler-proxy-gw-sched")
    assert deploy["spec"]["replicas"] == 2
    container = out.container("scheduler-proxy-gw-sched")
    [env] = container["env"]
    assert env["valueFrom"]["configMapKeyRef"]["name"] == "gateway-api-gw-api"
    volumes = {v["name"]: v for v in pod_spec(deploy)["volumes"]}
    assert volumes["proxy-token"]["secret"]["secretName"] == "gateway-secret-gw-api"
    assert not out.of_kind("Secret") and not out.of_kind("ConfigMap")


def test_web_proxy_alone_with_an_explicit_api() -> None:
    out = render(
        WEB,
        {
            "gateway": {
                "apiUrl": "http://gateway-api-other.dask:8001/api/v1/routes",
                "proxyTokenSecret": {"name": "my-token", "key": "token"},
            }
        },
        release="gw-web",
    )
    assert sorted(s["metadata"]["name"] for s in out.of_kind("Service")) == [
        "web-api-gw-web",
        "web-public-gw-web",
    ]
    container = out.container("web-proxy-gw-web")
    [env] = container["env"]
    assert env == {
        "name": "DASK_GATEWAY_ROUTES_URL",
        "value": "http://gateway-api-other.dask:8001/api/v1/routes",
    }
    volumes = {v["name"]: v for v in pod_spec(out.deployment("web-proxy-gw-web"))["volumes"]}
    assert volumes["proxy-token"]["secret"]["secretName"] == "my-token"
    assert volumes["proxy-token"]["secret"]["items"] == [{"key": "token", "path": "token"}]


def test_long_release_names_are_cut_to_dns_labels() -> None:
    release = "a" * 53  # Helm's own limit
    out = render(UMBRELLA, DEFAULT, release=release)
    for doc in out.docs:
        assert len(doc["metadata"]["name"]) <= 63
    service = f"gateway-api-{release}"[:63]
    out.deployment(service)
    config = yaml.safe_load(out.get("ConfigMap", service)["data"]["config.yaml"])
    assert config["internal_url"].startswith(f"http://{service}.")
    web_public = [
        s for s in out.of_kind("Service") if s["metadata"]["name"].startswith("web-public-")
    ]
    assert len(web_public) == 1
