"""A Ray Train job (2 CPU workers, DDP over gloo) trains the tiny model on a batch recorded in PostgreSQL."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from cluster.config import load_config
from cluster.train_job import run_training
from recorder import queries
from recorder.migrate import upgrade
from recorder.records import LlmCallRecord
from recorder.store import TrajectoryStore
from tests.recorder_data import finished, step, trajectory
from trainer.model import MANIFEST

pytestmark = pytest.mark.slow


def _record_groups(url: str, groups: int = 3, size: int = 4) -> None:
    rng = np.random.default_rng(11)
    store = TrajectoryStore(url)
    records = []
    for g in range(groups):
        prompt = rng.integers(100, 40000, 12)
        for i in range(size):
            tid = f"g{g}-t{i}"
            completion = rng.integers(100, 40000, 6)
            records += [
                trajectory(tid, f"g{g}"),
                step(tid, 0),
                LlmCallRecord.from_tokens(tid, 0, 0, 0, prompt, completion, -rng.random(6) * 3 - 8),
                finished(tid, f"g{g}", float(i % 2)),
            ]
    store.write(records)
    store.dispose()


def _config(url: str, tiny_model_dir: str, tmp_path: Path, **trainer: object):
    base = load_config()
    return base.model_copy(
        update={
            "model": base.model.model_copy(update={"name": tiny_model_dir, "store_dir": tmp_path / "store"}),
            "database": base.database.model_copy(update={"url": url}),
            "trainer": base.trainer.model_copy(update={"num_workers": 2, "micro_batch_rows": 4, **trainer}),
        }
    )


def _served_adapter_matches_peft(tiny_engine, base: str, adapter: str) -> None:
    """vLLM serves the trained adapter: its log-probs are the peft model's, not the base model's."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompt = tiny_engine.chat_prompt([{"role": "user", "content": "Buy YES?"}])
    tiny_engine.set_adapter(1, adapter)
    try:
        served = tiny_engine.generate(prompt, temperature=0.0, max_tokens=8)
    finally:
        tiny_engine.set_adapter(0, None)
    assert served.model_version == 1
    completion = served.completions[0]
    ids = torch.tensor([prompt + completion.token_ids])

    def logprobs(model) -> torch.Tensor:
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
        return logp.gather(1, ids[0, 1:, None])[len(prompt) - 1 :, 0]

    base_model = AutoModelForCausalLM.from_pretrained(base)
    tuned = logprobs(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter))
    assert torch.allclose(torch.tensor(completion.logprobs), tuned, atol=2e-3)
    assert (tuned - logprobs(base_model)).abs().max() > 1e-2  # and the adapter really changed the policy


def _merged_weights_serve_like_the_adapter(tiny_engine, base: str, artifact: Path) -> None:
    """engine.lora_serving: merged: the job also wrote the adapter merged into the base weights; swapped in as
    full weights, they give the adapter's log-probs."""
    prompt = tiny_engine.chat_prompt([{"role": "user", "content": "Sell NO?"}])
    tiny_engine.set_adapter(1, str(artifact))
    try:
        adapter = tiny_engine.generate(prompt, temperature=0.0, max_tokens=8).completions[0]
    finally:
        tiny_engine.set_adapter(0, None)
    tiny_engine.load_weights(1, str(artifact / "merged"))
    try:
        merged = tiny_engine.generate(prompt, temperature=0.0, max_tokens=8)
    finally:
        tiny_engine.load_weights(0, base)  # the engine is shared by the session
    assert merged.model_version == 1 and merged.completions[0].token_ids == adapter.token_ids
    assert np.allclose(merged.completions[0].logprobs, adapter.logprobs, atol=2e-3)


