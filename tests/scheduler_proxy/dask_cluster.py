"""A real TLS dask cluster (one Scheduler, one Worker) running in a thread of its own.

distributed runs on asyncio, so the cluster gets a dedicated thread with its own event
loop; the trio test talks to it only through ``trio.to_thread.run_sync``. Security follows
spec §3.3/§5.1: the per-cluster certificate is the only CA and is also the scheduler's,
the worker's and the client's certificate; encryption is required.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path

from distributed import Scheduler, Worker
from distributed.security import Security

from dask_gateway_common.tls import generate_cluster_credentials


@dataclass
class ClusterCredentials:
    cert_pem: str
    key_pem: str
    cert_file: str
    key_file: str

    @classmethod
    def create(cls, name: str, directory: Path) -> ClusterCredentials:
        cert, key = generate_cluster_credentials(name)
        cert_file = directory / "dask.crt"
        key_file = directory / "dask.pem"
        cert_file.write_bytes(cert)
        key_file.write_bytes(key)
        key_file.chmod(0o600)
        return cls(cert.decode(), key.decode(), str(cert_file), str(key_file))

    def cluster_security(self) -> Security:
        return Security(
            require_encryption=True,
            tls_ca_file=self.cert_file,
            tls_scheduler_cert=self.cert_file,
            tls_scheduler_key=self.key_file,
            tls_worker_cert=self.cert_file,
            tls_worker_key=self.key_file,
            tls_client_cert=self.cert_file,
            tls_client_key=self.key_file,
        )


class ThreadedCluster:
    """Start with ``start(timeout)`` (blocking); ``address`` is the scheduler's tls:// URL."""

    def __init__(self, credentials: ClusterCredentials) -> None:
        self.credentials = credentials
        self.address: str | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="dask-cluster", daemon=True)

    def start(self, timeout: float) -> str:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("dask cluster did not start in time")
        if self._error is not None:
            raise RuntimeError("dask cluster failed to start") from self._error
        assert self.address is not None
        return self.address

    def stop(self, timeout: float) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("dask cluster did not stop in time")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the test thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        security = self.credentials.cluster_security()
        async with Scheduler(
            protocol="tls", host="127.0.0.1", port=0, dashboard=False, security=security
        ) as scheduler:
            async with Worker(scheduler.address, nthreads=1, dashboard=False, security=security):
                self.address = scheduler.address
                self._ready.set()
                await self._stop.wait()
