"""The store's PostgreSQL bulk paths: binary COPY of steps and LLM calls, and the one-statement trajectory upsert.

Steps and calls are COPYed straight into their tables. A resend that hits an existing key fails the whole
transaction with a unique violation; the caller then writes again with `resent=True`, which COPYs into a
temporary staging table and moves the rows over with INSERT ... ON CONFLICT DO NOTHING. Column lists and types
come from recorder/columns.py (the ORM), never from a list of their own.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection

from recorder.columns import TRAJECTORIES, TRAJECTORY_OUTCOME, WRITTEN, pg_types
from recorder.wire import COPY_HEADER, COPY_TRAILER


def _trajectory_upsert() -> str:
    """One statement, one round trip for any number of trajectories, passed as one JSON array of rows (a JSON
    text is encoded in C; per-column array parameters cost psycopg a Python loop per value). A start on an
    existing id changes nothing; an end fills in the outcome."""
    types = pg_types(TRAJECTORIES)
    names = ", ".join(f'"{name}"' for name in types)
    typed = ", ".join(f'"{name}" {kind}' for name, kind in types.items())
    updates = ", ".join(f'"{name}" = EXCLUDED."{name}"' for name in TRAJECTORY_OUTCOME)
    return (
        f"INSERT INTO trajectories ({names}) SELECT {names} FROM jsonb_to_recordset(%s::jsonb) AS r({typed}) "
        f"ON CONFLICT (id) DO UPDATE SET {updates} WHERE EXCLUDED.status <> 'running'"
    )


TRAJECTORY_UPSERT = _trajectory_upsert()


def upsert_trajectories(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Rows as `columns.trajectory_row` builds them; neither a start nor an end touches a trajectory's batch."""
    payload = json.dumps(rows, separators=(",", ":"), default=_isoformat, allow_nan=False)
    execute(conn, TRAJECTORY_UPSERT, [payload])


def copy_bulk(conn: Connection, encoded: dict[str, list[bytes]], resent: bool) -> None:
    """COPY each table's rows (chunks of concatenated COPY tuples)."""
    from psycopg import sql

    for table, rows in encoded.items():
        if not rows:
            continue
        if not resent:
            _copy_encoded(conn, table, rows)
            continue
        stage = _create_stage(conn, table)
        _copy_encoded(conn, table, rows, target=stage)
        statement = sql.SQL("INSERT INTO {} ({cols}) SELECT {cols} FROM {} ON CONFLICT DO NOTHING").format(
            sql.Identifier(table), sql.Identifier(stage), cols=_names(WRITTEN[table].columns)
        )
        execute(conn, statement)
        # Empty it now, not at commit: rows isolated in savepoints share one transaction.
        execute(conn, sql.SQL("DELETE FROM {}").format(sql.Identifier(stage)))


def _create_stage(conn: Connection, table: str) -> str:
    from psycopg import sql

    stage = f"_stage_{table}"
    statement = sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
    execute(conn, statement.format(sql.Identifier(stage), sql.Identifier(table)))
    return stage


def _copy_encoded(conn: Connection, table: str, rows: list[bytes], target: str | None = None) -> None:
    from psycopg import sql

    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier(target or table), _names(WRITTEN[table].columns)
    )
    with conn.connection.driver_connection.cursor() as cursor:
        with cursor.copy(statement) as copy:
            copy.write(b"".join((COPY_HEADER, *rows, COPY_TRAILER)))


def _names(columns: Any) -> Any:
    """A quoted, comma-separated identifier list (psycopg composes identifiers; values are always bound)."""
    from psycopg import sql

    return sql.SQL(", ").join(sql.Identifier(name) for name in columns)


def execute(conn: Connection, statement: Any, params: Any = None) -> None:
    """Run a psycopg-composed statement on the connection's current transaction."""
    conn.connection.driver_connection.execute(statement, params)


def _isoformat(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def is_unique_violation(exc: BaseException) -> bool:
    return type(exc).__name__ == "UniqueViolation" and type(exc).__module__.startswith("psycopg")
