"""Every place that lists a table's columns agrees with the one definition, the ORM in recorder/schema.py.

What the store writes is derived from the ORM (recorder/columns.py). What cannot be derived is checked here: the
migrated database, the record dataclasses, the row functions, the validators and the wire encoder's hand-packed
COPY tuples. Each check returns messages naming the table, the column and the place to fix; the last tests add
a fake column to a copy of the ORM and show that every check names it.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from recorder import columns as cols
from recorder.columns import CALLS, JUDGMENTS, STEPS, TRAJECTORIES, WRITTEN, TableColumns
from recorder.migrate import upgrade
from recorder.pg_write import TRAJECTORY_UPSERT
from recorder.records import JudgmentRecord, LlmCallRecord, StepRecord, TrajectoryRecord, validate
from recorder.schema import Base, Step
from recorder.wire import CALL_COLUMNS, STEP_COLUMNS, encode_call, encode_step, timestamp_field

NOW = datetime(2026, 12, 2, 9, 30, 15, 123456, tzinfo=UTC)
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_FAMILIES = (sa.Boolean, sa.Integer, sa.Float, sa.String, sa.LargeBinary, sa.JSON, sa.DateTime)


def _records() -> dict[str, Any]:
    """One record per written table with every field set to a non-default value, so each one is exercised."""
    rng = np.random.default_rng(3)
    return {
        "trajectories": TrajectoryRecord(
            "t1", "market", "s-1", "g-1", 3, status="finished", agent_id="agent", total_reward=1.5,
            reward_components={"pnl": 1.0}, metrics={"trades": 2}, metadata={"seed": 7}, step_count=2, is_eval=True,
            started_at=NOW - timedelta(minutes=1), finished_at=NOW,
        ),
        "steps": StepRecord("t1", 4, "balance 100 €", {"type": "buy"}, env_reward=2, done=True, error="late"),
        "llm_calls": LlmCallRecord.from_tokens(
            "t1", 4, 1, 3, rng.integers(0, 1000, 5), rng.integers(0, 1000, 3), -rng.random(3), text="buy",
            finish_reason="length", purpose="judge", messages=[{"role": "user", "content": "hi"}],
            sampling_params={"temperature": 0.7}, latency_ms=12.5,
        ),
        "reward_judgments": JudgmentRecord(
            "t1", "judge-a", "llm", 1, judge_model="m", judge_version="v1", rank_in_group=0, normalized_score=0.5,
            reasoning="fine", criteria={"style": 1},
        ),
    }  # fmt: skip


VALUES: dict[str, Callable[[Any, datetime], list[Any]]] = {
    "trajectories": cols.trajectory_values,
    "steps": cols.step_values,
    "llm_calls": cols.call_values,
    "reward_judgments": cols.judgment_values,
}


def _family(kind: Any) -> str:
    return next((family.__name__ for family in _FAMILIES if isinstance(kind, family)), type(kind).__name__)


# ---- checks ---------------------------------------------------------------------------------------------------


def migration_problems(metadata: sa.MetaData, inspector: Any) -> list[str]:
    """The migrated database against the ORM: tables, then columns name for name, type family, width, NULL."""
    problems = []
    in_db = set(inspector.get_table_names()) - {"alembic_version"}
    for name in sorted(in_db - set(metadata.tables)):
        problems.append(f"table {name} is in the migrated database but not in the ORM; add it to recorder/schema.py")
    for table in metadata.sorted_tables:
        if table.name not in in_db:
            problems.append(
                f"table {table.name} is in the ORM but missing from the migrations; add a revision under "
                "recorder/migrations/versions"
            )
            continue
        reflected = {column["name"]: column for column in inspector.get_columns(table.name)}
        for column in table.columns:
            found = reflected.get(column.name)
            if found is None:
                problems.append(
                    f"column {column.name} of table {table.name} is in the ORM but missing from the migrations; "
                    "add it there (a new revision under recorder/migrations/versions)"
                )
                continue
            want, got = _family(column.type), _family(found["type"])
            if want != got:
                problems.append(
                    f"column {column.name} of table {table.name} is {want} in the ORM but {got} in the migrations"
                )
            elif getattr(column.type, "length", None) != getattr(found["type"], "length", None):
                problems.append(
                    f"column {column.name} of table {table.name} has width {column.type.length} in the ORM but "
                    f"{found['type'].length} in the migrations"
                )
            if column.nullable != found["nullable"]:
                problems.append(
                    f"column {column.name} of table {table.name} is nullable={column.nullable} in the ORM but "
                    f"nullable={found['nullable']} in the migrations"
                )
        for name in sorted(set(reflected) - set(table.columns.keys())):
            problems.append(
                f"column {name} of table {table.name} is in the migrations but not in the ORM; add it to "
                "recorder/schema.py"
            )
    return problems


def record_problems(columns: TableColumns) -> list[str]:
    """The record type has a field for every column copied from it, and no field without a column."""
    fields = [field.name for field in dataclasses.fields(columns.record)]
    record, table = columns.record.__name__, columns.name
    problems = [
        f"column {name} of table {table} is in the ORM but missing from {record} (recorder/records.py); add it "
        "there, or list it as computed or skipped in recorder/columns.py"
        for name in columns.copied
        if name not in fields
    ]
    problems += [
        f"field {name} of {record} is not a column of table {table}; add the column to recorder/schema.py, or "
        "drop the field"
        for name in fields
        if name not in columns.columns
    ]
    return problems


def row_problems(columns: TableColumns, values: Callable[[Any, datetime], list[Any]], record: Any) -> list[str]:
    """The table's row function fills every written column: the copied ones as the record has them."""
    row = values(record, NOW)
    function, table = values.__name__, columns.name
    if len(row) < len(columns.write_order):
        return [
            f"column {name} of table {table} is in the ORM but missing from {function} (recorder/columns.py); "
            "add it there"
            for name in columns.write_order[len(row) :]
        ]
    if len(row) > len(columns.write_order):
        return [f"{function} returns {len(row)} values for the {len(columns.write_order)} columns of table {table}"]
    mapped = columns.as_row(row)
    return [
        f"column {name} of table {table}: {function} gives {mapped[name]!r}, the record has {getattr(record, name)!r}"
        for name in columns.copied
        if mapped[name] != getattr(record, name)
    ]


