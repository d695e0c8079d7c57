"""The recorder as a Ray actor: producers' batches are group-committed, and acknowledged only once stored.

Calls that arrive while a write is in flight are merged into the next transaction, so many small calls
cost one commit. On PostgreSQL several writer connections ("lanes") commit side by side, so the server
ingests one batch while the recorder prepares the next; each producer keeps to one lane, in order.
The buffer is bounded; a full buffer makes callers wait, then fail with RecorderBusy. Every call has a
deadline (`recorder.write_timeout_s`, then RecorderTimeout), and so has every statement on PostgreSQL
(`database.statement_timeout_s`). Rows the database refuses are rejected one by one (recorder/isolate.py);
an outage fails exactly the calls whose records were in that transaction (RecorderUnavailable): nothing
they sent was stored, and the producer, which still holds them, retries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from recorder.config import DatabaseConfig, RecorderConfig
from recorder.errors import is_connectivity
from recorder.migrate import check_schema
from recorder.records import Record
from recorder.store import TrajectoryStore, WriteResult, create_db_engine
from recorder.wire import EncodedRows

log = logging.getLogger(__name__)


def _width(items: list[Record | EncodedRows]) -> int:
    """Positions a payload spans: one per record, one per row of an encoded block."""
    return sum(len(item) if isinstance(item, EncodedRows) else 1 for item in items)


class RecorderUnavailable(RuntimeError):
    """The database write failed; nothing from the call was stored. Retry later."""


class RecorderTimeout(RecorderUnavailable):
    """A call was not committed within `recorder.write_timeout_s`. Retry: it may still commit, and then the
    resend is a no-op (writes are idempotent)."""


class RecorderRejected(ValueError):
    """The database refused a write for a reason no single record explains (a missing table, no permission,
    a read-only server): retrying will not help until that is fixed. Bad rows are rejected one by one."""


class RecorderBusy(RuntimeError):
    """The recorder's buffer stayed full for `buffer_wait_s`; nothing from the call was stored. Retry later."""


class RecorderMetrics:
    """Custom metrics on Ray's metrics endpoint and dashboard (exported with a `ray_` prefix); the gateway's ledger,
    which writes its own records, reports under its name too."""

    def __init__(self, actor_name: str) -> None:
        from ray.util.metrics import Counter, Gauge

        keys = ("recorder",)
        self.tags = {"recorder": actor_name}
        self.written = Counter("ziggurat_recorder_rows_written", "Rows committed by the recorder", tag_keys=keys)
        self.rejected = Counter("ziggurat_recorder_rows_rejected", "Malformed rows refused", tag_keys=keys)
        self.db_errors = Counter("ziggurat_recorder_db_errors", "Failed database transactions", tag_keys=keys)
        self.busy = Counter("ziggurat_recorder_busy", "Calls refused because the buffer was full", tag_keys=keys)
        self.pending = Gauge("ziggurat_recorder_pending_rows", "Rows waiting for the database", tag_keys=keys)

    def wrote(self, result: WriteResult, pending: int) -> None:
        """One committed transaction, with the rows still waiting after it."""
        if result.written:  # Ray's counters refuse a zero increment
            self.written.inc(result.written, tags=self.tags)
        if result.rejected:
            self.rejected.inc(len(result.rejected), tags=self.tags)
        self.pending.set(pending, tags=self.tags)

    def failed(self, pending: int) -> None:
        """One failed transaction, with the rows still waiting."""
        self.db_errors.inc(1, tags=self.tags)
        self.pending.set(pending, tags=self.tags)


_Call = tuple[list[Record | EncodedRows], asyncio.Future[WriteResult]]


@dataclass(eq=False)
class _Lane:
    """One writer connection with its own queue: calls queued while a transaction runs are merged into the next."""

    store: TrajectoryStore
    pending: list[_Call] = field(default_factory=list)
    writer: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    sources: int = 0
    """Producers assigned to this lane."""

    def __post_init__(self) -> None:
        self.idle.set()  # nothing queued yet