def _checkpoints_keep_the_pre_batch_logprobs(engine, batch_id: int, base: str, tmp_path: Path) -> None:
    """Every checkpoint holds each worker's log-probs of its rows under the policy before the batch (here the
    base model: a fresh adapter starts at zero), so a worker restarted at update k anchors its ratios there."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.data import build_rows, collate, shard_groups
    from trainer.loop import STATE_FILE
    from trainer.step import token_logprobs

    first = sorted((tmp_path / "store" / "ray_runs").glob("*/checkpoint_*"))[0]  # after update 1
    saved = torch.load(first / STATE_FILE, weights_only=False)["old_logprobs"]
    assert len(saved) == 2  # one per worker
    model = AutoModelForCausalLM.from_pretrained(base)
    groups = queries.load_batch(engine, batch_id)
    for rank, logprobs in enumerate(saved):
        batch = collate(build_rows(shard_groups(groups, rank, 2))[0], pad_id=0)
        with torch.no_grad():
            expected = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask, batch.temperatures)
        mask = batch.loss_mask
        assert logprobs.shape == mask.shape and torch.allclose(logprobs * mask, expected * mask, atol=1e-4)


def test_training_job_registers_a_ready_version_from_a_recorded_batch(
    ray_session, postgres, tiny_model_dir, tiny_engine, tmp_path
):
    url = postgres.create_database(f"train_{uuid.uuid4().hex[:8]}")
    upgrade(url)
    _record_groups(url)
    config = _config(url, tiny_model_dir, tmp_path, updates_per_batch=2, learning_rate=2e-2)
    config = config.model_copy(
        update={
            "engine": config.engine.model_copy(update={"lora_serving": "merged"}),
            "trainer": config.trainer.model_copy(update={"allocator": "jemalloc"}),
        }
    )
    version = run_training(config)
    assert version == 1
    store = TrajectoryStore(url)
    (registered,) = queries.list_versions(store.engine)
    _checkpoints_keep_the_pre_batch_logprobs(store.engine, registered["training_batch_id"], tiny_model_dir, tmp_path)
    assert registered["status"] == "ready" and registered["kind"] == "lora"
    assert registered["metrics"]["update"] == 2 and registered["metrics"]["rows"] == 12
    assert registered["metrics"]["reward_mean"] == pytest.approx(0.5)  # rewards 1,0,1,0 in every group
    assert registered["metrics"]["reward_std"] == pytest.approx(0.5)
    assert np.isfinite(registered["metrics"]["loss"]) and registered["metrics"]["grad_norm"] > 0
    artifact = Path(registered["artifact_uri"])
    assert (artifact / "adapter_model.safetensors").is_file()
    manifest = json.loads((artifact / MANIFEST).read_text())
    assert manifest["version"] == 1 and manifest["training_batch"] == registered["training_batch_id"]
    assert "adapter_model.safetensors" in manifest["checksums"]
    batch = queries.get_batch(store.engine, registered["training_batch_id"])
    assert batch["status"] == "completed" and batch["target_version"] == 1 and len(batch["trajectory_ids"]) == 12
    # every update's report is on the batch's row (the trainer starts no W&B run of its own)
    updates = batch["stats"]["updates"]
    assert [u["update"] for u in updates] == [1, 2]
    assert all(np.isfinite(u["loss"]) and u["tokens"] > 0 and u["tokens_per_s"] > 0 for u in updates)
    assert all({"clip_fraction", "approx_kl", "kl_ref", "entropy", "grad_norm", "elapsed_s"} <= set(u) for u in updates)
    # what each update's wall time was made of: the worker's own CPU seconds, and how busy it kept its threads
    assert all(u["cpu_user_s"] > 0 and u["cpu_utilization"] > 0 and u["minor_faults"] >= 0 for u in updates)
    # trainer.allocator reached the Ray Train worker processes: each update says whether it ran on jemalloc
    assert [u["jemalloc"] for u in updates] == [1, 1]
    # the trainer-sampler mismatch is measured once per batch, before its first update: every report says the same
    mismatch = ("mismatch_kl_k1", "mismatch_kl_k3", "tis_clip_fraction", "tis_weight_mean")
    assert [tuple(u[k] for k in mismatch) for u in updates] == [tuple(updates[0][k] for k in mismatch)] * 2
    assert updates[0]["mismatch_kl_k3"] >= 0 and 0 <= updates[0]["tis_clip_fraction"] <= 1
    assert 0 < updates[0]["tis_weight_mean"] <= config.trainer.tis_cap
    assert batch["stats"]["progress"] == {"done": 2, "total": 2, "fraction": 1.0, "loss": updates[-1]["loss"]}
    assert registered["wandb_run_id"] is None
    _served_adapter_matches_peft(tiny_engine, tiny_model_dir, str(artifact))
    _merged_weights_serve_like_the_adapter(tiny_engine, tiny_model_dir, artifact)
    assert registered["metrics"]["merge_s"] > 0
    assert run_training(config) is None  # every group is used now: nothing to train, no junk version
    assert len(queries.list_versions(store.engine)) == 1
    store.dispose()

    # A fresh database numbers its versions and batches from 1 again, into the same model store: its job
    # trains on its own batch (8 rows here, not 12) instead of restoring the earlier job's checkpoint.
    fresh = postgres.create_database(f"train_again_{uuid.uuid4().hex[:8]}")
    upgrade(fresh)
    _record_groups(fresh, groups=2)
    again = config.model_copy(
        update={
            "database": config.database.model_copy(update={"url": fresh}),
            "trainer": config.trainer.model_copy(update={"allocator": "system"}),
        }
    )
    assert run_training(again) == 1
    store = TrajectoryStore(fresh)
    (retrained,) = queries.list_versions(store.engine)
    updates = queries.get_batch(store.engine, retrained["training_batch_id"])["stats"]["updates"]
    store.dispose()
    assert retrained["metrics"]["rows"] == 8 and retrained["metrics"]["update"] == 2
    assert [u["jemalloc"] for u in updates] == [0, 0]


def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_session, postgres, tiny_model_dir, tmp_path):
    import os
    import signal
    import threading
    import time

    import psutil

    url = postgres.create_database(f"resume_{uuid.uuid4().hex[:8]}")
    upgrade(url)
    _record_groups(url)
    config = _config(url, tiny_model_dir, tmp_path, updates_per_batch=25, max_failures=2)
    outcome: dict[str, object] = {}
    thread = threading.Thread(target=lambda: outcome.update(version=run_training(config)))
    thread.start()
    runs = tmp_path / "store" / "ray_runs"
    deadline = time.monotonic() + 240
    while len(list(runs.glob("*/checkpoint_*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(list(runs.glob("*/checkpoint_*"))) >= 3, "no checkpoints were written"
    workers = [
        p for p in psutil.process_iter(["cmdline"]) if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])
    ]
    assert workers, "no training worker to kill"
    os.kill(workers[-1].pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert outcome.get("version") == 1
    store = TrajectoryStore(url)
    (registered,) = queries.list_versions(store.engine)
    store.dispose()
    assert registered["status"] == "ready" and registered["metrics"]["update"] == 25
    assert registered["metrics"]["resumed_from_update"] >= 1  # the restarted group continued, not restarted
    store = TrajectoryStore(url)
    updates = queries.get_batch(store.engine, registered["training_batch_id"])["stats"]["updates"]
    store.dispose()
    assert [u["update"] for u in updates] == list(range(1, 26))  # one entry each, a replayed update replaced
    assert updates[-1]["resumed_from_update"] >= 1


def test_update_reports_are_kept_once_per_update_on_the_batch_row(tmp_path):
    url = f"sqlite:///{tmp_path / 'progress.db'}"
    upgrade(url)
    _record_groups(url, groups=2)
    store = TrajectoryStore(url)
    batch_id = queries.claim_batch(store.engine, max_groups=2)
    first = {"update": 1, "loss": 0.5, "tokens": 24.0, "note": "dropped: not a number", "flag": True}
    queries.set_batch_progress(store.engine, batch_id, 1, 3, loss=0.5, report=first)
    queries.set_batch_progress(store.engine, batch_id, 2, 3, loss=0.4, report={"update": 2, "loss": float("nan")})
    # a retried update 2 (a worker restarted from the checkpoint of update 1) replaces its entry
    queries.set_batch_progress(store.engine, batch_id, 2, 3, loss=0.3, report={"update": 2, "loss": 0.3})
    stats = queries.get_batch(store.engine, batch_id)["stats"]
    store.dispose()
    assert stats["updates"] == [{"update": 1, "loss": 0.5, "tokens": 24.0}, {"update": 2, "loss": 0.3}]
    assert stats["progress"] == {"done": 2, "total": 3, "fraction": 2 / 3, "loss": 0.3}


def test_full_weights_train_sharded_with_fsdp2_on_cpu_workers(ray_session, tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    url = f"sqlite:///{tmp_path / 'fsdp.db'}"
    upgrade(url)
    _record_groups(url)
    config = _config(
        url, tiny_model_dir, tmp_path, mode="full", strategy="fsdp", updates_per_batch=2, learning_rate=1e-3
    )
    assert run_training(config) == 1
    store = TrajectoryStore(url)
    (registered,) = queries.list_versions(store.engine)
    store.dispose()
    assert registered["status"] == "ready" and registered["kind"] == "full" and registered["metrics"]["update"] == 2
    trained = AutoModelForCausalLM.from_pretrained(registered["artifact_uri"])  # whole tensors, gathered from shards
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [
        name for (name, a), (_, b) in zip(trained.named_parameters(), base.named_parameters(), strict=True)
        if not torch.equal(a, b)
    ]  # fmt: skip
    assert any("layers.0." in n for n in changed) and any("layers.1." in n for n in changed)


def hand_made_adapter(base: str, folder: Path, seed: int = 0) -> Path:
    """A real LoRA adapter of the tiny model (fresh, as a job starts one), with a manifest that lists every
    file's sha256, as the training job writes it: registered by hand as a version to serve or train from."""
    from trainer.config import TrainerConfig
    from trainer.model import build_policy, sha256_file

    build_policy(base, TrainerConfig(seed=seed)).save_pretrained(folder, safe_serialization=True)
    checksums = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"kind": "lora", "checksums": checksums}))
    return folder


