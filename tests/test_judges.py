"""Judges are pure apart from one generate callable: tested here with scripted judge replies."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from rollout.config import JudgeConfig
from rollout.judges import JudgedTrajectory, JudgeOutputError, judge_group, normalized, parse_scores, ranks

GROUP = [JudgedTrajectory(f"t{i}", f"[turn 1] did: action {i}", reward) for i, reward in enumerate([0.2, 1.0, -0.4])]
LLM = JudgeConfig(llm=True, weights={"env": 0.25, "llm": 0.75})


def _judge(reply: str, config: JudgeConfig = LLM) -> dict[tuple[str, str], object]:
    prompts: list[str] = []

    async def generate(prompt: str) -> str:
        prompts.append(prompt)
        return reply

    records = asyncio.run(judge_group(GROUP, config, generate, judge_model="judge-model", judge_version="base"))
    if config.llm:
        assert len(prompts) == 1 and all(t.transcript in prompts[0] for t in GROUP) and config.rubric in prompts[0]
    return {(r.trajectory_id, r.judge): r for r in records}


def test_ranks_and_normalisation_within_a_group():
    assert ranks([0.2, 1.0, -0.4, 1.0]) == [3, 1, 4, 1]
    assert normalized([0.0, 2.0, 1.0]) == [0.0, 1.0, 0.5]
    assert normalized([3.0, 3.0]) == [0.5, 0.5]


def test_a_well_formed_judgment_is_used_and_combined_by_weight():
    by = _judge('Sure. {"scores": [0.1, 0.9, 0.5], "reasoning": "agent 2 traded well"} done')
    assert [by[(f"t{i}", "llm")].score for i in range(3)] == [0.1, 0.9, 0.5]
    assert [by[(f"t{i}", "llm")].rank_in_group for i in range(3)] == [3, 1, 2]
    assert by[("t1", "llm")].reasoning == "agent 2 traded well" and by[("t1", "llm")].criteria["fallback"] is False
    assert by[("t1", "llm")].judge_model == "judge-model"
    assert by[("t2", "env")].score == -0.4
    assert by[("t0", "combined")].score == pytest.approx(0.25 * 0.2 + 0.75 * 0.1)
    assert by[("t0", "combined")].criteria["components"] == {"env": 0.2, "llm": 0.1}


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ("I think agent 2 is best.", "no JSON object"),
        ('{"scores": [0.1, 0.9]}', "list of 3 numbers"),
        ('{"scores": [0.1, "high", 0.5]}', "score 2 is not a finite number"),
        ('{"scores": [0.1, 7, 0.5]}', "outside [0, 1]"),
        ('{"scores": [0.1, NaN, 0.5]}', "not a finite number"),
        ('{"scores": [0.1, 0.2, 0.5}', "not valid JSON"),
    ],
)
def test_garbage_judge_output_falls_back_to_the_env_reward_and_says_why(reply, why):
    by = _judge(reply)
    llm = [by[(f"t{i}", "llm")] for i in range(3)]
    assert [r.score for r in llm] == pytest.approx([0.4285714, 1.0, 0.0])  # env rewards min-max scaled
    assert all(r.criteria["fallback"] is True and why in r.criteria["error"] for r in llm)
    assert all(why in r.reasoning for r in llm)


def test_parse_scores_names_the_problem():
    with pytest.raises(JudgeOutputError, match="outside"):
        parse_scores('{"scores": [-0.5]}', 1)
    assert parse_scores('{"scores": [1, 0]}', 2) == ([1.0, 0.0], "")


def test_env_only_judging_needs_no_engine():
    by = _judge("unused", JudgeConfig())
    assert {judge for _, judge in by} == {"env", "combined"}
    assert by[("t1", "combined")].score == 1.0


def test_judge_config_rejects_weights_it_cannot_compute():
    with pytest.raises(ValidationError, match="unknown judge"):
        JudgeConfig(weights={"ruler": 1.0})
    with pytest.raises(ValidationError, match="judge.llm is false"):
        JudgeConfig(weights={"llm": 1.0})
    with pytest.raises(ValueError, match="no engine"):
        asyncio.run(judge_group(GROUP, LLM, None))
