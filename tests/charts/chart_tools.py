"""Helpers for the chart checks: run the real Helm, kubernetes-validate and hadolint.

The tools come from the virtualenv running pytest (``make install-test`` puts them there;
Helm via tools/install_helm.py). A missing tool fails the test with that advice, never
skips it. Renders are cached per (chart, values, release, namespace) so that the many
assertions on one value set cost one ``helm template``.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHARTS = REPO / "charts"
UMBRELLA = "dask-gateway"
API = "dask-gateway-api"
SCHED = "dask-gateway-scheduler-proxy"
WEB = "dask-gateway-web-proxy"
ALL_CHARTS = (UMBRELLA, API, SCHED, WEB)

RELEASE = "gw"
NAMESPACE = "dask"
K8S_VERSION = "1.33.0"
TIMEOUT = 120

# Recognisable secrets: a test fails if any shows up outside a Secret.
TOKEN = "7f0c1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7"
HUB_TOKEN = "hubtoken0123456789abcdef0123456789abcdef0123456789abcdef01234567"
PASSWORD = "s3cret-simple-password-1234"
FERNET_KEY = "Y2hhcnQtdGVzdHMtZmVybmV0LWtleS0zMi1ieXRlcyE="  # a valid Fernet key (32 bytes)

DEFAULT: dict[str, Any] = {"gateway": {"proxyToken": TOKEN}}
CLASSIC: dict[str, Any] = {
    "gateway": {
        "proxyToken": TOKEN,
        "auth": {"type": "jupyterhub", "jupyterhub": {"apiToken": HUB_TOKEN}},
    }
}
SCALED: dict[str, Any] = {
    "gateway": {"proxyToken": TOKEN},
    "schedulerProxy": {"replicas": 3, "podDisruptionBudget": {"enabled": True}},
    "webProxy": {"replicas": 3, "podDisruptionBudget": {"enabled": True}},
}
AUTOSCALED: dict[str, Any] = {
    "gateway": {"proxyToken": TOKEN},
    "schedulerProxy": {
        "replicas": 3,
        "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 9},
        "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1},
    },
    "webProxy": {
        "replicas": 3,
        "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 9},
        "podDisruptionBudget": {"enabled": True},
    },
}
#: Every optional branch of the templates at once.
FULL: dict[str, Any] = {
    "gateway": {
        "proxyToken": TOKEN,
        "encryptKeys": [FERNET_KEY],
        "prefix": "/services/dask-gateway/",
        "publicUrl": "https://dask.example.com",
        "logLevel": "DEBUG",
        "auth": {"type": "simple", "simple": {"password": PASSWORD}},
        "backend": {
            "namespace": "dask-clusters",
            "imagePullSecrets": ["regcred"],
            "serviceAccount": "dask-pods",
            "nodeSelector": {"pool": "dask"},
            "tolerations": [{"key": "dask", "operator": "Exists", "effect": "NoSchedule"}],
            "environment": {"OMP_NUM_THREADS": "1"},
            "scheduler": {"cores": 2, "memory": "4 G"},
            "worker": {"cores": 4, "memory": "8 G", "threads": 2},
            "kubernetes": {"api_concurrency": 8},
        },
        "cluster": {"idle_timeout": 3600, "cluster_max_workers": 8},
        "userLimits": {"max_clusters": 4, "max_cores": 16},
        "clusterOptions": {
            "fields": [
                {"field": "worker_cores", "type": "integer", "default": 1, "min": 1, "max": 4},
                {
                    "field": "worker_memory",
                    "type": "select",
                    "default": "2 GiB",
                    "options": ["1 GiB", "2 GiB", "4 GiB"],
                },
            ]
        },
        "extraConfig": {"stopped_record_max_age": 600},
        "imagePullSecrets": ["regcred"],
        "serviceAccount": {"name": "dask-gateway-api", "annotations": {"a": "b"}},
        "service": {"annotations": {"example.com/owner": "data"}},
        "podAnnotations": {"team": "data"},
        "nodeSelector": {"pool": "system"},
        "extraEnv": [{"name": "EXTRA", "value": "1"}],
        "priorityClassName": "high",
    },
    "schedulerProxy": {
        "replicas": 2,
        "workers": 2,
        "extraArgs": ["--log-level=DEBUG"],
        "service": {
            "type": "NodePort",
            "nodePort": 30786,
            "externalTrafficPolicy": "Local",
            "annotations": {"lb": "nlb"},
        },
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "sched"}},
            }
        ],
        "imagePullSecrets": ["regcred"],
        "priorityClassName": "high",
    },
    "webProxy": {
        "tls": {"secretName": "web-tls"},
        "service": {
            "port": 443,
            "loadBalancerIP": "203.0.113.20",
            "loadBalancerSourceRanges": ["10.0.0.0/8"],
        },
        "affinity": {"podAntiAffinity": {}},
    },
}
KERBEROS: dict[str, Any] = {
    "gateway": {
        "proxyToken": TOKEN,
        "auth": {"type": "kerberos", "kerberos": {"keytab": "not-a-real-keytab"}},
    }
}

#: Named umbrella value sets, rendered and validated by the tests.
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": DEFAULT,
    "classic": CLASSIC,
    "scaled": SCALED,
    "autoscaled": AUTOSCALED,
    "full": FULL,
    "kerberos": KERBEROS,
}
#: Each sub-chart alone: (chart, values).
STANDALONE: dict[str, tuple[str, dict[str, Any]]] = {
    "api-alone": (API, {"proxyToken": TOKEN}),
    "scheduler-proxy-alone": (SCHED, {"gateway": {"release": "gw-api"}, "replicas": 2}),
    "web-proxy-alone": (
        WEB,
        {
            "gateway": {
                "apiUrl": "http://gateway-api-other.dask:8001/api/v1/routes",
                "proxyTokenSecret": {"name": "my-token", "key": "token"},
            }
        },
    ),
}


def tool(name: str) -> str:
    """Path of a tool installed in the virtualenv running the tests, or fail the test."""
    path = Path(sys.prefix) / "bin" / name
    if not path.is_file():
        pytest.fail(
            f"{name} not found at {path}: run `make install-test` "
            "(it installs Helm with tools/install_helm.py and the other test tools)",
            pytrace=False,
        )
    return str(path)


def run(cmd: list[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd or REPO, check=False
    )


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return run([tool("helm"), *args])


@dataclass
class Rendered:
    """The output of one ``helm template``: raw text and parsed documents."""

    text: str
    docs: list[dict[str, Any]] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}: {self.names()}"
        return found[0]

    def names(self) -> list[str]:
        return [f"{d['kind']}/{d['metadata']['name']}" for d in self.docs]

    def deployment(self, name: str) -> dict[str, Any]:
        return self.get("Deployment", name)

    def container(self, deployment: str) -> dict[str, Any]:
        containers = self.deployment(deployment)["spec"]["template"]["spec"]["containers"]
        assert len(containers) == 1
        return containers[0]

    def api_config(self, release: str = RELEASE) -> dict[str, Any]:
        cm = self.get("ConfigMap", f"gateway-api-{release}")
        return yaml.safe_load(cm["data"]["config.yaml"])

    def secret_data(self, name: str) -> dict[str, str]:
        data = self.get("Secret", name)["data"]
        return {k: base64.b64decode(v).decode() for k, v in data.items()}


class RenderError(Exception):
    def __init__(self, stderr: str) -> None:
        super().__init__(stderr)
        self.stderr = stderr


_cache: dict[str, Rendered] = {}


def _template(
    chart: str, values: dict[str, Any], release: str, namespace: str
) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as tmp:
        values_file = Path(tmp) / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        return helm(
            "template",
            release,
            str(CHARTS / chart),
            "--namespace",
            namespace,
            "--kube-version",
            K8S_VERSION,
            "-f",
            str(values_file),
        )


def render(
    chart: str = UMBRELLA,
    values: dict[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> Rendered:
    """``helm template`` the chart with these values; raises RenderError on failure."""
    values = values or {}
    key = json.dumps([chart, values, release, namespace], sort_keys=True)
    if key not in _cache:
        result = _template(chart, values, release, namespace)
        if result.returncode != 0:
            raise RenderError(result.stderr)
        docs = [d for d in yaml.safe_load_all(result.stdout) if d]
        _cache[key] = Rendered(result.stdout, docs)
    return _cache[key]


def render_error(chart: str, values: dict[str, Any], **kwargs: str) -> str:
    """The stderr of a rendering that must fail."""
    try:
        render(chart, values, **kwargs)
    except RenderError as exc:
        return exc.stderr
    raise AssertionError(f"rendering {chart} with {values} succeeded but should have failed")


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of two value trees (``extra`` wins); the inputs are not modified."""
    out = json.loads(json.dumps(base))
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def annotations(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"].get("annotations", {})


def render_notes(chart: str, values: dict[str, Any], *, release: str = RELEASE) -> str:
    """The chart's NOTES.txt as `helm install` would print it.

    `helm template` never renders NOTES.txt and `helm install --dry-run` needs a cluster, so
    render it from a copy of the chart where the same text is wrapped in a ConfigMap.
    """
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / chart
        shutil.copytree(CHARTS / chart, copy)
        notes = (copy / "templates" / "NOTES.txt").read_text()
        (copy / "templates" / "_notes_under_test.tpl").write_text(
            '{{- define "notes-under-test" -}}\n' + notes + "{{- end -}}\n"
        )
        (copy / "templates" / "notes-under-test.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-under-test\n"
            'data:\n  notes: {{ include "notes-under-test" . | quote }}\n'
        )
        values_file = Path(tmp) / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        result = helm(
            "template",
            release,
            str(copy),
            "--namespace",
            NAMESPACE,
            "-f",
            str(values_file),
            "--show-only",
            "templates/notes-under-test.yaml",
        )
    if result.returncode != 0:
        raise RenderError(result.stderr)
    return yaml.safe_load(result.stdout)["data"]["notes"]
