"""GRPO really learns: on the verifiable lowercase task, the tiny model's held-out reward rises over a few
loop iterations versus the untrained model (seeded engine and trainer; nothing about the result is fixed)."""

from __future__ import annotations

import pytest

from cluster.loop import run_loop, shutdown
from tests.test_controller import loop_config

pytestmark = pytest.mark.slow


def test_held_out_reward_rises_over_iterations(ray_session, tiny_model_dir, tmp_path):
    from recorder.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'learn.db'}"
    upgrade(url)
    config = loop_config(url, tiny_model_dir, tmp_path, "learn")
    config = config.model_copy(
        update={
            "rollout": config.rollout.model_copy(
                update={
                    "actors": 1,
                    "group_size": 8,
                    "groups_per_iteration": 8,
                    "eval_seeds": [0, 1, 2, 3],
                    "eval_group_size": 8,
                }  # fmt: skip
            ),
            "controller": config.controller.model_copy(update={"iterations": 3, "min_groups": 4}),
            "trainer": config.trainer.model_copy(
                update={"num_workers": 1, "learning_rate": 2e-3, "updates_per_batch": 4, "reward_source": "env"}
            ),
        }
    )
    try:
        report = run_loop(config, tmp_path / "out")
    finally:
        shutdown(config)
    evals = {v["version"]: v["eval_mean_reward"] for v in report["versions"]}
    assert [it["training"]["trained"] for it in report["iterations"]] == [True, True, True]
    assert set(evals) == {0, 1, 2, 3} and all(v["eval_episodes"] == 32 for v in report["versions"])
    # The lowercase share of a random model's tokens is ~0.5; three GRPO rounds must move it well beyond the
    # noise of a 32-episode mean (~0.05 here).
    assert evals[3] > evals[0] + 0.1, evals
