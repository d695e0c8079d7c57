"""What producers send to the recorder, and the checks every record passes before it is stored.

Token arrays travel packed (little-endian int32 ids, float32 log-probs) so a step stays small on the wire
and goes into the database as it came. `validate` returns None or a message naming the bad field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from recorder.schema import TRAJECTORY_STATUSES

TOKEN_DTYPE = np.dtype("<i4")
LOGPROB_DTYPE = np.dtype("<f4")


def pack_tokens(token_ids: Sequence[int] | np.ndarray) -> bytes:
    return np.asarray(token_ids, dtype=TOKEN_DTYPE).tobytes()


def pack_logprobs(logprobs: Sequence[float] | np.ndarray) -> bytes:
    return np.asarray(logprobs, dtype=LOGPROB_DTYPE).tobytes()


def unpack_tokens(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=TOKEN_DTYPE)


def unpack_logprobs(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=LOGPROB_DTYPE)


@dataclass(slots=True)
class TrajectoryRecord:
    """Start (status `running`) or end (`finished` / `aborted` / `failed`) of one episode."""

    id: str
    environment: str
    scenario_id: str
    group_id: str
    model_version: int
    status: str = "running"
    agent_id: str | None = None
    total_reward: float | None = None
    reward_components: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    step_count: int = 0
    is_eval: bool = False
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def key(self) -> tuple[Any, ...]:
        return ("trajectory", self.id, self.status)


@dataclass(slots=True)
class StepRecord:
    """One environment step: what the agent saw, what it did, what the environment said."""

    trajectory_id: str
    step_index: int
    observation: str
    action: dict[str, Any] | None = None
    env_reward: float = 0.0
    done: bool = False
    error: str | None = None

    @property
    def key(self) -> tuple[Any, ...]:
        return ("step", self.trajectory_id, self.step_index)


@dataclass(slots=True)
class LlmCallRecord:
    """One LLM call, as tokens. Build it with `LlmCallRecord.from_tokens`."""

    trajectory_id: str
    step_index: int
    call_index: int
    model_version: int
    prompt_token_ids: bytes
    completion_token_ids: bytes
    completion_logprobs: bytes
    text: str = ""
    finish_reason: str | None = None
    purpose: str = "policy"
    messages: list[dict[str, Any]] | None = None
    sampling_params: dict[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None

    @classmethod
    def from_tokens(
        cls,
        trajectory_id: str,
        step_index: int,
        call_index: int,
        model_version: int,
        prompt_token_ids: Sequence[int] | np.ndarray,
        completion_token_ids: Sequence[int] | np.ndarray,
        completion_logprobs: Sequence[float] | np.ndarray,
        **rest: Any,
    ) -> LlmCallRecord:
        return cls(
            trajectory_id,
            step_index,
            call_index,
            model_version,
            pack_tokens(prompt_token_ids),
            pack_tokens(completion_token_ids),
            pack_logprobs(completion_logprobs),
            **rest,
        )

    @property
    def key(self) -> tuple[Any, ...]:
        return ("llm_call", self.trajectory_id, self.step_index, self.call_index)


@dataclass(slots=True)
class JudgmentRecord:
    """A judge's verdict on one finished trajectory (unique per trajectory and judge name)."""

    trajectory_id: str
    judge: str
    judge_kind: str
    score: float
    judge_model: str | None = None
    judge_version: str | None = None
    rank_in_group: int | None = None
    normalized_score: float | None = None
    reasoning: str | None = None
    criteria: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[Any, ...]:
        return ("judgment", self.trajectory_id, self.judge)


Record = TrajectoryRecord | StepRecord | LlmCallRecord | JudgmentRecord


def record_size(record: Record) -> int:
    """Approximate bytes on the wire, for keeping each call under the size where Ray switches to the store."""
    if isinstance(record, LlmCallRecord):
        size = len(record.prompt_token_ids) + len(record.completion_token_ids) + len(record.completion_logprobs)
        size += len(record.text) + (sum(len(str(m)) for m in record.messages) if record.messages else 0)
        return size + 200
    if isinstance(record, StepRecord):
        return len(record.observation) + len(str(record.action)) + len(record.error or "") + 100
    if isinstance(record, TrajectoryRecord):
        return 300 + len(str(record.metadata)) + len(str(record.metrics))
    return 200 + len(record.reasoning or "")