def _record_from_versions(url: str, versions: dict[str, int], size: int = 4) -> None:
    """One group per name, sampled by the given model version, rewards 0/1 alternating."""
    rng = np.random.default_rng(13)
    store = TrajectoryStore(url)
    records = []
    for group, version in versions.items():
        prompt = rng.integers(100, 40000, 12)
        for i in range(size):
            tid = f"{group}-t{i}"
            completion = rng.integers(100, 40000, 6)
            records += [
                trajectory(tid, group, version),
                step(tid, 0),
                LlmCallRecord.from_tokens(tid, 0, 0, version, prompt, completion, -rng.random(6) * 3 - 8),
                finished(tid, group, float(i % 2), version),
            ]
    store.write(records)
    store.dispose()


def test_staleness_is_judged_once_at_claim_against_the_parent(ray_session, tiny_model_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'stale.db'}"
    upgrade(url)
    _record_from_versions(url, {"from-v0": 0, "from-v1": 1, "from-v2": 2})
    adapter = hand_made_adapter(tiny_model_dir, tmp_path / "store" / "parent")
    store = TrajectoryStore(url)
    for status in ("retired", "deployed"):  # v1, then v2: the deployed version, the parent of what trains next
        queries.register_version(
            store.engine, base_model=tiny_model_dir, kind="lora", artifact_uri=str(adapter), status=status
        )

    def trained_on(version: int) -> tuple[dict, list[str]]:
        row = queries.get_version(store.engine, version)
        return row, queries.get_batch(store.engine, row["training_batch_id"])["trajectory_ids"]

    only_parent = _config(url, tiny_model_dir, tmp_path, updates_per_batch=1, num_workers=1, max_staleness=0)
    assert run_training(only_parent) == 3
    row, members = trained_on(3)
    assert members == [f"from-v2-t{i}" for i in range(4)]  # max_staleness 0: the parent's own groups only
    assert row["parent_version"] == 2 and row["status"] == "ready"
    assert (row["metrics"]["trajectories"], row["metrics"]["rows"], row["metrics"]["groups_stale"]) == (4, 4, 0)

    one_behind = _config(url, tiny_model_dir, tmp_path, updates_per_batch=1, num_workers=1, max_staleness=1)
    assert run_training(one_behind) == 4  # v3 is ready but not deployed: v4 trains from v2 as well
    row, members = trained_on(4)
    assert members == [f"from-v1-t{i}" for i in range(4)]  # exactly max_staleness behind: trained on, counted
    assert row["parent_version"] == 2 and (row["metrics"]["trajectories"], row["metrics"]["rows"]) == (4, 4)
    assert run_training(one_behind) is None  # from-v0 is one more behind: never claimed
    assert queries.readiness(store.engine, parent_version=2, max_staleness=1).stale == 4
    assert len(queries.list_batches(store.engine)) == 2 and len(queries.list_versions(store.engine)) == 4
    store.dispose()


