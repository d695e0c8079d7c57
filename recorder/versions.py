"""The model-version registry: numbering, statuses (changed compare-and-set), and the lineage rule.

Lineage: the next version trains from the *deployed* version. After a rollback that is the rollback target
(rollback deploys it); a ready version nobody deployed, a canary, or a rejected, rolled-back or failed
version is never a parent, so a bad candidate cannot leak into every version after it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from recorder.schema import VERSION_STATUSES, ModelVersion, Trajectory, utcnow

V = ModelVersion.__table__
T = Trajectory.__table__


class VersionStateConflict(RuntimeError):
    """A version's status was not the one the caller expected (someone else changed it first)."""


def _statuses(expected: str | tuple[str, ...]) -> tuple[str, ...]:
    return (expected,) if isinstance(expected, str) else tuple(expected)


def insert_version(
    conn: Connection,
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
) -> int:
    """Insert the next version number inside the caller's transaction (IntegrityError if another
    transaction took the number first: the caller retries)."""
    if status not in VERSION_STATUSES:
        raise ValueError(f"version status must be one of {', '.join(VERSION_STATUSES)}, got {status!r}")
    if kind not in ("base", "lora", "full"):
        raise ValueError(f"version kind must be base, lora or full, got {kind!r}")
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
    for _ in range(attempts):
        try:
            with engine.begin() as conn:
                return insert_version(
                    conn, base_model=base_model, kind=kind, name=name, artifact_uri=artifact_uri,
                    parent_version=parent_version, training_batch_id=training_batch_id, status=status,
                    metrics=metrics, wandb_run_id=wandb_run_id,
                )  # fmt: skip
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


def training_parent(engine: Engine) -> dict[str, Any] | None:
    """The version the next batch trains from: the deployed one (None: nothing is registered as deployed,
    so training starts from the base model)."""
    with engine.connect() as conn:
        row = (
            conn.execute(sa.select(V).where(V.c.status == "deployed").order_by(V.c.version.desc()).limit(1))
            .mappings()
            .first()
        )
    return dict(row) if row is not None else None


def deployed_version(engine: Engine) -> int:
    """The deployed version's number (0, the base model, when none is registered)."""
    parent = training_parent(engine)
    return parent["version"] if parent is not None else 0


def update_version(
    engine: Engine,
    version: int,
    *,
    status: str | None = None,
    expected: str | tuple[str, ...] | None = None,
    metrics: dict[str, Any] | None = None,
    artifact_uri: str | None = None,
    wandb_run_id: str | None = None,
) -> None:
    """Change a version's status or add metrics (merged into the existing ones). With `expected`, the change
    is compare-and-set: it happens only if the version's status is (one of) `expected`, else
    VersionStateConflict."""
    if status is not None and status not in VERSION_STATUSES:
        raise ValueError(f"version status must be one of {', '.join(VERSION_STATUSES)}, got {status!r}")
    with engine.begin() as conn:
        update_version_in(
            conn, version, status=status, expected=expected, metrics=metrics, artifact_uri=artifact_uri,
            wandb_run_id=wandb_run_id,
        )  # fmt: skip


def mark_deployed(engine: Engine, version: int, metrics: dict[str, Any] | None = None) -> None:
    """In one transaction: `version` deployed, the version deployed before it retired, and every other canary
    rolled back (no actor serves it any more). An outage part-way leaves the statuses as they were."""
    with engine.begin() as conn:
        for status, replaced in (("deployed", "retired"), ("canary", "rolled_back")):
            others = conn.execute(sa.select(V.c.version).where(V.c.status == status, V.c.version != version))
            for (other,) in others.all():
                extra = {"canary_replaced_by": version} if status == "canary" else None
                update_version_in(conn, other, status=replaced, metrics=extra)
        update_version_in(conn, version, status="deployed", metrics=metrics)


def update_version_in(
    conn: Connection,
    version: int,
    *,
    status: str | None = None,
    expected: str | tuple[str, ...] | None = None,
    metrics: dict[str, Any] | None = None,
    artifact_uri: str | None = None,
    wandb_run_id: str | None = None,
) -> None:
    """`update_version` inside the caller's transaction (so a batch and its version change together)."""
    current = conn.execute(sa.select(V.c.metrics, V.c.status).where(V.c.version == version)).first()
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
    where = V.c.version == version
    if expected is not None:
        where = sa.and_(where, V.c.status.in_(_statuses(expected)))
    if conn.execute(sa.update(V).where(where).values(**values)).rowcount == 0:
        now = conn.execute(sa.select(V.c.status).where(V.c.version == version)).scalar_one()
        raise VersionStateConflict(
            f"model version {version} is {now}, not {' or '.join(_statuses(expected or ()))}: another process "
            f"changed it first; read it again (`ziggurat versions`) before changing it"
        )


def episode_reward_by_version(engine: Engine, versions: list[int], since: datetime) -> dict[int, tuple[float, int]]:
    """(mean reward, episodes) of the finished training episodes per version, started at or after `since`:
    what a canary is decided on (evaluation episodes are left out, they play other scenarios)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(T.c.model_version, sa.func.avg(T.c.total_reward), sa.func.count())
            .where(
                T.c.status == "finished",
                T.c.is_eval.is_(False),
                T.c.started_at >= since,
                T.c.model_version.in_(versions),
            )
            .group_by(T.c.model_version)
        ).all()
    return {version: (float(mean), count) for version, mean, count in rows}
