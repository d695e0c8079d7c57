"""What producers send to the recorder, and the checks every record passes before it is stored.

Token arrays travel packed (little-endian int32 ids, float32 log-probs) so a step stays small on the wire
and goes into the database as it came. `validate` returns None or a message naming the bad field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from recorder.sanitize import (
    datetime_problem,
    index_problem,
    json_problem,
    number_problem,
    plain_index,
    plain_number,
    short,
    storable_text,
    text_problem,
)
from recorder.schema import TRAJECTORY_STATUSES, LlmCall, RewardJudgment, Trajectory

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
    try:
        if isinstance(record, LlmCallRecord):
            size = len(record.prompt_token_ids) + len(record.completion_token_ids) + len(record.completion_logprobs)
            size += len(record.text) + (sum(len(str(m)) for m in record.messages) if record.messages else 0)
            return size + 200
        if isinstance(record, StepRecord):
            return len(record.observation) + len(str(record.action)) + len(record.error or "") + 100
        if isinstance(record, TrajectoryRecord):
            return 300 + len(str(record.metadata)) + len(str(record.metrics))
        return 200 + len(record.reasoning or "")
    except Exception:  # a malformed record (validation names the field); it must not stop the batch being cut
        return 200


def leading_batch(records: Sequence[Record], max_bytes: int, max_count: int) -> int:
    """How many of the leading `records` make one write of at most `max_count` records and about `max_bytes`
    (`record_size`); at least one, so a record larger than that goes alone."""
    size, count = 0, 0
    for record in records[:max_count]:
        size += record_size(record)
        if count and size > max_bytes:
            break
        count += 1
    return count


def record_key(record: object) -> tuple[Any, ...]:
    """A record's key for naming it in a report, or a stand-in for one whose key fields are broken."""
    try:
        return tuple(record.key)  # type: ignore[attr-defined]
    except Exception:  # not a record, or one whose key fields are broken
        return ("unknown", repr(record)[:80])


_T, _C, _J = Trajectory.__table__.c, LlmCall.__table__.c, RewardJudgment.__table__.c


def _width(column: Any) -> int:
    """The VARCHAR width of a column, read from the schema so that the two never disagree."""
    return int(column.type.length)


ID_LENGTH = _width(_T.id)


def _check_id(name: str, value: object) -> str | None:
    return text_problem(name, value, ID_LENGTH)


def _first(*problems: str | None) -> str | None:
    return next((p for p in problems if p), None)


def _check_bool(name: str, value: object) -> str | None:
    return None if isinstance(value, bool) else f"{name} must be a bool, got {short(value)}"


def _reward_components(value: object) -> str | None:
    if not isinstance(value, dict):
        return "reward_components must be a mapping of name to number"
    for name, number in value.items():
        if problem := number_problem(f"reward_components[{short(name, 40)}]", number):
            return problem
    return json_problem("reward_components", value, dict, nullable=False)


def _validate_trajectory(r: TrajectoryRecord) -> str | None:
    if r.status not in TRAJECTORY_STATUSES:
        return f"status must be one of {', '.join(TRAJECTORY_STATUSES)}, got {short(r.status)}"
    return _first(
        _check_id("id", r.id),
        _check_id("group_id", r.group_id),
        text_problem("environment", r.environment, _width(_T.environment)),
        text_problem("scenario_id", r.scenario_id, _width(_T.scenario_id)),
        text_problem("agent_id", r.agent_id, _width(_T.agent_id), empty=True, null=True),
        index_problem("model_version", r.model_version),
        index_problem("step_count", r.step_count),
        number_problem("total_reward", r.total_reward, optional=True),
        _reward_components(r.reward_components),
        json_problem("metrics", r.metrics, dict, nullable=False),
        json_problem("metadata", r.metadata, dict, nullable=False),
        _check_bool("is_eval", r.is_eval),
        datetime_problem("started_at", r.started_at),
        datetime_problem("finished_at", r.finished_at),
    )


def _plain_id(value: object) -> bool:
    return type(value) is str and 0 < len(value) <= ID_LENGTH and storable_text(value)


