"""Judges: turn a finished GRPO group into one reward per trajectory, written as reward_judgments rows.

- `env`: the environment's own total reward.
- `llm`: an LLM judge that sees the whole group at once and scores its trajectories relative to each other
  against a rubric (RULER-style: relative scores within a group are more reliable than absolute ones).
  Garbage output never fails the group: the judge falls back to the env reward and records why.
- `combined`: the weighted sum of the two (`judge.weights`), what the trainer uses as `reward_source:
  combined`.

Judging is pure except for one `generate` callable, so it runs wherever an engine is (the rollout actor
uses its own engine with the base weights) and is unit-testable with a scripted reply.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from recorder.records import JudgmentRecord
from rollout.config import JudgeConfig

# prompt text -> judge completion text (a coroutine, so the judge can share the rollout actor's engine)
GenerateText = Callable[[str], Awaitable[str]]


@dataclass(frozen=True)
class JudgedTrajectory:
    """What a judge sees of one finished episode."""

    trajectory_id: str
    transcript: str
    env_reward: float


def ranks(scores: Sequence[float]) -> list[int]:
    """1 = best; ties share the better rank."""
    return [1 + sum(other > score for other in scores) for score in scores]


def normalized(scores: Sequence[float]) -> list[float]:
    """Scores mapped to [0, 1] within the group (all 0.5 when they are all equal)."""
    low, high = min(scores), max(scores)
    if high - low < 1e-12:
        return [0.5 for _ in scores]
    return [(s - low) / (high - low) for s in scores]


def judge_prompt(rubric: str, group: Sequence[JudgedTrajectory], max_chars: int) -> str:
    parts = [
        "You are grading agents that all started from the same situation. Compare them with each other.",
        f"Rubric: {rubric}",
        "",
    ]
    for index, trajectory in enumerate(group, start=1):
        parts += [f"Agent {index}:", trajectory.transcript[:max_chars], ""]
    parts.append(
        f'Answer with JSON only, one score per agent in order: {{"scores": [s1, ..., s{len(group)}], '
        '"reasoning": "one sentence"}'
    )
    return "\n".join(parts)


class JudgeOutputError(ValueError):
    """The judge's text could not be read as one score in [0, 1] per trajectory."""


def parse_scores(text: str, expected: int) -> tuple[list[float], str]:
    """Read `{"scores": [...], "reasoning": "..."}` from the judge's text (the first JSON object in it)."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if match is None:
        raise JudgeOutputError("no JSON object in the judge output")
    try:
        data = json.loads(match.group(0))
    except json.JSONDecodeError as exc:
        raise JudgeOutputError(f"judge output is not valid JSON ({exc.msg})") from None
    scores = data.get("scores") if isinstance(data, dict) else None
    if not isinstance(scores, list) or len(scores) != expected:
        raise JudgeOutputError(f"expected 'scores' to be a list of {expected} numbers, got {scores!r:.80}")
    values: list[float] = []
    for position, score in enumerate(scores, start=1):
        if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
            raise JudgeOutputError(f"score {position} is not a finite number: {score!r:.40}")
        if not 0.0 <= score <= 1.0:
            raise JudgeOutputError(f"score {position} is {score}, outside [0, 1]")
        values.append(float(score))
    reasoning = data.get("reasoning")
    return values, reasoning if isinstance(reasoning, str) else ""


def env_judgments(group: Sequence[JudgedTrajectory]) -> list[JudgmentRecord]:
    scores = [t.env_reward for t in group]
    return [
        JudgmentRecord(t.trajectory_id, "env", "env", score, rank_in_group=rank, normalized_score=norm)
        for t, score, rank, norm in zip(group, scores, ranks(scores), normalized(scores), strict=True)
    ]


async def llm_judgments(
    group: Sequence[JudgedTrajectory], config: JudgeConfig, generate: GenerateText, judge_model: str, version: str
) -> list[JudgmentRecord]:
    """Score the group with the LLM judge; on unusable output fall back to the env reward (min-max scaled)."""
    prompt = judge_prompt(config.rubric, group, config.max_transcript_chars)
    text = ""
    try:
        text = await generate(prompt)
        scores, reasoning = parse_scores(text, len(group))
        criteria: dict[str, object] = {"rubric": config.rubric, "fallback": False}
    except JudgeOutputError as exc:
        scores = normalized([t.env_reward for t in group])
        reasoning = f"fallback to the env reward: {exc}; judge said: {text[:200]!r}"
        criteria = {"rubric": config.rubric, "fallback": True, "error": str(exc)}
    return [
        JudgmentRecord(
            t.trajectory_id,
            "llm",
            "llm",
            score,
            judge_model=judge_model,
            judge_version=version,
            rank_in_group=rank,
            normalized_score=norm,
            reasoning=reasoning,
            criteria=criteria,
        )  # fmt: skip
        for t, score, rank, norm in zip(group, scores, ranks(scores), normalized(scores), strict=True)
    ]


def combined_judgments(by_judge: dict[str, list[JudgmentRecord]], weights: dict[str, float]) -> list[JudgmentRecord]:
    """The weighted sum of the named judges' scores, per trajectory (judges absent from `by_judge` count 0)."""
    used = {name: weight for name, weight in weights.items() if name in by_judge}
    if not used:
        raise ValueError(f"judge.weights names {sorted(weights)} but only {sorted(by_judge)} judged this group")
    first = next(iter(by_judge.values()))
    scores = [sum(weight * by_judge[name][i].score for name, weight in used.items()) for i in range(len(first))]
    components = [{name: by_judge[name][i].score for name in used} for i in range(len(first))]
    return [
        JudgmentRecord(
            record.trajectory_id,
            "combined",
            "combined",
            score,
            rank_in_group=rank,
            normalized_score=norm,
            criteria={"weights": used, "components": parts},
        )  # fmt: skip
        for record, score, rank, norm, parts in zip(
            first, scores, ranks(scores), normalized(scores), components, strict=True
        )
    ]


async def judge_group(
    group: Sequence[JudgedTrajectory],
    config: JudgeConfig,
    generate: GenerateText | None = None,
    judge_model: str = "",
    judge_version: str = "",
) -> list[JudgmentRecord]:
    """Every judgment of one group: env, llm (if configured and `generate` is given) and combined."""
    by_judge = {"env": env_judgments(group)}
    if config.llm:
        if generate is None:
            raise ValueError("judge.llm is on but no engine was given to the judge")
        by_judge["llm"] = await llm_judgments(group, config, generate, judge_model, judge_version)
    combined = combined_judgments(by_judge, config.weights)
    return [record for records in by_judge.values() for record in records] + combined
