"""Fixtures of the emulator's own tests: a fresh emulator per test and a hard deadline.

Synchronous tests run under a SIGALRM deadline (:data:`TEST_DEADLINE`); trio tests put
``trio.fail_after`` around their waits instead (an exception raised from a signal handler
must not land inside trio's scheduler).
"""

from __future__ import annotations

import inspect
import signal
from collections.abc import Iterator
from types import FrameType

import pytest
from kubernetes import client

from tests.k8s_emulator import KubeEmulator

TEST_DEADLINE = 60


class DeadlineExceeded(Exception):
    pass


@pytest.fixture(autouse=True)
def _deadline(request: pytest.FixtureRequest) -> Iterator[None]:
    if inspect.iscoroutinefunction(request.function):
        yield
        return

    def expire(signum: int, frame: FrameType | None) -> None:
        raise DeadlineExceeded(f"{request.node.name} ran over {TEST_DEADLINE}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, TEST_DEADLINE)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    with KubeEmulator() as emulator:
        yield emulator


@pytest.fixture
def api(kube: KubeEmulator) -> Iterator[client.CoreV1Api]:
    api_client = kube.api_client()
    try:
        yield client.CoreV1Api(api_client)
    finally:
        api_client.close()


@pytest.fixture
def kubelet_kube() -> Iterator[KubeEmulator]:
    with KubeEmulator(kubelet=True) as emulator:
        yield emulator


@pytest.fixture
def kapi(kubelet_kube: KubeEmulator) -> Iterator[client.CoreV1Api]:
    api_client = kubelet_kube.api_client()
    try:
        yield client.CoreV1Api(api_client)
    finally:
        api_client.close()