def _validate_step(r: StepRecord) -> str | None:
    # Fast path for the common, well-formed record; it accepts nothing the checks below would refuse.
    if (
        _plain_id(r.trajectory_id)
        and plain_index(r.step_index)
        and plain_number(r.env_reward)
        and type(r.observation) is str
        and storable_text(r.observation)
        and type(r.done) is bool
        and (r.error is None or (type(r.error) is str and storable_text(r.error)))
        and (r.action is None or (type(r.action) is dict and json_problem("action", r.action) is None))
    ):
        return None
    return _first(
        _check_id("trajectory_id", r.trajectory_id),
        index_problem("step_index", r.step_index),
        number_problem("env_reward", r.env_reward),
        text_problem("observation", r.observation, empty=True),
        json_problem("action", r.action, dict),
        _check_bool("done", r.done),
        text_problem("error", r.error, empty=True, null=True),
    )


_PURPOSE_WIDTH, _FINISH_WIDTH = _width(_C.purpose), _width(_C.finish_reason)


def _validate_call(r: LlmCallRecord) -> str | None:
    # Fast path for the common, well-formed record; it accepts nothing the checks below would refuse.
    if (
        _plain_id(r.trajectory_id)
        and plain_index(r.step_index)
        and plain_index(r.call_index)
        and plain_index(r.model_version)
        and (r.latency_ms is None or plain_number(r.latency_ms))
        and type(r.prompt_token_ids) is bytes
        and type(r.completion_token_ids) is bytes
        and type(r.completion_logprobs) is bytes
        and r.prompt_token_ids
        and r.completion_token_ids
        and not len(r.prompt_token_ids) % 4
        and not len(r.completion_token_ids) % 4
        and len(r.completion_token_ids) == len(r.completion_logprobs)
        and type(r.text) is str
        and storable_text(r.text)
        and type(r.purpose) is str
        and 0 < len(r.purpose) <= _PURPOSE_WIDTH
        and storable_text(r.purpose)
        and (r.finish_reason is None or (type(r.finish_reason) is str and len(r.finish_reason) <= _FINISH_WIDTH))
        and (r.finish_reason is None or storable_text(r.finish_reason))
        and type(r.sampling_params) is dict
        and json_problem("sampling_params", r.sampling_params) is None
        and (r.messages is None or (type(r.messages) is list and json_problem("messages", r.messages) is None))
    ):
        return None
    problem = _first(
        _check_id("trajectory_id", r.trajectory_id),
        index_problem("step_index", r.step_index),
        index_problem("call_index", r.call_index),
        index_problem("model_version", r.model_version),
        number_problem("latency_ms", r.latency_ms, optional=True),
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
    return _first(
        text_problem("text", r.text, empty=True),
        text_problem("purpose", r.purpose, _PURPOSE_WIDTH),
        text_problem("finish_reason", r.finish_reason, _FINISH_WIDTH, empty=True, null=True),
        json_problem("sampling_params", r.sampling_params, dict, nullable=False),
        json_problem("messages", r.messages, list),
    )


def _check_call_arrays(r: LlmCallRecord) -> str | None:
    if (unpack_tokens(r.prompt_token_ids) < 0).any() or (unpack_tokens(r.completion_token_ids) < 0).any():
        return "token ids must be >= 0"
    logprobs = unpack_logprobs(r.completion_logprobs)
    if not np.isfinite(logprobs).all() or (logprobs > 1e-3).any():
        return "completion_logprobs must be finite log-probabilities (<= 0)"
    return None


def _validate_judgment(r: JudgmentRecord) -> str | None:
    return _first(
        _check_id("trajectory_id", r.trajectory_id),
        number_problem("score", r.score),
        number_problem("normalized_score", r.normalized_score, optional=True),
        text_problem("judge", r.judge, _width(_J.judge)),
        text_problem("judge_kind", r.judge_kind, _width(_J.judge_kind)),
        text_problem("judge_model", r.judge_model, _width(_J.judge_model), empty=True, null=True),
        text_problem("judge_version", r.judge_version, _width(_J.judge_version), empty=True, null=True),
        None if r.rank_in_group is None else index_problem("rank_in_group", r.rank_in_group),
        text_problem("reasoning", r.reasoning, empty=True, null=True),
        json_problem("criteria", r.criteria, dict, nullable=False),
    )


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
