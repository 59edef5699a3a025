"""Kubernetes API server + kubelet emulators for tests (see README.md).

``from tests.k8s_emulator import KubeEmulator``::

    with KubeEmulator(kubelet=True) as kube:
        api = kubernetes.client.CoreV1Api(kube.api_client())
        ...
"""

from .apiserver import FaultRule, KubeEmulator, RequestRecord
from .errors import ApiError
from .kubelet import Kubelet, PodMatch, default_base_env
from .selectors import parse_field_selector, parse_label_selector
from .store import Store, Watcher, WatchEvent
from .waiting import poll_until

__all__ = [
    "ApiError",
    "FaultRule",
    "KubeEmulator",
    "Kubelet",
    "PodMatch",
    "RequestRecord",
    "Store",
    "WatchEvent",
    "Watcher",
    "default_base_env",
    "parse_field_selector",
    "parse_label_selector",
    "poll_until",
]
