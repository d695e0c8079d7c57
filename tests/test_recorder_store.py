"""The trajectory store on SQLite and on real PostgreSQL: same test bodies (the `db_url` fixture)."""

from __future__ import annotations

import math
import threading
import uuid
from collections import Counter

import numpy as np
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from recorder import queries
from recorder.migrate import SchemaOutOfDate, head_revision
from recorder.records import JudgmentRecord, LlmCallRecord, StepRecord, unpack_logprobs, unpack_tokens
from recorder.schema import Base
from recorder.store import TrajectoryStore
from tests.recorder_data import call, finished, step, trajectory


@pytest.fixture
def store(db_url):
    store = TrajectoryStore(db_url)
    yield store
    store.dispose()


def _count(store, table: str) -> int:
    with store.engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()


def test_migrations_build_exactly_the_orm_schema(store):
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert context.get_current_revision() == head_revision()
        assert compare_metadata(context, Base.metadata) == []


def test_store_refuses_a_database_without_the_schema(tmp_path, postgres):
    for url in (f"sqlite:///{tmp_path / 'empty.db'}", postgres.create_database(f"e_{uuid.uuid4().hex[:8]}")):
        with pytest.raises(SchemaOutOfDate, match="run `ziggurat db upgrade"):
            TrajectoryStore(url)


def test_records_round_trip_with_exact_tokens(store):
    rng = np.random.default_rng(0)
    llm_call = call("t1", 0, rng)
    result = store.write([trajectory("t1"), step("t1", 0, reward=0.5), llm_call])
    assert result.written == 3 and result.rejected == []
    with store.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM llm_calls")).mappings().one()
        stored_step = conn.execute(sa.text("SELECT * FROM steps")).mappings().one()
    assert np.array_equal(unpack_tokens(row["prompt_token_ids"]), unpack_tokens(llm_call.prompt_token_ids))
    assert np.array_equal(unpack_logprobs(row["completion_logprobs"]), unpack_logprobs(llm_call.completion_logprobs))
    assert row["prompt_tokens"] == 300 and row["completion_tokens"] == 100
    assert stored_step["env_reward"] == 0.5


def test_writes_are_idempotent(store):
    rng = np.random.default_rng(1)
    batch = [trajectory("t1"), step("t1", 0), call("t1", 0, rng), step("t1", 1)]
    store.write(batch)
    store.write(batch)  # a retry after a timeout
    store.write(batch + batch)  # and duplicates inside one call
    assert (_count(store, "trajectories"), _count(store, "steps"), _count(store, "llm_calls")) == (1, 2, 1)


def test_a_replayed_start_never_reopens_a_finished_trajectory(store):
    store.write([trajectory("t1")])
    store.write([finished("t1", "g", reward=2.0)])
    store.write([trajectory("t1")])  # the start event, resent late
    with store.engine.connect() as conn:
        status, reward = conn.execute(sa.text("SELECT status, total_reward FROM trajectories")).one()
    assert (status, reward) == ("finished", 2.0)


BAD_RECORDS = [
    (StepRecord("t1", "3", "obs"), "step_index must be an integer >= 0"),
    (StepRecord("t1", -1, "obs"), "step_index must be an integer >= 0"),
    (StepRecord("t1", 5, "obs", env_reward=math.nan), "env_reward must be finite"),
    (StepRecord("t1", 6, 42), "observation must be a string"),
    (StepRecord("nobody", 0, "obs"), "trajectory_id 'nobody' is unknown"),
    (
        LlmCallRecord.from_tokens("t1", 0, 1, 0, [1, 2], [3, 4, 5], [-0.1, -0.2]),
        "completion_logprobs has 2 values for 3",
    ),
    (LlmCallRecord.from_tokens("t1", 0, 2, 0, [], [3], [-0.1]), "prompt_token_ids is empty"),
    (LlmCallRecord.from_tokens("t1", 0, 6, 0, [1], [], []), "completion_token_ids is empty"),
    (LlmCallRecord.from_tokens("t1", 0, 3, 0, [1], [3], [math.nan]), "completion_logprobs must be finite"),
    (LlmCallRecord.from_tokens("t1", 0, 4, 0, [1], [3], [-0.1], purpose=None), "purpose must be a string"),
    (LlmCallRecord.from_tokens("t1", 0, 5, 0, [1], [3], [-0.1], finish_reason="x" * 17), "finish_reason must be"),
    (StepRecord("t1", 7, "obs", done=1), "done must be a bool"),
    (finished("t2", "g", reward=math.nan), "total_reward must be finite"),
    (trajectory("t3", status="done"), "status must be one of"),
    (JudgmentRecord("t1", "ruler", "llm", score=math.inf), "score must be finite"),
    ("not a record", "unknown record type str"),
]


