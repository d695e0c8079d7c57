"""PostgreSQL binary COPY rows for the bulk tables, encoded wherever it is cheapest (usually the producer).

Producers talking to a PostgreSQL-backed recorder send steps and LLM calls as `EncodedRows`: one
binary COPY tuple per record, built from a record that already passed `validate`, laid end to end in one
bytes object (one object to pickle, not one per row). The recorder then streams them into the table
without touching each row again. The same encoder serves records that arrive as
objects. The column lists and field counts are the ORM's (recorder/columns.py); the tuples are packed by hand
for speed, in that order, and tests/test_columns.py decodes them column by column against the ORM.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from recorder.columns import CALLS, STEPS
from recorder.records import LlmCallRecord, StepRecord

COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_TRAILER = struct.pack(">h", -1)
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_NULL = struct.pack(">i", -1)

STEP_COLUMNS = STEPS.columns
CALL_COLUMNS = CALLS.columns
_STEP_FIELDS, _CALL_FIELDS = len(STEP_COLUMNS), len(CALL_COLUMNS)


@dataclass(slots=True)
class EncodedRows:
    """Rows of one bulk table as binary COPY tuples, back to back, with each row's trajectory id and size."""

    table: str
    trajectory_ids: list[str]
    """The trajectory each row belongs to (the recorder checks that it exists)."""
    data: bytes
    """The COPY tuples, concatenated (no header or trailer)."""
    sizes: list[int]
    """Length in bytes of each row in `data`."""

    def __len__(self) -> int:
        return len(self.sizes)

    def rows(self) -> list[bytes]:
        """Each row's tuple, split out of `data` (needed only when some rows are dropped)."""
        rows, start = [], 0
        for size in self.sizes:
            rows.append(self.data[start : start + size])
            start += size
        return rows

    @classmethod
    def of_rows(cls, table: str, trajectory_ids: list[str], rows: list[bytes]) -> EncodedRows:
        return cls(table, trajectory_ids, b"".join(rows), [len(row) for row in rows])


_INT4 = struct.Struct(">i").pack
_FLOAT8 = struct.Struct(">id").pack
_STEP_HEAD = struct.Struct(">hi").pack  # field count, then the trajectory id's length
_STEP_INDEX_AND_TEXT = struct.Struct(">iii").pack  # step index (4 bytes), then the observation's length
_CALL_INDEXES_AND_TEXT = struct.Struct(">iiiiiii").pack  # step, call, model version, then the purpose's length
_TOKEN_COUNTS = struct.Struct(">iiii").pack
_TRUE, _FALSE = b"\x00\x00\x00\x01\x01", b"\x00\x00\x00\x01\x00"
# One encoder (json.dumps(separators=...) builds one per call). NaN would be written as a bare `NaN` token that
# PostgreSQL refuses; validation rejects it first, and this keeps it from reaching the server regardless.
_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _text(value: str | None) -> bytes:
    if value is None:
        return _NULL
    data = value.encode()
    return _INT4(len(data)) + data


def _jsonb(value: Any) -> bytes:
    if value is None:
        return _NULL
    data = _json(value).encode()
    return _INT4(len(data) + 1) + b"\x01" + data  # jsonb binary format: version 1, then the JSON text


def _float8(value: float | None) -> bytes:
    return _NULL if value is None else _FLOAT8(8, value)


def timestamp_field(moment: datetime) -> bytes:
    delta = moment - _PG_EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return b"\x00\x00\x00\x08" + struct.pack(">q", micros)


def encode_step(r: StepRecord, created: bytes) -> bytes:
    """One `steps` tuple; `created` is `timestamp_field(now)`, shared by a batch."""
    trajectory_id = r.trajectory_id.encode()
    observation = r.observation.encode()
    return b"".join(
        (
            _STEP_HEAD(_STEP_FIELDS, len(trajectory_id)),
            trajectory_id,
            _STEP_INDEX_AND_TEXT(4, r.step_index, len(observation)),
            observation,
            _jsonb(r.action),
            _FLOAT8(8, float(r.env_reward)),
            _TRUE if r.done else _FALSE,
            _text(r.error),
            created,
        )
    )


def encode_call(r: LlmCallRecord, created: bytes) -> bytes:
    """One `llm_calls` tuple; `created` is `timestamp_field(now)`, shared by a batch."""
    trajectory_id = r.trajectory_id.encode()
    purpose = r.purpose.encode()
    text = r.text.encode()
    prompt, completion, logprobs = r.prompt_token_ids, r.completion_token_ids, r.completion_logprobs
    return b"".join(
        (
            _STEP_HEAD(_CALL_FIELDS, len(trajectory_id)),
            trajectory_id,
            _CALL_INDEXES_AND_TEXT(4, r.step_index, 4, r.call_index, 4, r.model_version, len(purpose)),
            purpose,
            _jsonb(r.messages),
            _INT4(len(prompt)),
            prompt,
            _INT4(len(completion)),
            completion,
            _INT4(len(logprobs)),
            logprobs,
            _INT4(len(text)),
            text,
            _text(r.finish_reason),
            _jsonb(r.sampling_params),
            _float8(r.latency_ms),
            _TOKEN_COUNTS(4, len(prompt) // 4, 4, len(completion) // 4),
            created,
        )
    )


def encode(records: list[StepRecord | LlmCallRecord], now: datetime) -> list[EncodedRows]:
    """Encode valid steps and calls into at most two blocks: the steps, then the LLM calls, each in the
    order given (`encoded_keys` lists the records' keys in the same order)."""
    created = timestamp_field(now)
    step_ids: list[str] = []
    step_rows: list[bytes] = []
    call_ids: list[str] = []
    call_rows: list[bytes] = []
    for record in records:
        if isinstance(record, StepRecord):
            step_ids.append(record.trajectory_id)
            step_rows.append(encode_step(record, created))
        else:
            call_ids.append(record.trajectory_id)
            call_rows.append(encode_call(record, created))
    blocks = [EncodedRows.of_rows("steps", step_ids, step_rows), EncodedRows.of_rows("llm_calls", call_ids, call_rows)]
    return [block for block in blocks if len(block)]


def encoded_keys(records: list[StepRecord | LlmCallRecord]) -> list[tuple[Any, ...]]:
    """The keys of `records` in the order `encode` lays out their rows."""
    steps = [record.key for record in records if isinstance(record, StepRecord)]
    return steps + [record.key for record in records if not isinstance(record, StepRecord)]