def _decode(column: sa.Column, raw: bytes) -> Any:
    """A binary COPY field as the column's PostgreSQL type stores it."""
    family = _family(column.type)
    if family == "String":
        return raw.decode()
    if family == "Integer":
        return struct.unpack(">i", raw)[0]
    if family == "Float":
        return struct.unpack(">d", raw)[0]
    if family == "Boolean":
        return {b"\x01": True, b"\x00": False}[raw]
    if family == "LargeBinary":
        return raw
    if family == "JSON":
        assert raw[:1] == b"\x01", "jsonb binary format version"
        return json.loads(raw[1:])
    if family == "DateTime":
        return _PG_EPOCH + timedelta(microseconds=struct.unpack(">q", raw)[0])
    raise AssertionError(f"no decoder for {family}")


def wire_problems(table: sa.Table, names: tuple[str, ...], data: bytes, row: dict[str, Any], where: str) -> list[str]:
    """A binary COPY tuple decoded column by column (the ORM's order and types) against the store's row."""
    count, position, fields = struct.unpack_from(">h", data)[0], 2, []
    while position < len(data):
        size = struct.unpack_from(">i", data, position)[0]
        position += 4
        fields.append(None if size == -1 else data[position : position + size])
        position += max(size, 0)
    problems = [] if count == len(fields) else [f"{where} says {count} fields but writes {len(fields)}"]
    for index, name in enumerate(names):
        if index >= len(fields):
            problems.append(
                f"column {name} of table {table.name} is in the ORM but missing from {where} (recorder/wire.py); "
                "add it there, in the table's column order"
            )
            continue
        try:
            value = None if fields[index] is None else _decode(table.c[name], fields[index])
        except Exception as exc:
            value = f"<undecodable: {exc}>"
        if value != row.get(name):
            problems.append(
                f"column {name} of table {table.name}: {where} (recorder/wire.py) wrote {value!r} where the "
                f"store's row has {row.get(name)!r}; encode the columns in the table's order"
            )
    if len(fields) > len(names):
        problems.append(
            f"{where} writes {len(fields) - len(names)} fields more than table {table.name} has columns; drop them "
            "from recorder/wire.py or add the columns to recorder/schema.py"
        )
    return problems


