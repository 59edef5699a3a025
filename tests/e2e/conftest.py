"""pytest hooks of the end-to-end suite (the helpers live in ``harness.py``).

* every test runs under a :data:`~tests.e2e.harness.TEST_DEADLINE` SIGALRM deadline;
* a failed test's report carries the tail of each running gateway's three service logs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

from tests.e2e.harness import ACTIVE, TEST_DEADLINE, attach_service_logs, client_test_guard


@pytest.fixture(autouse=True)
def _test_deadline(request: pytest.FixtureRequest) -> Iterator[None]:
    """Run the test under its deadline, with cyclic GC only on the main thread (see
    :func:`~tests.e2e.harness.client_test_guard` for why)."""
    with client_test_guard(request.node.name, TEST_DEADLINE):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    attach_service_logs(outcome.get_result(), ACTIVE, 60)


#: The official client's ``Gateway.__del__`` calls ``close()`` again after an explicit
#: close; with distributed 2026.8 that raises inside ``__del__`` (a client quirk, not ours).
GATEWAY_DEL_QUIRK = (
    "ignore:Exception ignored in. <function Gateway.__del__:pytest.PytestUnraisableExceptionWarning"
)


def pytest_configure(config: pytest.Config) -> None:
    # Session-wide on purpose: closed clients are also collected after the last test.
    config.addinivalue_line("filterwarnings", GATEWAY_DEL_QUIRK)
    warnings.filterwarnings(
        "ignore",
        message=r"Exception ignored in. <function Gateway.__del__",
        category=pytest.PytestUnraisableExceptionWarning,
    )
