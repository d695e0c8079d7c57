"""The ledger's records until the database has them, written by the ledger itself.

The ledger stores through the recorder's `TrajectoryStore` (the same validation, idempotent keys, and rows the
database refuses found and rejected one by one), in its own process rather than through the recorder actor: a
call answered only once stored (`gateway.store_before_reply`) waits for one database transaction, not for
another actor's round trip as well (the ledger's answer to an idle call: 9.3 ms through the recorder, 5.9 ms
written itself, on the 2-core test machine).

Writes run one at a time, in the order records were added, on one worker thread: a trajectory's start is
committed before its steps, and the ledger's event loop keeps answering while the database works. A write that
fails for want of the database (down, restarting, locked) is retried with backoff until the flush's deadline;
past it everything not written stays held for the next flush. A record the database can never take is rejected
by name (logged here) and dropped, never holding back the ones after it. A write still running at its deadline
goes on in the thread, and the next one queues behind it: writes are idempotent, so writing its records again
stores nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from recorder.actor import RecorderMetrics
from recorder.config import DatabaseConfig
from recorder.errors import is_connectivity
from recorder.records import Record, leading_batch, record_key
from recorder.store import TrajectoryStore, WriteResult

log = logging.getLogger(__name__)

MAX_RECORDS_PER_WRITE = 5000
"""A backlog (after an outage) goes in transactions of at most this many records..."""
MAX_BYTES_PER_WRITE = 4_000_000
"""... and about this many bytes (a record larger than this goes alone), so each commits well within the
database's statement timeout."""


@dataclass
class StoreReport:
    written: int = 0
    """Records committed (a repeated start counts as written)."""
    rejected: int = 0
    """Records the store refused (each logged with its reason, then dropped)."""
    writes: int = 0
    """Transactions it took."""
    retries: int = 0
    """Writes tried again after the database did not answer."""


class LedgerStore:
    """Holds records (`add`) until `flush` has written them. Used from one event loop."""

    def __init__(self, url: str, database: DatabaseConfig, name: str) -> None:
        """`url`: the database to write to, resolved where the settings were read (it may carry a password from
        that environment); `database`: its timeouts; `name`: the `recorder` tag of its metrics (the recorder's:
        rows written and rejected, failed transactions, rows waiting)."""
        self._url = url
        self._database = database
        self.held: list[Record] = []
        self._store: TrajectoryStore | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="ledger-store")
        self._writing = asyncio.Lock()
        self._metrics = RecorderMetrics(name)

    def add(self, *records: Record) -> None:
        self.held.extend(records)

    async def flush(self, deadline_s: float) -> StoreReport:
        """Write everything held, including what is added meanwhile, retrying while the database does not answer;
        raises past `deadline_s` or on an error that is not the database's absence (its schema stale, say), with
        every record not yet written still held."""
        report = StoreReport()
        deadline = time.monotonic() + deadline_s
        backoff = 0.05
        async with self._writing:
            loop = asyncio.get_running_loop()
            while self.held:
                batch = self.held[: leading_batch(self.held, MAX_BYTES_PER_WRITE, MAX_RECORDS_PER_WRITE)]
                write = loop.run_in_executor(self._thread, self._write, batch)
                try:  # shielded: at the deadline the write goes on in its thread, and this flush gives up
                    result: WriteResult = await asyncio.wait_for(
                        asyncio.shield(write), max(0.0, deadline - time.monotonic())
                    )
                except Exception as exc:
                    self._metrics.failed(len(self.held))
                    if not is_connectivity(exc) or time.monotonic() + backoff > deadline:
                        raise
                    report.retries += 1
                    await asyncio.sleep(backoff)
                    backoff = min(2 * backoff, 1.0)
                    continue
                del self.held[: len(batch)]  # only a flush removes, and records are added at the end
                report.writes += 1
                report.written += result.written
                report.rejected += len(result.rejected)
                self._metrics.wrote(result, len(self.held))
                for position, reason in result.rejected:
                    log.error(
                        "the database refused gateway record %s: %s", record_key(batch[position])[:3], reason[:300]
                    )
        return report

    def _write(self, batch: list[Record]) -> WriteResult:
        if self._store is None:  # opened on first use: the database may be down when the ledger starts
            self._store = TrajectoryStore(
                self._url, self._database.connect_timeout_s, 1, self._database.statement_timeout_s
            )
        return self._store.write(batch)

    def close(self) -> None:
        """Close the database connection once a write in progress ends (on the writer's thread)."""
        if self._store is not None:
            self._thread.submit(self._store.dispose)
        self._thread.shutdown(wait=False)
