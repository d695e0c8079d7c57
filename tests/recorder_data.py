"""Building realistic records for recorder tests and benchmarks."""

from __future__ import annotations

import numpy as np

from recorder.records import LlmCallRecord, StepRecord, TrajectoryRecord


def trajectory(tid: str, group: str = "g", version: int = 0, **fields: object) -> TrajectoryRecord:
    return TrajectoryRecord(
        id=tid, environment="market", scenario_id=f"scenario-{group}", group_id=group, model_version=version, **fields
    )


def finished(tid: str, group: str, reward: float, version: int = 0, steps: int = 1) -> TrajectoryRecord:
    return trajectory(tid, group, version, status="finished", total_reward=reward, step_count=steps)


def step(tid: str, index: int, reward: float = 0.0) -> StepRecord:
    return StepRecord(tid, index, observation=f"balance 100, step {index}", action={"type": "hold"}, env_reward=reward)


def call(
    tid: str, index: int, rng: np.random.Generator, prompt_len: int = 300, completion_len: int = 100, version: int = 0
) -> LlmCallRecord:
    """A ~2 KB LLM call: packed prompt/completion token ids and completion log-probs."""
    return LlmCallRecord.from_tokens(
        tid,
        index,
        0,
        version,
        rng.integers(0, 49152, prompt_len),
        rng.integers(0, 49152, completion_len),
        -rng.random(completion_len).astype(np.float32) * 5,
        text='{"type": "hold"}',
        finish_reason="stop",
        sampling_params={"temperature": 1.0},
        latency_ms=12.5,
    )
