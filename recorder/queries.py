"""What the controller and the trainer ask of the trajectory store: readiness, batches, model versions.

The reward a group is trained on comes from `reward_source`: `env` (the environment's total reward on the
trajectory) or the name of a judge whose rows are in reward_judgments.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from recorder.records import unpack_logprobs, unpack_tokens
from recorder.schema import (
    BATCH_STATUSES,
    VERSION_STATUSES,
    LlmCall,
    ModelVersion,
    RewardJudgment,
    Step,
    TrainingBatch,
    TrainingBatchTrajectory,
    Trajectory,
    utcnow,
)

T = Trajectory.__table__
J = RewardJudgment.__table__
B = TrainingBatch.__table__
M = TrainingBatchTrajectory.__table__
C = LlmCall.__table__
V = ModelVersion.__table__


class BatchClaimConflict(RuntimeError):
    """Another claimer took some of the chosen trajectories first; the caller retries."""


def _rewarded(reward_source: str) -> tuple[Any, Any]:
    """(FROM clause, reward column) for trajectories joined to the chosen reward."""
    if reward_source == "env":
        return T, T.c.total_reward
    joined = T.join(J, sa.and_(J.c.trajectory_id == T.c.id, J.c.judge == reward_source))
    return joined, J.c.score


S = Step.__table__


def _quality_ok() -> Any:
    """The data-quality gate: steps recorded, LLM calls recorded, and every step's action has a parsed
    result or an error (the old pipeline trained on rows missing some of these)."""
    return sa.and_(
        sa.exists().where(S.c.trajectory_id == T.c.id),
        sa.exists().where(C.c.trajectory_id == T.c.id),
        ~sa.exists().where(S.c.trajectory_id == T.c.id, _no_action, S.c.error.is_(None)),
    )


# A missing action is stored as JSON null (or SQL NULL by hand-written rows): both count as no result.
_no_action = sa.or_(S.c.action.is_(None), sa.cast(S.c.action, sa.Text) == "null")


def _unused(min_version: int) -> Any:
    """Finished, not for evaluation, not yet in a training batch, fresh enough."""
    return sa.and_(
        T.c.status == "finished",
        T.c.is_eval.is_(False),
        T.c.training_batch_id.is_(None),
        T.c.model_version >= min_version,
    )


def _eligible(min_version: int) -> Any:
    """Unused, fresh enough and passing the data-quality gate."""
    return sa.and_(_unused(min_version), _quality_ok())


@dataclass
class Readiness:
    finished: int
    """Finished trajectories not yet used in a batch (and not evaluation episodes)."""
    judged: int
    """Of those, how many have a reward from the chosen source."""
    groups: int
    """Distinct GRPO groups among the judged ones."""
    group_sizes: dict[int, int]
    """How many groups have each size."""
    groups_with_variance: int
    """Groups of at least `min_group_size` whose rewards are not all equal (the trainable ones)."""
    trainable_trajectories: int
    """Trajectories in those groups."""
    by_model_version: dict[int, int]
    """Judged, unused trajectories per model version that produced them."""
    failed_quality: int = 0
    """Finished, unused trajectories left out by the data-quality gate (missing steps or LLM calls, or a
    step whose action has neither a result nor an error)."""
    stale: int = 0
    """Finished, unused trajectories from versions older than the staleness bound."""


def readiness(engine: Engine, reward_source: str = "env", min_group_size: int = 2, min_version: int = 0) -> Readiness:
    source, reward = _rewarded(reward_source)
    eligible = _eligible(min_version)
    with engine.connect() as conn:
        finished = conn.execute(sa.select(sa.func.count()).select_from(T).where(eligible)).scalar_one()
        unused = conn.execute(sa.select(sa.func.count()).select_from(T).where(_unused(min_version))).scalar_one()
        any_version = conn.execute(sa.select(sa.func.count()).select_from(T).where(_unused(0))).scalar_one()
        judged_filter = sa.and_(eligible, reward.is_not(None))
        per_group = conn.execute(
            sa.select(
                T.c.group_id,
                sa.func.count().label("size"),
                sa.func.min(reward).label("low"),
                sa.func.max(reward).label("high"),
            )
            .select_from(source)
            .where(judged_filter)
            .group_by(T.c.group_id)
        ).all()
        by_version = conn.execute(
            sa.select(T.c.model_version, sa.func.count())
            .select_from(source)
            .where(judged_filter)
            .group_by(T.c.model_version)
        ).all()
    trainable = [g for g in per_group if g.size >= min_group_size and g.high > g.low]
    return Readiness(
        finished=finished,
        judged=sum(g.size for g in per_group),
        groups=len(per_group),
        group_sizes=dict(sorted(Counter(g.size for g in per_group).items())),
        groups_with_variance=len(trainable),
        trainable_trajectories=sum(g.size for g in trainable),
        by_model_version={version: count for version, count in by_version},
        failed_quality=unused - finished,
        stale=any_version - unused,
    )


def _trainable_groups(reward_source: str, min_group_size: int, min_version: int, max_groups: int) -> Any:
    """(group_id, size) of the oldest whole, judged groups with reward variance: what a batch takes."""
    source, reward = _rewarded(reward_source)
    return (
        sa.select(T.c.group_id, sa.func.count().label("size"))
        .select_from(source)
        .where(_eligible(min_version), reward.is_not(None))
        .group_by(T.c.group_id)
        .having(sa.and_(sa.func.count() >= min_group_size, sa.func.max(reward) > sa.func.min(reward)))
        .order_by(sa.func.min(T.c.finished_at), T.c.group_id)
        .limit(max_groups)
    )


def claim_batch(
    engine: Engine,
    *,
    max_groups: int,
    min_group_size: int = 2,
    reward_source: str = "env",
    min_version: int = 0,
    target_version: int | None = None,
    attempts: int = 5,
) -> int | None:
    """Atomically claim up to `max_groups` whole, trainable groups (oldest first) into a new batch.

    Two claimers never get the same trajectory: rows are locked (PostgreSQL: FOR UPDATE SKIP LOCKED; a
    group with any row locked elsewhere is left out whole) and the final UPDATE only takes rows still
    unclaimed, checked by row count. Returns the batch id, or None if no group is trainable.
    """
    for attempt in range(attempts):
        try:
            with engine.begin() as conn:
                return _claim_once(conn, max_groups, min_group_size, reward_source, min_version, target_version)
        except BatchClaimConflict:
            time.sleep(0.05 * (attempt + 1))
        except OperationalError as exc:
            # SQLite: a concurrent claimer committed after our read snapshot ("database is locked").
            if engine.dialect.name != "sqlite" or "locked" not in str(exc):
                raise
            time.sleep(0.05 * (attempt + 1))
    raise BatchClaimConflict(f"could not claim a batch in {attempts} attempts: other claimers keep winning")


def _claim_once(
    conn: Connection,
    max_groups: int,
    min_group_size: int,
    reward_source: str,
    min_version: int,
    target_version: int | None,
) -> int | None:
    source, reward = _rewarded(reward_source)
    judged = sa.and_(_eligible(min_version), reward.is_not(None))
    groups = conn.execute(_trainable_groups(reward_source, min_group_size, min_version, max_groups)).all()
    if not groups:
        return None
    sizes = {g.group_id: g.size for g in groups}
    rows = sa.select(T.c.id, T.c.group_id).select_from(source).where(judged, T.c.group_id.in_(sizes))
    if conn.dialect.name == "postgresql":
        rows = rows.with_for_update(skip_locked=True, of=T)
    locked = conn.execute(rows).all()
    got = Counter(row.group_id for row in locked)
    complete = {group for group, size in sizes.items() if got[group] == size}  # a partly locked group waits
    ids = [row.id for row in locked if row.group_id in complete]
    if not ids:
        raise BatchClaimConflict("every chosen group is being claimed elsewhere")
    batch_id = conn.execute(
        sa.insert(B)
        .values(status="pending", target_version=target_version, stats={}, created_at=utcnow())
        .returning(B.c.id)
    ).scalar_one()
    updated = conn.execute(
        sa.update(T).where(T.c.id.in_(ids), T.c.training_batch_id.is_(None)).values(training_batch_id=batch_id)
    ).rowcount
    if updated != len(ids):
        raise BatchClaimConflict(f"{len(ids) - updated} trajectories were claimed concurrently")
    conn.execute(sa.insert(M), [{"batch_id": batch_id, "trajectory_id": i} for i in ids])
    conn.execute(
        sa.update(B).where(B.c.id == batch_id).values(stats={"groups": len(complete), "trajectories": len(ids)})
    )
    return batch_id


@dataclass
class CallData:
    """One policy LLM call of a trajectory, as arrays ready for `torch.from_numpy`."""

    step_index: int
    call_index: int
    model_version: int
    prompt_token_ids: np.ndarray
    completion_token_ids: np.ndarray
    completion_logprobs: np.ndarray


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
    source, reward = _rewarded(reward_source)
    judged = sa.and_(_eligible(min_version), reward.is_not(None))
    groups = _trainable_groups(reward_source, min_group_size, min_version, max_groups).with_only_columns(T.c.group_id)
    members = sa.select(T.c.id).select_from(source).where(judged, T.c.group_id.in_(groups))
    return _load_groups(engine, members, reward_source)


def _load_groups(engine: Engine, members: Any, reward_source: str) -> list[GroupData]:
    source, reward = _rewarded(reward_source)
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
            )
        )
    groups: dict[str, GroupData] = {}
    for row in trajectories:
        group = groups.setdefault(row.group_id, GroupData(row.group_id, row.scenario_id))
        group.trajectories.append(TrajectoryData(row.id, row.model_version, row.reward, by_trajectory.get(row.id, [])))
    return list(groups.values())


def mark_batch(
    engine: Engine,
    batch_id: int,
    status: str,
    *,
    error: str | None = None,
    stats: dict[str, Any] | None = None,
    ray_job_id: str | None = None,
    target_version: int | None = None,
    release: bool = False,
) -> None:
    """Move a batch to running/completed/failed. `release` (failed only) frees its trajectories for reuse."""
    if status not in BATCH_STATUSES:
        raise ValueError(f"batch status must be one of {', '.join(BATCH_STATUSES)}, got {status!r}")
    with engine.begin() as conn:
        current = conn.execute(sa.select(B.c.stats).where(B.c.id == batch_id)).first()
        if current is None:
            raise KeyError(f"training batch {batch_id} does not exist")
        values: dict[str, Any] = {"status": status}
        if status == "running":
            values["started_at"] = utcnow()
        if status in ("completed", "failed"):
            values["finished_at"] = utcnow()
        if error is not None:
            values["error"] = error
        if stats:
            values["stats"] = {**(current.stats or {}), **stats}
        if ray_job_id is not None:
            values["ray_job_id"] = ray_job_id
        if target_version is not None:
            values["target_version"] = target_version
        conn.execute(sa.update(B).where(B.c.id == batch_id).values(**values))
        if release:
            if status != "failed":
                raise ValueError("only a failed batch can release its trajectories")
            conn.execute(sa.update(T).where(T.c.training_batch_id == batch_id).values(training_batch_id=None))


def set_batch_progress(engine: Engine, batch_id: int, done: int, total: int, **numbers: float) -> None:
    """The trainer's progress on a batch (updates done / total, latest metrics), read by the controller."""
    with engine.begin() as conn:
        current = conn.execute(sa.select(B.c.stats).where(B.c.id == batch_id)).scalar_one()
        progress = {"done": done, "total": total, "fraction": done / max(total, 1), **numbers}
        conn.execute(sa.update(B).where(B.c.id == batch_id).values(stats={**(current or {}), "progress": progress}))


