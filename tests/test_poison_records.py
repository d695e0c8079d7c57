"""Poison records: whatever one record holds, it is rejected by name, dropped, and recording goes on.

Through the real path (RecorderClient -> recorder actor -> SQLite or the throwaway PostgreSQL), with every
kind of value the databases (or Python on the way to them) refuse, and with rows only the database can
refuse (a constraint the recorder does not know of), which the store isolates row by row.
"""

from __future__ import annotations

import json
import math
import sqlite3
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa

from recorder.actor import start_recorder, stop_recorder
from recorder.client import RecorderClient
from recorder.config import DatabaseConfig, RecorderConfig
from recorder.records import JudgmentRecord, LlmCallRecord, Record, StepRecord, TrajectoryRecord
from recorder.schema import utcnow
from recorder.store import TrajectoryStore
from recorder.wire import EncodedRows, encode
from tests.recorder_data import call, finished, step, trajectory

REFUSED = "refused by the database"
"""Text that a constraint installed by `_refuse_in_the_database` makes the database refuse."""


class Unpicklable(str):
    """A string that passes every check but cannot travel to the recorder (e.g. a lazy proxy type)."""

    def __reduce__(self) -> Any:
        raise TypeError("this string refuses to be pickled")


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def _refuse_in_the_database(url: str) -> None:
    """Constraints the recorder cannot know of: rows that pass validation and still fail in the database."""
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            for table, column in (("steps", "observation"), ("llm_calls", "text"), ("trajectories", "environment")):
                conn.execute(
                    f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} WHEN NEW.{column} = '{REFUSED}' "
                    f"BEGIN SELECT RAISE(ABORT, 'a test trigger refuses this {table} row'); END"
                )
        return
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for table, column in (("steps", "observation"), ("llm_calls", "text"), ("trajectories", "environment")):
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD CONSTRAINT refuse_{table} CHECK ({column} <> '{REFUSED}')")
    engine.dispose()


