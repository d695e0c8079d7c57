"""Canary versions: which actors serve one, how it compares with the deployed version, when it is decided.

A canary is a version served by a fraction of the rollout actors (`controller.canary_fraction`) while the
others keep the deployed version. It is decided on the mean reward of the finished training episodes each
side played since the canary began: early once both sides have `controller.canary_min_episodes`, and at the
latest at its deadline (after the loop's next rollout round, or `controller.canary_settle_timeout_s`), on
what there is then. Promoted, it is deployed to every actor; rolled back, every actor serves the deployed
version again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine

from cluster.config import ControllerConfig
from recorder.versions import episode_reward_by_version


def started_metrics(actors: list[str], deployed: int) -> dict[str, Any]:
    """What a canary deploy records on the version row (read back by `since` and `canary_actors`)."""
    return {"canary_actors": actors, "canary_since": datetime.now(UTC).isoformat(), "canary_of": deployed}


def mark_deployed(db: Engine, version: int, swap_s: float) -> None:
    """Statuses after `version` was swapped into every actor: it is deployed, the one before is retired, and
    any canary other than it is over (rolled back), since no actor serves it any more; one transaction."""
    from recorder import versions

    versions.mark_deployed(db, version, metrics={"deploy_swap_s": round(swap_s, 4)})


def since(row: dict[str, Any]) -> datetime:
    """When the canary began (the row's update time for canaries recorded before this was stored)."""
    stamp = (row["metrics"] or {}).get("canary_since")
    if stamp:
        return datetime.fromisoformat(stamp)
    updated = row["updated_at"]
    return updated if updated.tzinfo else updated.replace(tzinfo=UTC)


def canary_actors(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Actor name -> the canary version it should serve, over every version now in `canary` status."""
    return {name: row["version"] for row in rows for name in (row["metrics"] or {}).get("canary_actors", [])}


@dataclass(frozen=True)
class Verdict:
    decided: bool
    promoted: bool
    reason: str
    canary_mean_reward: float | None
    deployed_mean_reward: float | None
    episodes: dict[int, int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "decided": self.decided,
            "promoted": self.promoted,
            "reason": self.reason,
            "canary_mean_reward": self.canary_mean_reward,
            "deployed_mean_reward": self.deployed_mean_reward,
            "episodes": self.episodes,
        }


def judge(
    means: dict[int, tuple[float, int]],
    version: int,
    deployed: int,
    settings: ControllerConfig,
    min_episodes: int,
    due: bool,
) -> Verdict:
    """Decide a canary on its episodes' mean reward against the deployed version's; `due` is its deadline."""
    canary_mean, canary_n = means.get(version, (None, 0))
    deployed_mean, deployed_n = means.get(deployed, (None, 0))
    episodes = {version: canary_n, deployed: deployed_n}
    if min(canary_n, deployed_n) < min_episodes and not due:
        return Verdict(False, False, f"waiting for {min_episodes} episodes on each side", None, None, episodes)
    if canary_mean is None or deployed_mean is None:
        side = f"version {version}" if canary_mean is None else f"the deployed version {deployed}"
        reason = f"deadline passed with no finished episodes on {side}: rolled back"
        return Verdict(True, False, reason, canary_mean, deployed_mean, episodes)
    promoted = canary_mean >= deployed_mean - settings.canary_tolerance
    relation = ">=" if promoted else "<"
    reason = (
        f"canary mean reward {canary_mean:.4f} {relation} deployed {deployed_mean:.4f} - tolerance "
        f"{settings.canary_tolerance} ({canary_n} vs {deployed_n} episodes)"
    )
    return Verdict(True, promoted, reason, canary_mean, deployed_mean, episodes)


def decide(
    db: Engine, row: dict[str, Any], deployed: int, settings: ControllerConfig, min_episodes: int, final: bool
) -> Verdict:
    """The canary in `row` against the deployed version, on both sides' episodes since the canary began."""
    means = episode_reward_by_version(db, [row["version"], deployed], since(row))
    return judge(means, row["version"], deployed, settings, min_episodes, final or overdue(row, settings))


def overdue(row: dict[str, Any], settings: ControllerConfig) -> bool:
    return (datetime.now(UTC) - since(row)).total_seconds() > settings.canary_settle_timeout_s