def list_batches(engine: Engine, statuses: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    query = sa.select(B).order_by(B.c.id)
    if statuses:
        query = query.where(B.c.status.in_(statuses))
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]


def get_batch(engine: Engine, batch_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(sa.select(B).where(B.c.id == batch_id)).mappings().first()
        if row is None:
            raise KeyError(f"training batch {batch_id} does not exist")
        members = conn.execute(sa.select(M.c.trajectory_id).where(M.c.batch_id == batch_id)).scalars().all()
    return {**row, "trajectory_ids": sorted(members)}


def register_version(
    engine: Engine,
    *,
    base_model: str,
    kind: str,
    name: str | None = None,
    artifact_uri: str | None = None,
    parent_version: int | None = None,
    training_batch_id: int | None = None,
    status: str = "training",
    metrics: dict[str, Any] | None = None,
    wandb_run_id: str | None = None,
    attempts: int = 5,
) -> int:
    """Add the next model version (1, 2, ...: monotonic even with concurrent registrations)."""
    if status not in VERSION_STATUSES:
        raise ValueError(f"version status must be one of {', '.join(VERSION_STATUSES)}, got {status!r}")
    if kind not in ("base", "lora", "full"):
        raise ValueError(f"version kind must be base, lora or full, got {kind!r}")
    for _ in range(attempts):
        try:
            with engine.begin() as conn:
                version = conn.execute(sa.select(sa.func.coalesce(sa.func.max(V.c.version), 0) + 1)).scalar_one()
                now = utcnow()
                conn.execute(
                    sa.insert(V).values(
                        version=version,
                        name=name or f"v{version}",
                        base_model=base_model,
                        kind=kind,
                        artifact_uri=artifact_uri,
                        parent_version=parent_version,
                        training_batch_id=training_batch_id,
                        status=status,
                        metrics=metrics or {},
                        wandb_run_id=wandb_run_id,
                        created_at=now,
                        updated_at=now,
                    )
                )
                return version
        except IntegrityError:
            continue  # another registration took this number; take the next
    raise RuntimeError(f"could not register a model version in {attempts} attempts")


def ensure_base_version(engine: Engine, base_model: str) -> None:
    """Version 0 is the base model; it is registered (as deployed) once, so rollback to it is uniform."""
    with engine.begin() as conn:
        if conn.execute(sa.select(V.c.version).where(V.c.version == 0)).first() is not None:
            return
        now = utcnow()
        try:
            with conn.begin_nested():
                conn.execute(
                    sa.insert(V).values(
                        version=0,
                        name="v0",
                        base_model=base_model,
                        kind="base",
                        status="deployed",
                        metrics={},
                        created_at=now,
                        updated_at=now,
                    )  # fmt: skip
                )
        except IntegrityError:
            pass  # another controller registered it first


def get_version(engine: Engine, version: int) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(sa.select(V).where(V.c.version == version)).mappings().first()
    if row is None:
        raise KeyError(f"model version {version} does not exist; `ziggurat versions` lists them")
    return dict(row)


def list_versions(engine: Engine, status: str | None = None) -> list[dict[str, Any]]:
    query = sa.select(V).order_by(V.c.version)
    if status is not None:
        query = query.where(V.c.status == status)
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]


def update_version(
    engine: Engine,
    version: int,
    *,
    status: str | None = None,
    metrics: dict[str, Any] | None = None,
    artifact_uri: str | None = None,
    wandb_run_id: str | None = None,
) -> None:
    """Change a version's status or add metrics (merged into the existing ones)."""
    if status is not None and status not in VERSION_STATUSES:
        raise ValueError(f"version status must be one of {', '.join(VERSION_STATUSES)}, got {status!r}")
    with engine.begin() as conn:
        current = conn.execute(sa.select(V.c.metrics).where(V.c.version == version)).first()
        if current is None:
            raise KeyError(f"model version {version} does not exist")
        values: dict[str, Any] = {"updated_at": utcnow()}
        if status is not None:
            values["status"] = status
        if metrics:
            values["metrics"] = {**(current.metrics or {}), **metrics}
        if artifact_uri is not None:
            values["artifact_uri"] = artifact_uri
        if wandb_run_id is not None:
            values["wandb_run_id"] = wandb_run_id
        conn.execute(sa.update(V).where(V.c.version == version).values(**values))