def _poison() -> list[tuple[Record, str]]:
    """(record, what its rejection must say). Steps and calls belong to `good-0`, which is stored."""
    t = "good-0"
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    rng = np.random.default_rng(7)

    def bad_call(index: int, **fields: Any) -> LlmCallRecord:
        record = call(t, 0, rng, 8, 4)
        record.call_index = index
        for name, value in fields.items():
            setattr(record, name, value)
        return record

    return [
        # NUL characters, in text and in JSON (values and keys)
        (StepRecord(t, 100, "a\x00b"), "observation contains a NUL character"),
        (StepRecord(t, 101, "o", action={"say": "a\x00b"}), "action['say'] contains a NUL character"),
        (StepRecord(t, 102, "o", action={"k\x00": 1}), "a key of action contains a NUL character"),
        (StepRecord(t, 103, "o", error="x\x00"), "error contains a NUL character"),
        # lone UTF-16 surrogates (text Python cannot even encode)
        (StepRecord(t, 104, "caf\udce9"), "observation contains a lone UTF-16 surrogate U+DCE9"),
        (StepRecord(t, 105, "o", action={"say": ["ok", "\ud83d"]}), "action['say'][1] contains a lone UTF-16"),
        # NaN and Infinity in JSON
        (StepRecord(t, 106, "o", action={"x": math.nan}), "action['x'] is nan"),
        (StepRecord(t, 107, "o", action={"x": [1.0, -math.inf]}), "action['x'][1] is -inf"),
        # JSON nested too deep, or containing itself, and keys that are not strings
        (StepRecord(t, 108, "o", action=_nested(101)), "action is nested more than 100 levels"),
        (StepRecord(t, 109, "o", action=_nested(5000)), "action is nested more than 100 levels"),
        (StepRecord(t, 110, "o", action=cycle), "action is nested more than 100 levels deep (or contains itself)"),
        (StepRecord(t, 111, "o", action={(1, 2): "x"}), "JSON object keys must be strings"),
        (StepRecord(t, 112, "o", action={7: "x"}), "action has the key 7 (int)"),
        # values that are not JSON, and JSON integers beyond 64 bits
        (StepRecord(t, 113, "o", action={"s": {1, 2}}), "action['s'] is a set, which is not JSON"),
        (StepRecord(t, 114, "o", action={"n": 2**64}), "action['n'] is an integer beyond 64 bits"),
        (StepRecord(t, 115, "o", action=["not", "a", "dict"]), "action must be a dict"),
        # bytes where text is expected
        (StepRecord(t, 116, b"observation"), "observation must be a string, got bytes"),
        (StepRecord(t, 117, "o", error=b"oops"), "error must be a string, got bytes"),
        # integers out of the columns' range, numbers no double holds
        (StepRecord(t, 2**31, "o"), "step_index must be at most 2147483647"),
        (StepRecord(t, 2**70, "o"), "step_index must be at most 2147483647"),
        (StepRecord(t, 118, "o", env_reward=10**400), "env_reward must be finite and fit a double"),
        # LLM calls
        (bad_call(1, text="x\x00y"), "text contains a NUL character"),
        (bad_call(2, messages=[{"role": "user", "content": "\udc80"}]), "messages[0]['content'] contains a lone"),
        (bad_call(3, sampling_params={"temperature": math.inf}), "sampling_params['temperature'] is inf"),
        (bad_call(4, messages="not a list"), "messages must be a list"),
        (bad_call(5, purpose="p" * 33), "purpose must be at most 32 characters"),
        (bad_call(2**31), "call_index must be at most 2147483647"),
        # trajectories: over-long fields and ids, bad JSON, wrong types
        (TrajectoryRecord("t-long-env", "e" * 101, "s", "g", 0), "environment must be at most 100 characters"),
        (TrajectoryRecord("t" * 65, "market", "s", "g", 0), "id must be at most 64 characters"),
        (TrajectoryRecord("t-nul", "market", "s\x00", "g", 0), "scenario_id contains a NUL character"),
        (TrajectoryRecord("t-agent", "market", "s", "g", 0, agent_id=b"a"), "agent_id must be a string, got bytes"),
        (TrajectoryRecord("t-nan", "market", "s", "g", 0, metrics={"loss": math.nan}), "metrics['loss'] is nan"),
        (TrajectoryRecord("t-when", "market", "s", "g", 0, started_at="now"), "started_at must be a datetime"),
        (TrajectoryRecord("t-version", "market", "s", "g", 2**40), "model_version must be at most 2147483647"),
        (TrajectoryRecord("t-pickle", "market", "s", "g", 0, metadata={"n": Unpicklable("x")}), "cannot be sent"),
        # judgments
        (JudgmentRecord(t, "ruler-nul", "llm", 0.5, reasoning="\x00"), "reasoning contains a NUL character"),
        (JudgmentRecord(t, "j" * 101, "llm", 0.5), "judge must be at most 100 characters"),
        (JudgmentRecord(t, "ruler-nan", "llm", 0.5, criteria={"c": math.nan}), "criteria['c'] is nan"),
        # rows only the database refuses: isolated in the store, row by row
        (StepRecord(t, 119, REFUSED), "the database refused it"),
        (bad_call(6, text=REFUSED), "the database refused it"),
        (TrajectoryRecord("t-db-refused", REFUSED, "s", "g", 0), "the database refused it"),
        (StepRecord("t-db-refused", 0, "o"), "trajectory_id 't-db-refused' is unknown"),
    ]


def _episode(tid: str, rng: np.random.Generator) -> list[Record]:
    group = f"group-{tid}"
    records: list[Record] = [trajectory(tid, group)]
    for index in range(2):
        records += [step(tid, index, reward=0.5), call(tid, index, rng, 16, 4)]
    return records + [finished(tid, group, reward=1.0, steps=2)]


def _rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(sql))]
    finally:
        engine.dispose()


