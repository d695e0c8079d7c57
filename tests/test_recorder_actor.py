"""The recorder actor and its producers under failure: actor crashes, database restarts, a full buffer."""

from __future__ import annotations

import time
import uuid

import numpy as np
import psycopg
import pytest
import ray
import sqlalchemy as sa

from recorder.actor import Recorder, RecorderBusy, start_recorder, stop_recorder
from recorder.client import RecorderClient, RecorderUnreachable
from recorder.config import DatabaseConfig, RecorderConfig
from recorder.migrate import SchemaOutOfDate, upgrade
from recorder.pg_server import ThrowawayPostgres
from recorder.records import StepRecord
from recorder.schema import utcnow
from recorder.wire import EncodedRows, encode
from tests.recorder_data import call, finished, step, trajectory

TRAJECTORIES, STEPS = 25, 6


@ray.remote(num_cpus=0)
def produce(producer: int, settings: RecorderConfig) -> list[tuple[str, int]]:
    """Run episodes and stream them; return the step keys the recorder acknowledged."""
    client = RecorderClient(settings)
    rng = np.random.default_rng(producer)
    acknowledged: list[tuple[str, int]] = []
    for t in range(TRAJECTORIES):
        tid = f"p{producer}-t{t}"
        client.add(trajectory(tid, f"p{producer}-g{t // 5}"))
        keys = []
        for s in range(STEPS):
            client.add(step(tid, s), call(tid, s, rng, 120, 40))
            keys.append((tid, s))
        client.add(finished(tid, f"p{producer}-g{t // 5}", float(t % 2), steps=STEPS))
        client.flush()  # returns only once everything above is committed
        acknowledged += keys
    return acknowledged


def _settings(**overrides: object) -> RecorderConfig:
    defaults = {"actor_name": f"recorder-{uuid.uuid4().hex[:8]}", "call_timeout_s": 20, "retry_deadline_s": 120}
    return RecorderConfig(**{**defaults, **overrides})


def _stored_steps(url: str) -> list[tuple[str, int]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text("SELECT trajectory_id, step_index FROM steps"))]
    finally:
        engine.dispose()


