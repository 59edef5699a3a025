"""pytest hooks of the end-to-end suite (the helpers live in ``harness.py``).

* every test runs under a :data:`~tests.e2e.harness.TEST_DEADLINE` SIGALRM deadline;
* a failed test's report carries the tail of each running gateway's three service logs.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator

import pytest

from tests.e2e.harness import ACTIVE, TEST_DEADLINE, time_limit


@pytest.fixture(autouse=True)
def _test_deadline(request: pytest.FixtureRequest) -> Iterator[None]:
    """Run the test under its deadline, with cyclic GC only on the main thread.

    The official client deadlocks if a ``Gateway`` it leaked (e.g. the one inside a
    ``GatewayCluster`` whose start failed) is finalized on the shared client loop thread:
    ``Gateway.__del__`` -> ``close()`` -> ``sync()`` waits on that very loop. Automatic
    collection is therefore off during a test and garbage is collected here, on the main
    thread, where ``close()`` works.
    """
    gc.collect()
    gc.disable()
    try:
        with time_limit(TEST_DEADLINE, f"test {request.node.name}"):
            yield
    finally:
        try:
            with time_limit(30, "collecting the test's client objects"):
                gc.collect()
        finally:
            gc.enable()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for local in ACTIVE:
            for name in ("api", "web-proxy", "scheduler-proxy"):
                report.sections.append(
                    (f"{local.workdir.name}: {name} log (tail)", local.log_tail(name, 60))
                )


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
