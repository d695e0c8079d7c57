"""Gateway API keys: created once (the key is shown then and never again), stored as SHA-256, revoked by name."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from recorder.schema import ApiKey, utcnow

K = ApiKey.__table__
KEY_PREFIX = "zk-"


class ApiKeyError(ValueError):
    """A key operation that cannot be done (a duplicate or unknown name); the message says which."""


@dataclass(frozen=True)
class KeyInfo:
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(engine: Engine, name: str) -> str:
    """A new key for client `name`; returns the key itself, which is not stored anywhere."""
    if not name or len(name) > 200:
        raise ApiKeyError("a key's name must be 1 to 200 characters")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    try:
        with engine.begin() as conn:
            conn.execute(K.insert().values(name=name, key_hash=hash_key(key), prefix=key[:10], created_at=utcnow()))
    except IntegrityError:
        raise ApiKeyError(f"a key named {name!r} exists already; revoke it or pick another name") from None
    return key


def list_keys(engine: Engine) -> list[KeyInfo]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(K.c.name, K.c.prefix, K.c.created_at, K.c.revoked_at).order_by(K.c.id)).all()
    return [KeyInfo(*row) for row in rows]


def revoke_key(engine: Engine, name: str) -> None:
    with engine.begin() as conn:
        done = conn.execute(K.update().where(K.c.name == name, K.c.revoked_at.is_(None)).values(revoked_at=utcnow()))
    if done.rowcount == 0:
        raise ApiKeyError(f"no active key named {name!r} (`ziggurat keys list` shows them)")


def active_keys(engine: Engine) -> dict[str, str]:
    """SHA-256 of every key not revoked -> the client's name."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(K.c.key_hash, K.c.name).where(K.c.revoked_at.is_(None))).all()
    return {key_hash: name for key_hash, name in rows}
