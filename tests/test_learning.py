"""The learning check: GRPO through the whole loop makes the tiny model better at a verifiable task.

Task: the `lowercase` environment (reward = share of the reply's characters that are lowercase letters or
spaces). Policy: a tiny chat model pretrained here in seconds (tests/tiny_lm.py) that answers with words in
three styles, lowercase, UPPERCASE and numbers, so it starts at roughly half the reward. Three loop iterations
(play on the served version, train a version with GRPO on the recorded groups, hot-swap it) must raise the
held-out mean reward clearly above the untrained model's on the same held-out scenarios. The rewards come
from sampling the served model; the engine and the trainer are seeded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.loop import run_loop, shutdown
from rollout.config import EngineConfig
from rollout.envs import make_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pretrained_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.tiny_lm import pretrain_tiny_chat_model

    env = make_env("lowercase")
    prompts = [(env.system_prompt(), env.reset(seed)) for seed in range(2000, 2100)]  # not the eval scenarios
    return str(pretrain_tiny_chat_model(Path(tmp_path_factory.mktemp("tiny-chat")), prompts))


def test_held_out_reward_rises_over_three_iterations(ray_session, pretrained_tiny_model, tmp_path):
    base = load_config()
    config = base.model_copy(
        update={
            "model": base.model.model_copy(update={"name": pretrained_tiny_model, "store_dir": tmp_path / "store"}),
            "database": base.database.model_copy(update={"url": f"sqlite:///{tmp_path / 'learn.db'}"}),
            "recorder": base.recorder.model_copy(update={"actor_name": "learn-recorder"}),
            "engine": EngineConfig(device="cpu", max_model_len=512, kv_cache_gib=1, max_num_seqs=64, seed=0),
            "rollout": base.rollout.model_copy(
                update={
                    "env": "lowercase",
                    "env_settings": {},
                    "actors": 1,
                    "group_size": 8,
                    "groups_per_iteration": 8,
                    "max_turns": 1,
                    "max_tokens": 32,
                    "temperature": 1.0,
                    "eval_temperature": 1.0,
                    "eval_seeds": list(range(8)),
                    "eval_group_size": 8,
                }  # fmt: skip
            ),
            "controller": base.controller.model_copy(
                update={"name": "learn", "min_groups": 4, "iterations": 3, "poll_interval_s": 0.2}
            ),
            "trainer": base.trainer.model_copy(
                update={
                    "mode": "full",
                    "num_workers": 1,
                    "learning_rate": 2e-3,
                    "updates_per_batch": 2,
                    "micro_batch_rows": 64,
                    "reward_source": "env",
                    "seed": 0,
                }  # fmt: skip
            ),
        }
    )
    try:
        report = run_loop(config, tmp_path / "out")
    finally:
        shutdown(config)
    # full versions are evaluated once served, alongside the next round (the last one after it)
    assert all(v["eval_mean_reward"] is not None for v in report["versions"]), report["versions"]
    evals = {v["version"]: round(v["eval_mean_reward"], 4) for v in report["versions"]}
    print("held-out mean reward by version:", evals)
    assert [i["training"]["trained"] for i in report["iterations"]] == [True, True, True]
    assert report["final_version"] == 3
    base_reward, final_reward = report["base_eval_mean_reward"], report["final_eval_mean_reward"]
    assert 0.2 < base_reward < 0.8  # the pretrained model mixes the three styles
    assert final_reward > base_reward + 0.1, evals
