"""SQLite store: round trips, encryption at rest, WAL, schema versioning, expiry."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest
from cryptography.fernet import Fernet

from dask_gateway_api.models import Cluster, ClusterStatus, Worker, WorkerStatus
from dask_gateway_api.resources import ClusterConfig
from dask_gateway_api.store import (
    SCHEMA_VERSION,
    StoredCluster,
    StoredWorker,
    StoreError,
    cluster_from_row,
    cluster_to_row,
    open_store,
    parse_encrypt_keys,
    worker_from_row,
    worker_to_row,
)

TOKEN = "f" * 64
KEY_PEM = b"-----BEGIN PRIVATE KEY-----\nsecret-key-material\n-----END PRIVATE KEY-----\n"


def make_cluster(name: str = "c1", **kw: object) -> StoredCluster:
    base: dict[str, object] = dict(
        name=name,
        username="alice",
        status="PENDING",
        start_time=1_700_000_000_000,
        stop_time=None,
        token=TOKEN,
        tls_cert=b"CERT PEM",
        tls_key=KEY_PEM,
        data={"options": {"size": "small", "n": 1}, "config": {"worker_cores": 2}, "count": 0},
    )
    base.update(kw)
    return StoredCluster(**base)  # type: ignore[arg-type]


def test_round_trip_clusters_and_workers(tmp_path) -> None:
    path = tmp_path / "db" / "gateway.sqlite"
    store = open_store(path)
    assert store.journal_mode == "wal"
    assert store.schema_version == SCHEMA_VERSION
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    cluster = make_cluster()
    store.put_cluster(cluster)
    assert store.get_cluster("c1") == cluster
    assert store.get_cluster("nope") is None
    assert "secret" not in repr(cluster) and TOKEN not in repr(cluster)

    workers = [
        StoredWorker("c1", "w1", "RUNNING", 5, None, {"state": {"pid": 10}}),
        StoredWorker("c1", "w2", "SUBMITTED", 6, None, {}),
    ]
    store.put_workers(workers)
    store.put_workers([])
    assert store.load_workers("c1") == workers
    store.put_worker(StoredWorker("c1", "w2", "STOPPED", 6, 9, {"close_expected": True}))
    assert store.load_workers("c1")[1].status == "STOPPED"
    store.delete_worker("c1", "w1")
    assert [w.name for w in store.load_workers("c1")] == ["w2"]

    store.update_cluster_state("c1", "RUNNING", None, {"count": 2})
    store.put_cluster(make_cluster("c2", username="bob", start_time=1_700_000_000_001))
    store.close()

    # Everything survives a reopen (a restarted API).
    again = open_store(path)
    loaded = again.get_cluster("c1")
    assert loaded is not None
    assert loaded.status == "RUNNING" and loaded.data == {"count": 2}
    assert loaded.token == TOKEN and loaded.tls_key == KEY_PEM
    assert [c.name for c in again.load_clusters()] == ["c1", "c2"]
    assert [c.name for c in again.load_clusters(["PENDING"])] == ["c2"]
    assert again.load_clusters([]) == []
    again.delete_cluster("c1")
    assert again.get_cluster("c1") is None
    assert again.load_workers("c1") == []  # cascaded
    again.close()


def test_plaintext_secrets_without_keys_are_marked(tmp_path) -> None:
    store = open_store(tmp_path / "g.db")
    assert not store.encrypted
    store.put_cluster(make_cluster())
    store.close()
    raw = (
        sqlite3.connect(tmp_path / "g.db").execute("SELECT token, tls_key FROM clusters").fetchone()
    )
    assert raw[0] == b"plain:" + TOKEN.encode()


def test_encryption_at_rest_and_key_rotation(tmp_path) -> None:
    old_key, new_key = Fernet.generate_key(), Fernet.generate_key()
    path = tmp_path / "g.db"
    store = open_store(path, [old_key])
    assert store.encrypted
    store.put_cluster(make_cluster())
    store.close()

    # Nothing secret is readable in the file (WAL included).
    for name in os.listdir(tmp_path):
        content = (tmp_path / name).read_bytes()
        assert TOKEN.encode() not in content
        assert b"secret-key-material" not in content

    # Rotation: the new key encrypts, the old one still decrypts.
    rotated = open_store(path, [new_key, old_key])
    loaded = rotated.get_cluster("c1")
    assert loaded is not None and loaded.token == TOKEN and loaded.tls_key == KEY_PEM
    rotated.put_cluster(loaded)
    rotated.close()
    only_new = open_store(path, [new_key])
    assert only_new.get_cluster("c1") == loaded
    only_new.close()

    with pytest.raises(StoreError, match="no encryption keys"):
        open_store(path).get_cluster("c1")
    with pytest.raises(StoreError, match="cannot be decrypted"):
        open_store(path, [old_key]).get_cluster("c1")


def test_parse_encrypt_keys() -> None:
    k1, k2 = Fernet.generate_key(), Fernet.generate_key()
    assert parse_encrypt_keys(None) == []
    assert parse_encrypt_keys("") == []
    assert parse_encrypt_keys(f"{k1.decode()}; ;{k2.decode()};") == [k1, k2]
    with pytest.raises(ValueError, match="#2") as info:
        parse_encrypt_keys(f"{k1.decode()};not-a-key-at-all")
    assert "not-a-key" not in str(info.value)


def test_delete_stopped_older_than() -> None:
    store = open_store(":memory:")
    now = 10_000_000
    store.put_cluster(make_cluster("old-stopped", status="STOPPED", stop_time=now - 7_200_000))
    store.put_cluster(make_cluster("old-failed", status="FAILED", stop_time=now - 3_600_001))
    store.put_cluster(make_cluster("recent", status="STOPPED", stop_time=now - 10))
    store.put_cluster(make_cluster("running", status="RUNNING"))
    store.put_cluster(make_cluster("stopping", status="STOPPING", stop_time=now - 9_000_000))
    store.put_workers([StoredWorker("old-failed", "w", "FAILED", 1, 2, {})])
    deleted = store.delete_stopped_older_than(3600, now_ms=now)
    assert sorted(deleted) == ["old-failed", "old-stopped"]
    assert sorted(c.name for c in store.load_clusters()) == ["recent", "running", "stopping"]
    assert store.load_workers("old-failed") == []
    assert store.delete_stopped_older_than(3600, now_ms=now) == []


def test_newer_schema_is_refused(tmp_path) -> None:
    path = tmp_path / "g.db"
    open_store(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this server supports"):
        open_store(path)


def test_garbage_file_is_a_store_error(tmp_path) -> None:
    path = tmp_path / "g.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot use database"):
        open_store(path)
    with pytest.raises(StoreError):
        open_store(tmp_path / "g.db" / "inside-a-file.db")


def test_corrupt_rows_are_store_errors() -> None:
    store = open_store(":memory:")
    store.put_cluster(make_cluster())
    store._conn.execute("UPDATE clusters SET data = '{not json', token = X'00'")  # noqa: SLF001
    with pytest.raises(StoreError):
        store.get_cluster("c1")


def test_model_codec_round_trip() -> None:
    config = ClusterConfig(worker_cores=2, worker_memory=2**30, cluster_max_workers=4)
    cluster = Cluster(
        name="abc",
        username="alice",
        token=TOKEN,
        status=ClusterStatus.RUNNING,
        options={"size": "small"},
        config=config,
        cert_pem="CERT",
        key_pem=KEY_PEM.decode(),
        start_time_ms=5,
        target=ClusterStatus.RUNNING,
        scheduler_address="tls://127.0.0.1:1",
        dashboard_address="http://127.0.0.1:2",
        api_address="http://127.0.0.1:3",
        count=3,
        adaptive=True,
        adapt_minimum=1,
        adapt_maximum=None,
        last_heartbeat=7,
        worker_start_failures=1,
        state={"pid": 42, "argv_tail": ["a"]},
    )
    store = open_store(":memory:", [Fernet.generate_key()])
    store.put_cluster(cluster_to_row(cluster))
    loaded = store.get_cluster("abc")
    assert loaded is not None
    assert cluster_from_row(loaded) == cluster

    worker = Worker("w1", "abc", WorkerStatus.STOPPING, 8, None, True, True, {"pid": 9})
    store.put_worker(worker_to_row(worker))
    assert [worker_from_row(w) for w in store.load_workers("abc")] == [worker]

    bad = cluster_to_row(cluster)
    bad.status = "SLEEPING"
    with pytest.raises(StoreError, match="unreadable"):
        cluster_from_row(bad)
    bad_worker = worker_to_row(worker)
    bad_worker.status = "NAPPING"
    with pytest.raises(StoreError, match="unknown status"):
        worker_from_row(bad_worker)
