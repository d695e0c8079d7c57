"""The persistent trainer service (2 CPU workers, DDP over gloo) trains batch after batch of the tiny model.

One service runs a whole scenario on one SQLite database: batch 1 from the base model, batch 2 from the
version batch 1 produced (on the model the workers hold), batch 3 that cannot train (a token outside the
vocabulary), batch 4 after it. The one-batch job then trains batch 1 again on a copy of the database taken
before the service touched it: the independent reference for what the service's first version must be.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster import trainer_service
from cluster.config import load_config
from cluster.train_job import run_training
from recorder import queries
from recorder.migrate import upgrade
from recorder.records import LlmCallRecord
from recorder.store import TrajectoryStore
from tests.recorder_data import finished, step, trajectory
from trainer.model import MANIFEST

pytestmark = pytest.mark.slow

OUT_OF_VOCABULARY = 60_000  # the tiny model's vocabulary is SmolLM2's 49152 tokens


def _record(url: str, groups: dict[str, int], seed: int, bad_token: bool = False) -> None:
    """One group of 4 per name, sampled by the given version, rewards 0/1 alternating."""
    rng = np.random.default_rng(seed)
    store = TrajectoryStore(url)
    records = []
    for group, version in groups.items():
        prompt = rng.integers(100, 40000, 12)
        for i in range(4):
            tid = f"{group}-t{i}"
            completion = rng.integers(100, 40000, 6)
            if bad_token:
                completion[2] = OUT_OF_VOCABULARY
            records += [
                trajectory(tid, group, version),
                step(tid, 0),
                LlmCallRecord.from_tokens(tid, 0, 0, version, prompt, completion, -rng.random(6) * 3 - 8),
                finished(tid, group, float(i % 2), version),
            ]
    store.write(records)
    store.dispose()


def _config(url: str, tiny_model_dir: str, store: Path, name: str) -> Any:
    base = load_config()
    return base.model_copy(
        update={
            "model": base.model.model_copy(update={"name": tiny_model_dir, "store_dir": store}),
            "database": base.database.model_copy(update={"url": url}),
            "controller": base.controller.model_copy(update={"name": name}),
            "trainer": base.trainer.model_copy(
                update={"num_workers": 2, "micro_batch_rows": 4, "updates_per_batch": 2, "learning_rate": 2e-2}
            ),
        }
    )


def _wait_ended(engine: Any, batch_id: int, timeout_s: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = queries.get_batch(engine, batch_id)
        if batch["status"] in ("completed", "failed"):
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} still {queries.get_batch(engine, batch_id)['status']} after {timeout_s} s")


def _copy_database(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database (its WAL included), through SQLite's backup API."""
    import sqlite3

    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)


def _wall_s(batch: dict[str, Any]) -> float:
    return (batch["finished_at"] - batch["started_at"]).total_seconds()


