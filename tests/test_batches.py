"""Which groups a batch may take (complete, whole, fresh against its parent), one open batch per parent, and
batch and version statuses changed compare-and-set: on SQLite and on real PostgreSQL (the `db_url` fixture)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from recorder import queries
from recorder.records import LlmCallRecord, StepRecord, TrajectoryRecord
from recorder.store import TrajectoryStore
from tests.recorder_data import call, finished, step, trajectory


@pytest.fixture
def store(db_url):
    store = TrajectoryStore(db_url)
    yield store
    store.dispose()


def _group(
    name: str, rewards: list[float], version: int = 0, steps: int = 1, seed: int = 0
) -> list[TrajectoryRecord | StepRecord | LlmCallRecord]:
    """A finished, complete group: every trajectory has all its `steps` steps, each with its LLM call."""
    rng = np.random.default_rng(seed)
    records: list[TrajectoryRecord | StepRecord | LlmCallRecord] = []
    for i, reward in enumerate(rewards):
        tid = f"{name}-{i}"
        records.append(trajectory(tid, name, version))
        for index in range(steps):
            records += [step(tid, index), call(tid, index, rng, 8, 4, version)]
        records.append(finished(tid, name, reward, version, steps=steps))
    return records


def _claimed(store: TrajectoryStore, batch_id: int | None) -> list[str]:
    assert batch_id is not None, "nothing was claimed"
    return queries.get_batch(store.engine, batch_id)["trajectory_ids"]


# ---- complete data, whole groups --------------------------------------------------------------------------
def _episode(
    tid: str, group: str, reward: float, stored: tuple[int, ...] = (0, 1), calls: tuple[int, ...] = (0, 1)
) -> list[TrajectoryRecord | StepRecord | LlmCallRecord]:
    """A finished two-step trajectory with only the `stored` steps and the `calls` of those steps recorded."""
    rng = np.random.default_rng(len(tid))
    records: list[TrajectoryRecord | StepRecord | LlmCallRecord] = [trajectory(tid, group)]
    records += [step(tid, i) for i in stored] + [call(tid, i, rng, 8, 4) for i in calls]
    return [*records, finished(tid, group, reward, steps=2)]


def test_a_trajectory_missing_one_of_its_steps_is_never_claimed(store):
    records = _episode("whole-0", "whole", 1.0) + _episode("whole-1", "whole", 0.0)
    records += _episode("gap-0", "gap", 1.0) + _episode("gap-1", "gap", 0.0, stored=(0,), calls=(0,))
    records += _episode("nocall-0", "nocall", 1.0) + _episode("nocall-1", "nocall", 0.0, calls=(0,))
    store.write(records)

    ready = queries.readiness(store.engine)
    assert ready.groups_with_variance == 1 and ready.trainable_trajectories == 2  # only "whole"
    assert ready.failed_quality == 2  # gap-1 (a step missing) and nocall-1 (a step's LLM call missing)
    assert ready.incomplete_groups == 2  # "gap" and "nocall" wait for their missing data
    assert _claimed(store, queries.claim_batch(store.engine, max_groups=10)) == ["whole-0", "whole-1"]
    assert queries.claim_batch(store.engine, max_groups=10) is None

    rng = np.random.default_rng(5)
    store.write([step("gap-1", 1), call("gap-1", 1, rng, 8, 4)])  # the late step arrives: the group is whole
    assert _claimed(store, queries.claim_batch(store.engine, max_groups=10)) == ["gap-0", "gap-1"]


def test_a_group_trains_only_whole(store):
    records = _group("ok", [1.0, 0.0])
    records += _group("waiting", [1.0, 0.0, 0.5])[:-1]  # its last trajectory is still running
    records += _group("cut", [1.0, 0.0, 0.5])[:-1]
    records.append(TrajectoryRecord("cut-2", "market", "scenario-cut", "cut", 0, status="aborted", step_count=1))
    records += [trajectory("eval-0", "ok", is_eval=True)]  # an evaluation episode is not part of the group
    store.write(records)
    assert _claimed(store, queries.claim_batch(store.engine, max_groups=10)) == ["ok-0", "ok-1"]
    assert queries.claim_batch(store.engine, max_groups=10) is None  # "cut" never, "waiting" not yet
    ready = queries.readiness(store.engine)
    assert (ready.groups, ready.groups_with_variance, ready.incomplete_groups) == (2, 0, 2)
    store.write([finished("waiting-2", "waiting", 0.5)])
    assert len(_claimed(store, queries.claim_batch(store.engine, max_groups=10))) == 3


# ---- one staleness rule: at claim, against the parent -----------------------------------------------------
def _versions(store: TrajectoryStore) -> None:
    for version in (0, 1, 2):
        store.write(_group(f"v{version}", [1.0, 0.0], version=version, seed=version))


def test_max_staleness_zero_claims_only_groups_of_the_parent_itself(store):
    _versions(store)
    ready = queries.readiness(store.engine, parent_version=2, max_staleness=0)
    assert (ready.groups_with_variance, ready.stale, ready.min_version) == (1, 4, 2)
    batch = queries.claim_batch(store.engine, max_groups=10, parent_version=2, max_staleness=0)
    assert _claimed(store, batch) == ["v2-0", "v2-1"]
    assert queries.get_batch(store.engine, batch)["parent_version"] == 2


def test_a_group_exactly_max_staleness_behind_is_claimed_and_one_more_is_not(store):
    _versions(store)
    ready = queries.readiness(store.engine, parent_version=2, max_staleness=1)
    assert (ready.groups_with_variance, ready.stale) == (2, 2)  # v1 (1 behind) counts, v0 (2 behind) is stale
    batch = queries.claim_batch(store.engine, max_groups=10, parent_version=2, max_staleness=1)
    assert _claimed(store, batch) == ["v1-0", "v1-1", "v2-0", "v2-1"]
    queries.fail_batch(store.engine, batch, "released for the next claim")
    assert queries.staleness_floor(2, 1) == 1 and queries.staleness_floor(None, 3) == 0
    assert queries.staleness_floor(5, None) == 0


# ---- lineage ----------------------------------------------------------------------------------------------
def test_the_next_version_trains_from_the_deployed_one(store):
    engine = store.engine
    queries.ensure_base_version(engine, "base")
    assert queries.training_parent(engine)["version"] == 0
    statuses = {1: "retired", 2: "deployed", 3: "canary", 4: "ready", 5: "failed", 6: "rolled_back"}
    for version, status in statuses.items():
        assert queries.register_version(engine, base_model="base", kind="lora", artifact_uri=f"/v{version}") == version
        queries.update_version(engine, version, status=status)
    queries.update_version(engine, 0, status="retired")
    assert queries.training_parent(engine)["version"] == 2 and queries.deployed_version(engine) == 2


# ---- one open batch per parent; compare-and-set statuses -------------------------------------------------
def test_two_concurrent_claims_from_one_parent_make_one_batch(store):
    for g in range(6):
        store.write(_group(f"g{g}", [1.0, 0.0], seed=g))
    barrier = threading.Barrier(2)
    results: list[object] = []

    def claim() -> None:
        barrier.wait()
        try:
            results.append(queries.claim_batch(store.engine, max_groups=2, parent_version=0, attempts=50))
        except Exception as exc:  # the loser's error, checked below
            results.append(exc)

    threads = [threading.Thread(target=claim) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(queries.list_batches(store.engine)) == 1, results
    batch_id = next(r for r in results if isinstance(r, int))
    (refused,) = [r for r in results if not isinstance(r, int)]
    assert isinstance(refused, queries.BatchInProgress)
    assert f"training batch {batch_id} from version 0 is still pending" in str(refused)

    # another parent has its own lineage; this one opens again once its batch has ended
    other = queries.claim_batch(store.engine, max_groups=2, parent_version=1)
    assert other is not None and other != batch_id
    queries.mark_batch(store.engine, batch_id, "failed", error="worker lost", release=True)
    assert queries.claim_batch(store.engine, max_groups=2, parent_version=0) is not None


def test_a_batch_that_ended_can_never_move_again(store):
    store.write(_group("g", [1.0, 0.0]))
    engine = store.engine
    batch = queries.claim_batch(engine, max_groups=1)
    with pytest.raises(queries.BatchStateConflict, match=f"batch {batch} is pending, not running"):
        queries.mark_batch(engine, batch, "completed")
    version = queries.start_batch(engine, batch, base_model="base", kind="lora", parent_version=0)
    assert queries.get_batch(engine, batch)["target_version"] == version
    with pytest.raises(queries.BatchStateConflict, match="is running, not pending"):  # a second job, same batch
        queries.start_batch(engine, batch, base_model="base", kind="lora", parent_version=0)
    assert [v["version"] for v in queries.list_versions(engine)] == [version]  # the loser registered nothing
    queries.complete_batch(engine, batch, version, artifact_uri="/store/v1", metrics={"loss": 0.1})
    assert queries.get_version(engine, version)["status"] == "ready"

    # a timeout firing after the job completed cannot reopen or fail the batch, nor its version
    for status in ("running", "failed"):
        with pytest.raises(queries.BatchStateConflict, match=f"batch {batch} is completed, not .*cannot become"):
            queries.mark_batch(engine, batch, status)
    with pytest.raises(queries.BatchStateConflict, match="is completed"):
        queries.fail_batch(engine, batch, "training passed controller.training_timeout_s")
    info = queries.get_batch(engine, batch)
    assert info["status"] == "completed" and info["error"] is None and info["trajectory_ids"] == ["g-0", "g-1"]
    assert queries.readiness(engine).groups_with_variance == 0  # not released
    assert queries.get_version(engine, version)["status"] == "ready"
    with pytest.raises(ValueError, match="never returns to it"):
        queries.mark_batch(engine, batch, "pending")
    with pytest.raises(ValueError, match="cannot move from completed to running"):
        queries.mark_batch(engine, batch, "running", expected="completed")
    with pytest.raises(queries.VersionStateConflict, match=f"version {version} is ready, not training"):
        queries.update_version(engine, version, status="failed", expected="training")
