"""The producer side: rollout actors hand records to a RecorderClient, which ships them to the recorder.

Records stay in the client until the recorder acknowledges them (committed, or rejected as malformed).
Each record is validated here before it is sent (recorder/records.py): one the database could not store
is reported by name in the flush report and dropped, and never holds back the records after it.
Each call is kept under `max_call_bytes` and made self-contained: the start record of every trajectory it
mentions travels with it (re-inserting a start is a no-op), so several calls can be in flight at once and
land in any order. Failures (recorder restarting, database down, buffer full, timeout) are retried with
backoff until `retry_deadline_s`; after that `flush` raises RecorderUnreachable and the records are still
in `client.unacked` for the next flush. Retrying is safe: the recorder's writes are idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from recorder.actor import RecorderBusy, RecorderUnavailable
from recorder.config import RecorderConfig
from recorder.records import (
    LlmCallRecord,
    Record,
    StepRecord,
    TrajectoryRecord,
    leading_batch,
    record_key,
    validate,
    validate_many,
)
from recorder.schema import utcnow
from recorder.store import WriteResult
from recorder.wire import EncodedRows, encode, encoded_keys

log = logging.getLogger(__name__)

RETRYABLE = (RayActorError, GetTimeoutError, RecorderUnavailable, RecorderBusy, TimeoutError)
_STARTS_CAPACITY = 10_000


class RecorderUnreachable(RuntimeError):
    """Records could not be acknowledged before the deadline; they are still held by the client."""


@dataclass
class FlushReport:
    acknowledged: int = 0
    """Records the recorder committed during this flush (repeated start records not counted)."""
    rejected: list[tuple[tuple[Any, ...], str]] = field(default_factory=list)
    """(record key, reason) for each record refused, here (validation) or by the recorder or the database;
    each is reported once and dropped from the client. The rest of the batch is stored."""
    retries: int = 0


def _encode(
    bulk: list[StepRecord | LlmCallRecord], rejected: list[tuple[tuple[Any, ...], str]]
) -> tuple[list[EncodedRows], list[StepRecord | LlmCallRecord]]:
    """COPY rows for validated steps and calls. Validation should leave nothing that fails to encode; if
    something does, encode one by one and reject only the records that fail, by name."""
    now = utcnow()
    try:
        return encode(bulk, now), bulk
    except Exception:
        kept = []
        for record in bulk:
            try:
                encode([record], now)
            except Exception as exc:
                rejected.append((record.key, f"cannot be encoded for the database ({type(exc).__name__}: {exc})"))
            else:
                kept.append(record)
        return encode(kept, now), kept


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, RayTaskError):  # an exception raised inside the actor, wrapped by Ray
        return isinstance(exc.cause, RETRYABLE)
    return isinstance(exc, RETRYABLE)


@dataclass
class _Call:
    records: list[Record]
    """The client's own records in this call, in order."""
    payload: list[Record | EncodedRows]
    """What is sent: start records of the trajectories the call refers to, then the records (steps and LLM
    calls already encoded as COPY rows when the recorder writes to PostgreSQL)."""
    keys: list[tuple[Any, ...]]
    """The key of each payload position (an EncodedRows block spans one position per row)."""
    repeated_starts: int
    """Leading payload positions that repeat start records (not counted as acknowledged)."""
    rejected_here: list[tuple[tuple[Any, ...], str]] = field(default_factory=list)
    """Records that failed validation in the client and were not sent."""