def _job(config: Any, root: Path, copy: str, batch_id: int, version: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The one-batch job trains `batch_id` on the database copy `root / copy` into a store of its own; returns
    the version's and the batch's rows there."""
    url = f"sqlite:///{root / copy}"
    job = config.model_copy(
        update={
            "database": config.database.model_copy(update={"url": url}),
            "model": config.model.model_copy(update={"store_dir": root / f"{copy}-store"}),
        }
    )
    assert run_training(job, batch_id=batch_id) == version
    store = TrajectoryStore(url)
    try:
        return queries.get_version(store.engine, version), queries.get_batch(store.engine, batch_id)
    finally:
        store.dispose()


@pytest.fixture(scope="module")
def scenario(ray_session: object, tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Runs one service through five batches, then the one-batch job on copies of batches 1 and 5 taken before
    the service trained them; returns the rows."""
    root = tmp_path_factory.mktemp("service")
    url = f"sqlite:///{root / 'service.db'}"
    upgrade(url)
    _record(url, {"a0": 0, "a1": 0, "b0": 0, "b1": 0}, seed=21)
    config = _config(url, tiny_model_dir, root / "store", f"zt-{uuid.uuid4().hex[:6]}")
    store = TrajectoryStore(url)
    engine = store.engine
    claim = {"max_groups": 2, "max_staleness": 1}
    first = queries.claim_batch(engine, parent_version=0, **claim)
    _copy_database(root / "service.db", root / "job1.db")  # batch 1 still pending: the job's copy of it

    started = time.monotonic()
    trainer_service.ensure(config, timeout_s=240)
    startup_s = time.monotonic() - started
    rows: dict[str, Any] = {"config": config, "startup_s": startup_s}
    assert trainer_service.submit(config, first) == 1
    rows["b1"] = _wait_ended(engine, first)
    second = queries.claim_batch(engine, parent_version=1, **claim)  # the version batch 1 just produced
    assert trainer_service.submit(config, second) == 2
    rows["b2"] = _wait_ended(engine, second)

    _record(url, {"x0": 0}, seed=22, bad_token=True)
    bad = queries.claim_batch(engine, parent_version=2, max_groups=2, max_staleness=2)
    assert trainer_service.submit(config, bad) == 3
    rows["b3"] = _wait_ended(engine, bad)
    rows["x_trainable_after"] = queries.readiness(engine, parent_version=2, max_staleness=2).groups_with_variance
    _record(url, {"y0": 2}, seed=23)
    after = queries.claim_batch(engine, parent_version=2, max_groups=2, max_staleness=1)  # x0 is too stale
    assert trainer_service.submit(config, after) == 4
    rows["b4"] = _wait_ended(engine, after)

    # as after a rollback to version 1: a batch whose parent is not what the workers hold
    _record(url, {"z0": 1}, seed=24)
    rollback = queries.claim_batch(engine, parent_version=1, max_groups=2, max_staleness=0)
    _copy_database(root / "service.db", root / "job5.db")
    assert trainer_service.submit(config, rollback) == 5
    rows["b5"] = _wait_ended(engine, rollback)
    rows["status"] = trainer_service.status(config)
    trainer_service.stop(config, timeout_s=60)
    rows["found_after_stop"] = trainer_service.find(config)
    rows["versions"] = {v["version"]: v for v in queries.list_versions(engine)}
    store.dispose()

    started = time.monotonic()
    rows["job1_version"], rows["job1_batch"] = _job(config, root, "job1.db", first, 1)
    rows["job_s"] = time.monotonic() - started
    rows["job5_version"], rows["job5_batch"] = _job(config, root, "job5.db", rollback, 5)
    print(
        f"\nservice startup {startup_s:.1f} s; batch 1 {_wall_s(rows['b1']):.2f} s, batch 2 "
        f"{_wall_s(rows['b2']):.2f} s, batch 4 {_wall_s(rows['b4']):.2f} s, batch 5 (rebuilt) "
        f"{_wall_s(rows['b5']):.2f} s; one-batch job {rows['job_s']:.1f} s"
    )
    return rows


def _adapter(folder: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def test_one_service_trains_batch_after_batch_on_the_model_it_holds(scenario: dict[str, Any]) -> None:
    config, b1, b2, versions = scenario["config"], scenario["b1"], scenario["b2"], scenario["versions"]
    for batch, version, parent in ((b1, 1, None), (b2, 2, 1)):
        assert batch["status"] == "completed", batch["error"]
        assert batch["ray_job_id"] == trainer_service.job_id(config) == f"service:{config.controller.name}-trainer"
        row = versions[version]
        assert row["status"] == "ready" and row["parent_version"] == parent and row["training_batch_id"] == batch["id"]
        manifest = json.loads((Path(row["artifact_uri"]) / MANIFEST).read_text())
        assert manifest["version"] == version and manifest["training_batch"] == batch["id"]
        assert "adapter_model.safetensors" in manifest["checksums"] and "trainer_state.pt" not in manifest["checksums"]
        assert [u["update"] for u in batch["stats"]["updates"]] == [1, 2]
        assert row["metrics"]["update"] == 2 and row["metrics"]["rows"] == 8
    # batch 2 trained on the model the workers held after batch 1: one model built in all
    assert [(u["model_builds"], u["reused_model"]) for u in b1["stats"]["updates"]] == [(1, 0), (1, 0)]
    assert [(u["model_builds"], u["reused_model"]) for u in b2["stats"]["updates"]] == [(1, 1), (1, 1)]
    assert _wall_s(b2) < _wall_s(b1), (_wall_s(b1), _wall_s(b2))
    # ... and moved it further: version 2 is not version 1
    one, two = _adapter(versions[1]["artifact_uri"]), _adapter(versions[2]["artifact_uri"])
    assert max(float((one[k] - two[k]).abs().max()) for k in one) > 1e-4
    assert scenario["found_after_stop"] is None


def _same_training(served_version: dict[str, Any], served_batch: dict[str, Any], job: str, rows: dict) -> None:
    """The service's version and update reports equal the one-batch job's (`job`: its rows' key prefix)."""
    import torch

    assert rows[f"{job}_version"]["status"] == "ready"
    served, trained = _adapter(served_version["artifact_uri"]), _adapter(rows[f"{job}_version"]["artifact_uri"])
    assert sorted(served) == sorted(trained)
    for name in served:
        assert torch.allclose(served[name], trained[name], atol=1e-6), name
    # and training moved the adapter at all (a fresh LoRA's B matrices are zero)
    assert any(float(served[k].abs().max()) > 0 for k in served if "lora_B" in k)
    mine, theirs = served_batch["stats"]["updates"], rows[f"{job}_batch"]["stats"]["updates"]
    assert len(mine) == len(theirs) == 2
    for ours, reference in zip(mine, theirs, strict=True):
        assert ours["loss"] == pytest.approx(reference["loss"], rel=1e-5)
        assert ours["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)


def test_the_first_batch_trains_what_the_one_batch_job_trains(scenario: dict[str, Any]) -> None:
    _same_training(scenario["versions"][1], scenario["b1"], "job1", scenario)


def test_a_batch_from_another_parent_is_built_from_that_version_as_the_job_builds_it(
    scenario: dict[str, Any],
) -> None:
    b5, versions = scenario["b5"], scenario["versions"]
    assert b5["status"] == "completed", b5["error"]
    assert versions[5]["status"] == "ready" and versions[5]["parent_version"] == 1
    # the workers held version 4: they built version 1's adapter (the second build) with a fresh optimizer
    assert [(u["model_builds"], u["reused_model"]) for u in b5["stats"]["updates"]] == [(2, 0), (2, 0)]
    _same_training(versions[5], b5, "job5", scenario)


def test_a_batch_that_cannot_train_fails_and_the_service_trains_the_next(scenario: dict[str, Any]) -> None:
    b3, b4, versions, status = scenario["b3"], scenario["b4"], scenario["versions"], scenario["status"]
    assert b3["status"] == "failed"
    assert f"token id {OUT_OF_VOCABULARY}" in b3["error"] and "outside the model's vocabulary" in b3["error"]
    assert versions[3]["status"] == "failed" and "vocabulary" in versions[3]["metrics"]["error"]
    assert scenario["x_trainable_after"] == 1  # its group was released
    assert b4["status"] == "completed", b4["error"]
    assert versions[4]["status"] == "ready" and versions[4]["parent_version"] == 2
    # the failed batch never touched the weights: batch 4 trains on the model version 2 left
    assert [u["reused_model"] for u in b4["stats"]["updates"]] == [1, 1]
    assert status["running"] and status["batches_done"] == 4 and status["batches_failed"] == 1
    assert status["error"] is None and status["queued"] == []


def test_a_killed_worker_resumes_its_batch_and_the_service_serves_on(
    ray_session: object, tiny_model_dir: str, tmp_path: Path
) -> None:
    import os
    import signal

    import psutil

    url = f"sqlite:///{tmp_path / 'kill.db'}"
    upgrade(url)
    _record(url, {"a0": 0, "a1": 0, "b0": 0, "b1": 0}, seed=31)
    config = _config(url, tiny_model_dir, tmp_path / "store", f"zk-{uuid.uuid4().hex[:6]}")
    updates = 40
    config = config.model_copy(
        update={"trainer": config.trainer.model_copy(update={"updates_per_batch": updates, "max_failures": 2})}
    )
    store = TrajectoryStore(url)
    engine = store.engine
    try:
        first = queries.claim_batch(engine, parent_version=0, max_groups=2, max_staleness=1)
        trainer_service.ensure(config, timeout_s=240)
        workers = [
            p for p in psutil.process_iter(["cmdline"]) if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])
        ]
        assert len(workers) == 2, "expected the service's two training workers"
        assert trainer_service.submit(config, first) == 1
        assert trainer_service.serving(config, first)  # what the controller's recovery asks of the batch's job
        deadline = time.monotonic() + 120
        done = 0
        while done < 4 and time.monotonic() < deadline:
            done = (queries.get_batch(engine, first)["stats"] or {}).get("progress", {}).get("done", 0)
            time.sleep(0.05)
        assert 4 <= done < updates, f"the batch was at update {done} when the worker was to be killed"
        os.kill(workers[-1].pid, signal.SIGKILL)
        batch = _wait_ended(engine, first)
        assert batch["status"] == "completed", batch["error"]
        reports = batch["stats"]["updates"]
        assert [u["update"] for u in reports] == list(range(1, updates + 1))  # each once: replays replaced
        # the new group went on from a checkpoint, not from update 0. Update `done` is recorded on the row
        # before its own report but after its collectives, so every rank had returned from report(done - 1);
        # each rank's result queue holds one report, so every rank's report of done - 2 had been taken and its
        # checkpoint registered. done - 1's may still sit in the killed worker's queue (CI: done 3, resumed 1).
        assert reports[-1]["resumed_from_update"] >= done - 2 >= 2
        assert queries.get_version(engine, 1)["status"] == "ready"
        # the restarted group serves the next batch, on the model it resumed
        second = queries.claim_batch(engine, parent_version=1, max_groups=2, max_staleness=1)
        assert trainer_service.submit(config, second) == 2
        batch = _wait_ended(engine, second)
        assert batch["status"] == "completed", batch["error"]
        assert batch["stats"]["updates"][-1]["reused_model"] == 1
        status = trainer_service.status(config)
        assert status is not None and status["running"] and status["batches_done"] == 2
        assert not trainer_service.serving(config, first)
        # A service is reused by the configuration that started it only: any other (here another learning rate,
        # as a rerun after a crashed loop would bring) replaces it instead of training with the old settings.
        trainer_service.ensure(config, timeout_s=60)
        assert trainer_service.status(config)["run_name"] == status["run_name"]
        changed = config.model_copy(update={"trainer": config.trainer.model_copy(update={"learning_rate": 2e-3})})
        trainer_service.ensure(changed, timeout_s=240)
        replaced = trainer_service.status(changed)
        assert replaced["running"] and replaced["batches_done"] == 0 and replaced["run_name"] != status["run_name"]
    finally:
        trainer_service.stop(config, timeout_s=60)
        store.dispose()
