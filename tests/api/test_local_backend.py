"""Local backend: commands and environment (pure), then real processes.

Most process tests launch a tiny Python sleeper as the "scheduler" (the §5.1 flags are
appended and ignored) so they run in milliseconds; the full scheduler-with-preload path
is covered by the manager/app integration test.
"""

from __future__ import annotations

import os
import stat
import sys

import pytest
import trio

from dask_gateway_api.backends import BackendError, ClusterLaunch
from dask_gateway_api.backends.local import (
    _proc_starttime,
    boot_id,
    cmdline_matches,
    default_scheduler_cmd,
    open_local_backend,
    parse_proc_stat,
    process_environment,
    resolve_program,
    same_process_alive,
    scheduler_command,
    worker_command,
)

SLEEPER = (sys.executable, "-c", "import time; time.sleep(60)")
STUBBORN = (
    sys.executable,
    "-c",
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
    " sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(60)",
)


def make_launch(**kw: object) -> ClusterLaunch:
    base: dict[str, object] = dict(
        name="abc123",
        username="alice",
        api_url="http://127.0.0.1:9/api",
        token="s3cret-token",
        tls_cert=b"CERT",
        tls_key=b"KEY",
        scheduler_cmd=SLEEPER,
        worker_cmd=SLEEPER,
        environment={"FOO": "bar", "DASK_GATEWAY_CLUSTER_NAME": "spoofed"},
        worker_threads=2,
        worker_memory=1024**3,
        heartbeat_period=15,
        adaptive_period=3.0,
        idle_timeout=0.5,
    )
    base.update(kw)
    return ClusterLaunch(**base)  # type: ignore[arg-type]


def test_scheduler_command_is_spec_exact() -> None:
    launch = make_launch(scheduler_cmd=("dask", "scheduler"))
    assert scheduler_command(launch) == [
        "dask",
        "scheduler",
        "--protocol",
        "tls",
        "--port",
        "0",
        "--host",
        "127.0.0.1",
        "--dashboard-address",
        "127.0.0.1:0",
        "--preload",
        "dask_gateway.scheduler_preload",
        "--dg-api-address",
        "127.0.0.1:0",
        "--dg-heartbeat-period",
        "15",
        "--dg-adaptive-period",
        "3",
        "--dg-idle-timeout",
        "0.5",
    ]
    default = scheduler_command(make_launch(scheduler_cmd=()))
    assert tuple(default[:3]) == default_scheduler_cmd()


def test_worker_command_is_spec_exact() -> None:
    launch = make_launch(worker_cmd=("dask", "worker"))
    assert worker_command(launch, "tls://127.0.0.1:1234", "w1") == [
        "dask",
        "worker",
        "tls://127.0.0.1:1234",
        "--dashboard-address",
        "127.0.0.1:0",
        "--name",
        "w1",
        "--nthreads",
        "2",
        "--memory-limit",
        str(1024**3),
    ]


def test_environment_gateway_vars_win_and_inherit_only_listed() -> None:
    parent = {"PATH": "/bin", "SECRET_OF_API": "x", "LANG": "C.UTF-8"}
    env = process_environment(
        make_launch(),
        role="worker",
        cert_path="/d/dask.crt",
        key_path="/d/dask.pem",
        token_path="/d/api-token",
        parent_env=parent,
    )
    assert env["PATH"] == "/bin" and env["LANG"] == "C.UTF-8"
    assert "SECRET_OF_API" not in env
    assert env["FOO"] == "bar"
    assert env["DASK_GATEWAY_CLUSTER_NAME"] == "abc123"
    assert env["DASK_GATEWAY_API_URL"] == "http://127.0.0.1:9/api"
    assert env["DASK_GATEWAY_API_TOKEN"] == "/d/api-token"
    assert env["USER"] == "alice"
    assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
    assert env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"] == "/d/dask.crt"
    assert env["DASK_DISTRIBUTED__COMM__TLS__WORKER__CERT"] == "/d/dask.crt"
    assert env["DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY"] == "/d/dask.pem"
    assert not any("SCHEDULER" in k for k in env)
    with pytest.raises(ValueError):
        process_environment(
            make_launch(), role="x", cert_path="", key_path="", token_path="", parent_env={}
        )


def test_resolve_program_prefers_the_interpreters_bin_dir(tmp_path) -> None:
    bin_dir = os.path.dirname(sys.executable)
    assert resolve_program(["dask", "scheduler"], "") == [
        os.path.join(bin_dir, "dask"),
        "scheduler",
    ]
    assert resolve_program(["/abs/prog", "x"], "/usr/bin") == ["/abs/prog", "x"]
    assert resolve_program(["no-such-program-xyz"], "/usr/bin") == ["no-such-program-xyz"]
    assert resolve_program(["sh"], "/bin:/usr/bin")[0].endswith("/sh")
    assert resolve_program([], None) == []