def test_malformed_records_are_rejected_by_field_and_the_rest_is_written(store):
    rng = np.random.default_rng(2)
    good = [trajectory("t1"), step("t1", 0), call("t1", 0, rng), JudgmentRecord("t1", "env", "env", score=1.0)]
    bad = [record for record, _ in BAD_RECORDS]
    result = store.write(good[:1] + bad + good[1:])
    assert result.written == len(good)
    assert [position for position, _ in result.rejected] == list(range(1, 1 + len(bad)))
    for (_, reason), (_, expected) in zip(result.rejected, BAD_RECORDS, strict=True):
        assert expected in reason
    assert (_count(store, "steps"), _count(store, "llm_calls"), _count(store, "reward_judgments")) == (1, 1, 1)
    assert _count(store, "trajectories") == 1  # t2 (NaN reward) and t3 (bad status) were not stored


def _fill_groups(store, version: int = 0) -> None:
    rng = np.random.default_rng(3)
    records = []
    layout = {"varied": [1.0, 0.0, 0.0, 1.0], "flat": [1.0, 1.0, 1.0], "pair": [0.5, 0.0]}
    for group, rewards in layout.items():
        for i, reward in enumerate(rewards):
            tid = f"{group}-{i}"
            records += [trajectory(tid, group, version), step(tid, 0), call(tid, 0, rng, 20, 5, version)]
            records.append(finished(tid, group, reward, version))
    # A running episode of its own group (one inside "pair" would hold that group back: groups train whole,
    # see test_a_group_trains_only_whole); an evaluation episode is never part of a training group.
    records += [trajectory("still-running", "late", version), trajectory("eval-0", "varied", version, is_eval=True)]
    store.write(records)


def test_readiness_counts_only_trainable_unused_groups(store):
    _fill_groups(store)
    ready = queries.readiness(store.engine)
    assert ready.finished == 9 and ready.judged == 9
    assert ready.groups == 3 and ready.group_sizes == {2: 1, 3: 1, 4: 1}
    assert ready.groups_with_variance == 2  # "flat" has equal rewards: nothing to learn from
    assert ready.trainable_trajectories == 6
    assert ready.by_model_version == {0: 9}
    assert queries.readiness(store.engine, parent_version=1, max_staleness=0).finished == 0  # staleness bound


def test_readiness_from_a_judge_counts_judged_trajectories(store):
    _fill_groups(store)
    store.write([JudgmentRecord(f"varied-{i}", "ruler", "llm", score=float(i), rank_in_group=i) for i in range(4)])
    ready = queries.readiness(store.engine, reward_source="ruler")
    assert (ready.finished, ready.judged, ready.groups, ready.groups_with_variance) == (9, 4, 1, 1)


def test_claim_load_and_release_a_batch(store):
    _fill_groups(store)
    batch = queries.claim_batch(store.engine, max_groups=10, target_version=1)
    assert batch is not None
    info = queries.get_batch(store.engine, batch)
    assert info["status"] == "pending" and info["stats"] == {"groups": 2, "trajectories": 6}
    assert info["trajectory_ids"] == sorted(["varied-0", "varied-1", "varied-2", "varied-3", "pair-0", "pair-1"])
    assert queries.claim_batch(store.engine, max_groups=10) is None  # nothing trainable is left
    assert queries.readiness(store.engine).finished == 3

    groups = {g.group_id: g for g in queries.load_batch(store.engine, batch)}
    assert set(groups) == {"varied", "pair"}
    assert list(groups["varied"].rewards) == [1.0, 0.0, 0.0, 1.0]
    first = groups["varied"].trajectories[0].calls[0]
    assert first.prompt_token_ids.dtype == np.int32 and len(first.prompt_token_ids) == 20
    assert len(first.completion_token_ids) == len(first.completion_logprobs) == 5

    queries.mark_batch(store.engine, batch, "running", ray_job_id="raysubmit_1")
    queries.mark_batch(store.engine, batch, "failed", error="worker OOM", release=True)
    info = queries.get_batch(store.engine, batch)
    assert (info["status"], info["error"], info["ray_job_id"]) == ("failed", "worker OOM", "raysubmit_1")
    assert queries.claim_batch(store.engine, max_groups=10) is not None  # released groups are claimable again
    with pytest.raises(ValueError, match="batch status must be one of"):
        queries.mark_batch(store.engine, batch, "done")


