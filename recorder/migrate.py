"""Schema migrations (Alembic), applied with `ziggurat db upgrade`; the recorder refuses stale schemas."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL, Engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class SchemaOutOfDate(RuntimeError):
    """The database schema is not at the revision this code needs."""


def alembic_config(url: str | URL | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["url"] = url
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "recorder/migrations has no revisions"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Bring the database at `url` to `revision` (creating the tables on an empty database)."""
    command.upgrade(alembic_config(url), revision)


def check_schema(engine: Engine) -> None:
    """Raise SchemaOutOfDate, saying what to run, unless the database is at the head revision."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        state = "has no Ziggurat tables" if current is None else f"is at revision {current}"
        raise SchemaOutOfDate(
            f"the database {engine.url.render_as_string(hide_password=True)} {state}, but this code needs "
            f"revision {head}; run `ziggurat db upgrade --config <your config>` and start again"
        )
