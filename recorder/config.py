"""Typed settings for the trajectory database (the `database:` section of a config file)."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.engine import URL, make_url

DEFAULT_STATEMENT_TIMEOUT_S = 60.0
"""`database.statement_timeout_s` by default, and for engines made without a config."""


class DatabaseConfig(BaseModel):
    """Where the recorder stores trajectories. The password never lives in a config file."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    url: str = Field("sqlite:///ziggurat.db", validate_default=True)
    """SQLAlchemy URL without a password, e.g. `sqlite:///ziggurat.db` (relative to the working
    directory where the config is loaded, made absolute then) or
    `postgresql+psycopg://ziggurat@db-host:5432/ziggurat`. The environment variable ZIGGURAT_DB_URL, when
    set, replaces it whole."""

    password_env: str = "ZIGGURAT_DB_PASSWORD"
    """Name of the environment variable holding the database password, if the server needs one."""

    pool_size: int = Field(5, ge=1)
    """Connections kept open per process (PostgreSQL only)."""

    connect_timeout_s: float = Field(10.0, gt=0)
    """Deadline for opening one connection before the call fails with a clear error. On SQLite it is also
    how long a write waits for another process's lock ("database is locked" after it)."""

    statement_timeout_s: float | None = Field(DEFAULT_STATEMENT_TIMEOUT_S, gt=0)
    """PostgreSQL cancels any one statement that runs longer (the server's `statement_timeout`, set on every
    connection that `create_db_engine` opens), so a lock wait or a runaway query fails with an error instead
    of hanging its caller; the recorder retries such a write. TCP keepalives likewise end a connection to a
    server that stopped answering. None: no limit. It travels as a connection startup option; behind a
    pooler that refuses those (PgBouncer), set None here and `ALTER ROLE ... SET statement_timeout` instead.
    SQLite waits at most `connect_timeout_s` for a lock instead."""

    auto_upgrade: bool = False
    """Apply schema migrations when a job starts. Convenient for the embedded SQLite default; on a shared
    PostgreSQL leave it off and run `ziggurat db upgrade` deliberately."""

    @field_validator("url")
    @classmethod
    def _no_password_in_file(cls, value: str) -> str:
        try:
            parsed = make_url(value)
        except Exception as exc:
            raise ValueError(
                f"not a SQLAlchemy URL ({exc}); use e.g. sqlite:///ziggurat.db or "
                "postgresql+psycopg://user@host:5432/dbname"
            ) from None
        if parsed.password:
            raise ValueError(
                "the URL contains a password; remove it and export it in the environment variable "
                "named by database.password_env (ZIGGURAT_DB_PASSWORD by default)"
            )
        if parsed.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError(f"backend {parsed.get_backend_name()!r} is not supported; use sqlite or postgresql")
        database = parsed.database or ""
        if parsed.get_backend_name() == "sqlite" and database and database != ":memory:":
            # Anchor a relative SQLite path where the config is read: Ray workers (the trainer's, the
            # rollout actors') run in other working directories and must open the same file.
            value = parsed.set(database=os.path.abspath(os.path.expanduser(database))).render_as_string()
        return value

    def resolved_url(self) -> URL:
        """The URL to connect with: ZIGGURAT_DB_URL if set, else `url`, plus the password from the env."""
        parsed = make_url(os.environ.get("ZIGGURAT_DB_URL") or self.url)
        password = os.environ.get(self.password_env)
        if password and parsed.get_backend_name() == "postgresql" and not parsed.password:
            parsed = parsed.set(password=password)
        return parsed

    def create_engine(self) -> Any:
        """A SQLAlchemy engine on `resolved_url()` with this section's deadlines and pool size."""
        from recorder.store import create_db_engine

        return create_db_engine(self.resolved_url(), self.connect_timeout_s, self.pool_size, self.statement_timeout_s)


class RecorderConfig(BaseModel):
    """How the recorder actor buffers and how producers talk to it."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    actor_name: str = "recorder"
    """Name of the recorder actor in the Ray namespace (what producers look up)."""

    max_buffer_records: int = Field(20_000, ge=100)
    """Records the actor holds waiting for the database; calls beyond it wait, then fail with RecorderBusy."""

    buffer_wait_s: float = Field(10.0, ge=0)
    """How long a call waits for buffer space before failing (the producer then retries later)."""

    max_call_bytes: int = Field(4_000_000, ge=1_000)
    """Producers keep each call under this many bytes (one record larger than this travels alone). Arguments
    over 100 KiB go through Ray's object store; on Ray 2.60 that is cheaper per record, not dearer: the CPU
    Ray spends per record falls as calls grow (bench/recorder.py: ratio 0.78 at 1 MB, 0.83 at 2 MB, 0.87 at
    4 MB). A client has at most 8 calls in flight, so this also bounds what it holds in the object store."""

    writer_connections: int = Field(2, ge=1, le=16)
    """Database connections the recorder writes through side by side (PostgreSQL; SQLite always uses one).
    Each producer's calls go through one of them, in order."""

    call_timeout_s: float = Field(60.0, gt=0)
    """Deadline for one producer call (the database commit included)."""

    write_timeout_s: float = Field(30.0, gt=0)
    """Deadline inside the recorder for one call, from its arrival to its commit (the wait for buffer space
    included; never longer than `call_timeout_s`). A call past it fails with RecorderTimeout, which
    producers retry: its records may still be committed later, and then the resend is a no-op. Keep it above
    the time one group commit takes (milliseconds to a few seconds)."""

    retry_deadline_s: float = Field(300.0, gt=0)
    """How long a producer keeps retrying unacknowledged records before it reports them as not stored
    (they stay in the client; a later flush tries again)."""

    hold_after_s: float = Field(30.0, gt=0)
    """Live mode: how long a finished group's flush tries before its records are held in the rollout actor
    (the recorder or database is unreachable) and the group is returned so its lane plays on. A background
    flush keeps retrying; nothing held is trained on until it is stored. Keep it at least `write_timeout_s`, so
    a recorder that is only slow is waited for, not sent the same records again."""

    max_held_records: int = Field(50_000, ge=0)
    """Live mode: records a rollout actor may hold unstored while it plays on through an outage; past it, a
    finished group waits for its records to be stored (backpressure). 0: every group waits, as in sync mode."""

    detached: bool = False
    """Keep the recorder alive after the driver that started it exits (for long-running clusters)."""
