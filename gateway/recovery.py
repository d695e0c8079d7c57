"""What a restarted episode ledger learns again from the database: its open episodes and candidate groups.

The ledger (gateway.ledger) keeps open episodes in memory; everything it acknowledged and flushed is in the
database. A ledger that starts (again, after a crash) reads back every gateway trajectory still `running`:
an episode continues at the step after its last recorded call, pinned to the version its first call was served
by, with its TTL counted from its last recorded activity; a decision point's candidates can still be rewarded.
Records the old ledger held but had not flushed (at most `gateway.flush_interval_s` of calls) are gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from recorder.schema import LlmCall, Step, Trajectory

ENVIRONMENT = "gateway"
_INTERNAL_METADATA = ("source", "candidate")  # keys the ledger adds to a trajectory's metadata itself


@dataclass(frozen=True)
class RecoveredEpisode:
    id: str
    group_id: str
    agent_id: str | None
    metadata: dict[str, Any]
    version: int
    steps: int
    """Single-completion calls recorded: the next call's step index."""
    decision_points: int
    """Calls with `n` > 1 recorded (their candidate groups, rewarded or not)."""
    unstepped: dict[int, str]
    """Step index -> reply text of each recorded call without a step row (the ledger held its step when it
    stopped); the latest is held again for `annotate`, the others are recorded with the reply as the action."""
    step_rewards: float
    idle_s: float
    """Seconds since its last recorded activity."""


@dataclass(frozen=True)
class RecoveredCandidates:
    group: str
    members: list[str]
    agent_id: str | None
    version: int
    metadata: dict[str, Any]
    idle_s: float


@dataclass
class LedgerState:
    episodes: list[RecoveredEpisode] = field(default_factory=list)
    candidates: list[RecoveredCandidates] = field(default_factory=list)
    closed: dict[str, str] = field(default_factory=dict)
    """Recently closed episodes and candidate groups -> their final status, oldest first."""


def _age_s(when: datetime | None, now: datetime) -> float:
    if when is None:
        return 0.0
    if when.tzinfo is None:  # SQLite hands back naive datetimes; the recorder writes UTC
        when = when.replace(tzinfo=UTC)
    return max(0.0, (now - when).total_seconds())


def _own_metadata(meta: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (meta or {}).items() if k not in _INTERNAL_METADATA}


def _member_index(member_id: str) -> int:
    return int(member_id.rsplit(".", 1)[1])


def read_ledger_state(engine: sa.Engine, remember_closed: int) -> LedgerState:
    """The gateway's open episodes and candidate groups as the database holds them, and up to `remember_closed`
    of the most recently closed ones (so a late reward is told "already finished", not "unknown")."""
    T, C, S = Trajectory.__table__, LlmCall.__table__, Step.__table__
    now = datetime.now(UTC)
    state = LedgerState()
    with engine.connect() as conn:
        running = conn.execute(
            sa.select(T.c.id, T.c.group_id, T.c.agent_id, T.c.model_version, T.c.metadata, T.c.started_at).where(
                T.c.status == "running", T.c.environment == ENVIRONMENT
            )
        ).all()
        episodes = [r for r in running if not (r.metadata or {}).get("candidate")]
        candidates = [r for r in running if (r.metadata or {}).get("candidate")]
        ids = [r.id for r in episodes]
        calls: dict[str, dict[int, tuple[str, datetime]]] = {i: {} for i in ids}
        stepped: dict[str, dict[int, float]] = {i: {} for i in ids}
        decision_points: dict[str, set[str]] = {i: set() for i in ids}
        if ids:
            for row in conn.execute(
                sa.select(C.c.trajectory_id, C.c.step_index, C.c.text, C.c.created_at).where(
                    C.c.trajectory_id.in_(ids), C.c.call_index == 0
                )
            ):
                calls[row.trajectory_id][row.step_index] = (row.text, row.created_at)
            for row in conn.execute(
                sa.select(S.c.trajectory_id, S.c.step_index, S.c.env_reward).where(S.c.trajectory_id.in_(ids))
            ):
                stepped[row.trajectory_id][row.step_index] = row.env_reward
            # an episode's decision points are candidate groups started since it started, whatever their status
            since = min(r.started_at for r in episodes)
            for row in conn.execute(
                sa.select(T.c.group_id, T.c.metadata).where(T.c.environment == ENVIRONMENT, T.c.started_at >= since)
            ):
                meta = row.metadata or {}
                if meta.get("candidate") and meta.get("episode") in decision_points:
                    decision_points[meta["episode"]].add(row.group_id)
        for row in episodes:
            own = calls[row.id]
            last_at = max((at for _, at in own.values()), default=row.started_at)
            state.episodes.append(
                RecoveredEpisode(
                    id=row.id, group_id=row.group_id, agent_id=row.agent_id, metadata=_own_metadata(row.metadata),
                    version=row.model_version, steps=max(own, default=-1) + 1,
                    decision_points=len(decision_points[row.id]),
                    unstepped={i: text for i, (text, _) in sorted(own.items()) if i not in stepped[row.id]},
                    step_rewards=float(sum(stepped[row.id].values())), idle_s=_age_s(last_at, now),
                )
            )  # fmt: skip
        groups: dict[str, list[Any]] = {}
        for row in candidates:
            groups.setdefault(row.group_id, []).append(row)
        for group, members in groups.items():
            first = members[0]
            state.candidates.append(
                RecoveredCandidates(
                    group=group, members=sorted((m.id for m in members), key=_member_index), agent_id=first.agent_id,
                    version=first.model_version, metadata=_own_metadata(first.metadata),
                    idle_s=_age_s(max(m.started_at for m in members), now),
                )
            )  # fmt: skip
        closed = conn.execute(
            sa.select(T.c.id, T.c.group_id, T.c.status, T.c.metadata)
            .where(T.c.environment == ENVIRONMENT, T.c.status != "running")
            .order_by(T.c.finished_at.desc())
            .limit(remember_closed)
        ).all()
    for row in reversed(closed):
        key = row.group_id if (row.metadata or {}).get("candidate") else row.id
        state.closed[key] = row.status
    return state
