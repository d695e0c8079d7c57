"""Binary COPY rows built by producers: same rows as the record path, idempotent, checked on arrival."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import sqlalchemy as sa

from recorder.migrate import upgrade
from recorder.records import unpack_logprobs, unpack_tokens
from recorder.schema import LlmCall, Step, utcnow
from recorder.store import TrajectoryStore
from recorder.wire import CALL_COLUMNS, STEP_COLUMNS, EncodedRows, encode
from tests.recorder_data import call, step, trajectory


def test_encoded_columns_are_exactly_the_tables_columns():
    assert set(STEP_COLUMNS) == set(Step.__table__.columns.keys())
    assert set(CALL_COLUMNS) == set(LlmCall.__table__.columns.keys())


@pytest.fixture
def pg_store(postgres):
    url = postgres.create_database(f"w_{uuid.uuid4().hex[:8]}")
    upgrade(url)
    store = TrajectoryStore(url)
    yield store
    store.dispose()


def _rows(store, table) -> list[dict]:
    with store.engine.connect() as conn:
        return [
            dict(r) for r in conn.execute(sa.select(table.__table__).order_by(*table.__table__.primary_key)).mappings()
        ]


def test_encoded_rows_store_what_the_records_say(pg_store):
    rng = np.random.default_rng(5)
    records = [step("t1", 0, reward=0.25), call("t1", 0, rng), step("t1", 1)]
    records[0].error = "bad JSON\tat line 1\n"  # tabs, newlines and unicode survive the binary format
    records[0].observation = "prix: 0,31 € — ok"
    blocks = encode(records, utcnow())
    result = pg_store.write([trajectory("t1"), *blocks])
    assert result.written == 4 and not result.rejected
    steps, calls = _rows(pg_store, Step), _rows(pg_store, LlmCall)
    assert [(s["step_index"], s["env_reward"], s["error"], s["observation"]) for s in steps] == [
        (0, 0.25, "bad JSON\tat line 1\n", "prix: 0,31 € — ok"),
        (1, 0.0, None, "balance 100, step 1"),
    ]
    assert steps[0]["action"] == {"type": "hold"} and steps[0]["done"] is False
    stored = calls[0]
    assert np.array_equal(unpack_tokens(stored["prompt_token_ids"]), unpack_tokens(records[1].prompt_token_ids))
    assert np.array_equal(
        unpack_logprobs(stored["completion_logprobs"]), unpack_logprobs(records[1].completion_logprobs)
    )
    assert stored["sampling_params"] == {"temperature": 1.0} and stored["messages"] is None
    assert (stored["prompt_tokens"], stored["completion_tokens"], stored["latency_ms"]) == (300, 100, 12.5)
    assert abs((stored["created_at"] - utcnow()).total_seconds()) < 60


def test_resent_encoded_rows_are_ignored(pg_store):
    rng = np.random.default_rng(6)
    blocks = encode([step("t1", 0), call("t1", 0, rng)], utcnow())
    pg_store.write([trajectory("t1"), *blocks])
    more = encode([step("t1", 1)], utcnow())
    result = pg_store.write([*blocks, *more])  # a retry that overlaps what is stored, plus one new step
    assert result.written == 3 and not result.rejected
    assert len(_rows(pg_store, Step)) == 2 and len(_rows(pg_store, LlmCall)) == 1


def test_encoded_rows_of_unknown_trajectories_are_rejected_by_position(pg_store):
    blocks = encode([step("t1", 0), step("ghost", 0), step("t1", 1)], utcnow())
    result = pg_store.write([trajectory("t1"), *blocks])
    assert result.written == 3
    assert result.rejected == [(2, "trajectory_id 'ghost' is unknown: send its TrajectoryRecord first")]


def test_malformed_blocks_are_rejected_whole(pg_store, tmp_path):
    bad = EncodedRows("steps", ["t1", "t1"], b"only one row", [12, 1])
    result = pg_store.write([trajectory("t1"), bad])
    assert result.written == 1 and [p for p, _ in result.rejected] == [1, 2]
    assert "sizes that add up to the data" in result.rejected[0][1]
    bad_sizes = EncodedRows("steps", ["t1"], b"row", ["3"])
    assert "sizes must be a list of positive integers" in pg_store.write([bad_sizes]).rejected[0][1]
    sqlite_url = f"sqlite:///{tmp_path / 's.db'}"
    upgrade(sqlite_url)
    sqlite_store = TrajectoryStore(sqlite_url)
    result = sqlite_store.write([trajectory("t1"), *encode([step("t1", 0)], utcnow())])
    assert "send record objects to a SQLite recorder" in result.rejected[0][1]
    sqlite_store.dispose()