def _check_id(name: str, value: object) -> str | None:
    if not isinstance(value, str) or not value:
        return f"{name} must be a non-empty string, got {value!r}"
    if len(value) > 64:
        return f"{name} is longer than 64 characters"
    return None


def _check_index(name: str, value: object) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return f"{name} must be an integer >= 0, got {value!r}"
    return None


def _check_number(name: str, value: object, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        return f"{name} must be a number, got {type(value).__name__}"
    if not math.isfinite(value):
        return f"{name} must be finite, got {value!r}"
    return None


def _first(*problems: str | None) -> str | None:
    return next((p for p in problems if p), None)


def _validate_trajectory(r: TrajectoryRecord) -> str | None:
    problem = _first(
        _check_id("id", r.id),
        _check_id("group_id", r.group_id),
        _check_index("model_version", r.model_version),
        _check_index("step_count", r.step_count),
        _check_number("total_reward", r.total_reward, optional=True),
    )
    if problem:
        return problem
    if not isinstance(r.environment, str) or not r.environment:
        return "environment must be a non-empty string"
    if not isinstance(r.scenario_id, str) or not r.scenario_id:
        return "scenario_id must be a non-empty string (the start state that groups a GRPO group)"
    if r.status not in TRAJECTORY_STATUSES:
        return f"status must be one of {', '.join(TRAJECTORY_STATUSES)}, got {r.status!r}"
    if not isinstance(r.reward_components, dict):
        return "reward_components must be a mapping of name to number"
    for name, value in r.reward_components.items():
        if problem := _check_number(f"reward_components[{name!r}]", value):
            return problem
    return None


def _plain_id(value: object) -> bool:
    return type(value) is str and 0 < len(value) <= 64


def _plain_index(value: object) -> bool:
    return type(value) is int and value >= 0


def _plain_number(value: object) -> bool:
    return (type(value) is float and math.isfinite(value)) or type(value) is int


def _validate_step(r: StepRecord) -> str | None:
    # Fast path for the common, well-formed record; it accepts nothing the checks below would refuse.
    if (
        _plain_id(r.trajectory_id)
        and _plain_index(r.step_index)
        and _plain_number(r.env_reward)
        and type(r.observation) is str
        and (r.action is None or type(r.action) is dict)
        and type(r.done) is bool
    ):
        return None
    problem = _first(
        _check_id("trajectory_id", r.trajectory_id),
        _check_index("step_index", r.step_index),
        _check_number("env_reward", r.env_reward),
    )
    if problem:
        return problem
    if not isinstance(r.observation, str):
        return f"observation must be a string, got {type(r.observation).__name__}"
    if r.action is not None and not isinstance(r.action, dict):
        return f"action must be a mapping (the parsed action) or None, got {type(r.action).__name__}"
    if not isinstance(r.done, bool):
        return f"done must be a bool, got {r.done!r}"
    return None


def _validate_call(r: LlmCallRecord) -> str | None:
    # Fast path for the common, well-formed record; it accepts nothing the checks below would refuse.
    if (
        _plain_id(r.trajectory_id)
        and _plain_index(r.step_index)
        and _plain_index(r.call_index)
        and _plain_index(r.model_version)
        and (r.latency_ms is None or _plain_number(r.latency_ms))
        and type(r.prompt_token_ids) is bytes
        and type(r.completion_token_ids) is bytes
        and type(r.completion_logprobs) is bytes
        and r.prompt_token_ids
        and r.completion_token_ids
        and not len(r.prompt_token_ids) % 4
        and not len(r.completion_token_ids) % 4
        and len(r.completion_token_ids) == len(r.completion_logprobs)
        and type(r.text) is str
        and type(r.purpose) is str
        and 0 < len(r.purpose) <= 32
        and (r.finish_reason is None or (type(r.finish_reason) is str and len(r.finish_reason) <= 16))
    ):
        return None
    problem = _first(
        _check_id("trajectory_id", r.trajectory_id),
        _check_index("step_index", r.step_index),
        _check_index("call_index", r.call_index),
        _check_index("model_version", r.model_version),
        _check_number("latency_ms", r.latency_ms, optional=True),
    )
    if problem:
        return problem
    for name in ("prompt_token_ids", "completion_token_ids", "completion_logprobs"):
        blob = getattr(r, name)
        if not isinstance(blob, bytes) or len(blob) % 4:
            return f"{name} must be packed 4-byte values (use LlmCallRecord.from_tokens)"
    if not r.prompt_token_ids:
        return "prompt_token_ids is empty"
    if not r.completion_token_ids:
        return "completion_token_ids is empty: a recorded LLM call produced at least one token"
    if len(r.completion_token_ids) != len(r.completion_logprobs):
        return (
            f"completion_logprobs has {len(r.completion_logprobs) // 4} values for "
            f"{len(r.completion_token_ids) // 4} completion tokens; they must match one to one"
        )
    if not isinstance(r.text, str):
        return f"text must be a string, got {type(r.text).__name__}"
    if not isinstance(r.purpose, str) or not 0 < len(r.purpose) <= 32:
        return f"purpose must be a string of 1 to 32 characters, got {r.purpose!r}"
    if r.finish_reason is not None and (not isinstance(r.finish_reason, str) or len(r.finish_reason) > 16):
        return f"finish_reason must be None or a string of at most 16 characters, got {r.finish_reason!r}"
    return None


def _check_call_arrays(r: LlmCallRecord) -> str | None:
    if (unpack_tokens(r.prompt_token_ids) < 0).any() or (unpack_tokens(r.completion_token_ids) < 0).any():
        return "token ids must be >= 0"
    logprobs = unpack_logprobs(r.completion_logprobs)
    if not np.isfinite(logprobs).all() or (logprobs > 1e-3).any():
        return "completion_logprobs must be finite log-probabilities (<= 0)"
    return None


def _validate_judgment(r: JudgmentRecord) -> str | None:
    problem = _first(
        _check_id("trajectory_id", r.trajectory_id),
        _check_number("score", r.score),
        _check_number("normalized_score", r.normalized_score, optional=True),
    )
    if problem:
        return problem
    if not isinstance(r.judge, str) or not r.judge or not isinstance(r.judge_kind, str) or not r.judge_kind:
        return "judge and judge_kind must be non-empty strings"
    if r.rank_in_group is not None and (_check_index("rank_in_group", r.rank_in_group)):
        return _check_index("rank_in_group", r.rank_in_group)
    return None


_VALIDATORS = {
    TrajectoryRecord: _validate_trajectory,
    StepRecord: _validate_step,
    LlmCallRecord: _validate_call,
    JudgmentRecord: _validate_judgment,
}


def _validate_fields(record: object) -> str | None:
    validator = _VALIDATORS.get(type(record))
    if validator is None:
        kinds = "TrajectoryRecord, StepRecord, LlmCallRecord or JudgmentRecord"
        return f"unknown record type {type(record).__name__}; send {kinds}"
    try:
        return validator(record)
    except Exception as exc:  # a field of the wrong type deep inside, e.g. a non-numeric reward component
        return f"malformed {type(record).__name__}: {type(exc).__name__}: {exc}"


def validate(record: object) -> str | None:
    """None if the record may be stored, else what is wrong with it (naming the field)."""
    problem = _validate_fields(record)
    if problem is None and isinstance(record, LlmCallRecord):
        problem = _check_call_arrays(record)
    return problem


def validate_many(records: Sequence[object]) -> list[str | None]:
    """`validate` for a whole batch; the token and log-prob checks run once over all calls together."""
    problems = [_validate_fields(record) for record in records]
    calls = [r for r, p in zip(records, problems, strict=True) if p is None and isinstance(r, LlmCallRecord)]
    if calls:
        tokens = unpack_tokens(b"".join(blob for r in calls for blob in (r.prompt_token_ids, r.completion_token_ids)))
        logprobs = unpack_logprobs(b"".join(r.completion_logprobs for r in calls))
        clean = (tokens.size == 0 or tokens.min() >= 0) and np.isfinite(logprobs).all() and not (logprobs > 1e-3).any()
        if not clean:  # rare: find the culprits one by one
            for position, record in enumerate(records):
                if problems[position] is None and isinstance(record, LlmCallRecord):
                    problems[position] = _check_call_arrays(record)
    return problems
