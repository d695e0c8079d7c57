"""One episode of a rollout group: an environment played against the engine turn by turn, every step and LLM
call streamed to the recorder client as it happens.

Multi-turn prompts extend the exact tokens of earlier turns (rollout.chat), and every turn samples the
version the group was pinned to. The rollout actor (rollout.actor) runs a group's episodes concurrently and
owns everything across them: the pinned version, swaps, judging and flushing.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from recorder.client import RecorderClient
from recorder.records import LlmCallRecord, StepRecord, TrajectoryRecord
from rollout.chat import next_turn_tokens
from rollout.engine import PolicyEngine

if TYPE_CHECKING:
    from rollout.simulated import SimulatedEngine
from rollout.envs import make_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpisodeSpec:
    """What every episode of one group shares."""

    env_name: str
    env_settings: dict[str, Any]
    seed: int
    group_id: str
    max_turns: int
    max_tokens: int
    temperature: float
    timeout_s: float
    min_tokens: int = 0
    is_eval: bool = False
    version: int | None = None


@dataclass
class EpisodeResult:
    """How one episode ended, as `run_group` reports and judges it."""

    trajectory_id: str
    reward: float
    turns: int
    status: str
    completion_tokens: int
    transcript: str
    version: int
    error: str | None = None


@dataclass
class EpisodeCounters:
    """What a rollout actor's health reports about its episodes, kept up to date as they run."""

    in_flight: int = 0
    """Episodes playing now."""
    calls: int = 0
    """LLM calls finished so far."""
    last_call: float | None = None
    """`time.monotonic()` when the latest LLM call finished (None before the first)."""


async def run_episode(
    engine: PolicyEngine | SimulatedEngine,
    spec: EpisodeSpec,
    client: RecorderClient,
    max_model_len: int,
    counters: EpisodeCounters,
) -> EpisodeResult:
    """Play one episode of `spec`'s group on `spec.version` and record it: its start, every step and LLM call,
    and its end (finished, aborted past `spec.timeout_s`, or failed with the error). Never raises for the
    episode's own failure: the result says it."""
    trajectory_id, seed = uuid.uuid4().hex, spec.seed
    assert spec.version is not None, "run_group pins the group's version"
    version = spec.version  # every turn of the episode samples this version
    common = {
        "environment": spec.env_name, "scenario_id": f"{spec.env_name}:{seed}", "group_id": spec.group_id,
        "is_eval": spec.is_eval,
    }  # fmt: skip
    # The episode's own start and end times, not when its group's records reach the database.
    started_at = datetime.now(UTC)
    client.add(
        TrajectoryRecord(trajectory_id, **common, model_version=version, metadata={"seed": seed}, started_at=started_at)
    )
    progress: dict[str, Any] = {"reward": 0.0, "turns": 0, "tokens": 0, "transcript": []}
    metrics: dict[str, Any] = {}
    error = None
    counters.in_flight += 1
    try:
        await asyncio.wait_for(
            _play(engine, spec, trajectory_id, progress, client, max_model_len, counters), spec.timeout_s
        )
        status = "finished"
    except TimeoutError:
        status = "aborted"
        log.warning("episode %s passed its %.0f s deadline; recorded as aborted", trajectory_id, spec.timeout_s)
    except Exception as exc:  # an episode never stays `running`: its group is reported failed and replayed
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        metrics["error"] = error[:2000]  # an outcome column: the end record fills it in
        log.warning("episode %s failed on version %d: %s", trajectory_id, version, error)
    finally:
        counters.in_flight -= 1
    client.add(
        TrajectoryRecord(
            trajectory_id, **common, model_version=version, status=status, total_reward=progress["reward"],
            step_count=progress["turns"], metrics=metrics, metadata={"seed": seed}, started_at=started_at,
            finished_at=datetime.now(UTC),
        )
    )  # fmt: skip
    return EpisodeResult(
        trajectory_id, progress["reward"], progress["turns"], status, progress["tokens"],
        "\n".join(progress["transcript"]), version, error,
    )  # fmt: skip


async def _play(
    engine: PolicyEngine | SimulatedEngine,
    spec: EpisodeSpec,
    trajectory_id: str,
    progress: dict[str, Any],
    client: RecorderClient,
    max_model_len: int,
    counters: EpisodeCounters,
) -> None:
    env = make_env(spec.env_name, **spec.env_settings)
    max_tokens, temperature = spec.max_tokens, spec.temperature
    observation = env.reset(spec.seed)
    messages = [{"role": "system", "content": env.system_prompt()}, {"role": "user", "content": observation}]
    prompt = engine.chat_prompt(messages)
    # An environment may start the policy's reply for it (e.g. '{"type": "'): those tokens go into the
    # prompt of every turn, so they are never trained on, and the env parses prefix + completion.
    prefix = getattr(env, "response_prefix", "")
    prefix_ids = engine.tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
    limit = max_model_len
    for turn in range(spec.max_turns):
        started = time.perf_counter()
        prompt = prompt + prefix_ids
        generation = await engine.generate(
            prompt, max_tokens=max_tokens, min_tokens=spec.min_tokens, temperature=temperature, version=spec.version
        )
        completion = generation.completions[0]
        counters.calls, counters.last_call = counters.calls + 1, time.monotonic()
        action_text = prefix + completion.text
        result = env.step(action_text)
        client.add(
            StepRecord(
                trajectory_id, turn, observation, action=result.info.get("action"), env_reward=result.reward,
                done=result.done, error=result.info.get("error"),
            ),
            LlmCallRecord.from_tokens(
                trajectory_id, turn, 0, generation.model_version, prompt, completion.token_ids,
                completion.logprobs, text=completion.text, finish_reason=completion.finish_reason,
                sampling_params={"temperature": temperature, "max_tokens": max_tokens},
                latency_ms=(time.perf_counter() - started) * 1000,
            ),
        )  # fmt: skip
        progress["reward"] += result.reward
        progress["transcript"] += [f"[turn {turn + 1}] saw: {observation[-300:]}", f"did: {action_text}"]
        progress["turns"] = turn + 1
        progress["tokens"] += len(completion.token_ids)
        if result.done:
            return
        observation = result.observation
        prompt = prompt + completion.token_ids + next_turn_tokens(engine.tokenizer, completion.token_ids, observation)
        if len(prompt) + max_tokens > limit:  # the next turn would not fit: end the episode here
            return
