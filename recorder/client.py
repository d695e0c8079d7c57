"""The producer side: rollout actors hand records to a RecorderClient, which ships them to the recorder.

Records stay in the client until the recorder acknowledges them (committed or rejected as malformed).
Calls are kept under `max_call_bytes` and sent in order, one at a time, so a trajectory's start always
lands before its steps. Failures (recorder restarting, database down, buffer full, timeout) are retried
with backoff until `retry_deadline_s`; after that `flush` raises RecorderUnreachable and the records are
still in `client.unacked` for the next flush. Retrying is safe: the recorder's writes are idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from recorder.actor import RecorderBusy, RecorderUnavailable
from recorder.config import RecorderConfig
from recorder.records import Record, record_size
from recorder.store import WriteResult

log = logging.getLogger(__name__)

RETRYABLE = (RayActorError, GetTimeoutError, RecorderUnavailable, RecorderBusy, TimeoutError)


class RecorderUnreachable(RuntimeError):
    """Records could not be acknowledged before the deadline; they are still held by the client."""


@dataclass
class FlushReport:
    acknowledged: int = 0
    """Records the recorder committed during this flush."""
    rejected: list[tuple[tuple[Any, ...], str]] = field(default_factory=list)
    """(record key, reason) for malformed records the recorder refused; they are dropped from the client."""
    retries: int = 0


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, RayTaskError):  # an exception raised inside the actor, wrapped by Ray
        return isinstance(exc.cause, RETRYABLE)
    return isinstance(exc, RETRYABLE)


class RecorderClient:
    """Batches records for the named recorder actor. Not thread-safe: one client per producer."""

    def __init__(self, settings: RecorderConfig = RecorderConfig(), actor: Any = None) -> None:
        self.settings = settings
        self._actor = actor
        self.unacked: list[Record] = []

    def add(self, *records: Record) -> None:
        self.unacked.extend(records)

    def extend(self, records: Iterable[Record]) -> None:
        self.unacked.extend(records)

    def _handle(self) -> Any:
        if self._actor is None:
            try:
                self._actor = ray.get_actor(self.settings.actor_name)
            except ValueError as exc:
                raise RayActorError() from exc  # not registered (yet): retried like a restarting actor
        return self._actor

    def _next_call(self) -> list[Record]:
        """The longest prefix of unacked records that fits in one call."""
        size, count = 0, 0
        for record in self.unacked:
            size += record_size(record)
            if count and size > self.settings.max_call_bytes:
                break
            count += 1
        return self.unacked[:count]

    def _acknowledge(self, sent: list[Record], result: WriteResult, report: FlushReport) -> None:
        del self.unacked[: len(sent)]
        report.acknowledged += result.written
        for position, reason in result.rejected:
            report.rejected.append((sent[position].key, reason))
            log.warning("recorder rejected %s: %s", sent[position].key, reason)

    def _give_up(self, started: float, error: BaseException) -> RecorderUnreachable:
        return RecorderUnreachable(
            f"{len(self.unacked)} records not acknowledged after {time.monotonic() - started:.0f} s "
            f"(last error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "They are kept in client.unacked; call flush() again once the recorder or database is back."
        )

    def flush(self, deadline_s: float | None = None) -> FlushReport:
        """Send everything; return once all of it is acknowledged (or raise RecorderUnreachable)."""
        report, started = FlushReport(), time.monotonic()
        deadline = started + (deadline_s if deadline_s is not None else self.settings.retry_deadline_s)
        backoff = 0.1
        while self.unacked:
            sent = self._next_call()
            try:
                timeout = max(0.1, min(self.settings.call_timeout_s, deadline - time.monotonic()))
                result = ray.get(self._handle().write.remote(sent), timeout=timeout)
            except Exception as exc:
                if not _is_retryable(exc):
                    raise
                if time.monotonic() + backoff > deadline:
                    raise self._give_up(started, exc) from exc
                report.retries += 1
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1
            self._acknowledge(sent, result, report)
        return report

    async def flush_async(self, deadline_s: float | None = None) -> FlushReport:
        """`flush` for async actors: awaits the recorder instead of blocking the event loop."""
        report, started = FlushReport(), time.monotonic()
        deadline = started + (deadline_s if deadline_s is not None else self.settings.retry_deadline_s)
        backoff = 0.1
        while self.unacked:
            sent = self._next_call()
            try:
                timeout = max(0.1, min(self.settings.call_timeout_s, deadline - time.monotonic()))
                result = await asyncio.wait_for(self._handle().write.remote(sent), timeout)
            except Exception as exc:
                if not _is_retryable(exc):
                    raise
                if time.monotonic() + backoff > deadline:
                    raise self._give_up(started, exc) from exc
                report.retries += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1
            self._acknowledge(sent, result, report)
        return report