class RecorderClient:
    """Batches records for the named recorder actor. Not thread-safe: one client per producer."""

    def __init__(self, settings: RecorderConfig = RecorderConfig(), actor: Any = None, max_in_flight: int = 8) -> None:
        self.settings = settings
        self.max_in_flight = max_in_flight
        self._actor = actor
        self.unacked: list[Record] = []
        self._starts: OrderedDict[str, TrajectoryRecord] = OrderedDict()
        self._wire: str | None = None
        self._source = uuid.uuid4().hex  # the recorder commits one source's calls in order
        self._refused: dict[int, str] = {}
        """Records (by id) found unshippable although valid; they are rejected when next cut, then forgotten."""

    def add(self, *records: Record) -> None:
        self.extend(records)

    def extend(self, records: Iterable[Record]) -> None:
        for record in records:
            # Only a start that can be stored is repeated in later calls; a bad one is reported once, by flush.
            if isinstance(record, TrajectoryRecord) and record.status == "running" and validate(record) is None:
                self._starts[record.id] = record
                if len(self._starts) > _STARTS_CAPACITY:
                    self._starts.popitem(last=False)
            self.unacked.append(record)

    def _handle(self) -> Any:
        if self._actor is None:
            try:
                self._actor = ray.get_actor(self.settings.actor_name)
            except ValueError as exc:
                raise RayActorError() from exc  # not registered (yet): retried like a restarting actor
        return self._actor

    def _cut(self, position: int) -> _Call:
        """The next call: records from `position` on, under max_call_bytes, with the starts they need.

        Records that fail validation (or were found unshippable) are left out and reported by name, so one
        bad record never blocks the ones after it.
        """
        # Half the recorder's buffer at most: with a start for each, a call still fits (a larger one is refused).
        most = max(1, self.settings.max_buffer_records // 2)
        pending = self.unacked[position:]
        records = pending[: leading_batch(pending, self.settings.max_call_bytes, most)]
        rejected, good = [], []
        for record, problem in zip(records, validate_many(records), strict=True):
            problem = problem or self._refused.get(id(record))
            if problem:
                rejected.append((record_key(record), problem))
            else:
                good.append(record)
        own = {r.id for r in good if isinstance(r, TrajectoryRecord)}
        needed = {r.trajectory_id for r in good if not isinstance(r, TrajectoryRecord)} - own
        starts: list[Record] = [self._starts[t] for t in sorted(needed) if t in self._starts]
        if self._wire != "pg-binary":
            payload = starts + good
            return _Call(records, payload, [r.key for r in payload], len(starts), rejected)
        # PostgreSQL: steps and calls travel as ready COPY rows (the recorder's hot path).
        plain, bulk = list(starts), []
        for record in good:
            (bulk if isinstance(record, StepRecord | LlmCallRecord) else plain).append(record)
        blocks, bulk = _encode(bulk, rejected)
        keys = [r.key for r in plain] + encoded_keys(bulk)
        return _Call(records, plain + blocks, keys, len(starts), rejected)

    def _count(self, call: _Call, result: WriteResult, report: FlushReport) -> None:
        report.acknowledged += result.written - call.repeated_starts
        for key, reason in call.rejected_here:
            report.rejected.append((key, reason))
            log.warning("rejected %s before sending: %s", key, reason)
        for position, reason in result.rejected:
            key = call.keys[position]
            if key[:1] == ("trajectory",) and key[-1] == "running":
                self._starts.pop(key[1], None)  # the database refuses this start: stop repeating it
            if position < call.repeated_starts:
                report.acknowledged += 1  # not counted in `written` and already reported when first sent
                continue
            report.rejected.append((key, reason))
            log.warning("recorder rejected %s: %s", key, reason)

    def _find_unshippable(self, call: _Call, error: BaseException) -> bool:
        """After Ray could not serialize a call: mark the records that cannot be pickled. True if any were."""
        found = False
        for record in call.records:
            try:
                ray.cloudpickle.dumps(record)
            except Exception as exc:
                self._refused[id(record)] = f"cannot be sent to the recorder ({type(exc).__name__}: {exc})"
                found = True
        if not found:
            log.warning("sending a call failed, and no single record is to blame: %s", error)
        return found

    def _discover_wire(self) -> None:
        """Ask the recorder once which payload it wants (COPY rows for PostgreSQL, records for SQLite)."""
        if self._wire is None:
            self._wire = ray.get(self._handle().wire_format.remote(), timeout=self.settings.call_timeout_s)

    def _give_up(self, started: float, error: BaseException) -> RecorderUnreachable:
        return RecorderUnreachable(
            f"{len(self.unacked)} records not acknowledged after {time.monotonic() - started:.0f} s "
            f"(last error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "They are kept in client.unacked; call flush() again once the recorder or database is back."
        )

    async def _discover_wire_async(self) -> None:
        """`_discover_wire` without blocking an async actor's event loop; a failure is left to `_fill`, which
        asks again and handles the error like any other send."""
        if self._wire is None:
            try:
                self._wire = await asyncio.wait_for(self._handle().wire_format.remote(), self.settings.call_timeout_s)
            except Exception as exc:
                log.debug("asking the recorder for its wire format failed: %s", exc)

    def _timeout(self, deadline: float) -> float:
        return max(0.1, min(self.settings.call_timeout_s, deadline - time.monotonic()))

    def flush(self, deadline_s: float | None = None) -> FlushReport:
        """Send everything; return once all of it is acknowledged (or raise RecorderUnreachable)."""
        return _Flush(self, deadline_s).run_sync()

    async def flush_async(self, deadline_s: float | None = None) -> FlushReport:
        """`flush` for async actors: awaits the recorder instead of blocking the event loop."""
        return await _Flush(self, deadline_s).run_async()


class _Flush:
    """One flush: a sliding window of calls in flight, answers taken oldest first.

    While all goes well the oldest call's records are the front of `unacked` and are dropped as it is
    acknowledged. After a failure nothing new is sent; the calls still in flight are drained (their
    successes noted), the rest stays in `unacked`, and the whole remainder is retried after a backoff.
    """

    def __init__(self, client: RecorderClient, deadline_s: float | None) -> None:
        self.client = client
        self.report = FlushReport()
        self.started = time.monotonic()
        self.deadline = self.started + (deadline_s if deadline_s is not None else client.settings.retry_deadline_s)
        self.in_flight: deque[tuple[_Call, Any]] = deque()
        self.next_position = 0
        self.error: BaseException | None = None
        self.acked_after_error: set[int] = set()
        self.backoff = 0.1

    def _fill(self) -> None:
        client = self.client
        while (
            self.error is None
            and len(self.in_flight) < client.max_in_flight
            and self.next_position < len(client.unacked)
        ):
            try:
                client._discover_wire()
                call = client._cut(self.next_position)
                try:
                    ref = client._handle().write.remote(call.payload, client._source) if call.payload else None
                except (RayActorError, GetTimeoutError):
                    raise
                except Exception as exc:  # Ray could not serialize the call: leave out the records to blame
                    if not client._find_unshippable(call, exc):
                        raise
                    continue
            except (RayActorError, GetTimeoutError) as exc:
                self.error = exc
                return
            self.next_position += len(call.records)
            self.in_flight.append((call, ref))

    def timeout(self) -> float:
        return max(0.1, min(self.client.settings.call_timeout_s, self.deadline - time.monotonic()))

    def _settle(self, call: _Call, outcome: Any) -> None:
        client = self.client
        if isinstance(outcome, BaseException):
            if not _is_retryable(outcome):
                raise outcome
            self.error = self.error or outcome
            return
        client._count(call, outcome, self.report)
        if client._refused:
            for record in call.records:
                client._refused.pop(id(record), None)
        if self.error is None:  # the oldest call: its records are the front of unacked
            del client.unacked[: len(call.records)]
            self.next_position -= len(call.records)
        else:
            self.acked_after_error.update(id(record) for record in call.records)

    def _after_drain(self) -> float | None:
        """Once nothing is in flight after a failure: the backoff to sleep before retrying (or raise)."""
        client, error = self.client, self.error
        assert error is not None
        client.unacked = [r for r in client.unacked if id(r) not in self.acked_after_error]
        self.acked_after_error.clear()
        self.error, self.next_position = None, 0
        if time.monotonic() + self.backoff > self.deadline:
            raise client._give_up(self.started, error) from error
        self.report.retries += 1
        delay, self.backoff = self.backoff, min(self.backoff * 2, 2.0)
        return delay

    def run_sync(self) -> FlushReport:
        while True:
            self._fill()
            if not self.in_flight:
                if self.error is None:
                    return self.report
                time.sleep(self._after_drain())
                continue
            call, ref = self.in_flight.popleft()
            try:
                outcome = WriteResult() if ref is None else ray.get(ref, timeout=self.timeout())
            except Exception as exc:
                outcome = exc
            self._settle(call, outcome)
            if self.error is None:
                self.backoff = 0.1

    async def run_async(self) -> FlushReport:
        await self.client._discover_wire_async()
        while True:
            self._fill()
            if not self.in_flight:
                if self.error is None:
                    return self.report
                await asyncio.sleep(self._after_drain())
                continue
            call, ref = self.in_flight.popleft()
            try:
                outcome = WriteResult() if ref is None else await asyncio.wait_for(ref, self.timeout())
            except Exception as exc:
                outcome = exc
            self._settle(call, outcome)
            if self.error is None:
                self.backoff = 0.1