def _report(problems: list[str]) -> str:
    return "\n".join(problems)


# ---- the schema as it is agrees ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def migrated(tmp_path_factory) -> Any:
    url = f"sqlite:///{tmp_path_factory.mktemp('columns') / 'columns.db'}"
    upgrade(url)
    engine = sa.create_engine(url)
    yield sa.inspect(engine)
    engine.dispose()


def test_the_migrated_database_has_exactly_the_orm_columns(migrated):
    problems = migration_problems(Base.metadata, migrated)
    assert not problems, _report(problems)


def test_the_store_writes_every_table_a_record_type_fills():
    assert set(WRITTEN) == set(_records()) == set(VALUES)
    assert {columns.record for columns in WRITTEN.values()} == {
        TrajectoryRecord,
        StepRecord,
        LlmCallRecord,
        JudgmentRecord,
    }


@pytest.mark.parametrize("table", sorted(WRITTEN))
def test_each_record_type_has_a_field_for_each_column(table):
    problems = record_problems(WRITTEN[table])
    assert not problems, _report(problems)


@pytest.mark.parametrize("table", sorted(WRITTEN))
def test_the_row_functions_fill_every_written_column(table):
    record = _records()[table]
    problems = row_problems(WRITTEN[table], VALUES[table], record)
    assert not problems, _report(problems)
    row = WRITTEN[table].as_row(VALUES[table](record, NOW))
    assert set(row) == set(WRITTEN[table].columns)
    if "created_at" in row:
        assert row["created_at"] == NOW


def test_computed_columns_hold_what_the_record_says():
    records = _records()
    trajectory = cols.trajectory_row(records["trajectories"], NOW)
    assert (trajectory["started_at"], trajectory["finished_at"]) == (NOW - timedelta(minutes=1), NOW)
    running = cols.trajectory_row(dataclasses.replace(records["trajectories"], status="running", started_at=None,
                                                      finished_at=None), NOW)  # fmt: skip
    assert (running["started_at"], running["finished_at"]) == (NOW, None)
    step, call, judgment = (cols.step_row(records["steps"], NOW), cols.call_row(records["llm_calls"], NOW),
                            cols.judgment_row(records["reward_judgments"], NOW))  # fmt: skip
    assert step["env_reward"] == 2.0 and type(step["env_reward"]) is float
    assert (call["prompt_tokens"], call["completion_tokens"]) == (5, 3)
    assert judgment["score"] == 1.0 and type(judgment["score"]) is float


@pytest.mark.parametrize("table", sorted(WRITTEN))
def test_validation_checks_every_field_and_every_width(table):
    """Validators name their fields by hand: each field must be checked, each VARCHAR's width enforced."""
    record, columns = _records()[table], WRITTEN[table]
    assert validate(record) is None
    missing = []
    for field in dataclasses.fields(record):
        problem = validate(dataclasses.replace(record, **{field.name: object()}))
        if not problem or field.name not in problem:
            missing.append(f"field {field.name} of {type(record).__name__} is not checked by validate: {problem}")
        column = columns.table.c[field.name]
        if isinstance(column.type, sa.String) and column.type.length:
            problem = validate(dataclasses.replace(record, **{field.name: "x" * (column.type.length + 1)}))
            if not problem or field.name not in problem:
                missing.append(
                    f"column {field.name} of table {table} is VARCHAR({column.type.length}) in the ORM but "
                    f"validate (recorder/records.py) lets a longer value through: {problem}"
                )
    assert not missing, _report(missing)