def test_proc_parsing() -> None:
    line = "123 (weird) name) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 4242 99 100"
    assert parse_proc_stat(line) == ("S", 4242)
    assert parse_proc_stat("garbage") is None
    assert parse_proc_stat("1 (x) S 1 2") is None
    assert cmdline_matches(
        b"/usr/bin/python\0/bin/dask\0worker\0--name\0w\0", ["worker", "--name", "w"]
    )
    assert not cmdline_matches(b"python\0other\0", ["worker"])
    assert not cmdline_matches(b"a\0", ["a", "b", "c"])


def test_same_process_alive_rejects_bad_states() -> None:
    assert not same_process_alive({})
    assert not same_process_alive({"pid": "1"})
    assert not same_process_alive({"pid": -5})
    me = os.getpid()
    assert same_process_alive({"pid": me})
    assert not same_process_alive({"pid": me, "starttime": -1})  # recycled pid
    assert not same_process_alive({"pid": me, "argv_tail": ["definitely-not-me"]})
    # With a start time, identity no longer depends on the command line (which a process
    # may rewrite, e.g. setproctitle), but a different boot is never the same process.
    me_state = {"pid": me, "starttime": _proc_starttime(me), "argv_tail": ["rewritten"]}
    assert same_process_alive(me_state)
    assert same_process_alive(dict(me_state, boot_id=boot_id()))
    assert not same_process_alive(dict(me_state, boot_id="another-boot"))


async def test_start_files_liveness_and_stop(tmp_path) -> None:
    with trio.fail_after(15):
        async with open_local_backend(
            tmp_path / "clusters", stop_grace=2, fork_server=False
        ) as backend:
            launch = make_launch()
            state = await backend.start_scheduler(launch)
            workdir = tmp_path / "clusters" / "abc123"
            assert stat.S_IMODE(os.stat(workdir).st_mode) == 0o700
            for name, content in (("dask.crt", b"CERT"), ("dask.pem", b"KEY")):
                path = workdir / ".certs" / name
                assert path.read_bytes() == content
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            token_file = workdir / ".certs" / "api-token"
            assert token_file.read_text() == "s3cret-token"
            assert (workdir / "logs" / "scheduler.log").exists()
            assert "s3cret" not in repr(launch)
            assert backend.is_alive(state)
            assert isinstance(state["starttime"], int)
            assert state["boot_id"] == boot_id() and boot_id()
            # It runs in its own session, away from the API's process group.
            assert os.getsid(state["pid"]) == state["pid"]

            worker = await backend.start_worker(
                make_launch(scheduler_address="tls://127.0.0.1:1"), "w-1"
            )
            assert (workdir / "logs" / "worker-w-1.log").exists()
            assert backend.is_alive(worker)

            await backend.stop_worker("abc123", "w-1", worker)
            assert not backend.is_alive(worker)
            await backend.stop_cluster("abc123", state, {"w-1": worker})
            assert not backend.is_alive(state)
            assert not (workdir / ".certs").exists()
            assert (workdir / "logs").exists()
            await backend.forget_cluster("abc123")
            assert not workdir.exists()


async def test_worker_needs_scheduler_address_and_safe_names(tmp_path) -> None:
    with trio.fail_after(10):
        async with open_local_backend(tmp_path, fork_server=False) as backend:
            with pytest.raises(BackendError, match="no scheduler address"):
                await backend.start_worker(make_launch(), "w1")
            with pytest.raises(BackendError, match="unsafe"):
                await backend.start_worker(make_launch(scheduler_address="tls://x:1"), "../x")
            with pytest.raises(BackendError, match="unsafe"):
                await backend.start_scheduler(make_launch(name="../../etc"))


async def test_bad_command_is_a_backend_error(tmp_path) -> None:
    with trio.fail_after(10):
        async with open_local_backend(tmp_path, fork_server=False) as backend:
            launch = make_launch(scheduler_cmd=("/nonexistent/dask-scheduler",))
            with pytest.raises(BackendError, match="cannot start"):
                await backend.start_scheduler(launch)


async def test_processes_survive_backend_close_and_are_readopted(tmp_path) -> None:
    with trio.fail_after(15):
        async with open_local_backend(tmp_path, fork_server=False) as first:
            state = await first.start_scheduler(make_launch())
        # The first API "run" is gone; its process must not be.
        assert same_process_alive(state)
        async with open_local_backend(tmp_path, stop_grace=2, fork_server=False) as second:
            assert second.adopt(state)
            assert not second.adopt(dict(state, starttime=state["starttime"] + 1))
            await second.stop_cluster("abc123", state, {})
            assert not second.is_alive(state)
            assert not second.adopt(state)


async def test_stubborn_process_is_killed_after_grace(tmp_path) -> None:
    with trio.fail_after(15):
        async with open_local_backend(tmp_path, stop_grace=0.3, fork_server=False) as backend:
            launch = make_launch(scheduler_cmd=STUBBORN)
            state = await backend.start_scheduler(launch)
            log = tmp_path / "abc123" / "logs" / "scheduler.log"
            # Wait until the SIGTERM handler is installed (the process says so).
            while b"ready" not in log.read_bytes():  # noqa: ASYNC110
                await trio.sleep(0.01)
            await backend.stop_cluster("abc123", state, {})
            assert not backend.is_alive(state)
