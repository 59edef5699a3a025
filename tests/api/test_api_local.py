"""The real thing: the API in-process with the local backend, a real ``dask scheduler``
with the official preload, and a real ``dask worker``.

One scenario, end to end over loopback: create a cluster with raw HTTP, see the
scheduler's first heartbeat make it RUNNING with its routes on the route feed, scale to
one worker and see it join, restart the API and find the cluster again, stop it and see
every process gone.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from functools import partial

import pytest
import trio

from dask_gateway_api.config import settings_from_mapping
from dask_gateway_api.main import serve_api
from dask_gateway_common.http import HTTPClient

pytestmark = pytest.mark.slow

TOKEN = "proxy-token-for-local-tests"
AUTH = ("Authorization", "Basic " + base64.b64encode(b"alice:x").decode())


def make_settings(tmp_path, port: int = 0):  # type: ignore[no-untyped-def]
    return settings_from_mapping(
        {
            "address": f"127.0.0.1:{port}",
            "db_path": str(tmp_path / "gateway.sqlite"),
            "backend": {"workdir": str(tmp_path / "clusters"), "stop_grace": 5},
            "cluster": {
                "heartbeat_period": 1,
                "heartbeat_timeout": 60,
                "worker_memory": "1 G",
                "start_timeout": 60,
            },
        },
        {"DASK_GATEWAY_PROXY_TOKEN": TOKEN},
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def db_rows(tmp_path, sql: str) -> list[tuple]:  # type: ignore[type-arg]
    conn = sqlite3.connect(tmp_path / "gateway.sqlite")
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def poll(predicate, timeout: float, interval: float = 0.1) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not await predicate():  # noqa: ASYNC110 - the state lives in other processes
            await trio.sleep(interval)


async def test_real_cluster_lifecycle_with_restart(tmp_path) -> None:
    with trio.fail_after(150):
        async with HTTPClient() as http:

            async def call(method: str, base: str, path: str, body: object = None, **kw):  # type: ignore[no-untyped-def]
                data = b"" if body is None else json.dumps(body).encode()
                return await http.fetch(method, base + path, body=data, timeout=30, **kw)

            # --- first API run: create, RUNNING, routes, scale, worker joins
            async with trio.open_nursery() as nursery:
                host, port = await nursery.start(
                    partial(serve_api, make_settings(tmp_path), direct_api=True)
                )
                base = f"http://{host}:{port}"
                reply = await call("POST", base, "/api/v1/clusters/", {}, headers=[AUTH])
                assert reply.status == 201
                name = json.loads(reply.body)["name"]

                async def running() -> bool:
                    r = await call("GET", base, f"/api/v1/clusters/{name}?wait", headers=[AUTH])
                    obj = json.loads(r.body)
                    assert obj["status"] in ("PENDING", "RUNNING"), obj
                    return obj["status"] == "RUNNING"

                await poll(running, 60)
                reply = await call("GET", base, f"/api/v1/clusters/{name}", headers=[AUTH])
                cluster = json.loads(reply.body)
                assert cluster["tls_cert"].startswith("-----BEGIN CERTIFICATE")
                assert cluster["dashboard_route"] in (None, f"/clusters/{name}/status")

                reply = await call(
                    "GET", base, "/api/v1/routes", headers=[("Authorization", f"token {TOKEN}")]
                )
                routes = {
                    (r["kind"], r.get("sni") or r.get("path")): r["target"]
                    for r in json.loads(reply.body)["routes"]
                }
                assert routes[("SNI", name)].startswith("tls://127.0.0.1:")
                assert routes[("PATH", "/")] == base

                reply = await call(
                    "POST", base, f"/api/v1/clusters/{name}/scale", {"count": 1}, headers=[AUTH]
                )
                assert json.loads(reply.body) == {"ok": True, "msg": None}

                async def worker_running() -> bool:
                    rows = db_rows(tmp_path, f"SELECT status FROM workers WHERE cluster='{name}'")
                    return rows == [("RUNNING",)]

                await poll(worker_running, 60, interval=0.25)
                (log_file,) = (tmp_path / "clusters" / name / "logs").glob("worker-*.log")
                assert "Registered to" in log_file.read_text()
                nursery.cancel_scope.cancel()  # the API goes away ...

            (data,) = db_rows(tmp_path, f"SELECT data FROM clusters WHERE name='{name}'")
            scheduler_pid = json.loads(data[0])["state"]["pid"]
            (wdata,) = db_rows(tmp_path, "SELECT data FROM workers")
            worker_pid = json.loads(wdata[0])["state"]["pid"]
            assert pid_alive(scheduler_pid) and pid_alive(worker_pid)  # ... the cluster not.

            # --- second API run, same address and database: re-adopted, then stopped
            async with trio.open_nursery() as nursery:
                host, port = await nursery.start(
                    partial(serve_api, make_settings(tmp_path, port), direct_api=True)
                )
                reply = await call("GET", base, f"/api/v1/clusters/{name}", headers=[AUTH])
                assert json.loads(reply.body)["status"] == "RUNNING"
                reply = await call(
                    "GET", base, "/api/v1/routes", headers=[("Authorization", f"token {TOKEN}")]
                )
                assert any(r.get("sni") == name for r in json.loads(reply.body)["routes"])
                # The scheduler finds the new API: heartbeats keep arriving.
                (before,) = db_rows(tmp_path, f"SELECT data FROM clusters WHERE name='{name}'")

                async def heartbeat_seen() -> bool:
                    (now,) = db_rows(tmp_path, f"SELECT data FROM clusters WHERE name='{name}'")
                    return (
                        json.loads(now[0])["last_heartbeat"]
                        > json.loads(before[0])["last_heartbeat"]
                    )

                await poll(heartbeat_seen, 30, interval=0.25)

                reply = await call("DELETE", base, f"/api/v1/clusters/{name}", headers=[AUTH])
                assert reply.status == 204

                async def stopped() -> bool:
                    r = await call("GET", base, f"/api/v1/clusters/{name}", headers=[AUTH])
                    return json.loads(r.body)["status"] == "STOPPED"

                await poll(stopped, 30)
                assert not pid_alive(scheduler_pid)
                assert not pid_alive(worker_pid)
                assert not (tmp_path / "clusters" / name / ".certs").exists()
                nursery.cancel_scope.cancel()
