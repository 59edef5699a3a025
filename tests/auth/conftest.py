"""Fixtures of the authentication suite: a real JupyterHub and a real MIT KDC.

Both are session-scoped (started once, a few seconds for the hub, well under a second for
the realm) and skip -- with the precise reason -- only when a piece is not installed
(``make install-test`` installs everything: ``requirements/test.txt`` and
``tools/install_auth_deps.sh``). Synchronous tests (the official client) run under the e2e
harness's SIGALRM deadline; trio tests use ``trio.fail_after``. Failure reports carry the
tails of the hub, KDC and gateway logs; measurements are printed in the terminal summary.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.auth.hub import BIN, RealHub
from tests.auth.kdc import TempRealm, missing_tools
from tests.auth.measure import MEASUREMENTS, record
from tests.e2e.harness import ACTIVE, time_limit

#: Deadline of one synchronous test (real gateways, a dask cluster at most).
SYNC_TEST_DEADLINE = 150.0

_STARTED: dict[str, RealHub | TempRealm] = {}

INSTALL_HINT = (
    "run `make install-test` (pip -r requirements/test.txt; bash tools/install_auth_deps.sh)"
)


@pytest.fixture(autouse=True)
def _sync_deadline(request: pytest.FixtureRequest) -> Iterator[None]:
    if inspect.iscoroutinefunction(request.function):
        yield  # trio tests carry their own trio.fail_after
        return
    with time_limit(SYNC_TEST_DEADLINE, f"test {request.node.name}"):
        yield


def hub_unavailable() -> str | None:
    if not (BIN / "jupyterhub").exists():
        return f"JupyterHub is not installed ({BIN / 'jupyterhub'} missing): {INSTALL_HINT}"
    return None


def kerberos_unavailable() -> str | None:
    missing = missing_tools()
    if missing:
        return f"MIT Kerberos tools not installed ({', '.join(missing)} missing): {INSTALL_HINT}"
    for module, package in (("gssapi", "gssapi"), ("kerberos", "pykerberos")):
        if importlib.util.find_spec(module) is None:
            return f"Python package {package} (import {module}) not installed: {INSTALL_HINT}"
    return None


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealHub]:
    reason = hub_unavailable()
    if reason:
        pytest.skip(reason)
    real = RealHub(tmp_path_factory.mktemp("jupyterhub"))
    with time_limit(90, "starting JupyterHub"):
        real.start(timeout=60)
    record("JupyterHub fixture start (process to /hub/health 200)", real.start_seconds, "s")
    _STARTED["jupyterhub"] = real
    try:
        real.create_user("alice", groups=("analysts",))
        real.create_user("bob")
        real.create_user("root")
        yield real
    finally:
        _STARTED.pop("jupyterhub", None)
        real.stop()


@pytest.fixture(scope="session")
def realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TempRealm]:
    """The realm, with ``KRB5_CONFIG`` etc. set in this process (restored afterwards)."""
    reason = kerberos_unavailable()
    if reason:
        pytest.skip(reason)
    temp = TempRealm(
        tmp_path_factory.mktemp("krb5"),
        users={"alice": "alice-pw", "bob": "bob-pw"},
        service_hosts=("127.0.0.1", "other.test"),
    )
    with time_limit(60, "starting the KDC"):
        temp.start()
    record("MIT KDC fixture start (realm + principals + keytab + krb5kdc)", temp.start_seconds, "s")
    _STARTED["kdc"] = temp
    saved = {name: os.environ.get(name) for name in (*temp.env, "KRB5CCNAME")}
    os.environ.update(temp.env)
    try:
        yield temp
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _STARTED.pop("kdc", None)
        temp.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed or not str(item.path).startswith(str(Path(__file__).parent)):
        return
    for name, service in _STARTED.items():
        report.sections.append((f"{name} log (tail)", service.log_tail()))
    for local in ACTIVE:
        for name in ("api", "web-proxy", "scheduler-proxy"):
            report.sections.append(
                (f"{local.workdir.name}: {name} log (tail)", local.log_tail(name, 60))
            )


#: The official client's ``Gateway.__del__`` calls ``close()`` again after an explicit close;
#: with distributed 2026.8 that raises inside ``__del__`` (a client quirk, not ours). It is
#: reported when the garbage collector runs, possibly after the last test.
GATEWAY_DEL_QUIRK = (
    "ignore:Exception ignored in. <function Gateway.__del__:pytest.PytestUnraisableExceptionWarning"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("filterwarnings", GATEWAY_DEL_QUIRK)
    warnings.filterwarnings(
        "ignore",
        message=r"Exception ignored in. <function Gateway.__del__",
        category=pytest.PytestUnraisableExceptionWarning,
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not MEASUREMENTS:
        return
    terminalreporter.section("authentication measurements")
    for name, (value, unit) in MEASUREMENTS.items():
        shown = f"{value * 1000:.2f} ms" if unit == "s" and value < 1 else f"{value:.2f} {unit}"
        terminalreporter.write_line(f"{name}: {shown}")
    sys.stdout.flush()
