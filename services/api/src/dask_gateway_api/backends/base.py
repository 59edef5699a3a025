"""The backend interface: how the cluster manager starts and stops Dask processes.

A backend knows how to run a scheduler and workers somewhere (local processes, pods) and
nothing about users, options, limits or HTTP. The manager hands it a :class:`ClusterLaunch`
(everything a process needs, already resolved) and gets back a *state*: a small JSON-able
dict (pids, paths, pod names...) that the manager persists with the cluster or worker
record. Every later call receives that state again, so a restarted API can re-adopt
processes it did not start itself (:meth:`Backend.adopt`).

Liveness: the manager awaits :meth:`Backend.wait_exit` for every scheduler and pending
worker, so a process that dies is noticed at once. The default implementation polls
:meth:`Backend.is_alive`; backends that can wait for an exit directly override it.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

__all__ = ["Backend", "BackendError", "ClusterLaunch", "State"]

#: What a backend remembers about one process; persisted by the manager as JSON.
State = dict[str, Any]


class BackendError(Exception):
    """A process could not be started (bad command, missing files...). Message is loggable."""


@dataclass(frozen=True)
class ClusterLaunch:
    """Everything needed to launch one cluster's scheduler and workers (spec §5.1).

    ``scheduler_cmd`` / ``worker_cmd`` are argument lists (already shell-split); empty
    means "the backend's default". Secrets (``token``, ``tls_key``) never appear in repr.
    """

    name: str
    username: str
    api_url: str
    token: str = field(repr=False)
    tls_cert: bytes = field(repr=False)
    tls_key: bytes = field(repr=False)
    scheduler_cmd: tuple[str, ...] = ()
    worker_cmd: tuple[str, ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict)
    worker_threads: int = 1
    worker_memory: int = 2**31
    heartbeat_period: float = 15.0
    adaptive_period: float = 3.0
    idle_timeout: float = 0.0
    #: The ``tls://`` address the scheduler reported (needed to start workers).
    scheduler_address: str = ""


class Backend(abc.ABC):
    """Start, stop and watch the processes of clusters."""

    @abc.abstractmethod
    async def start_scheduler(self, launch: ClusterLaunch) -> State:
        """Start the scheduler of ``launch.name``; return its state. Raises BackendError."""

    @abc.abstractmethod
    async def start_worker(self, launch: ClusterLaunch, worker_name: str) -> State:
        """Start one worker named ``worker_name``; return its state. Raises BackendError."""

    @abc.abstractmethod
    async def stop_worker(self, cluster_name: str, worker_name: str, state: State) -> None:
        """Stop one worker (graceful, then forced). Idempotent; never raises for a dead one."""

    @abc.abstractmethod
    async def stop_cluster(
        self, cluster_name: str, scheduler_state: State, worker_states: Mapping[str, State]
    ) -> None:
        """Stop the scheduler and every listed worker, then drop the cluster's secrets."""

    @abc.abstractmethod
    def is_alive(self, state: State) -> bool:
        """Whether the process described by ``state`` still runs (cheap, non-blocking)."""

    @abc.abstractmethod
    def adopt(self, state: State) -> bool:
        """After an API restart: take ownership of a process from an earlier run.

        Returns whether it is alive *and* still the same process (pid reuse is detected).
        """

    async def wait_exit(self, state: State) -> None:
        """Return once the process of ``state`` is gone (default: poll :meth:`is_alive`)."""
        while self.is_alive(state):  # noqa: ASYNC110 - polling is the generic fallback
            await trio.sleep(self.poll_interval)

    #: Seconds between :meth:`is_alive` polls in the default :meth:`wait_exit`.
    poll_interval: float = 5.0

    async def forget_cluster(self, cluster_name: str) -> None:  # noqa: B027 - optional hook
        """The cluster's record expired: remove whatever is left (logs, directories)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release backend resources. Never stops clusters (the manager decides that)."""