def _wait_for_steps(url: str, at_least: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while len(_stored_steps(url)) < at_least:
        assert time.monotonic() < deadline, "producers made no progress"
        time.sleep(0.05)


def _assert_exactly_once(url: str, acknowledged: list[tuple[str, int]]) -> None:
    stored = _stored_steps(url)
    assert len(stored) == len(set(stored)), "a step was stored twice"
    assert set(acknowledged) <= set(stored), "an acknowledged step is missing"
    assert len(acknowledged) == 4 * TRAJECTORIES * STEPS  # the producers retried until everything was in


def test_recorder_killed_mid_stream_loses_and_duplicates_nothing(ray_session, db_url):
    settings = _settings()
    recorder = start_recorder(DatabaseConfig(url=db_url), settings)
    producers = [produce.remote(p, settings) for p in range(4)]
    _wait_for_steps(db_url, 60)
    ray.kill(recorder, no_restart=False)  # a crash: Ray restarts it, producers retry
    acknowledged = [key for keys in ray.get(producers, timeout=300) for key in keys]
    _assert_exactly_once(db_url, acknowledged)
    stats = ray.get(recorder.stats.remote(), timeout=30)  # the restarted actor serves
    assert stats["calls"] > 0 and stats["pending_records"] == 0
    assert stats["writer_connections"] == (2 if db_url.startswith("postgresql") else 1)  # producers in parallel
    stop_recorder(recorder)


@pytest.fixture
def own_postgres():
    server = ThrowawayPostgres()
    server.start()
    yield server
    server.destroy()


def test_postgres_restart_mid_stream_loses_nothing(ray_session, own_postgres):
    url = own_postgres.create_database("restart")
    upgrade(url)
    settings = _settings()
    recorder = start_recorder(DatabaseConfig(url=url), settings)
    producers = [produce.remote(p, settings) for p in range(4)]
    _wait_for_steps(url, 60)
    own_postgres.stop()
    time.sleep(1.5)
    own_postgres.start()
    acknowledged = [key for keys in ray.get(producers, timeout=300) for key in keys]
    _assert_exactly_once(url, acknowledged)
    assert ray.get(recorder.stats.remote(), timeout=30)["db_errors"] > 0  # the outage really was seen
    stop_recorder(recorder)


def test_dead_database_is_a_clear_error_and_the_client_keeps_its_records(ray_session, own_postgres):
    url = own_postgres.create_database("dead")
    upgrade(url)
    settings = _settings(retry_deadline_s=2.0, call_timeout_s=5)
    recorder = start_recorder(DatabaseConfig(url=url, connect_timeout_s=1), settings)
    client = RecorderClient(settings)
    client.add(trajectory("t1"), *(step("t1", i) for i in range(10)))
    own_postgres.stop()
    with pytest.raises(RecorderUnreachable, match=r"11 records not acknowledged.*kept in client.unacked"):
        client.flush()
    assert len(client.unacked) == 11
    own_postgres.start()
    report = client.flush()
    assert report.acknowledged == 11 and not client.unacked
    assert len(_stored_steps(url)) == 10
    stop_recorder(recorder)


def test_malformed_records_come_back_named_and_the_rest_is_stored(ray_session, db_url):
    settings = _settings()
    recorder = start_recorder(DatabaseConfig(url=db_url), settings)
    client = RecorderClient(settings)
    client.add(trajectory("t1"), step("t1", 0), StepRecord("t1", -2, "obs"), StepRecord("ghost", 0, "obs"))
    report = client.flush()
    assert report.acknowledged == 2
    assert [key for key, _ in report.rejected] == [("step", "t1", -2), ("step", "ghost", 0)]
    assert "step_index must be an integer >= 0" in report.rejected[0][1]
    assert "unknown" in report.rejected[1][1]
    assert _stored_steps(db_url) == [("t1", 0)] and not client.unacked
    # A call whose every row is refused is answered as such: it does not stop the writer (Ray's counters take
    # no zero increment, and a write of nothing used to raise there, leaving its caller waiting to its timeout).
    lone = ray.get(recorder.write.remote([StepRecord("ghost", 1, "obs")], "lone"), timeout=settings.call_timeout_s)
    assert lone.written == 0 and [position for position, _ in lone.rejected] == [0]
    client.add(step("t1", 1))
    assert client.flush().acknowledged == 1
    stop_recorder(recorder)


def test_a_full_buffer_makes_callers_wait_then_fail_busy(ray_session, postgres):
    url = postgres.create_database(f"busy_{uuid.uuid4().hex[:8]}")
    upgrade(url)
    settings = _settings(max_buffer_records=100, buffer_wait_s=0.5)
    recorder = start_recorder(DatabaseConfig(url=url), settings)
    client = RecorderClient(settings)
    client.add(trajectory("t1"))
    client.flush()
    with psycopg.connect(host="127.0.0.1", port=postgres.port, user="postgres", dbname=url.rsplit("/", 1)[1]) as lock:
        lock.execute("LOCK TABLE steps IN ACCESS EXCLUSIVE MODE")  # the recorder's next write now blocks
        first = recorder.write.remote([step("t1", i) for i in range(60)])
        time.sleep(0.5)
        second = recorder.write.remote([step("t1", i) for i in range(60, 120)])
        with pytest.raises(RecorderBusy, match="buffer is full"):
            ray.get(second, timeout=30)
        lock.rollback()
    assert ray.get(first, timeout=30).written == 60
    stop_recorder(recorder)


def test_each_producer_keeps_to_one_writer_connection_and_producers_are_spread(ray_session, postgres, tmp_path):
    url = postgres.create_database(f"lanes_{uuid.uuid4().hex[:8]}")
    upgrade(url)
    recorder = Recorder(DatabaseConfig(url=url), _settings(writer_connections=2))
    lanes = [recorder._lane(source) for source in ("a", "b", "a", "c", "b", "d", None)]
    assert lanes[0] is lanes[2] and lanes[1] is lanes[4]  # a producer's calls are committed in order
    assert lanes[0] is not lanes[1] and lanes[3] is not lanes[5]  # producers are spread over the connections
    assert lanes[6] is recorder._lanes[0]
    sqlite_url = f"sqlite:///{tmp_path / 'lanes.db'}"
    upgrade(sqlite_url)
    on_sqlite = Recorder(DatabaseConfig(url=sqlite_url), _settings(writer_connections=4))
    assert len(on_sqlite._lanes) == 1  # SQLite has a single writer
    for lane in recorder._lanes + on_sqlite._lanes:
        lane.store.dispose()


def test_the_recorder_refuses_a_stale_schema(ray_session, postgres):
    url = postgres.create_database(f"stale_{uuid.uuid4().hex[:8]}")
    with pytest.raises(SchemaOutOfDate, match="run `ziggurat db upgrade"):
        start_recorder(DatabaseConfig(url=url), _settings())


def test_one_calls_bad_data_does_not_fail_the_calls_merged_with_it(ray_session, postgres):
    url = postgres.create_database(f"poison_{uuid.uuid4().hex[:8]}")
    upgrade(url)
    settings = _settings()
    recorder = start_recorder(DatabaseConfig(url=url), settings)
    client = RecorderClient(settings)
    client.add(trajectory("t1"))
    client.flush()
    poison = EncodedRows.of_rows("steps", ["t1"], [b"\x00\x08not a COPY tuple"])
    with psycopg.connect(host="127.0.0.1", port=postgres.port, user="postgres", dbname=url.rsplit("/", 1)[1]) as lock:
        lock.execute("LOCK TABLE steps IN ACCESS EXCLUSIVE MODE")
        first = recorder.write.remote(encode([step("t1", 0)], utcnow()))
        time.sleep(0.5)  # `first` now waits in the database; the next two calls are merged into one write
        good = recorder.write.remote(encode([step("t1", 1)], utcnow()))
        bad = recorder.write.remote([poison])
        time.sleep(0.5)
        lock.rollback()
    assert ray.get(first, timeout=30).written == 1
    assert ray.get(good, timeout=30).written == 1
    refused = ray.get(bad, timeout=30)  # the bad row is rejected by position, with the database's reason
    assert refused.written == 0 and [position for position, _ in refused.rejected] == [0]
    assert "the database refused it (ProgramLimitExceeded" in refused.rejected[0][1]
    assert sorted(_stored_steps(url)) == [("t1", 0), ("t1", 1)]
    stop_recorder(recorder)


def test_recorder_counts_show_up_as_ray_metrics(ray_session, tmp_path):
    import urllib.request

    url = f"sqlite:///{tmp_path / 'metrics.db'}"
    upgrade(url)
    settings = _settings()
    recorder = start_recorder(DatabaseConfig(url=url), settings)
    client = RecorderClient(settings)
    client.add(trajectory("t1"), step("t1", 0), step("t1", 1), StepRecord("ghost", 0, "obs"))  # refused by the recorder
    client.flush()
    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = {"ray_ziggurat_recorder_rows_written_total": 3.0, "ray_ziggurat_recorder_rows_rejected_total": 1.0}
    found: dict[str, float] = {}
    deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
    while set(found) != set(wanted) and time.monotonic() < deadline:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for line in body.splitlines():
            name = line.split("{", 1)[0]
            if name in wanted and f'recorder="{settings.actor_name}"' in line:
                found[name] = float(line.rsplit(" ", 1)[1])
        time.sleep(1)
    assert found == wanted
    stop_recorder(recorder)
