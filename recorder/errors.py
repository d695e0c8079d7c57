"""Telling database errors apart: an outage (retry the whole write later) from data the database refuses
(find the rows to blame and reject them by name), so a bad record is never retried forever and an outage
never turns into rejected records."""

from __future__ import annotations

import sqlite3
import struct

from sqlalchemy.exc import DBAPIError, StatementError

# SQLSTATE classes that pass when the server is reachable and healthy again: connection exception,
# operator intervention (shutdown, starting up, statement timeout), insufficient resources, transaction
# rollback (deadlock, serialization).
_TRANSIENT_SQLSTATE_CLASSES = {"08", "57", "53", "40"}

# SQLSTATE classes that blame the rows written: data exception (bad encoding, NUL, value too long, bad JSON),
# integrity constraint violation (check, foreign key, not null), program limit exceeded (a value too big to
# handle). 08P01 is the server finding a malformed COPY row, not a broken connection.
_DATA_SQLSTATE_CLASSES = {"22", "23", "54"}
_DATA_SQLSTATES = {"08P01"}

# Raised by Python while a row is turned into parameters (SQLite binds in this process): they concern the
# values, never the connection.
_PYTHON_DATA_ERRORS = (ValueError, TypeError, ArithmeticError, RecursionError, struct.error)
_SQLITE_DATA_ERRORS = (sqlite3.DataError, sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)


def _driver_error(exc: BaseException) -> BaseException:
    """The driver's (or a bind processor's) own exception under SQLAlchemy's wrapper, if any."""
    if isinstance(exc, StatementError) and exc.orig is not None:
        return exc.orig
    return exc


def is_connectivity(exc: BaseException) -> bool:
    """Errors that go away when the database is reachable again (as opposed to bad data)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    exc = _driver_error(exc)
    if isinstance(exc, sqlite3.OperationalError | ConnectionError | TimeoutError):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES and sqlstate not in _DATA_SQLSTATES
    # psycopg errors raised without a server answer (connection refused or lost) carry no SQLSTATE; a value
    # psycopg itself refuses to send (a DataError, say) carries none either, and is the row's fault.
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def is_data_error(exc: BaseException) -> bool:
    """Errors that blame the rows of the write. Anything else (an outage, a missing table, no permission)
    concerns every row alike and must never be answered by rejecting rows."""
    if is_connectivity(exc):
        return False
    exc = _driver_error(exc)
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate[:2] in _DATA_SQLSTATE_CLASSES or sqlstate in _DATA_SQLSTATES
    if isinstance(exc, _SQLITE_DATA_ERRORS):
        return True
    if type(exc).__module__.startswith("psycopg"):  # refused by psycopg before it reached the server
        import psycopg

        return isinstance(exc, psycopg.DataError | psycopg.IntegrityError)
    return isinstance(exc, _PYTHON_DATA_ERRORS) and not type(exc).__module__.startswith(("psycopg", "sqlalchemy"))


def refusal(exc: BaseException) -> str:
    """What the database said, with the column or constraint when the server names them."""
    error = _driver_error(exc)
    diag = getattr(error, "diag", None)
    message = (getattr(diag, "message_primary", None) or str(error)).strip().splitlines()
    details = []
    for label, value in (
        ("column", getattr(diag, "column_name", None)),
        ("constraint", getattr(diag, "constraint_name", None)),
        ("detail", getattr(diag, "message_detail", None)),
        ("where", (getattr(diag, "context", None) or "").strip().splitlines()[:1]),
    ):
        if value:
            details.append(f"{label}: {value[0] if isinstance(value, list) else value}")
    where = f" ({'; '.join(details)})" if details else ""
    return f"{type(error).__name__}: {message[0] if message else ''}{where}"