@pytest.mark.parametrize("filled", [True, False], ids=["every-field", "nulls"])
def test_the_wire_encoder_writes_every_column_in_orm_order(filled):
    records = _records()
    step, call = records["steps"], records["llm_calls"]
    if not filled:  # every nullable field NULL
        step = dataclasses.replace(step, action=None, error=None)
        call = dataclasses.replace(call, messages=None, finish_reason=None, latency_ms=None)
    created = timestamp_field(NOW)
    problems = wire_problems(
        STEPS.table, STEP_COLUMNS, encode_step(step, created), cols.step_row(step, NOW), "encode_step"
    )
    problems += wire_problems(
        CALLS.table, CALL_COLUMNS, encode_call(call, created), cols.call_row(call, NOW), "encode_call"
    )
    assert not problems, _report(problems)


def test_the_trajectory_upsert_has_every_written_column_with_its_orm_type():
    for name in TRAJECTORIES.columns:
        assert f'"{name}" {cols.pg_type(TRAJECTORIES.table.c[name])}' in TRAJECTORY_UPSERT, name
    assert '"training_batch_id"' not in TRAJECTORY_UPSERT  # a write never touches a trajectory's batch
    assert set(cols.TRAJECTORY_OUTCOME) <= set(TRAJECTORIES.columns)
    assert cols.pg_types(CALLS)["completion_logprobs"] == "bytea" and cols.pg_types(JUDGMENTS)["criteria"] == "jsonb"


# ---- each check names a column the ORM has and a place lacks -----------------------------------------------


def _orm_with(table: str, column: sa.Column) -> sa.MetaData:
    """A copy of the ORM's tables with one more column in `table`."""
    metadata = sa.MetaData()
    for orm_table in Base.metadata.sorted_tables:
        orm_table.to_metadata(metadata)
    metadata.tables[table].append_column(column)
    return metadata


def test_a_column_missing_from_the_migrations_is_named(migrated):
    problems = migration_problems(_orm_with("steps", sa.Column("fake", sa.Integer)), migrated)
    assert problems == [
        "column fake of table steps is in the ORM but missing from the migrations; add it there (a new revision "
        "under recorder/migrations/versions)"
    ]
    changed = _orm_with("steps", sa.Column("fake", sa.Integer))
    changed.tables["steps"].c.error.type = sa.Integer()
    assert any(
        "column error of table steps is Integer in the ORM but String" in p
        for p in migration_problems(changed, migrated)
    )


def test_a_column_missing_from_a_record_type_is_named():
    table = _orm_with("steps", sa.Column("fake", sa.Integer)).tables["steps"]
    problems = record_problems(TableColumns(table, StepRecord, computed=STEPS.computed))
    assert problems == [
        "column fake of table steps is in the ORM but missing from StepRecord (recorder/records.py); add it there, "
        "or list it as computed or skipped in recorder/columns.py"
    ]
    with pytest.raises(ValueError, match="columns \\['nope'\\] of recorder/columns.py are not in table steps"):
        TableColumns(Step.__table__, StepRecord, computed=("nope",))


def test_a_computed_column_the_row_function_does_not_fill_is_named():
    table = _orm_with("steps", sa.Column("fake", sa.Integer)).tables["steps"]
    columns = TableColumns(table, StepRecord, computed=(*STEPS.computed, "fake"))
    assert row_problems(columns, cols.step_values, _records()["steps"]) == [
        "column fake of table steps is in the ORM but missing from step_values (recorder/columns.py); add it there"
    ]


def test_a_column_missing_from_the_wire_encoder_is_named():
    table = _orm_with("steps", sa.Column("fake", sa.Integer)).tables["steps"]
    step = _records()["steps"]
    row = {**cols.step_row(step, NOW), "fake": 1}
    problems = wire_problems(
        table, (*STEP_COLUMNS, "fake"), encode_step(step, timestamp_field(NOW)), row, "encode_step"
    )
    assert problems == [
        "column fake of table steps is in the ORM but missing from encode_step (recorder/wire.py); add it there, in "
        "the table's column order"
    ]
    swapped = (*STEP_COLUMNS[:4], STEP_COLUMNS[5], STEP_COLUMNS[4], *STEP_COLUMNS[6:])  # done before env_reward
    problems = wire_problems(Step.__table__, swapped, encode_step(step, timestamp_field(NOW)), cols.step_row(step, NOW),
                             "encode_step")  # fmt: skip
    assert [p.split(":")[0] for p in problems] == ["column done of table steps", "column env_reward of table steps"]
