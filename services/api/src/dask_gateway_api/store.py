"""SQLite persistence of clusters and workers, with secrets encrypted at rest.

Theory of operation
-------------------
One ``sqlite3`` connection in WAL mode with ``synchronous=NORMAL``: a commit appends to the
write-ahead log without an fsync (the log is synced at checkpoints), so a write costs tens
of microseconds and a crash loses at most the last few commits, never consistency. The
calls are therefore made directly on the trio thread: every statement touches one or a
few rows by primary key, there is no network and no lock contention (one process, one
connection), and hopping to a worker thread would cost more than the work itself while
forcing a lock around the connection. ``delete_stopped_older_than`` is the only scan and
runs from the manager's timer task.

Rows keep the fields the server queries on as columns (name, user, status, times) and the
rest as a JSON ``data`` object, so the manager can add fields without a migration. The
schema version lives in ``PRAGMA user_version``; a newer database than this code knows is
refused rather than misread.

Secrets (the cluster API token and the TLS private key) are stored as
``b"fernet:" + MultiFernet token`` when encryption keys are configured
(``DASK_GATEWAY_ENCRYPT_KEYS``: ``;``-separated Fernet keys, the first encrypts, all
decrypt, which allows key rotation), else as ``b"plain:" + bytes``. Reading an encrypted
secret without keys, or with keys that do not match, is a clear :class:`StoreError`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .models import Cluster, ClusterStatus, Worker, WorkerStatus
from .resources import ClusterConfig

__all__ = [
    "SCHEMA_VERSION",
    "FINISHED_STATUSES",
    "ClusterStore",
    "Store",
    "StoreError",
    "StoredCluster",
    "StoredWorker",
    "cluster_from_row",
    "cluster_to_row",
    "open_store",
    "parse_encrypt_keys",
    "worker_from_row",
    "worker_to_row",
]

SCHEMA_VERSION = 1
FINISHED_STATUSES = ("STOPPED", "FAILED")

_PLAIN = b"plain:"
_FERNET = b"fernet:"

_SCHEMA_V1 = """
CREATE TABLE clusters (
    name TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    status TEXT NOT NULL,
    start_time INTEGER NOT NULL,
    stop_time INTEGER,
    token BLOB NOT NULL,
    tls_cert BLOB NOT NULL,
    tls_key BLOB NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX clusters_by_user ON clusters (username, status);
CREATE INDEX clusters_by_status ON clusters (status, stop_time);
CREATE TABLE workers (
    cluster TEXT NOT NULL REFERENCES clusters (name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    start_time INTEGER NOT NULL,
    stop_time INTEGER,
    data TEXT NOT NULL,
    PRIMARY KEY (cluster, name)
);
"""

#: Migrations from version N to N+1 (none yet; version 1 is the first schema).
_MIGRATIONS: dict[int, str] = {0: _SCHEMA_V1}


class ClusterStore(Protocol):
    """What the manager needs from persistence: SQLite (:class:`Store`, local backend) or
    Kubernetes objects (``kube_store.KubeStore``) implement it."""

    def put_cluster(self, cluster: StoredCluster) -> None: ...

    def update_cluster_state(
        self, name: str, status: str, stop_time: int | None, data: dict[str, Any]
    ) -> None: ...

    def load_clusters(self, statuses: Iterable[str] | None = None) -> list[StoredCluster]: ...

    def delete_stopped_older_than(self, age: float, now_ms: int | None = None) -> list[str]: ...

    def put_workers(self, workers: Iterable[StoredWorker]) -> None: ...

    def delete_worker(self, cluster: str, name: str) -> None: ...

    def load_workers(self, cluster: str) -> list[StoredWorker]: ...

    def close(self) -> None: ...


class StoreError(Exception):
    """The database cannot be used (bad file, newer schema, wrong encryption keys)."""


@dataclass
class StoredCluster:
    """One cluster row. ``data`` is any JSON object (options, config, addresses...)."""

    name: str
    username: str
    status: str
    start_time: int
    stop_time: int | None
    token: str = field(repr=False)
    tls_cert: bytes = field(repr=False)
    tls_key: bytes = field(repr=False)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class StoredWorker:
    """One worker row of a cluster."""

    cluster: str
    name: str
    status: str
    start_time: int
    stop_time: int | None
    data: dict[str, Any] = field(default_factory=dict)


def parse_encrypt_keys(value: str | None) -> list[bytes]:
    """Fernet keys from ``DASK_GATEWAY_ENCRYPT_KEYS`` (``;``-separated; blanks ignored).

    Raises ``ValueError`` naming the position of a bad key, never the key itself.
    """
    if not value:
        return []
    keys: list[bytes] = []
    for index, part in enumerate(value.split(";"), start=1):
        part = part.strip()
        if not part:
            continue
        key = part.encode("ascii", "replace")
        try:
            Fernet(key)
        except (ValueError, TypeError):
            raise ValueError(
                f"encryption key #{index} is not a valid Fernet key "
                "(32 url-safe base64-encoded bytes)"
            ) from None
        keys.append(key)
    return keys


class Store:
    """Clusters and workers in SQLite. Build with :func:`open_store`."""

    def __init__(self, conn: sqlite3.Connection, encrypt_keys: Sequence[bytes] = ()) -> None:
        self._conn = conn
        self._fernet = MultiFernet([Fernet(k) for k in encrypt_keys]) if encrypt_keys else None

    # -- secrets

    @property
    def encrypted(self) -> bool:
        return self._fernet is not None

    def _seal(self, secret: bytes) -> bytes:
        if self._fernet is None:
            return _PLAIN + secret
        return _FERNET + self._fernet.encrypt(secret)

    def _open(self, blob: bytes, what: str, name: str) -> bytes:
        blob = bytes(blob)
        if blob.startswith(_PLAIN):
            return blob[len(_PLAIN) :]
        if blob.startswith(_FERNET):
            if self._fernet is None:
                raise StoreError(
                    f"the {what} of cluster {name} is encrypted but no encryption keys "
                    "are configured (DASK_GATEWAY_ENCRYPT_KEYS)"
                )
            try:
                return self._fernet.decrypt(blob[len(_FERNET) :])
            except InvalidToken:
                raise StoreError(
                    f"the {what} of cluster {name} cannot be decrypted with the configured "
                    "encryption keys"
                ) from None
        raise StoreError(f"the {what} of cluster {name} has an unknown storage format")

    # -- clusters

    def put_cluster(self, cluster: StoredCluster) -> None:
        """Insert or replace a cluster row."""
        row = (
            cluster.name,
            cluster.username,
            cluster.status,
            int(cluster.start_time),
            None if cluster.stop_time is None else int(cluster.stop_time),
            self._seal(cluster.token.encode()),
            self._seal(cluster.tls_cert),
            self._seal(cluster.tls_key),
            json.dumps(cluster.data, separators=(",", ":")),
        )
        with self._conn:
            self._conn.execute(
                "INSERT INTO clusters (name, username, status, start_time, stop_time, token,"
                " tls_cert, tls_key, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET username = excluded.username,"
                " status = excluded.status, start_time = excluded.start_time,"
                " stop_time = excluded.stop_time, token = excluded.token,"
                " tls_cert = excluded.tls_cert, tls_key = excluded.tls_key,"
                " data = excluded.data",
                row,
            )

    def update_cluster_state(
        self, name: str, status: str, stop_time: int | None, data: dict[str, Any]
    ) -> None:
        """Update the mutable part of a cluster (no secret re-encryption)."""
        with self._conn:
            self._conn.execute(
                "UPDATE clusters SET status = ?, stop_time = ?, data = ? WHERE name = ?",
                (status, stop_time, json.dumps(data, separators=(",", ":")), name),
            )

    def _cluster_from_row(self, row: sqlite3.Row) -> StoredCluster:
        name = row["name"]
        try:
            data = json.loads(row["data"])
        except ValueError:
            raise StoreError(f"cluster {name} has a corrupt data field") from None
        return StoredCluster(
            name=name,
            username=row["username"],
            status=row["status"],
            start_time=row["start_time"],
            stop_time=row["stop_time"],
            token=self._open(row["token"], "token", name).decode(),
            tls_cert=self._open(row["tls_cert"], "certificate", name),
            tls_key=self._open(row["tls_key"], "TLS key", name),
            data=data if isinstance(data, dict) else {},
        )

    def get_cluster(self, name: str) -> StoredCluster | None:
        row = self._conn.execute("SELECT * FROM clusters WHERE name = ?", (name,)).fetchone()
        return None if row is None else self._cluster_from_row(row)

    def load_clusters(self, statuses: Iterable[str] | None = None) -> list[StoredCluster]:
        """All clusters (optionally only those with one of ``statuses``), oldest first."""
        if statuses is None:
            rows = self._conn.execute("SELECT * FROM clusters ORDER BY start_time").fetchall()
        else:
            wanted = list(statuses)
            marks = ",".join("?" * len(wanted))
            rows = self._conn.execute(
                f"SELECT * FROM clusters WHERE status IN ({marks}) ORDER BY start_time", wanted
            ).fetchall()
        return [self._cluster_from_row(r) for r in rows]

    def delete_cluster(self, name: str) -> None:
        with self._conn:
            self._conn.execute("DELETE FROM clusters WHERE name = ?", (name,))

    def delete_stopped_older_than(self, age: float, now_ms: int | None = None) -> list[str]:
        """Delete finished (STOPPED/FAILED) clusters stopped more than ``age`` seconds ago.

        Their workers go with them. Returns the deleted names.
        """
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        cutoff = now_ms - int(age * 1000)
        marks = ",".join("?" * len(FINISHED_STATUSES))
        with self._conn:
            rows = self._conn.execute(
                f"SELECT name FROM clusters WHERE status IN ({marks})"
                " AND stop_time IS NOT NULL AND stop_time < ?",
                (*FINISHED_STATUSES, cutoff),
            ).fetchall()
            names = [r["name"] for r in rows]
            self._conn.executemany("DELETE FROM clusters WHERE name = ?", [(n,) for n in names])
        return names

    # -- workers

    def put_workers(self, workers: Iterable[StoredWorker]) -> None:
        """Insert or replace worker rows, in one transaction."""
        rows = [
            (
                w.cluster,
                w.name,
                w.status,
                int(w.start_time),
                None if w.stop_time is None else int(w.stop_time),
                json.dumps(w.data, separators=(",", ":")),
            )
            for w in workers
        ]
        if not rows:
            return
        with self._conn:
            self._conn.executemany(
                "INSERT INTO workers (cluster, name, status, start_time, stop_time, data)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (cluster, name) DO UPDATE SET"
                " status = excluded.status, start_time = excluded.start_time,"
                " stop_time = excluded.stop_time, data = excluded.data",
                rows,
            )

    def put_worker(self, worker: StoredWorker) -> None:
        self.put_workers([worker])

    def delete_worker(self, cluster: str, name: str) -> None:
        with self._conn:
            self._conn.execute(
                "DELETE FROM workers WHERE cluster = ? AND name = ?", (cluster, name)
            )

    def load_workers(self, cluster: str) -> list[StoredWorker]:
        rows = self._conn.execute(
            "SELECT * FROM workers WHERE cluster = ? ORDER BY start_time, name", (cluster,)
        ).fetchall()
        out = []
        for row in rows:
            try:
                data = json.loads(row["data"])
            except ValueError:
                raise StoreError(f"worker {row['name']} has a corrupt data field") from None
            out.append(
                StoredWorker(
                    cluster=row["cluster"],
                    name=row["name"],
                    status=row["status"],
                    start_time=row["start_time"],
                    stop_time=row["stop_time"],
                    data=data if isinstance(data, dict) else {},
                )
            )
        return out

    # -- housekeeping

    @property
    def journal_mode(self) -> str:
        return str(self._conn.execute("PRAGMA journal_mode").fetchone()[0])

    @property
    def schema_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        self._conn.close()


def _migrate(conn: sqlite3.Connection) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"database schema version {version} is newer than this server supports "
            f"({SCHEMA_VERSION}); upgrade the server"
        )
    while version < SCHEMA_VERSION:
        script = _MIGRATIONS[version]
        # executescript commits first; the version bump is part of the same script.
        conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {version + 1};\nCOMMIT;")
        version += 1


def open_store(path: str | Path, encrypt_keys: Sequence[bytes] = ()) -> Store:
    """Open (creating and migrating if needed) the database at ``path``.

    ``":memory:"`` gives a throwaway in-memory database (no WAL, nothing persists).
    """
    target = str(path)
    if target != ":memory:":
        try:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            # Created 0600 up front; SQLite gives the -wal/-shm files the same mode.
            os.close(os.open(target, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise StoreError(f"cannot create database {target}: {exc.strerror}") from None
    try:
        conn = sqlite3.connect(target, isolation_level="DEFERRED")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open database {target}: {exc}") from None
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA busy_timeout = 5000")
        _migrate(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreError(f"cannot use database {target}: {exc}") from None
    except StoreError:
        conn.close()
        raise
    return Store(conn, encrypt_keys)


# ---------------------------------------------------------------- model codec

_CLUSTER_DATA_FIELDS = (
    "scheduler_address",
    "dashboard_address",
    "api_address",
    "count",
    "adaptive",
    "adapt_minimum",
    "adapt_maximum",
    "last_heartbeat",
    "worker_start_failures",
    "state",
    "failure_reason",
)


def cluster_to_row(cluster: Cluster) -> StoredCluster:
    """A :class:`~dask_gateway_api.models.Cluster` as a store row."""
    data: dict[str, Any] = {
        "options": cluster.options,
        "config": cluster.config.to_dict(),
        "target": cluster.target.name,
    }
    data.update({f: getattr(cluster, f) for f in _CLUSTER_DATA_FIELDS})
    return StoredCluster(
        name=cluster.name,
        username=cluster.username,
        status=cluster.status.name,
        start_time=cluster.start_time_ms,
        stop_time=cluster.stop_time_ms,
        token=cluster.token,
        tls_cert=cluster.cert_pem.encode(),
        tls_key=cluster.key_pem.encode(),
        data=data,
    )


def cluster_from_row(row: StoredCluster) -> Cluster:
    """Rebuild a cluster record; a row this code cannot read is a :class:`StoreError`."""
    data = dict(row.data)
    try:
        status = ClusterStatus[row.status]
        target = ClusterStatus[data.pop("target", "RUNNING")]
        config = ClusterConfig.from_dict(data.pop("config", {}))
    except (KeyError, ValueError, TypeError) as exc:
        raise StoreError(f"cluster {row.name} has an unreadable record: {exc}") from None
    extra = {f: data[f] for f in _CLUSTER_DATA_FIELDS if f in data}
    return Cluster(
        name=row.name,
        username=row.username,
        token=row.token,
        status=status,
        options=data.get("options") or {},
        config=config,
        cert_pem=row.tls_cert.decode(),
        key_pem=row.tls_key.decode(),
        start_time_ms=row.start_time,
        stop_time_ms=row.stop_time,
        target=target,
        **extra,
    )


def worker_to_row(worker: Worker) -> StoredWorker:
    return StoredWorker(
        cluster=worker.cluster_name,
        name=worker.name,
        status=worker.status.name,
        start_time=worker.start_time_ms,
        stop_time=worker.stop_time_ms,
        data={
            "close_expected": worker.close_expected,
            "launched": worker.launched,
            "state": worker.state,
        },
    )


def worker_from_row(row: StoredWorker) -> Worker:
    try:
        status = WorkerStatus[row.status]
    except KeyError:
        raise StoreError(f"worker {row.name} has an unknown status {row.status!r}") from None
    return Worker(
        name=row.name,
        cluster_name=row.cluster,
        status=status,
        start_time_ms=row.start_time,
        stop_time_ms=row.stop_time,
        close_expected=bool(row.data.get("close_expected", False)),
        launched=bool(row.data.get("launched", False)),
        state=dict(row.data.get("state") or {}),
    )
