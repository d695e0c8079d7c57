"""A training batch's life: pending -> running -> completed | failed (or pending -> failed), every change
compare-and-set, so a late or duplicate caller (a job finishing after the controller's timeout failed it, a
second job given the same batch) gets BatchStateConflict instead of reopening or retraining a batch.

Starting a batch registers the version it trains, and completing it makes that version ready, each in one
transaction with the batch's own change.
"""

from __future__ import annotations

import math
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from recorder.batches import B, M, T, V, in_progress, open_batch_of
from recorder.schema import BATCH_STATUSES, OPEN_BATCH_STATUSES, utcnow
from recorder.versions import insert_version, update_version_in

BATCH_TRANSITIONS: dict[str, tuple[str, ...]] = {
    "running": ("pending",),
    "completed": ("running",),
    "failed": ("pending", "running"),
}
"""The statuses a batch may move to, each with the statuses it may come from (never back to pending)."""


class BatchStateConflict(RuntimeError):
    """A batch was not in the status the caller expected (someone else moved it first)."""


def _expected(status: str, expected: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if status not in BATCH_STATUSES:
        raise ValueError(f"batch status must be one of {', '.join(BATCH_STATUSES)}, got {status!r}")
    if status not in BATCH_TRANSITIONS:
        raise ValueError(f"a batch is created {status} by claim_batch and never returns to it")
    legal = BATCH_TRANSITIONS[status]
    wanted = legal if expected is None else ((expected,) if isinstance(expected, str) else tuple(expected))
    illegal = [s for s in wanted if s not in legal]
    if illegal:
        raise ValueError(f"a batch cannot move from {' or '.join(illegal)} to {status}; only from {' or '.join(legal)}")
    return wanted


def _transition(
    conn: Connection,
    batch_id: int,
    status: str,
    expected: str | tuple[str, ...] | None,
    values: dict[str, Any],
    stats: dict[str, Any] | None = None,
    release: bool = False,
) -> None:
    """Compare-and-set: move the batch to `status` only if it is in `expected` now (default: every status
    `status` may legally follow), else BatchStateConflict."""
    wanted = _expected(status, expected)
    if release and status != "failed":
        raise ValueError("only a failed batch can release its trajectories")
    current = conn.execute(sa.select(B.c.stats).where(B.c.id == batch_id).with_for_update()).first()
    if current is None:
        raise KeyError(f"training batch {batch_id} does not exist")
    values = {**values, "status": status}
    if status == "running":
        values["started_at"] = utcnow()
    if status in ("completed", "failed"):
        values["finished_at"] = utcnow()
    if stats:
        values["stats"] = {**(current.stats or {}), **stats}
    moved = conn.execute(sa.update(B).where(B.c.id == batch_id, B.c.status.in_(wanted)).values(**values)).rowcount
    if moved == 0:
        now = conn.execute(sa.select(B.c.status).where(B.c.id == batch_id)).scalar_one()
        raise BatchStateConflict(
            f"training batch {batch_id} is {now}, not {' or '.join(wanted)}, so it cannot become {status}: another "
            "process (its job, a controller's timeout or recovery) moved it first; read it again (get_batch)"
        )
    if release:
        conn.execute(sa.update(T).where(T.c.training_batch_id == batch_id).values(training_batch_id=None))


def mark_batch(
    engine: Engine,
    batch_id: int,
    status: str,
    *,
    expected: str | tuple[str, ...] | None = None,
    error: str | None = None,
    stats: dict[str, Any] | None = None,
    ray_job_id: str | None = None,
    target_version: int | None = None,
    release: bool = False,
) -> None:
    """Move a batch to running/completed/failed, compare-and-set from `expected` (default: the statuses it
    may legally come from). `release` (failed only) frees its trajectories for reuse."""
    values: dict[str, Any] = {}
    if error is not None:
        values["error"] = error
    if ray_job_id is not None:
        values["ray_job_id"] = ray_job_id
    if target_version is not None:
        values["target_version"] = target_version
    with engine.begin() as conn:
        _transition(conn, batch_id, status, expected, values, stats, release)


def set_batch_job(engine: Engine, batch_id: int, ray_job_id: str) -> None:
    """Record the job that will train a pending batch (before it starts, so a restarted controller can look
    for it)."""
    with engine.begin() as conn:
        moved = conn.execute(
            sa.update(B).where(B.c.id == batch_id, B.c.status == "pending").values(ray_job_id=ray_job_id)
        ).rowcount
        if moved == 0:
            now = conn.execute(sa.select(B.c.status).where(B.c.id == batch_id)).scalar()
            if now is None:
                raise KeyError(f"training batch {batch_id} does not exist")
            raise BatchStateConflict(f"training batch {batch_id} is {now}, not pending: it already has its job")


def start_batch(
    engine: Engine,
    batch_id: int,
    *,
    base_model: str,
    kind: str,
    parent_version: int,
    ray_job_id: str | None = None,
    attempts: int = 5,
) -> int:
    """pending -> running, and the version it trains registered (status training), in one transaction:
    a job that loses the race registers nothing. Returns the new version."""
    for _ in range(attempts):
        try:
            with engine.begin() as conn:
                row = conn.execute(sa.select(B.c.parent_version).where(B.c.id == batch_id)).first()
                if row is None:
                    raise KeyError(f"training batch {batch_id} does not exist")
                if row.parent_version is not None and row.parent_version != parent_version:
                    raise ValueError(
                        f"training batch {batch_id} was claimed to train from version {row.parent_version}, "
                        f"not {parent_version}"
                    )
                values: dict[str, Any] = {"parent_version": parent_version}
                if ray_job_id is not None:
                    values["ray_job_id"] = ray_job_id
                _transition(conn, batch_id, "running", "pending", values)
                registered = conn.execute(sa.select(V.c.version).where(V.c.version == parent_version)).first()
                version = insert_version(
                    conn,
                    base_model=base_model,
                    kind=kind,
                    parent_version=parent_version if registered is not None else None,
                    training_batch_id=batch_id,
                    status="training",
                )
                conn.execute(sa.update(B).where(B.c.id == batch_id).values(target_version=version))
                return version
        except IntegrityError:
            with engine.connect() as conn:
                open_batch = open_batch_of(conn, parent_version, other_than=batch_id)
            if open_batch is not None:
                raise in_progress(open_batch, parent_version) from None
            continue  # another registration took the version number; take the next
    raise RuntimeError(f"could not start training batch {batch_id} in {attempts} attempts")


def complete_batch(
    engine: Engine,
    batch_id: int,
    version: int,
    *,
    artifact_uri: str,
    metrics: dict[str, Any],
    wandb_run_id: str | None = None,
) -> None:
    """running -> completed and its version training -> ready, together or not at all (a batch a controller
    failed meanwhile keeps its version from becoming ready)."""
    with engine.begin() as conn:
        _transition(conn, batch_id, "completed", "running", {}, stats={"final": metrics})
        update_version_in(
            conn, version, status="ready", expected="training", artifact_uri=artifact_uri, metrics=metrics,
            wandb_run_id=wandb_run_id,
        )  # fmt: skip


def fail_batch(
    engine: Engine,
    batch_id: int,
    error: str,
    *,
    expected: str | tuple[str, ...] = OPEN_BATCH_STATUSES,
) -> None:
    """An open batch -> failed, its trajectories released for another try, and the version it was training
    (if still `training`) failed with the error, in one transaction. BatchStateConflict if the batch already
    ended. The version is read from the row here, not from a caller's older copy of it."""
    with engine.begin() as conn:
        _transition(conn, batch_id, "failed", expected, {"error": error}, release=True)
        version = conn.execute(sa.select(B.c.target_version).where(B.c.id == batch_id)).scalar_one()
        row = conn.execute(sa.select(V.c.metrics).where(V.c.version == version, V.c.status == "training")).first()
        if row is not None:  # a version that is already ready or failed keeps its status
            conn.execute(
                sa.update(V)
                .where(V.c.version == version, V.c.status == "training")
                .values(status="failed", metrics={**(row.metrics or {}), "error": error}, updated_at=utcnow())
            )


def set_batch_progress(
    engine: Engine, batch_id: int, done: int, total: int, report: dict[str, Any] | None = None, **numbers: float
) -> None:
    """The trainer's progress on a batch, read by the controller: `stats["progress"]` holds updates done /
    total, their fraction and the latest `numbers` (loss=...). `report`, one update's metrics, is kept in
    `stats["updates"]` (numbers only, one entry per update, in update order); a retried or resumed update that
    reports the same `update` number again replaces its entry. NaN and infinities are stored as None."""

    def numbers_in(values: dict[str, Any]) -> dict[str, float | int | None]:
        return {
            str(k): v if math.isfinite(v) else None
            for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }

    with engine.begin() as conn:
        current = conn.execute(sa.select(B.c.stats).where(B.c.id == batch_id).with_for_update()).scalar_one()
        stats = dict(current or {})
        stats["progress"] = {"done": done, "total": total, "fraction": done / max(total, 1), **numbers_in(numbers)}
        if report is not None:
            entry = numbers_in(report)
            number = entry.setdefault("update", done)
            kept = [u for u in stats.get("updates") or [] if u.get("update") != number]
            stats["updates"] = sorted([*kept, entry], key=lambda u: u.get("update") or 0)
        conn.execute(sa.update(B).where(B.c.id == batch_id).values(stats=stats))


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
