"""A rollout actor on the tiny model plays market episodes in a GRPO group and records them exactly."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import sqlalchemy as sa

from recorder.actor import start_recorder, stop_recorder
from recorder.config import DatabaseConfig, RecorderConfig
from recorder.migrate import upgrade
from recorder.records import unpack_logprobs, unpack_tokens
from recorder.schema import LlmCall, RewardJudgment, Step, Trajectory
from rollout.actor import start_rollout_worker
from rollout.config import EngineConfig, JudgeConfig

pytestmark = pytest.mark.slow


def test_a_group_of_multi_turn_episodes_is_recorded_as_generated(ray_session, tiny_model_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'rollout.db'}"
    upgrade(url)
    settings = RecorderConfig(actor_name="rollout-test-recorder")
    recorder = start_recorder(DatabaseConfig(url=url), settings)
    engine = EngineConfig(device="cpu", max_model_len=1024, kv_cache_gib=1, max_num_seqs=16)
    judge = JudgeConfig(llm=True, weights={"env": 0.5, "llm": 0.5}, max_tokens=24)
    worker = start_rollout_worker(tiny_model_dir, engine, settings, judge=judge)
    try:
        summary = ray.get(
            worker.run_group.remote("market", seed=3, group_size=3, max_turns=3, max_tokens=12), timeout=300
        )
    finally:
        ray.get(worker.close.remote(), timeout=60)
        ray.kill(worker)
        stop_recorder(recorder)
    assert summary["statuses"] == ["finished"] * 3 and summary["rejected"] == 0
    db = sa.create_engine(url)
    with db.connect() as conn:
        trajectories = conn.execute(sa.select(Trajectory.__table__)).mappings().all()
        steps = conn.execute(sa.select(Step.__table__).order_by("trajectory_id", "step_index")).mappings().all()
        calls = conn.execute(sa.select(LlmCall.__table__).order_by("trajectory_id", "step_index")).mappings().all()
        judgments = conn.execute(sa.select(RewardJudgment.__table__)).mappings().all()
    db.dispose()
    assert summary["judged"] == 3
    by_judge = {(j["trajectory_id"], j["judge"]): j for j in judgments}
    assert len(by_judge) == len(judgments) == 9  # env, llm and combined for each of the 3 trajectories
    for t in trajectories:
        env, llm, combined = (by_judge[(t["id"], name)] for name in ("env", "llm", "combined"))
        assert env["score"] == pytest.approx(t["total_reward"])
        # The random tiny model cannot write the judge's JSON: the judge falls back and says why.
        assert llm["criteria"]["fallback"] is True and llm["reasoning"].startswith("fallback")
        assert llm["judge_model"] == tiny_model_dir and 1 <= llm["rank_in_group"] <= 3
        assert combined["score"] == pytest.approx(0.5 * env["score"] + 0.5 * llm["score"])
    assert {t["group_id"] for t in trajectories} == {summary["group_id"]}
    assert {t["scenario_id"] for t in trajectories} == {"market:3"}
    assert sorted(t["total_reward"] for t in trajectories) == pytest.approx(sorted(summary["rewards"]))
    # A random policy does not write JSON: each turn is a recorded format error, never a crash.
    assert all(s["error"] and s["env_reward"] == pytest.approx(-0.05) for s in steps[:-1] if not s["done"])
    by_trajectory: dict[str, list] = {}
    for call in calls:
        by_trajectory.setdefault(call["trajectory_id"], []).append(call)
    for turns in by_trajectory.values():
        assert [c["step_index"] for c in turns] == list(range(len(turns)))
        for earlier, later in zip(turns, turns[1:], strict=False):
            before = np.concatenate(
                [unpack_tokens(earlier["prompt_token_ids"]), unpack_tokens(earlier["completion_token_ids"])]
            )
            # turn k+1's prompt extends the exact tokens of turn k
            assert np.array_equal(unpack_tokens(later["prompt_token_ids"])[: len(before)], before)
        for call in turns:
            assert len(unpack_tokens(call["completion_token_ids"])) == len(unpack_logprobs(call["completion_logprobs"]))
    assert sum(len(t) for t in by_trajectory.values()) == len(steps) == sum(t["step_count"] for t in trajectories)


def test_rollout_entrypoint_plays_and_summarises_groups(ray_session, tiny_model_dir, tmp_path):
    from cluster.config import load_config
    from cluster.rollout_job import run_rollouts

    base = load_config()
    config = base.model_copy(
        update={
            "model": base.model.model_copy(update={"name": tiny_model_dir}),
            "engine": base.engine.model_copy(update={"max_model_len": 512, "max_num_seqs": 8}),
            "database": base.database.model_copy(update={"url": f"sqlite:///{tmp_path / 'r.db'}"}),
            "recorder": base.recorder.model_copy(update={"actor_name": "rollout-run-recorder"}),
        }
    )
    summary = run_rollouts(config, "arithmetic", groups=2, group_size=3, max_turns=1, max_tokens=6)
    assert summary["groups"] == 2 and summary["recorded"] == 2 * 3 * 4  # start, step, call, finish each
    assert summary["completion_tokens"] > 0 and summary["tokens_per_s_per_group"] > 0