class Recorder:
    """Create with `start_recorder`; producers use `recorder.client.RecorderClient`."""

    def __init__(self, database: DatabaseConfig, settings: RecorderConfig) -> None:
        self._settings = settings

        def open_store() -> TrajectoryStore:
            return TrajectoryStore(
                database.resolved_url(), database.connect_timeout_s, database.pool_size, database.statement_timeout_s
            )

        first = open_store()  # refuses to start (saying to run `ziggurat db upgrade`) on a stale schema
        lanes = settings.writer_connections if first.dialect == "postgresql" else 1  # SQLite takes one write at a time
        stores = [first] + [open_store() for _ in range(lanes - 1)]
        self._lanes = [_Lane(store) for store in stores]
        self._lane_of_source: dict[str, _Lane] = {}
        self._pending_records = 0
        self._space = asyncio.Event()
        # write_s: seconds inside database transactions; close to the busy time, the database write is the bottleneck
        self._stats: dict[str, float] = {
            "calls": 0, "written": 0, "rejected": 0, "transactions": 0, "db_errors": 0, "busy": 0, "timeouts": 0,
            "write_s": 0.0,
        }  # fmt: skip
        self._metrics = RecorderMetrics(settings.actor_name)
        self._started = time.time()

    def _lane(self, source: str | None) -> _Lane:
        """A producer's calls always go through the same lane, so they are committed in the order they came
        (a step never overtakes its trajectory's start). New producers join the lane with the fewest."""
        if source is None:
            return self._lanes[0]
        lane = self._lane_of_source.get(source)
        if lane is None:
            lane = min(self._lanes, key=lambda candidate: candidate.sources)
            lane.sources += 1
            self._lane_of_source[source] = lane
        return lane

    async def write(self, records: list[Record | EncodedRows], source: str | None = None) -> WriteResult:
        """Store `records`; returns once they are committed, with the positions of rejected ones, or raises
        RecorderTimeout (retryable) at `recorder.write_timeout_s`.

        `source` names the producer (RecorderClient sends one per client): its calls share one writer
        connection and are committed in order. Calls without one go through the first connection.
        """
        arrived = time.monotonic()
        timeout_s = min(self._settings.write_timeout_s, self._settings.call_timeout_s)  # the producer waits no longer
        lane = self._lane(source)
        if lane.writer is None or lane.writer.done():
            lane.writer = asyncio.get_running_loop().create_task(self._write_loop(lane))
        self._stats["calls"] += 1
        size = _width(records)
        if size > self._settings.max_buffer_records:
            raise ValueError(f"one call sent {size} records; send at most {self._settings.max_buffer_records}")
        deadline = arrived + min(self._settings.buffer_wait_s, timeout_s)
        while self._pending_records + size > self._settings.max_buffer_records:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._stats["busy"] += 1
                self._metrics.busy.inc(1, tags=self._metrics.tags)
                raise RecorderBusy(
                    f"the recorder buffer is full ({self._pending_records} records waiting for the database); "
                    "nothing from this call was stored; retry later"
                )
            self._space.clear()
            try:
                await asyncio.wait_for(self._space.wait(), remaining)
            except TimeoutError:
                pass
        future: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        lane.pending.append((records, future))
        self._pending_records += size
        lane.idle.clear()
        lane.wake.set()
        try:
            # The writer resolves the future whenever the database answers; a caller stops waiting at its deadline.
            return await asyncio.wait_for(future, max(0.0, arrived + timeout_s - time.monotonic()))
        except TimeoutError:
            self._stats["timeouts"] += 1
            raise RecorderTimeout(
                f"the call was not committed within {timeout_s:g} s (recorder.write_timeout_s): the database is "
                f"slow or blocked ({self._pending_records} records waiting). Its records may still be committed; "
                "keep them and retry (the resend is a no-op if they were)"
            ) from None

    async def _write_loop(self, lane: _Lane) -> None:
        while True:
            await lane.wake.wait()
            lane.wake.clear()
            while lane.pending:
                batch, lane.pending = lane.pending, []
                size = sum(_width(call_records) for call_records, _ in batch)
                try:
                    await self._write(lane.store, batch, size)
                finally:
                    self._pending_records -= size
                    self._space.set()
            lane.idle.set()

    async def _write(self, store: TrajectoryStore, batch: list[_Call], size: int) -> None:
        records = [record for call_records, _ in batch for record in call_records]
        started = time.perf_counter()
        try:
            result = await asyncio.to_thread(store.write, records)
        except Exception as exc:
            self._stats["write_s"] += time.perf_counter() - started
            self._stats["db_errors"] += 1
            self._metrics.db_errors.inc(1, tags=self._metrics.tags)
            if is_connectivity(exc) or len(batch) == 1:
                self._fail(batch, exc, size)
                return
            # Not an outage, and not rows the store could isolate (it rejects those itself): write the calls
            # one by one, so a call that cannot be written fails alone, not the calls merged with it.
            for call in batch:
                await self._write(store, [call], _width(call[0]))
            return
        self._stats["write_s"] += time.perf_counter() - started
        self._stats["transactions"] += 1
        self._stats["written"] += result.written
        self._stats["rejected"] += len(result.rejected)
        self._metrics.wrote(result, self._pending_records - size)
        self._resolve(batch, result)

    @staticmethod
    def _fail(batch: list[_Call], exc: Exception, size: int) -> None:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        log.warning("database write of %d records failed: %s: %s", size, type(exc).__name__, reason)
        if is_connectivity(exc):
            error: Exception = RecorderUnavailable(
                f"the database write failed ({type(exc).__name__}: {reason}); nothing from this call was "
                "stored; keep the records and retry"
            )
        else:
            error = RecorderRejected(
                f"the database refused this call's write ({type(exc).__name__}: {reason}); nothing from it was "
                "stored. This is not one record's data (those are rejected one by one): check the database's "
                "schema (`ziggurat db status`), permissions and that it accepts writes, then retry"
            )
        for _, future in batch:
            if not future.done():
                future.set_exception(error)

    @staticmethod
    def _resolve(batch: list[_Call], result: WriteResult) -> None:
        """Hand each caller the part of the merged result that concerns its own records."""
        rejected = dict(result.rejected)
        offset = 0
        for call_records, future in batch:
            width = _width(call_records)
            mine = [(p - offset, rejected[p]) for p in range(offset, offset + width) if p in rejected]
            offset += width
            if not future.done():
                future.set_result(WriteResult(written=width - len(mine), rejected=mine))

    async def wire_format(self) -> str:
        """`pg-binary`: send steps and LLM calls as `recorder.wire.EncodedRows`; `records`: as objects."""
        return "pg-binary" if self._lanes[0].store.dialect == "postgresql" else "records"

    async def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until everything received so far is committed (or failed back to its producer)."""
        await asyncio.wait_for(asyncio.gather(*(lane.idle.wait() for lane in self._lanes)), timeout_s)

    async def stats(self) -> dict[str, Any]:
        return {
            **self._stats,
            "write_s": round(self._stats["write_s"], 3),
            "pending_records": self._pending_records,
            "uptime_s": round(time.time() - self._started, 1),
            "dialect": self._lanes[0].store.dialect,
            "writer_connections": len(self._lanes),
        }

    async def close(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Flush, stop the writer and close the database connections; returns the final stats."""
        await self.flush(timeout_s)
        for lane in self._lanes:
            if lane.writer is not None:
                lane.writer.cancel()
            lane.store.dispose()
        return await self.stats()