def test_a_batch_with_nothing_to_train_fails_and_registers_no_version(ray_session, tiny_model_dir, tmp_path):
    from cluster import train_job

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    upgrade(url)
    _record_groups(url, groups=2)
    store = TrajectoryStore(url)
    batch_id = queries.claim_batch(store.engine, max_groups=2)  # claimed on the environment's reward
    # ... and given to a job that trains on a judge nobody recorded: every claimed group loads without a reward
    config = _config(url, tiny_model_dir, tmp_path, reward_source="ruler")
    expected = f"training batch {batch_id} has nothing to train with reward 'ruler'"
    with pytest.raises(RuntimeError, match=expected) as info:
        run_training(config, batch_id=batch_id)
    assert isinstance(info.value, train_job.NothingToTrain)
    assert queries.list_versions(store.engine) == []  # no version identical to its parent
    batch = queries.get_batch(store.engine, batch_id)
    assert batch["status"] == "failed" and "nothing to train" in batch["error"]
    assert queries.readiness(store.engine).groups_with_variance == 2  # its groups were released
    store.dispose()


def test_a_claimed_batch_whose_job_cannot_start_is_released_not_left_pending(ray_session, tiny_model_dir, tmp_path):
    """One open batch per parent: a claim left pending by a job that died before starting would block every
    later claim from that parent. The job fails it and releases its groups instead."""
    url = f"sqlite:///{tmp_path / 'unstarted.db'}"
    upgrade(url)
    _record_groups(url, groups=2)
    broken = tmp_path / "not-a-model"
    broken.mkdir()  # a folder without config.json: resolve_model refuses it after the claim
    config = _config(url, str(broken), tmp_path)
    with pytest.raises(Exception, match="config.json"):
        run_training(config)
    store = TrajectoryStore(url)
    (batch,) = queries.list_batches(store.engine)
    assert batch["status"] == "failed" and "did not start" in batch["error"]
    assert queries.list_versions(store.engine) == []
    assert queries.claim_batch(store.engine, max_groups=2, parent_version=0) is not None  # the lineage is free
    store.dispose()


def test_a_job_whose_workers_cannot_be_placed_fails_at_its_start_deadline(ray_session, tiny_model_dir, tmp_path):
    """Ray Train alone retries a worker start that cannot be placed forever; the job fails at
    trainer.worker_start_timeout_s (one retry) instead, and its claimed batch is failed and released."""
    import time

    url = f"sqlite:///{tmp_path / 'unplaced.db'}"
    upgrade(url)
    _record_groups(url, groups=2)
    config = _config(
        url, tiny_model_dir, tmp_path, num_workers=1, resources_per_worker={"no_such_resource": 1.0},
        worker_start_timeout_s=10,
    )  # fmt: skip
    started = time.monotonic()
    with pytest.raises(Exception, match="worker group startup timed out"):
        run_training(config)
    assert time.monotonic() - started < 120
    store = TrajectoryStore(url)
    (batch,) = queries.list_batches(store.engine)
    assert batch["status"] == "failed"
    assert queries.readiness(store.engine).groups_with_variance == 2  # its groups are free for another batch
    store.dispose()
