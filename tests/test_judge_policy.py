"""The LLM judge is not the policy, and never holds a group hostage (issue 13, items 11 and 13).

A config whose served weights replace the base ones (trainer.mode: full, engine.lora_serving: merged) cannot
also judge with the base weights: it is refused when it loads, naming the keys. A rollout worker whose engine
holds full weights anyway (outside the loop) records which weights judged. A judge generation past
`judge.timeout_s` falls back to the env reward and says why."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from cluster.config import ConfigError, parse_config
from recorder.schema import RewardJudgment
from rollout.config import JudgeConfig
from tests.rollout_harness import in_process_worker, perturbed_weights, recording_into_sqlite, rows, run_on


def test_a_judge_that_would_score_with_the_weights_under_training_is_refused():
    with pytest.raises(ConfigError, match=r"judge.llm .*trainer.mode: full replaces .*set judge.llm: false"):
        parse_config({"trainer": {"mode": "full"}, "judge": {"llm": True, "weights": {"env": 0.5, "llm": 0.5}}})
    with pytest.raises(ConfigError, match=r"judge.llm .*engine.lora_serving: merged .*use lora_serving: adapter"):
        parse_config({"engine": {"lora_serving": "merged"}, "judge": {"llm": True}})
    # Without the LLM judge, or with adapters on the base weights, nothing is refused.
    assert parse_config({"trainer": {"mode": "full"}, "engine": {"lora_serving": "adapter"}}).trainer.mode == "full"
    assert parse_config({"engine": {"lora_serving": "adapter"}, "judge": {"llm": True}}).judge.llm


@pytest.fixture(scope="module")
def recorded(ray_session, tmp_path_factory):
    with recording_into_sqlite(tmp_path_factory.mktemp("judge"), "judge-policy-recorder") as recorded_db:
        yield recorded_db


def _llm_judgments(url: str, trajectory_ids: list[str]) -> list[RewardJudgment]:
    query = sa.select(RewardJudgment.__table__).where(
        RewardJudgment.judge == "llm", RewardJudgment.trajectory_id.in_(trajectory_ids)
    )
    return rows(url, query)


@pytest.mark.slow
def test_a_judge_past_its_deadline_falls_back_and_says_so(recorded, tiny_engine, tiny_model_dir, tiny_engine_config):
    judge = JudgeConfig(llm=True, weights={"env": 0.5, "llm": 0.5}, max_tokens=400, timeout_s=0.001)
    worker = in_process_worker(tiny_engine, tiny_model_dir, tiny_engine_config, recorded[1], judge)
    summary = run_on(tiny_engine, worker.run_group("lowercase", seed=2, group_size=3, max_turns=1, max_tokens=6))
    assert summary["statuses"] == ["finished"] * 3 and summary["judged"] == 3
    judgments = _llm_judgments(recorded[0], summary["trajectory_ids"])
    assert len(judgments) == 3
    for judgment in judgments:
        assert judgment.criteria["fallback"] is True
        assert "judge.timeout_s (0.001 s)" in judgment.criteria["error"], judgment.criteria
    # The engine is not left busy with the abandoned judge request: the next call is served at once.
    prompt = tiny_engine.chat_prompt([{"role": "user", "content": "still there?"}])
    assert tiny_engine.generate(prompt, max_tokens=2, temperature=0.0, timeout_s=30).completions


@pytest.mark.slow
def test_the_judge_records_the_weights_it_really_sampled(
    recorded, tiny_engine, tiny_model_dir, tiny_engine_config, tmp_path
):
    judge = JudgeConfig(llm=True, weights={"env": 0.5, "llm": 0.5}, max_tokens=8)
    worker = in_process_worker(tiny_engine, tiny_model_dir, tiny_engine_config, recorded[1], judge)
    base = run_on(tiny_engine, worker.run_group("lowercase", seed=3, group_size=2, max_turns=1, max_tokens=4))
    assert {j.judge_version for j in _llm_judgments(recorded[0], base["trajectory_ids"])} == {"base"}
    folder = perturbed_weights(tiny_model_dir, tmp_path / "v65", seed=4)
    run_on(tiny_engine, worker.prepare(65, folder, "full"))
    run_on(tiny_engine, worker.activate(65))
    try:
        full = run_on(tiny_engine, worker.run_group("lowercase", seed=3, group_size=2, max_turns=1, max_tokens=4))
    finally:
        run_on(tiny_engine, worker.activate(0))
    judgments = _llm_judgments(recorded[0], full["trajectory_ids"])
    assert len(judgments) == 2
    assert {(j.judge_version, j.judge_model) for j in judgments} == {("v65", folder)}
