"""The database side of the recorder: validate, then write a batch of records in one transaction.

Writes are idempotent on natural keys (trajectory id; trajectory + step; trajectory + step + call;
trajectory + judge), so a producer may resend anything it was not sure about. On PostgreSQL steps and
LLM calls are COPYed straight into their tables; a resend that hits an existing key rolls the transaction
back, and it is written again through staging tables with INSERT ... ON CONFLICT DO NOTHING. On SQLite
they go through executemany with INSERT OR IGNORE. When the database refuses part of a batch (a value past
its limits, a constraint), the rows to blame are found in savepoints and rejected by position; the rest is
stored (recorder/isolate.py). An outage is raised, for the caller to retry. The rows a record becomes are
built in recorder/columns.py (from the ORM's column lists), PostgreSQL's bulk statements in recorder/pg_write.py.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine

from recorder.columns import (
    TRAJECTORY_OUTCOME,
    WRITTEN,
    call_values,
    judgment_row,
    step_values,
    trajectory_row,
)
from recorder.config import DEFAULT_STATEMENT_TIMEOUT_S
from recorder.errors import is_data_error, refusal
from recorder.isolate import WriteBatch, write_isolating
from recorder.migrate import check_schema
from recorder.pg_write import copy_bulk, is_unique_violation, upsert_trajectories
from recorder.records import JudgmentRecord, LlmCallRecord, Record, StepRecord, TrajectoryRecord, validate_many
from recorder.schema import LlmCall, RewardJudgment, Step, Trajectory, utcnow
from recorder.wire import EncodedRows, encode

log = logging.getLogger(__name__)

_KNOWN_IDS_CAPACITY = 100_000


@dataclass
class WriteResult:
    """What happened to a batch: positions of rejected records with the reason; the rest is committed."""

    written: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)


def create_db_engine(
    url: str | URL,
    connect_timeout_s: float = 10.0,
    pool_size: int = 5,
    statement_timeout_s: float | None = DEFAULT_STATEMENT_TIMEOUT_S,
) -> Engine:
    """An engine for the trajectory database: every call on it has a deadline, every commit is durable.

    PostgreSQL: `statement_timeout_s` is the server-side limit per statement (None: none), and TCP
    keepalives end a connection to a server that went silent. SQLite: lock waits end after
    `connect_timeout_s`.
    """
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(parsed, connect_args={"timeout": connect_timeout_s})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers don't block the recorder's writes
            # The recorder acknowledges a step once its transaction commits, so a commit must survive a power
            # loss: FULL syncs the WAL at every commit (NORMAL only at checkpoints, which can lose the last
            # commits). Group commit keeps this to one sync per transaction of many records.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    connect_args: dict[str, Any] = {
        "connect_timeout": max(1, int(connect_timeout_s)),
        # A server that vanished without closing the socket is noticed in about 30 s, not hours.
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 4,
    }
    if statement_timeout_s is not None:
        # A startup option, not a SET: it holds for every connection the pool opens and survives rollbacks.
        option = f"-c statement_timeout={max(1, round(statement_timeout_s * 1000))}"
        given = parsed.query.get("options")
        connect_args["options"] = f"{given} {option}" if isinstance(given, str) else option
    return sa.create_engine(
        parsed,
        pool_pre_ping=True,  # a restarted server leaves dead pooled connections behind
        pool_size=pool_size,
        connect_args=connect_args,
    )


def _dedupe_trajectories(records: Iterable[TrajectoryRecord]) -> list[TrajectoryRecord]:
    """One row per id; a terminal status beats `running` (a replayed start never reopens an episode)."""
    chosen: dict[str, TrajectoryRecord] = {}
    for record in records:
        previous = chosen.get(record.id)
        if previous is None or record.status != "running" or previous.status == "running":
            chosen[record.id] = record
    return [chosen[key] for key in sorted(chosen)]  # one lock order for concurrent writers


@cache
def _sqlite_trajectory_upsert() -> Any:
    """Built once: SQLAlchemy builds `excluded`'s column collection anew on every statement (about 0.7 ms, as
    much as the rest of a small write)."""
    insert = sqlite.insert(Trajectory.__table__)
    updated = {name: insert.excluded[name] for name in TRAJECTORY_OUTCOME}
    return insert.on_conflict_do_update(index_elements=["id"], set_=updated, where=insert.excluded.status != "running")


class TrajectoryStore:
    """Owns a SQLAlchemy engine; `write` is the only path records take into the database (the recorder actor's,
    and the gateway ledger's for its calls)."""

    def __init__(
        self,
        url: str | URL,
        connect_timeout_s: float = 10.0,
        pool_size: int = 5,
        statement_timeout_s: float | None = DEFAULT_STATEMENT_TIMEOUT_S,
    ) -> None:
        self.engine = create_db_engine(url, connect_timeout_s, pool_size, statement_timeout_s)
        self.dialect = self.engine.dialect.name
        check_schema(self.engine)
        self._known_ids: OrderedDict[str, None] = OrderedDict()
        self._conn: Connection | None = None

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

    def write(self, items: Sequence[Record | EncodedRows]) -> WriteResult:
        """Validate, then store everything valid in one transaction; report the rest by position.

        Positions count a record as one and an `EncodedRows` block as one per row, in order. Rows the
        database refuses are rejected too. Raises (and stores nothing) if the database cannot be reached, or
        on an error that no row explains (a missing table, no permission).
        """
        batch = WriteBatch()
        records = [item for item in items if not isinstance(item, EncodedRows)]
        problems = iter(validate_many(records))
        position = 0
        for item in items:
            if isinstance(item, EncodedRows):
                problem = self._check_block(item)
                if problem:
                    batch.rejected += [(position + offset, problem) for offset in range(len(item))]
                else:
                    batch.encoded.append((range(position, position + len(item)), item))
                position += len(item)
                continue
            problem = next(problems)
            if problem:
                batch.rejected.append((position, problem))
            else:
                batch.records.append((position, item))
            position += 1

        conn = self._connection()
        try:
            written = self._write_or_isolate(conn, batch)
        except Exception:
            self._conn = None  # a broken connection must not be reused; the pool invalidates dead ones
            conn.close()
            raise
        return WriteResult(written=written, rejected=sorted(batch.rejected))

    def _write_or_isolate(self, conn: Connection, batch: WriteBatch) -> int:
        """The fast write; after a unique violation, the resend path; after the database refused some of the
        data, the rows to blame are found and rejected (an outage is raised, for the caller to retry)."""
        try:
            return self._write_batch(conn, batch, resent=False)
        except Exception as exc:
            if is_unique_violation(exc):
                # Some rows were stored before (a producer resent after a timeout or a recorder restart):
                # the transaction rolled back; write it again, skipping rows that exist.
                try:
                    return self._write_batch(conn, batch, resent=True)
                except Exception as again:
                    if not is_data_error(again):
                        raise
                    exc = again
            elif not is_data_error(exc):
                raise
            log.warning("the database refused part of a batch (%s); isolating the rows to blame", refusal(exc))
        return write_isolating(self, conn, batch)

    def _check_block(self, block: EncodedRows) -> str | None:
        if self.dialect != "postgresql":
            return "EncodedRows are PostgreSQL COPY rows; send record objects to a SQLite recorder"
        if block.table not in ("steps", "llm_calls"):
            return f"EncodedRows.table must be steps or llm_calls, got {block.table!r}"
        if not isinstance(block.data, bytes) or not isinstance(block.trajectory_ids, list):
            return "EncodedRows needs data as bytes and a list of trajectory ids"
        if not isinstance(block.sizes, list) or not all(type(size) is int and size > 0 for size in block.sizes):
            return "EncodedRows sizes must be a list of positive integers"
        if len(block.trajectory_ids) != len(block.sizes) or sum(block.sizes) != len(block.data):
            return "EncodedRows needs one trajectory id and one size per row, and sizes that add up to the data"
        if not all(isinstance(trajectory_id, str) for trajectory_id in set(block.trajectory_ids)):
            return "EncodedRows trajectory ids must be strings"
        return None

    def _write_batch(self, conn: Connection, batch: WriteBatch, resent: bool) -> int:
        """Write in one transaction; reject rows of unknown trajectories into `batch`. Returns rows written.

        On PostgreSQL steps and calls are COPYed straight into their tables unless `resent`: a row that
        exists then fails the whole transaction with a unique violation, and the caller retries with
        `resent=True`, which goes through staging tables and ON CONFLICT DO NOTHING.
        """
        with conn.begin():
            written = self.write_rows(conn, batch, resent)
        for trajectory_id in batch.started_ids():
            self._remember(trajectory_id)
        return written

    def write_rows(self, conn: Connection, batch: WriteBatch, resent: bool, pending: Set[str] = frozenset()) -> int:
        """The body of a write, in the caller's transaction. `pending`: trajectories written earlier in it
        (not committed yet, so neither remembered nor looked up)."""
        new_ids = batch.started_ids()
        referenced = {r.trajectory_id for _, r in batch.records if not isinstance(r, TrajectoryRecord)}
        for _, block in batch.encoded:
            referenced.update(block.trajectory_ids)
        unknown = self._unknown_trajectories(conn, referenced - new_ids - pending)
        if unknown:
            batch.drop_unknown(unknown)
        by_type: dict[type, list[Any]] = {kind: [] for kind in (TrajectoryRecord, StepRecord, LlmCallRecord)}
        by_type[JudgmentRecord] = []
        for _, record in batch.records:
            by_type[type(record)].append(record)
        now = utcnow()
        trajectories = _dedupe_trajectories(by_type[TrajectoryRecord])  # sorted: one lock order, no deadlocks
        # A start of a trajectory already stored changes nothing (producers repeat starts so that each call
        # stands alone): skip it rather than make the server lock the row.
        trajectories = [r for r in trajectories if r.status != "running" or r.id not in self._known_ids]
        self._write_trajectories(conn, trajectories, now)
        if self.dialect == "postgresql":
            blocks = [block for _, block in batch.encoded]
            blocks += encode(by_type[StepRecord] + by_type[LlmCallRecord], now)  # records sent as objects
            encoded: dict[str, list[bytes]] = {}
            for block in blocks:
                encoded.setdefault(block.table, []).append(block.data)
            copy_bulk(conn, encoded, resent)
            judgments = [judgment_row(r, now) for r in by_type[JudgmentRecord]]
            if judgments:
                conn.execute(postgresql.insert(RewardJudgment.__table__).on_conflict_do_nothing(), judgments)
        else:
            for table, rows in (
                (Step.__table__, [step_values(r, now) for r in by_type[StepRecord]]),
                (LlmCall.__table__, [call_values(r, now) for r in by_type[LlmCallRecord]]),
            ):
                if rows:
                    self._insert_or_ignore(conn, table, rows)
            judgments = [judgment_row(r, now) for r in by_type[JudgmentRecord]]
            if judgments:
                conn.execute(sqlite.insert(RewardJudgment.__table__).on_conflict_do_nothing(), judgments)
        return len(batch.records) + sum(len(block) for _, block in batch.encoded)

    def _insert_or_ignore(self, conn: Connection, table: sa.Table, rows: list[list[Any]]) -> None:
        """SQLite bulk rows (values in the table's `write_order`, recorder/columns.py) through the driver's
        executemany, each value converted by its column type's own SQLAlchemy bind processor (what an ORM
        insert would store), without SQLAlchemy's per-row work."""
        columns = WRITTEN[table.name].write_order
        dialect = self.engine.dialect
        processors = [
            (position, processor)
            for position, name in enumerate(columns)
            if (processor := table.c[name].type.dialect_impl(dialect).bind_processor(dialect)) is not None
        ]
        for row in rows:  # the row functions' lists are fresh: converted in place
            for position, processor in processors:
                row[position] = processor(row[position])
        names = ", ".join(f'"{name}"' for name in columns)
        marks = ", ".join("?" for _ in columns)
        cursor = conn.connection.driver_connection.cursor()
        try:
            cursor.executemany(f'INSERT OR IGNORE INTO "{table.name}" ({names}) VALUES ({marks})', rows)
        finally:
            cursor.close()

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
        rows = [trajectory_row(r, now) for r in records]
        # A start on an existing id changes nothing; an end fills in the outcome. Neither touches the batch
        # a trajectory belongs to.
        if self.dialect == "postgresql":
            upsert_trajectories(conn, rows)
            return
        conn.execute(_sqlite_trajectory_upsert(), rows)
