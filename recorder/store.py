"""The database side of the recorder: validate, then write a batch of records in one transaction.

Writes are idempotent on natural keys (trajectory id; trajectory + step; trajectory + step + call;
trajectory + judge), so a producer may resend anything it was not sure about. On PostgreSQL the bulk
tables go through COPY into a temporary staging table and one INSERT ... ON CONFLICT DO NOTHING; on
SQLite through executemany with INSERT OR IGNORE.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import URL, Connection, Engine

from recorder.migrate import check_schema
from recorder.records import JudgmentRecord, LlmCallRecord, Record, StepRecord, TrajectoryRecord, validate_many
from recorder.schema import LlmCall, RewardJudgment, Step, Trajectory, utcnow

log = logging.getLogger(__name__)

_KNOWN_IDS_CAPACITY = 100_000
_OUTCOME_COLUMNS = ("status", "total_reward", "reward_components", "metrics", "step_count", "finished_at")


@dataclass
class WriteResult:
    """What happened to a batch: positions of rejected records with the reason; the rest is committed."""

    written: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)


def create_db_engine(url: str | URL, connect_timeout_s: float = 10.0, pool_size: int = 5) -> Engine:
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(parsed, connect_args={"timeout": connect_timeout_s})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers don't block the recorder's writes
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return sa.create_engine(
        parsed,
        pool_pre_ping=True,  # a restarted server leaves dead pooled connections behind
        pool_size=pool_size,
        connect_args={"connect_timeout": max(1, int(connect_timeout_s))},
    )


def _dedupe_trajectories(records: Iterable[TrajectoryRecord]) -> list[TrajectoryRecord]:
    """One row per id; a terminal status beats `running` (a replayed start never reopens an episode)."""
    chosen: dict[str, TrajectoryRecord] = {}
    for record in records:
        previous = chosen.get(record.id)
        if previous is None or record.status != "running" or previous.status == "running":
            chosen[record.id] = record
    return list(chosen.values())


class TrajectoryStore:
    """Owns a SQLAlchemy engine; `write` is the recorder's only path into the database."""

    def __init__(self, url: str | URL, connect_timeout_s: float = 10.0, pool_size: int = 5) -> None:
        self.engine = create_db_engine(url, connect_timeout_s, pool_size)
        self.dialect = self.engine.dialect.name
        check_schema(self.engine)
        self._known_ids: OrderedDict[str, None] = OrderedDict()
        self._conn: Connection | None = None
        self._copy_types: dict[tuple[str, tuple[str, ...]], list[int]] = {}

    def dispose(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.engine.dispose()

    def _connection(self) -> Connection:
        """The writer's own connection, kept between writes (no pool checkout or ping per transaction)."""
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = self.engine.connect()
        return self._conn

    # ---- writes -------------------------------------------------------------------------------

    def write(self, records: Sequence[Record]) -> WriteResult:
        """Validate every record, store the valid ones in one transaction, report the rest by position.

        Raises (and stores nothing) if the database cannot be reached or the transaction fails.
        """
        result = WriteResult()
        valid: list[tuple[int, Record]] = []
        for position, (record, problem) in enumerate(zip(records, validate_many(records), strict=True)):
            if problem:
                result.rejected.append((position, problem))
            else:
                valid.append((position, record))

        conn = self._connection()
        try:
            result.written = self._write_valid(conn, valid, result)
        except Exception:
            self._conn = None  # a broken connection must not be reused; the pool invalidates dead ones
            conn.close()
            raise
        result.rejected.sort()
        return result

    def _write_valid(self, conn: Connection, valid: list[tuple[int, Record]], result: WriteResult) -> int:
        """Write in one transaction; reject records of unknown trajectories into `result`. Returns rows written."""
        with conn.begin():
            new_ids = {r.id for _, r in valid if isinstance(r, TrajectoryRecord)}
            referenced = {r.trajectory_id for _, r in valid if not isinstance(r, TrajectoryRecord)}
            unknown = self._unknown_trajectories(conn, referenced - new_ids)
            if unknown:
                kept = []
                for position, record in valid:
                    if not isinstance(record, TrajectoryRecord) and record.trajectory_id in unknown:
                        problem = f"trajectory_id {record.trajectory_id!r} is unknown: send its TrajectoryRecord first"
                        result.rejected.append((position, problem))
                    else:
                        kept.append((position, record))
                valid = kept
            by_type: dict[type, list[Any]] = {kind: [] for kind in (TrajectoryRecord, StepRecord, LlmCallRecord)}
            by_type[JudgmentRecord] = []
            for _, record in valid:
                by_type[type(record)].append(record)
            now = utcnow()
            self._write_trajectories(conn, _dedupe_trajectories(by_type[TrajectoryRecord]), now)
            self._insert_ignore(
                conn,
                [
                    (Step.__table__, [self._step_row(r, now) for r in by_type[StepRecord]]),
                    (LlmCall.__table__, [self._call_row(r, now) for r in by_type[LlmCallRecord]]),
                    (RewardJudgment.__table__, [self._judgment_row(r, now) for r in by_type[JudgmentRecord]]),
                ],
            )
        for trajectory_id in new_ids:
            self._remember(trajectory_id)
        return len(valid)

    def _remember(self, trajectory_id: str) -> None:
        self._known_ids[trajectory_id] = None
        self._known_ids.move_to_end(trajectory_id)
        if len(self._known_ids) > _KNOWN_IDS_CAPACITY:
            self._known_ids.popitem(last=False)

    def _unknown_trajectories(self, conn: Connection, ids: set[str]) -> set[str]:
        missing = {i for i in ids if i not in self._known_ids}
        if not missing:
            return set()
        table = Trajectory.__table__
        found = set(conn.execute(sa.select(table.c.id).where(table.c.id.in_(missing))).scalars())
        for trajectory_id in found:
            self._remember(trajectory_id)
        return missing - found

    def _write_trajectories(self, conn: Connection, records: list[TrajectoryRecord], now: datetime) -> None:
        if not records:
            return
        table = Trajectory.__table__
        rows = [
            {
                "id": r.id,
                "environment": r.environment,
                "scenario_id": r.scenario_id,
                "group_id": r.group_id,
                "agent_id": r.agent_id,
                "model_version": r.model_version,
                "status": r.status,
                "total_reward": r.total_reward,
                "reward_components": r.reward_components,
                "metrics": r.metrics,
                "metadata": r.metadata,
                "step_count": r.step_count,
                "is_eval": r.is_eval,
                "started_at": r.started_at or now,
                "finished_at": r.finished_at or (now if r.status != "running" else None),
            }
            for r in records
        ]
        # A start on an existing id changes nothing; an end fills in the outcome. Neither touches the batch
        # a trajectory belongs to.
        if self.dialect == "postgresql":
            stage, columns = self._stage(conn, table, rows)
            updates = ", ".join(f"{name} = EXCLUDED.{name}" for name in _OUTCOME_COLUMNS)
            conn.exec_driver_sql(
                f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM {stage} "
                f"ON CONFLICT (id) DO UPDATE SET {updates} WHERE EXCLUDED.status <> 'running'"
            )
            return
        insert = sqlite.insert(table)
        updated = {name: insert.excluded[name] for name in _OUTCOME_COLUMNS}
        conn.execute(
            insert.on_conflict_do_update(
                index_elements=["id"], set_=updated, where=insert.excluded.status != "running"
            ),
            rows,
        )

    @staticmethod
    def _step_row(r: StepRecord, now: datetime) -> dict[str, Any]:
        return {
            "trajectory_id": r.trajectory_id,
            "step_index": r.step_index,
            "observation": r.observation,
            "action": r.action,
            "env_reward": float(r.env_reward),
            "done": r.done,
            "error": r.error,
            "created_at": now,
        }

    @staticmethod
    def _call_row(r: LlmCallRecord, now: datetime) -> dict[str, Any]:
        return {
            "trajectory_id": r.trajectory_id,
            "step_index": r.step_index,
            "call_index": r.call_index,
            "model_version": r.model_version,
            "purpose": r.purpose,
            "messages": r.messages,
            "prompt_token_ids": r.prompt_token_ids,
            "completion_token_ids": r.completion_token_ids,
            "completion_logprobs": r.completion_logprobs,
            "text": r.text,
            "finish_reason": r.finish_reason,
            "sampling_params": r.sampling_params,
            "latency_ms": r.latency_ms,
            "prompt_tokens": len(r.prompt_token_ids) // 4,
            "completion_tokens": len(r.completion_token_ids) // 4,
            "created_at": now,
        }

    @staticmethod
    def _judgment_row(r: JudgmentRecord, now: datetime) -> dict[str, Any]:
        return {
            "trajectory_id": r.trajectory_id,
            "judge": r.judge,
            "judge_kind": r.judge_kind,
            "judge_model": r.judge_model,
            "judge_version": r.judge_version,
            "score": float(r.score),
            "rank_in_group": r.rank_in_group,
            "normalized_score": r.normalized_score,
            "reasoning": r.reasoning,
            "criteria": r.criteria,
            "created_at": now,
        }

    def _insert_ignore(self, conn: Connection, tables: list[tuple[sa.Table, list[dict[str, Any]]]]) -> None:
        """Insert rows whose keys are new; rows whose keys exist already are skipped (a resend)."""
        tables = [(table, rows) for table, rows in tables if rows]
        if self.dialect != "postgresql":
            for table, rows in tables:
                conn.execute(sqlite.insert(table).on_conflict_do_nothing(), rows)
            return
        import psycopg

        # Fast path: COPY straight into the tables. Resends are rare, so only when a key already exists
        # do we roll back to the savepoint and go through staging tables with ON CONFLICT DO NOTHING.
        try:
            with conn.begin_nested():
                for table, rows in tables:
                    self._copy(conn, table, table.name, rows)
        except psycopg.errors.UniqueViolation:
            for table, rows in tables:
                stage, columns = self._stage(conn, table, rows)
                conn.exec_driver_sql(
                    f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM {stage} ON CONFLICT DO NOTHING"
                )

    def _stage(self, conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> tuple[str, str]:
        """COPY rows into a transaction-scoped staging copy of `table`; returns its name and the column list."""
        stage = f"_stage_{table.name}"
        conn.exec_driver_sql(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table.name} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        self._copy(conn, table, stage, rows)
        return stage, ", ".join(rows[0])

    def _copy(self, conn: Connection, table: sa.Table, target: str, rows: list[dict[str, Any]]) -> None:
        """Binary COPY (C-encoded by psycopg; bytea travels raw instead of hex) of rows into `target`."""
        from psycopg.types.json import Jsonb

        columns = list(rows[0])
        raw = conn.connection.driver_connection
        key = (table.name, tuple(columns))
        if key not in self._copy_types:
            described = raw.execute(f"SELECT {', '.join(columns)} FROM {table.name} LIMIT 0").description
            self._copy_types[key] = [column.type_code for column in described]
        json_positions = [i for i, c in enumerate(columns) if isinstance(table.c[c].type, sa.JSON)]
        with raw.cursor() as cursor:
            with cursor.copy(f"COPY {target} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(self._copy_types[key])
                for row in rows:
                    values = list(row.values())
                    for i in json_positions:
                        if values[i] is not None:
                            values[i] = Jsonb(values[i])
                    copy.write_row(values)