def test_poison_records_are_rejected_by_name_and_recording_goes_on(ray_session, db_url):
    _refuse_in_the_database(db_url)
    settings = RecorderConfig(
        actor_name=f"recorder-{uuid.uuid4().hex[:8]}", call_timeout_s=30, retry_deadline_s=60, max_call_bytes=3_000
    )  # small calls: the poison lands in several calls, some merged into one transaction by the recorder
    recorder = start_recorder(DatabaseConfig(url=db_url), settings)
    client = RecorderClient(settings)
    rng = np.random.default_rng(0)
    poison = _poison()

    first = _episode("good-0", rng)
    good: list[Record] = list(first)
    client.extend(first[:-1])  # good-0 ends after the poison that refers to it
    for i, (record, _) in enumerate(poison):
        client.add(record)
        if i % 8 == 0:  # good records of other episodes between the bad ones, in the same flush
            episode = _episode(f"good-{1 + i // 8}", rng)
            client.extend(episode)
            good += episode
    client.add(first[-1], JudgmentRecord("good-0", "env", "env", score=1.0))
    report = client.flush()

    rejected = dict(report.rejected)
    assert len(report.rejected) == len(rejected), "a record was rejected twice"
    expected = {record.key: reason for record, reason in poison}
    assert set(rejected) == set(expected), f"unexpected: {set(rejected) ^ set(expected)}"
    for key, fragment in expected.items():
        assert fragment in rejected[key], (key, rejected[key])
    assert not client.unacked

    later = [f"good-later-{i}" for i in range(9)]  # the measurement in the issue: 0 of 9 were stored
    for tid in later:
        client.extend(_episode(tid, rng))
        assert client.flush().rejected == []
        assert not client.unacked

    first_flush = {r.id for r in good if isinstance(r, TrajectoryRecord)}
    stored = _rows(db_url, "SELECT id, status FROM trajectories")
    assert sorted(stored) == sorted((tid, "finished") for tid in first_flush | set(later))
    steps = _rows(db_url, "SELECT trajectory_id, step_index FROM steps")
    calls = _rows(db_url, "SELECT trajectory_id, step_index, call_index FROM llm_calls")
    assert len(steps) == len(set(steps)) and len(calls) == len(set(calls)), "a row was stored twice"
    assert set(steps) == {(tid, index) for tid in first_flush | set(later) for index in range(2)}
    assert set(calls) == {(tid, index, 0) for tid in first_flush | set(later) for index in range(2)}
    assert _rows(db_url, "SELECT trajectory_id, judge FROM reward_judgments") == [("good-0", "env")]
    stop_recorder(recorder)


@pytest.fixture
def refusing_store(db_url):
    _refuse_in_the_database(db_url)
    store = TrajectoryStore(db_url)
    yield store
    store.dispose()


def test_a_batch_the_database_refuses_in_part_stores_all_the_rest(refusing_store, db_url):
    rng = np.random.default_rng(1)
    items: list[Any] = [trajectory("t1"), trajectory("t2")]
    bad: list[int] = []
    for index in range(300):
        refused = index in (0, 137, 138, 299)
        if refused:
            bad.append(len(items))
        items.append(StepRecord("t1", index, REFUSED if refused else "fine"))
        items.append(call("t2", index, rng, 8, 4))
    # A call may carry a trajectory's steps, then its end and no start (the end creates the row): the steps
    # are kept even when a refused row separates them from the end.
    items.append(StepRecord("t4", 0, "fine"))
    bad.append(len(items))
    items.append(StepRecord("t1", 300, REFUSED))
    items.append(finished("t4", "g", reward=1.0))
    bad.append(len(items))
    items.append(TrajectoryRecord("t3", REFUSED, "s", "g", 0))
    items.append(step("t3", 0))  # its trajectory was refused: unknown
    result = refusing_store.write(items)
    assert [position for position, _ in result.rejected] == [*bad, len(items) - 1]
    assert all("the database refused it" in reason for _, reason in result.rejected[:-1])
    assert "'t3' is unknown" in result.rejected[-1][1]
    assert result.written == len(items) - len(bad) - 1
    stored = _rows(db_url, "SELECT trajectory_id, step_index FROM steps")
    assert sorted(stored) == [("t1", i) for i in range(300) if i not in (0, 137, 138, 299)] + [("t4", 0)]
    assert len(_rows(db_url, "SELECT 1 FROM llm_calls")) == 300
    assert refusing_store.write(items[:50]).written == 50 - 1  # a resend: idempotent, and the bad row again refused
    assert len(_rows(db_url, "SELECT 1 FROM steps")) == 297


