"""Which recorded groups may be trained, and claiming them into batches (a batch's life after that:
recorder/batch_lifecycle.py).

Three rules live here, each once:

- **Complete data.** A trajectory is trainable only when it finished and every one of its `step_count` steps
  is stored, each with its policy LLM call and an action that was parsed or carries its error.
- **Whole groups.** A group is trainable only when *all* its recorded trajectories are (evaluation episodes
  are not part of a training group). A group with a member still running, aborted, failed, unjudged,
  incomplete or too stale is never trained on partially: GRPO advantages of a partial group compare the
  survivors of a filter, not the samples the policy drew.
- **Staleness.** `staleness_floor`: a group is fresh enough when every trajectory was sampled by the parent
  version (the one the batch trains from) or at most `max_staleness` versions before it. It is judged once,
  when the batch is claimed; a claimed group is trained on.

At most one batch per parent version is open (pending or running), enforced by a partial unique index
(recorder/schema.py), so two claimers from one parent get one batch between them.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from recorder.schema import (
    OPEN_BATCH_STATUSES,
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
S = Step.__table__
V = ModelVersion.__table__


class BatchClaimConflict(RuntimeError):
    """Another claimer took some of the chosen trajectories first; the caller retries."""


class BatchInProgress(RuntimeError):
    """A batch from the same parent version is still pending or running: one trains at a time."""


def staleness_floor(parent_version: int | None, max_staleness: int | None) -> int:
    """The oldest model version whose samples may train a batch from `parent_version` (None: the base
    model, version 0). `max_staleness` None: no bound."""
    if max_staleness is None:
        return 0
    return max(0, (parent_version or 0) - max_staleness)


def rewarded(reward_source: str) -> tuple[Any, Any]:
    """(FROM clause, reward column) for trajectories joined to the chosen reward."""
    if reward_source == "env":
        return T, T.c.total_reward
    joined = T.join(J, sa.and_(J.c.trajectory_id == T.c.id, J.c.judge == reward_source))
    return joined, J.c.score


# A missing action is stored as JSON null (or SQL NULL by hand-written rows): both count as no result.
_no_action = sa.or_(S.c.action.is_(None), sa.cast(S.c.action, sa.Text) == "null")


def _complete() -> Any:
    """The data-quality gate: all `step_count` steps stored (indices 0..step_count-1, none beyond), each with
    a policy LLM call, and every action parsed or carrying its error. The recorder acknowledges steps and
    calls in several flushes, so a finished trajectory can be visible before all of them are."""
    stored_steps = sa.select(sa.func.count()).select_from(S).where(S.c.trajectory_id == T.c.id).scalar_subquery()
    call_of_step = sa.exists().where(
        C.c.trajectory_id == S.c.trajectory_id, C.c.step_index == S.c.step_index, C.c.purpose == "policy"
    )
    return sa.and_(
        T.c.step_count > 0,
        stored_steps == T.c.step_count,
        ~sa.exists().where(S.c.trajectory_id == T.c.id, S.c.step_index >= T.c.step_count),
        ~sa.exists().where(S.c.trajectory_id == T.c.id, ~call_of_step),
        ~sa.exists().where(S.c.trajectory_id == T.c.id, _no_action, S.c.error.is_(None)),
    )


def _unused(min_version: int) -> Any:
    """Finished, not for evaluation, not yet in a training batch, fresh enough."""
    return sa.and_(
        T.c.status == "finished",
        T.c.is_eval.is_(False),
        T.c.training_batch_id.is_(None),
        T.c.model_version >= min_version,
    )


def eligible(min_version: int) -> Any:
    """Unused, fresh enough and complete."""
    return sa.and_(_unused(min_version), _complete())


def _members() -> Any:
    """How many trajectories (evaluation episodes aside) the group of the outer row has recorded."""
    member = T.alias("member")
    return (
        sa.select(sa.func.count())
        .select_from(member)
        .where(member.c.group_id == T.c.group_id, member.c.is_eval.is_(False))
        .scalar_subquery()
    )


@dataclass
class Readiness:
    finished: int
    """Finished trajectories not yet used in a batch (and not evaluation episodes), fresh and complete."""
    judged: int
    """Of those, how many have a reward from the chosen source."""
    groups: int
    """Distinct GRPO groups among the judged ones."""
    group_sizes: dict[int, int]
    """How many groups have each size (judged trajectories)."""
    groups_with_variance: int
    """Whole groups of at least `min_group_size` whose rewards are not all equal (the trainable ones)."""
    trainable_trajectories: int
    """Trajectories in those groups."""
    by_model_version: dict[int, int]
    """Judged, unused trajectories per model version that produced them."""
    failed_quality: int = 0
    """Finished, unused trajectories left out by the data-quality gate (fewer steps or LLM calls stored than
    `step_count`, or a step whose action has neither a result nor an error)."""
    stale: int = 0
    """Finished, unused trajectories from versions older than the staleness bound."""
    incomplete_groups: int = 0
    """Judged groups not trainable yet (or ever) because another of their trajectories is running, aborted,
    failed, unjudged, incomplete or stale: groups are trained whole."""
    min_version: int = 0
    """The staleness bound: the oldest version whose samples may be trained on (`staleness_floor`)."""


def readiness(
    engine: Engine,
    reward_source: str = "env",
    min_group_size: int = 2,
    *,
    parent_version: int | None = None,
    max_staleness: int | None = None,
) -> Readiness:
    """What a claim from `parent_version` (None: the base model) with `max_staleness` would find."""
    min_version = staleness_floor(parent_version, max_staleness)
    source, reward = rewarded(reward_source)
    fresh = eligible(min_version)
    with engine.connect() as conn:
        finished = conn.execute(sa.select(sa.func.count()).select_from(T).where(fresh)).scalar_one()
        unused = conn.execute(sa.select(sa.func.count()).select_from(T).where(_unused(min_version))).scalar_one()
        any_version = conn.execute(sa.select(sa.func.count()).select_from(T).where(_unused(0))).scalar_one()
        judged_filter = sa.and_(fresh, reward.is_not(None))
        per_group = conn.execute(
            sa.select(
                T.c.group_id,
                sa.func.count().label("size"),
                sa.func.min(reward).label("low"),
                sa.func.max(reward).label("high"),
                _members().label("members"),
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
    whole = [g for g in per_group if g.size == g.members]
    trainable = [g for g in whole if g.size >= min_group_size and g.high > g.low]
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
        incomplete_groups=len(per_group) - len(whole),
        min_version=min_version,
    )


def trainable_groups(reward_source: str, min_group_size: int, min_version: int, max_groups: int) -> Any:
    """(group_id, size) of the oldest whole, judged groups with reward variance: what a batch takes."""
    source, reward = rewarded(reward_source)
    return (
        sa.select(T.c.group_id, sa.func.count().label("size"))
        .select_from(source)
        .where(eligible(min_version), reward.is_not(None))
        .group_by(T.c.group_id)
        .having(
            sa.and_(
                sa.func.count() >= min_group_size,
                sa.func.max(reward) > sa.func.min(reward),
                sa.func.count() == _members(),
            )
        )
        .order_by(sa.func.min(T.c.finished_at), T.c.group_id)
        .limit(max_groups)
    )


def open_batch_of(conn: Connection, parent_version: int, other_than: int | None = None) -> Any:
    """(id, status) of an open batch from `parent_version`, or None."""
    query = sa.select(B.c.id, B.c.status).where(
        B.c.parent_version == parent_version, B.c.status.in_(OPEN_BATCH_STATUSES)
    )
    if other_than is not None:
        query = query.where(B.c.id != other_than)
    return conn.execute(query.order_by(B.c.id).limit(1)).first()


def in_progress(open_batch: Any, parent_version: int) -> BatchInProgress:
    return BatchInProgress(
        f"training batch {open_batch.id} from version {parent_version} is still {open_batch.status}: one batch "
        "per parent version trains at a time; wait for it to finish (`ziggurat status`), or let the controller "
        "fail it if its job is gone (`ziggurat train` again after that)"
    )


def claim_batch(
    engine: Engine,
    *,
    max_groups: int,
    min_group_size: int = 2,
    reward_source: str = "env",
    parent_version: int | None = None,
    max_staleness: int | None = None,
    target_version: int | None = None,
    attempts: int = 5,
) -> int | None:
    """Atomically claim up to `max_groups` whole, trainable groups (oldest first) into a new batch that
    trains from `parent_version`, fresh by `staleness_floor(parent_version, max_staleness)`.

    Two claimers never get the same trajectory: rows are locked (PostgreSQL: FOR UPDATE SKIP LOCKED; a
    group with any row locked elsewhere is left out whole) and the final UPDATE only takes rows still
    unclaimed, checked by row count. With a `parent_version`, BatchInProgress if a batch from that parent is
    still open (the database refuses a second one). Returns the batch id, or None if no group is trainable.
    """
    min_version = staleness_floor(parent_version, max_staleness)
    for attempt in range(attempts):
        try:
            with engine.begin() as conn:
                return _claim_once(
                    conn, max_groups, min_group_size, reward_source, min_version, target_version, parent_version
                )
        except BatchClaimConflict:
            time.sleep(0.05 * (attempt + 1))
        except IntegrityError:
            if parent_version is None:
                raise
            with engine.connect() as conn:
                open_batch = open_batch_of(conn, parent_version)
            if open_batch is not None:  # the partial unique index refused a second open batch
                raise in_progress(open_batch, parent_version) from None
            time.sleep(0.05 * (attempt + 1))  # the other batch ended meanwhile: try again
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
    parent_version: int | None,
) -> int | None:
    if parent_version is not None and (open_batch := open_batch_of(conn, parent_version)) is not None:
        raise in_progress(open_batch, parent_version)
    source, reward = rewarded(reward_source)
    judged = sa.and_(eligible(min_version), reward.is_not(None))
    groups = conn.execute(trainable_groups(reward_source, min_group_size, min_version, max_groups)).all()
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
        .values(
            status="pending",
            target_version=target_version,
            parent_version=parent_version,
            stats={},
            created_at=utcnow(),
        )
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
