"""Every recorder call has a deadline, and an acknowledged write survives a power loss (issue 13, item 13)."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import ray
import sqlalchemy as sa
from ray.exceptions import RayTaskError

from recorder.actor import RecorderTimeout, start_recorder, stop_recorder
from recorder.client import RecorderClient, _is_retryable
from recorder.config import DatabaseConfig, RecorderConfig
from recorder.errors import is_connectivity
from recorder.migrate import upgrade
from recorder.store import TrajectoryStore, create_db_engine
from tests.recorder_data import step, trajectory


def test_statement_timeout_cancels_a_slow_statement(postgres):
    url = postgres.create_database(f"st_{uuid.uuid4().hex[:8]}")
    engine = create_db_engine(url, statement_timeout_s=0.5)
    try:
        for _ in range(2):  # every connection the pool opens has it, also after a rollback
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "500ms"
                started = time.monotonic()
                with pytest.raises(sa.exc.OperationalError, match="canceling statement due to statement timeout") as e:
                    conn.exec_driver_sql("SELECT pg_sleep(10)")
                assert time.monotonic() - started < 5
                assert is_connectivity(e.value)  # the recorder retries such a write, never rejects its rows
            engine.dispose()
    finally:
        engine.dispose()
    upgrade(url)
    defaults = create_db_engine(url)  # engines made without a config get the config's default
    store = TrajectoryStore(url, statement_timeout_s=DatabaseConfig(statement_timeout_s=2.5).statement_timeout_s)
    try:
        with defaults.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "1min"
        assert store._connection().exec_driver_sql("SHOW statement_timeout").scalar() == "2500ms"
    finally:
        defaults.dispose()
        store.dispose()


def test_embedded_sqlite_is_durable_on_acknowledge(tmp_path):
    url = f"sqlite:///{tmp_path / 'durable.db'}"
    upgrade(url)
    store = TrajectoryStore(url)  # the recorder's writer connection
    engine = create_db_engine(url)  # and every other one
    try:
        for conn in (store._connection(), engine.connect()):
            # 2 = FULL: the WAL is synced at every commit, so an acknowledged write survives a power loss.
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            conn.close()
    finally:
        engine.dispose()
        store.dispose()


@contextlib.contextmanager
def _table_locked(url: str) -> Iterator[threading.Event]:
    """Hold a lock that blocks the recorder's next write until the returned event is set (or the block ends)."""
    release = threading.Event()
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN EXCLUSIVE")
    else:
        conn = psycopg.connect(url.replace("postgresql+psycopg", "postgresql"))
        conn.execute("LOCK TABLE steps IN ACCESS EXCLUSIVE MODE")
    done = threading.Event()

    def unlock() -> None:
        release.wait()
        conn.rollback()
        done.set()

    thread = threading.Thread(target=unlock, daemon=True)
    thread.start()
    try:
        yield release
    finally:
        release.set()
        done.wait(30)
        conn.close()


def test_a_write_past_its_deadline_fails_retryably_instead_of_hanging(ray_session, db_url):
    settings = RecorderConfig(
        actor_name=f"recorder-{uuid.uuid4().hex[:8]}", write_timeout_s=1.0, call_timeout_s=20, retry_deadline_s=60
    )
    recorder = start_recorder(DatabaseConfig(url=db_url, connect_timeout_s=3), settings)
    client = RecorderClient(settings)
    client.add(trajectory("t1"))
    client.flush()
    with _table_locked(db_url):
        started = time.monotonic()
        with pytest.raises(RayTaskError) as timed_out:
            ray.get(recorder.write.remote([step("t1", 0)]), timeout=15)
        assert time.monotonic() - started < 5
        assert isinstance(timed_out.value.cause, RecorderTimeout)
        assert "not committed within 1 s (recorder.write_timeout_s)" in str(timed_out.value)
        assert "retry" in str(timed_out.value) and _is_retryable(timed_out.value)

    # A producer rides a blocked database out: its calls time out, it retries, and once the lock is gone
    # everything is stored exactly once.
    with _table_locked(db_url) as release:
        threading.Timer(2.5, release.set).start()
        client.add(step("t1", 0), step("t1", 1))
        report = client.flush()
    assert report.acknowledged == 2 and report.retries >= 1 and not client.unacked
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        steps = conn.execute(sa.text("SELECT trajectory_id, step_index FROM steps ORDER BY step_index")).all()
    engine.dispose()
    assert [tuple(row) for row in steps] == [("t1", 0), ("t1", 1)]
    assert ray.get(recorder.stats.remote(), timeout=30)["timeouts"] >= 2
    stop_recorder(recorder)
