"""pytest hooks of the Kubernetes backend tests (helpers live in ``harness.py``).

* synchronous tests (the official client's scenarios) run under a SIGALRM deadline, with
  cyclic GC only on the main thread (see ``tests/e2e/conftest.py`` for why); trio tests put
  ``trio.fail_after`` around their waits instead;
* a failed test's report carries the tail of each running gateway's service logs.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator

import pytest

from tests.e2e.harness import attach_service_logs, client_test_guard
from tests.kube.harness import ACTIVE, TEST_DEADLINE


@pytest.fixture(autouse=True)
def _test_deadline(request: pytest.FixtureRequest) -> Iterator[None]:
    if inspect.iscoroutinefunction(request.function):
        yield
        return
    with client_test_guard(request.node.name, TEST_DEADLINE):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    attach_service_logs(outcome.get_result(), ACTIVE, 80)


def pytest_configure(config: pytest.Config) -> None:
    # The official client's Gateway.__del__ closes again after an explicit close; with
    # distributed 2026.8 that raises inside __del__ (a client quirk, not ours).
    config.addinivalue_line(
        "filterwarnings",
        "ignore:Exception ignored in. <function Gateway.__del__"
        ":pytest.PytestUnraisableExceptionWarning",
    )
    warnings.filterwarnings(
        "ignore",
        message=r"Exception ignored in. <function Gateway.__del__",
        category=pytest.PytestUnraisableExceptionWarning,
    )
