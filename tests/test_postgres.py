from __future__ import annotations

import os

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from recorder.pg_server import ThrowawayPostgres


def test_throwaway_server_starts_serves_and_stops():
    server = ThrowawayPostgres()  # in /tmp: pytest's tmp_path is root-only, and the server runs as postgres
    try:
        server.start()
        if os.geteuid() == 0:  # initdb refuses root, so the data must belong to the postgres user
            assert server.data_dir.stat().st_uid != 0
        engine = sa.create_engine(server.url, connect_args={"connect_timeout": 5})
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE probe (id int primary key, note text)"))
            conn.execute(sa.text("INSERT INTO probe VALUES (1, 'kept')"))
        engine.dispose()

        server.stop()
        with pytest.raises(OperationalError):
            with sa.create_engine(server.url, connect_args={"connect_timeout": 2}).connect():
                pass

        server.start()  # same data directory: the row survives a restart
        engine = sa.create_engine(server.url, connect_args={"connect_timeout": 5})
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT note FROM probe WHERE id = 1")).scalar_one() == "kept"
        engine.dispose()
    finally:
        server.destroy()
    assert not server.root.exists()


def test_session_server_creates_databases(postgres: ThrowawayPostgres):
    url = postgres.create_database("created_by_test")
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT current_database()")).scalar_one() == "created_by_test"
        assert "PostgreSQL" in conn.execute(sa.text("SELECT version()")).scalar_one()
    engine.dispose()