def test_concurrent_claims_never_share_a_trajectory(store):
    rng = np.random.default_rng(4)
    records = []
    for g in range(40):
        for i in range(4):
            tid = f"g{g}-{i}"
            records += [trajectory(tid, f"g{g}"), step(tid, 0), call(tid, 0, rng, 8, 4)]
            records.append(finished(tid, f"g{g}", float(i % 2)))
    store.write(records)
    claimed: list[int] = []
    errors: list[BaseException] = []

    def claimer() -> None:
        try:
            while (batch := queries.claim_batch(store.engine, max_groups=3, attempts=50)) is not None:
                claimed.append(batch)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    members = [tid for batch in claimed for tid in queries.get_batch(store.engine, batch)["trajectory_ids"]]
    assert len(members) == len(set(members)) == 160  # every trajectory claimed, exactly once
    for batch in claimed:  # and groups are never split across batches
        sizes = Counter(tid.split("-")[0] for tid in queries.get_batch(store.engine, batch)["trajectory_ids"])
        assert set(sizes.values()) == {4}


def test_model_versions_are_monotonic_under_concurrency(store):
    versions: list[int] = []

    def register() -> None:
        for _ in range(5):
            versions.append(queries.register_version(store.engine, base_model="smollm2", kind="lora", attempts=50))

    threads = [threading.Thread(target=register) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(versions) == list(range(1, 16))
    queries.update_version(store.engine, 3, status="ready", metrics={"loss": 0.5})
    queries.update_version(store.engine, 3, metrics={"reward_mean": 0.7})
    (v3,) = [v for v in queries.list_versions(store.engine) if v["version"] == 3]
    assert v3["status"] == "ready" and v3["metrics"] == {"loss": 0.5, "reward_mean": 0.7} and v3["name"] == "v3"
    assert [v["version"] for v in queries.list_versions(store.engine, status="ready")] == [3]
    with pytest.raises(ValueError, match="version status must be one of"):
        queries.update_version(store.engine, 3, status="shipped")
    with pytest.raises(KeyError):
        queries.update_version(store.engine, 99, status="ready")


def test_readiness_gates_on_data_quality_and_staleness(store):
    from recorder.records import StepRecord

    rng = np.random.default_rng(9)
    records = []
    for i in range(2):  # a good group: steps, calls, parsed actions
        records += [trajectory(f"ok{i}", "ok"), step(f"ok{i}", 0), call(f"ok{i}", 0, rng, 8, 4)]
        records.append(finished(f"ok{i}", "ok", float(i)))
    for i in range(2):  # no LLM calls recorded
        records += [trajectory(f"nocall{i}", "nocall"), step(f"nocall{i}", 0), finished(f"nocall{i}", "nocall", i)]
    for i in range(2):  # a step whose action has neither a result nor an error
        records += [trajectory(f"blank{i}", "blank"), call(f"blank{i}", 0, rng, 8, 4)]
        records += [StepRecord(f"blank{i}", 0, "obs", action=None), finished(f"blank{i}", "blank", float(i))]
    for i in range(2):  # fine, but produced by version 1
        records += [trajectory(f"old{i}", "old", 1), step(f"old{i}", 0), call(f"old{i}", 0, rng, 8, 4, version=1)]
        records.append(finished(f"old{i}", "old", float(i), version=1))
    store.write(records)
    ready = queries.readiness(store.engine)
    assert (ready.groups_with_variance, ready.failed_quality, ready.stale) == (2, 4, 0)
    ready = queries.readiness(store.engine, parent_version=2, max_staleness=0)  # version 1 is beyond the bound
    assert (ready.groups_with_variance, ready.failed_quality, ready.stale) == (0, 0, 8)
    batch = queries.claim_batch(store.engine, max_groups=10)
    assert sorted(queries.get_batch(store.engine, batch)["trajectory_ids"]) == ["ok0", "ok1", "old0", "old1"]
