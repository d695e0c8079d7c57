"""An episode started on version N finishes on N, whatever is swapped in between its turns (issue 13, item 8).

A real RolloutWorker on the shared tiny engine plays a two-turn group; while its first turn is generating, the
worker is told to serve another version: an adapter (a pointer flip), merged weights or full weights (both
replace the engine's weights in place). Every LLM call of the group must record the version the group started
on and every trajectory must end finished; the next group plays the new version."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from recorder.schema import LlmCall, Trajectory
from tests.rollout_harness import in_process_worker, perturbed_weights, recording_into_sqlite, rows, run_on
from tests.test_engine import _random_adapter

pytestmark = pytest.mark.slow

# Long first turns, so the swap lands while the group is on its first turn.
LONG_TURN = {"max_turns": 2, "max_tokens": 240, "min_tokens": 240, "temperature": 1.0}


@pytest.fixture(scope="module")
def recorded(ray_session, tmp_path_factory):
    with recording_into_sqlite(tmp_path_factory.mktemp("episodes"), "episode-versions-recorder") as recorded_db:
        yield recorded_db


@pytest.fixture
def worker(recorded, tiny_engine, tiny_model_dir, tiny_engine_config):
    worker = in_process_worker(tiny_engine, tiny_model_dir, tiny_engine_config, recorded[1])
    yield worker
    run_on(tiny_engine, worker.activate(0))  # back to the base weights for the rest of the session
    for version in run_on(tiny_engine, worker.health())["loaded_versions"]:
        run_on(tiny_engine, worker.unload(version))


def _artifact(kind: str, base: str, folder: Path) -> tuple[str, str]:
    """The folder a rollout actor loads for this kind of version, and what it loads it as."""
    if kind == "adapter":
        return _random_adapter(base, folder, seed=11), "lora"
    if kind == "merged":
        from trainer.model import merge_adapter

        adapter = _random_adapter(base, folder / "adapter", seed=12)
        return str(merge_adapter(base, adapter, folder / "merged")), "full"
    return perturbed_weights(base, folder), "full"


def _when_first_turn_runs(tiny_engine, worker) -> None:
    deadline = time.monotonic() + 60
    while not run_on(tiny_engine, worker.health())["episodes_by_version"]:
        assert time.monotonic() < deadline, "the group never started"
        time.sleep(0.005)


@pytest.mark.parametrize("kind", ["adapter", "merged", "full"])
def test_a_two_turn_episode_finishes_on_its_version_across_a_swap(
    kind, recorded, worker, tiny_engine, tiny_model_dir, tmp_path
):
    version = {"adapter": 61, "merged": 62, "full": 63}[kind]
    artifact, load_as = _artifact(kind, tiny_model_dir, tmp_path / kind)
    group = tiny_engine.submit(worker.run_group("two-turns", seed=5, group_size=2, **LONG_TURN))
    _when_first_turn_runs(tiny_engine, worker)
    run_on(tiny_engine, worker.prepare(version, artifact, load_as))
    swap = tiny_engine.submit(worker.activate(version, drain_timeout_s=120))
    # Submitted while the swap waits for the first group: it must start on the new version, never the old.
    waiting = tiny_engine.submit(worker.run_group("two-turns", seed=6, group_size=2, max_turns=2, max_tokens=8))
    before, after = group.result(timeout=180), waiting.result(timeout=180)
    assert swap.result(timeout=60) == 0
    assert before["statuses"] == ["finished"] * 2 and before["model_versions"] == [0, 0], before
    assert after["statuses"] == ["finished"] * 2 and after["model_versions"] == [version] * 2, after

    ids = before["trajectory_ids"] + after["trajectory_ids"]
    trajectories = rows(
        recorded[0],
        sa.select(Trajectory.id, Trajectory.status, Trajectory.model_version, Trajectory.step_count).where(
            Trajectory.id.in_(ids)
        ),
    )
    calls = rows(
        recorded[0], sa.select(LlmCall.trajectory_id, LlmCall.model_version).where(LlmCall.trajectory_id.in_(ids))
    )
    started_on = {t.id: t.model_version for t in trajectories}
    assert all(t.status == "finished" and t.step_count == 2 for t in trajectories) and len(trajectories) == 4
    assert {started_on[i] for i in before["trajectory_ids"]} == {0}
    assert len(calls) == 8 and all(call.model_version == started_on[call.trajectory_id] for call in calls)


def test_an_episode_that_cannot_finish_on_its_version_is_recorded_failed(
    recorded, worker, tiny_engine, tiny_model_dir, tmp_path
):
    """Past the drain deadline the swap goes ahead: the group's next turn fails, and the episodes say so
    (status `failed`, never left `running`), the group unjudged and reported failed for the loop to replay."""
    artifact = perturbed_weights(tiny_model_dir, tmp_path / "v64", seed=3)
    group = tiny_engine.submit(worker.run_group("two-turns", seed=7, group_size=2, **LONG_TURN))
    _when_first_turn_runs(tiny_engine, worker)
    run_on(tiny_engine, worker.prepare(64, artifact, "full"))
    run_on(tiny_engine, worker.activate(64, drain_timeout_s=0.0))
    summary = group.result(timeout=180)
    assert summary["statuses"] == ["failed"] * 2 and summary["failed"] and summary["judged"] == 0
    assert all("version 0 is not loaded" in error for error in summary["errors"]), summary["errors"]
    ids = summary["trajectory_ids"]
    statuses = rows(recorded[0], sa.select(Trajectory.status, Trajectory.metrics).where(Trajectory.id.in_(ids)))
    assert [status for status, _ in statuses] == ["failed", "failed"]
    assert all("not loaded" in metrics["error"] for _, metrics in statuses)


def test_full_weights_reloaded_in_place_are_the_weights_that_sample(worker, tiny_engine, tiny_model_dir, tmp_path):
    """The tiny model ties its LM head to its embeddings, as SmolLM2 does. vLLM's in-place reload loads no head
    weights for it and, on CPU, keeps computing the head through a kernel packed from the old weights: before
    rollout.vllm_worker fixed that, the engine sampled through the old head (log-probs 13 nats off the new
    weights'). After a full-weight version is swapped in, the log-probs the engine samples with must be the new
    weights', scored independently by transformers: otherwise the trainer scores every token under another
    distribution than the one that sampled it."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    assert AutoConfig.from_pretrained(tiny_model_dir).tie_word_embeddings
    artifact = perturbed_weights(tiny_model_dir, tmp_path / "v65", scale=0.5, seed=4)
    run_on(tiny_engine, worker.prepare(65, artifact, "full"))
    assert run_on(tiny_engine, worker.activate(65)) == 0
    prompt = list(range(200, 240))
    sampling = {"max_tokens": 24, "min_tokens": 24, "temperature": 1.0, "seed": 3}
    served = run_on(tiny_engine, worker.complete(prompt, sampling))
    (completion,) = served["completions"]
    assert served["model_version"] == 65

    def scored(folder: str) -> np.ndarray:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokens = torch.tensor(prompt + completion["token_ids"])[None]
        with torch.no_grad():
            logits = model(tokens).logits[0, len(prompt) - 1 : -1]
        picked = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion["token_ids"])[:, None])
        return picked[:, 0].numpy()

    sampled = np.array(completion["logprobs"])
    np.testing.assert_allclose(sampled, scored(artifact), atol=2e-3)
    assert np.abs(sampled - scored(tiny_model_dir)).max() > 0.1  # the base weights would not give them