def stop_recorder(actor: Any, timeout_s: float = 60.0) -> dict[str, Any]:
    """Flush the recorder, close it, and end the actor for good (no restart). Returns its final stats."""
    try:
        return ray.get(actor.close.remote(timeout_s), timeout=timeout_s + 10)
    finally:
        ray.kill(actor, no_restart=True)


def start_recorder(database: DatabaseConfig, settings: RecorderConfig = RecorderConfig()) -> Any:
    """Get or create the named recorder actor; restarts after a crash, its callers retry.

    Raises SchemaOutOfDate here, in the caller, rather than letting the actor restart in a loop.
    """
    engine = create_db_engine(
        database.resolved_url(), database.connect_timeout_s, statement_timeout_s=database.statement_timeout_s
    )
    try:
        check_schema(engine)
    finally:
        engine.dispose()
    options: dict[str, Any] = {
        "name": settings.actor_name,
        "get_if_exists": True,
        "max_restarts": -1,
        "max_task_retries": 0,  # the producer decides when to retry; writes are idempotent
        "max_concurrency": 1000,
        "num_cpus": 0,
    }
    if settings.detached:
        options["lifetime"] = "detached"
    actor = ray.remote(Recorder).options(**options).remote(database, settings)
    ray.get(actor.stats.remote(), timeout=settings.call_timeout_s)  # surfaces a failed start (e.g. stale schema)
    return actor
