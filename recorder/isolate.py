"""Finding the rows the database refuses, once a batch write has failed on its data.

Validation (recorder/records.py) refuses what it can before the database; this finds the rest: a constraint
the database has and the recorder does not know of, a COPY row a producer built by hand, a value past a
server limit. The failed batch is written again in one transaction, in halves, each in a savepoint; a half
that fails is split again until each failing row stands alone and is rejected by position with the
database's reason. k bad rows among n cost about 2·k·log2(n) savepoints, paid only after a batch failed.
An outage on the way is raised, never turned into rejections: the whole write is then retried.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.engine import Connection

from recorder.errors import is_data_error, refusal
from recorder.records import Record, TrajectoryRecord
from recorder.wire import EncodedRows

if TYPE_CHECKING:
    from recorder.store import TrajectoryStore

log = logging.getLogger(__name__)


@dataclass
class WriteBatch:
    """One write, sorted out: valid records and encoded rows with their positions, and the rejected ones."""

    records: list[tuple[int, Record]] = field(default_factory=list)
    encoded: list[tuple[Sequence[int], EncodedRows]] = field(default_factory=list)
    """Blocks of COPY rows with the position of each row."""
    rejected: list[tuple[int, str]] = field(default_factory=list)

    def started_ids(self) -> set[str]:
        return {r.id for _, r in self.records if isinstance(r, TrajectoryRecord)}

    def drop_unknown(self, unknown: set[str]) -> None:
        def problem(trajectory_id: str) -> str:
            return f"trajectory_id {trajectory_id!r} is unknown: send its TrajectoryRecord first"

        kept: list[tuple[int, Record]] = []
        for position, record in self.records:
            if not isinstance(record, TrajectoryRecord) and record.trajectory_id in unknown:
                self.rejected.append((position, problem(record.trajectory_id)))
            else:
                kept.append((position, record))
        self.records = kept
        blocks: list[tuple[Sequence[int], EncodedRows]] = []
        for positions, block in self.encoded:
            if unknown.isdisjoint(block.trajectory_ids):
                blocks.append((positions, block))
                continue
            kept_positions, ids, rows = [], [], []
            for position, trajectory_id, row in zip(positions, block.trajectory_ids, block.rows(), strict=True):
                if trajectory_id in unknown:
                    self.rejected.append((position, problem(trajectory_id)))
                else:
                    kept_positions.append(position)
                    ids.append(trajectory_id)
                    rows.append(row)
            blocks.append((kept_positions, EncodedRows.of_rows(block.table, ids, rows)))
        self.encoded = blocks


@dataclass(slots=True)
class _Unit:
    """One record, or one COPY row of a block, at its position in the write."""

    position: int
    record: Record | None = None
    table: str = ""
    trajectory_id: str = ""
    row: bytes = b""


def _units(batch: WriteBatch) -> list[_Unit]:
    units = [_Unit(position, record) for position, record in batch.records]
    for positions, block in batch.encoded:
        rows = zip(positions, block.trajectory_ids, block.rows(), strict=True)
        units += [_Unit(position, None, block.table, trajectory_id, row) for position, trajectory_id, row in rows]
    # Trajectories first, as in one whole write: a call may carry a trajectory's end after its steps and no
    # start (the end creates the row), so the steps must not be written, or judged unknown, before it.
    units.sort(key=lambda unit: (not isinstance(unit.record, TrajectoryRecord), unit.position))
    return units


def _sub_batch(units: list[_Unit]) -> WriteBatch:
    batch = WriteBatch()
    tables: dict[str, tuple[list[int], list[str], list[bytes]]] = {}
    for unit in units:
        if unit.record is not None:
            batch.records.append((unit.position, unit.record))
            continue
        positions, ids, rows = tables.setdefault(unit.table, ([], [], []))
        positions.append(unit.position)
        ids.append(unit.trajectory_id)
        rows.append(unit.row)
    batch.encoded = [(p, EncodedRows.of_rows(table, ids, rows)) for table, (p, ids, rows) in tables.items()]
    return batch


def write_isolating(store: TrajectoryStore, conn: Connection, batch: WriteBatch) -> int:
    """Write `batch` in one transaction, rejecting into `batch.rejected` only the rows the database refuses.
    Returns the rows written. Rows already stored are skipped (the resend path), so this is idempotent."""
    pending: set[str] = set()  # trajectories written in this transaction, not yet committed
    written = 0
    units = _units(batch)
    middle = len(units) // 2
    todo = [units[middle:], units[:middle]] if middle else [units]  # the whole batch has failed already
    with conn.begin():
        if store.dialect == "sqlite":
            # pysqlite opens its transaction lazily, at the first INSERT; a SAVEPOINT before that would be
            # the outermost one and commit on release. Open the real transaction first.
            driver = conn.connection.driver_connection
            if not driver.in_transaction:  # type: ignore[union-attr]
                driver.execute("BEGIN")  # type: ignore[union-attr]
        while todo:
            chunk = todo.pop()
            sub = _sub_batch(chunk)
            try:
                with conn.begin_nested():
                    count = store.write_rows(conn, sub, resent=True, pending=pending)
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                if len(chunk) == 1:
                    reason = (
                        f"the database refused it ({refusal(exc)}); the rest of the batch was stored. Fix or drop "
                        "the offending field before recording it again"
                    )
                    batch.rejected.append((chunk[0].position, reason))
                    log.warning("row %d of a batch: %s", chunk[0].position, reason)
                else:
                    middle = len(chunk) // 2
                    todo += [chunk[middle:], chunk[:middle]]  # the first half is popped (written) first
                continue
            written += count
            batch.rejected += sub.rejected  # rows of unknown trajectories
            pending |= sub.started_ids()
    for trajectory_id in pending:
        store._remember(trajectory_id)
    return written
