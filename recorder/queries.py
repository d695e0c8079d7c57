"""What the controller and the trainer ask of the trajectory store: readiness, batches, model versions.

This module loads training data (a batch's groups as token arrays) and re-exports the rest, so callers
keep using `queries.X`: which groups are trainable and claiming them live in `recorder.batches`, a batch's
life (compare-and-set statuses) in `recorder.batch_lifecycle`, the version registry and the lineage rule in
`recorder.versions`.

The reward a group is trained on comes from `reward_source`: `env` (the environment's total reward on the
trajectory) or the name of a judge whose rows are in reward_judgments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from recorder.batch_lifecycle import (
    BATCH_TRANSITIONS,
    BatchStateConflict,
    complete_batch,
    fail_batch,
    get_batch,
    list_batches,
    mark_batch,
    set_batch_job,
    set_batch_progress,
    start_batch,
)
from recorder.batches import (
    B,
    BatchClaimConflict,
    BatchInProgress,
    C,
    M,
    Readiness,
    T,
    claim_batch,
    eligible,
    readiness,
    rewarded,
    staleness_floor,
    trainable_groups,
)
from recorder.records import unpack_logprobs, unpack_tokens
from recorder.versions import (
    VersionStateConflict,
    deployed_version,
    ensure_base_version,
    get_version,
    list_versions,
    register_version,
    training_parent,
    update_version,
)

__all__ = [
    "BATCH_TRANSITIONS",
    "BatchClaimConflict",
    "BatchInProgress",
    "BatchStateConflict",
    "CallData",
    "GroupData",
    "Readiness",
    "TrajectoryData",
    "VersionStateConflict",
    "claim_batch",
    "complete_batch",
    "deployed_version",
    "ensure_base_version",
    "fail_batch",
    "get_batch",
    "get_version",
    "list_batches",
    "list_versions",
    "load_batch",
    "load_trainable_groups",
    "mark_batch",
    "readiness",
    "register_version",
    "set_batch_job",
    "set_batch_progress",
    "staleness_floor",
    "start_batch",
    "training_parent",
    "training_scenarios_played",
    "update_version",
]


def training_scenarios_played(engine: Engine) -> int:
    """Distinct training (not held-out) scenarios with a recorded trajectory: where live mode's seeds go on."""
    with engine.connect() as conn:
        query = sa.select(sa.func.count(sa.distinct(T.c.scenario_id))).where(T.c.is_eval.is_(False))
        return int(conn.execute(query).scalar_one())


@dataclass
class CallData:
    """One policy LLM call of a trajectory, as arrays ready for `torch.from_numpy`."""

    step_index: int
    call_index: int
    model_version: int
    prompt_token_ids: np.ndarray
    completion_token_ids: np.ndarray
    completion_logprobs: np.ndarray
    temperature: float = 1.0
    """The sampling temperature of the call (its sampling_params): the trainer scores at it."""


@dataclass
class TrajectoryData:
    id: str
    model_version: int
    reward: float
    calls: list[CallData] = field(default_factory=list)


@dataclass
class GroupData:
    group_id: str
    scenario_id: str
    trajectories: list[TrajectoryData] = field(default_factory=list)

    @property
    def rewards(self) -> np.ndarray:
        return np.array([t.reward for t in self.trajectories], dtype=np.float64)


def load_batch(engine: Engine, batch_id: int, reward_source: str = "env") -> list[GroupData]:
    """A batch's groups with every policy call's tokens and behaviour log-probs, in step/call order."""
    with engine.connect() as conn:
        if conn.execute(sa.select(B.c.id).where(B.c.id == batch_id)).first() is None:
            raise KeyError(f"training batch {batch_id} does not exist")
    return _load_groups(engine, sa.select(M.c.trajectory_id).where(M.c.batch_id == batch_id), reward_source)


def load_trainable_groups(
    engine: Engine, reward_source: str = "env", min_group_size: int = 2, max_groups: int = 64, min_version: int = 0
) -> list[GroupData]:
    """The oldest trainable groups, as `claim_batch` would choose them, without claiming them (read only)."""
    source, reward = rewarded(reward_source)
    judged = sa.and_(eligible(min_version), reward.is_not(None))
    groups = trainable_groups(reward_source, min_group_size, min_version, max_groups).with_only_columns(T.c.group_id)
    members = sa.select(T.c.id).select_from(source).where(judged, T.c.group_id.in_(groups))
    return _load_groups(engine, members, reward_source)


def _load_groups(engine: Engine, members: Any, reward_source: str) -> list[GroupData]:
    source, reward = rewarded(reward_source)
    with engine.connect() as conn:
        trajectories = conn.execute(
            sa.select(T.c.id, T.c.group_id, T.c.scenario_id, T.c.model_version, reward.label("reward"))
            .select_from(source)
            .where(T.c.id.in_(members))
            .order_by(T.c.group_id, T.c.id)
        ).all()
        calls = conn.execute(
            sa.select(C)
            .where(C.c.trajectory_id.in_(members), C.c.purpose == "policy")
            .order_by(C.c.trajectory_id, C.c.step_index, C.c.call_index)
        ).all()
    by_trajectory: dict[str, list[CallData]] = {}
    for call in calls:
        by_trajectory.setdefault(call.trajectory_id, []).append(
            CallData(
                call.step_index,
                call.call_index,
                call.model_version,
                unpack_tokens(call.prompt_token_ids),
                unpack_tokens(call.completion_token_ids),
                unpack_logprobs(call.completion_logprobs),
                float((call.sampling_params or {}).get("temperature", 1.0)),
            )
        )
    groups: dict[str, GroupData] = {}
    for row in trajectories:
        group = groups.setdefault(row.group_id, GroupData(row.group_id, row.scenario_id))
        group.trajectories.append(TrajectoryData(row.id, row.model_version, row.reward, by_trajectory.get(row.id, [])))
    return list(groups.values())