def test_bad_copy_rows_from_a_producer_are_isolated(postgres):
    from recorder.migrate import upgrade

    url = postgres.create_database(f"copy_{uuid.uuid4().hex[:8]}")
    upgrade(url)
    store = TrajectoryStore(url)
    try:
        store.write([trajectory("t1")])
        rows = encode([step("t1", i) for i in range(6)], utcnow())[0].rows()
        garbage = [b"\x00\x08not a COPY tuple", rows[0][:-3], b"\x00\x08" + b"\xff" * 40]
        mixed = [rows[0], garbage[0], *rows[1:4], garbage[1], rows[4], rows[5], garbage[2]]
        result = store.write([step("t1", 10), EncodedRows.of_rows("steps", ["t1"] * 9, mixed)])
        assert [position for position, _ in result.rejected] == [2, 6, 9], result.rejected
        assert result.written == 7
        assert sorted(_rows(url, "SELECT step_index FROM steps")) == [(i,) for i in (0, 1, 2, 3, 4, 5, 10)]
    finally:
        store.dispose()


def test_a_lost_connection_is_raised_for_a_retry_never_rejected(postgres):
    from recorder.errors import is_connectivity
    from recorder.migrate import upgrade

    url = postgres.create_database(f"lost_{uuid.uuid4().hex[:8]}")
    upgrade(url)
    store = TrajectoryStore(url)
    try:
        store.write([trajectory("t1")])
        pid = store._connection().connection.driver_connection.info.backend_pid
        with psycopg.connect(postgres.url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        with pytest.raises(Exception) as lost:
            store.write([StepRecord("t1", 0, REFUSED + " (never checked: the connection is gone)")])
        assert is_connectivity(lost.value)
        assert store.write([step("t1", 1)]).written == 1  # a new connection; nothing was rejected or kept
        assert _rows(url, "SELECT step_index FROM steps") == [(1,)]
    finally:
        store.dispose()


def test_valid_values_at_the_limits_are_stored_exactly(db_url):
    """The checks refuse only what cannot be stored: the limits themselves, and non-ASCII text, pass."""
    store = TrajectoryStore(db_url)
    try:
        action = {"deep": _nested(99), "emoji": "café 😀", "big": 2**63 - 1, "neg": -(2**63), "tiny": 5e-324}
        records: list[Any] = [
            TrajectoryRecord("t" * 64, "e" * 100, "s" * 200, "g" * 64, 2**31 - 1, started_at=datetime.now(UTC)),
            StepRecord("t" * 64, 2**31 - 1, "ünïcødé \u2028 text", action=action, env_reward=-1e308),
        ]
        result = store.write(records)
        assert result.rejected == [] and result.written == 2
        engine = store.engine
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT observation, action FROM steps")).one()
        assert row[0] == "ünïcødé \u2028 text"
        stored = row[1] if isinstance(row[1], dict) else json.loads(row[1])
        assert stored == action
    finally:
        store.dispose()


def test_many_tiny_records_are_cut_into_calls_the_recorder_accepts(ray_session, tmp_path):
    """Calls are cut by size; thousands of tiny records would make one call larger than the recorder's buffer,
    which it refuses outright, on every flush."""
    from recorder.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    upgrade(url)
    settings = RecorderConfig(actor_name=f"recorder-{uuid.uuid4().hex[:8]}", max_buffer_records=100)
    recorder = start_recorder(DatabaseConfig(url=url), settings)
    client = RecorderClient(settings)
    client.add(trajectory("t1"), *(StepRecord("t1", i, "") for i in range(500)))
    report = client.flush()
    assert report.acknowledged == 501 and report.rejected == [] and not client.unacked
    assert len(_rows(url, "SELECT 1 FROM steps")) == 500
    stop_recorder(recorder)
