"""The trajectory store's tables (SQLAlchemy 2.x typed ORM). Migrations in recorder/migrations/ create them.

Token arrays are packed little-endian binary (int32 token ids, float32 log-probs), not JSON text: a
300-token prompt is 1.2 KB instead of ~2 KB of digits, and unpacking is one `numpy.frombuffer`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JsonColumn = JSON().with_variant(JSONB(), "postgresql")

TRAJECTORY_STATUSES = ("running", "finished", "aborted", "failed")
VERSION_STATUSES = ("training", "ready", "canary", "deployed", "retired", "failed", "rolled_back")
BATCH_STATUSES = ("pending", "running", "completed", "failed")
OPEN_BATCH_STATUSES = ("pending", "running")
OPEN_BATCH = text("status IN ('pending', 'running')")
"""The partial-index predicate of an open batch (the same SQL on SQLite and PostgreSQL)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JsonColumn, list[Any]: JsonColumn}


class ModelVersion(Base):
    __tablename__ = "model_versions"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(200))
    base_model: Mapped[str] = mapped_column(String(500))
    kind: Mapped[str] = mapped_column(String(16))  # lora | full | base
    artifact_uri: Mapped[str | None] = mapped_column(Text)
    parent_version: Mapped[int | None] = mapped_column(ForeignKey("model_versions.version"))
    training_batch_id: Mapped[int | None] = mapped_column(ForeignKey("training_batches.id"))
    status: Mapped[str] = mapped_column(String(16), default="training")
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    wandb_run_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Trajectory(Base):
    __tablename__ = "trajectories"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    environment: Mapped[str] = mapped_column(String(100))
    scenario_id: Mapped[str] = mapped_column(String(200))
    group_id: Mapped[str] = mapped_column(String(64))
    agent_id: Mapped[str | None] = mapped_column(String(200))
    model_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="running")
    total_reward: Mapped[float | None] = mapped_column(Float)
    reward_components: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    step_count: Mapped[int] = mapped_column(Integer, default=0)
    is_eval: Mapped[bool] = mapped_column(Boolean, default=False)
    training_batch_id: Mapped[int | None] = mapped_column(ForeignKey("training_batches.id"))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_trajectories_ready", "status", "training_batch_id", "model_version"),
        Index("ix_trajectories_group", "group_id"),
        Index("ix_trajectories_scenario", "environment", "scenario_id"),
    )


class Step(Base):
    __tablename__ = "steps"

    trajectory_id: Mapped[str] = mapped_column(ForeignKey("trajectories.id"), primary_key=True)
    step_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    observation: Mapped[str] = mapped_column(Text)
    action: Mapped[dict[str, Any] | None] = mapped_column(JsonColumn)
    env_reward: Mapped[float] = mapped_column(Float, default=0.0)
    done: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LlmCall(Base):
    __tablename__ = "llm_calls"

    trajectory_id: Mapped[str] = mapped_column(ForeignKey("trajectories.id"), primary_key=True)
    step_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    call_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_version: Mapped[int] = mapped_column(Integer)
    purpose: Mapped[str] = mapped_column(String(32), default="policy")
    messages: Mapped[list[Any] | None] = mapped_column(JsonColumn)
    prompt_token_ids: Mapped[bytes] = mapped_column(LargeBinary)
    completion_token_ids: Mapped[bytes] = mapped_column(LargeBinary)
    completion_logprobs: Mapped[bytes] = mapped_column(LargeBinary)
    text: Mapped[str] = mapped_column(Text, default="")
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    sampling_params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RewardJudgment(Base):
    __tablename__ = "reward_judgments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    trajectory_id: Mapped[str] = mapped_column(ForeignKey("trajectories.id"))
    judge: Mapped[str] = mapped_column(String(100))  # a name unique per judge configuration
    judge_kind: Mapped[str] = mapped_column(String(32))  # env | llm | combined
    judge_model: Mapped[str | None] = mapped_column(String(500))
    judge_version: Mapped[str | None] = mapped_column(String(100))
    score: Mapped[float] = mapped_column(Float)
    rank_in_group: Mapped[int | None] = mapped_column(Integer)
    normalized_score: Mapped[float | None] = mapped_column(Float)
    reasoning: Mapped[str | None] = mapped_column(Text)
    criteria: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (UniqueConstraint("trajectory_id", "judge", name="uq_judgment_per_judge"),)


class TrainingBatch(Base):
    __tablename__ = "training_batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    target_version: Mapped[int | None] = mapped_column(Integer)
    # The version this batch trains from (0: the base model), fixed when it is claimed. No foreign key:
    # version 0 is only registered once a controller has run, and a job may train before that.
    parent_version: Mapped[int | None] = mapped_column(Integer)
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    ray_job_id: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    # One open (pending or running) batch per parent version: two jobs from one parent would register
    # sibling versions trained on disjoint halves of the data. The database refuses the second claim however
    # it arrives (controller, `ziggurat train`, a second controller). A NULL parent (a claim outside any
    # lineage, e.g. a tool reading data) is not constrained: NULLs never collide in a unique index.
    __table_args__ = (
        Index(
            "uq_training_batches_open_per_parent",
            "parent_version",
            unique=True,
            sqlite_where=OPEN_BATCH,
            postgresql_where=OPEN_BATCH,
        ),
    )


class TrainingBatchTrajectory(Base):
    """Membership of a batch, kept even if a trajectory is later released from it."""

    __tablename__ = "training_batch_trajectories"

    batch_id: Mapped[int] = mapped_column(ForeignKey("training_batches.id"), primary_key=True)
    trajectory_id: Mapped[str] = mapped_column(ForeignKey("trajectories.id"), primary_key=True)


class ApiKey(Base):
    """A gateway client's key: only its SHA-256 is stored, so the database never holds a usable key."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    """The key's first characters, to tell keys apart in listings."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
