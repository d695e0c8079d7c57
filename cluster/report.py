"""What the loop achieved, read from the database: mean reward per model version, as JSON and a PNG.

reward.png has two panels:
- held-out (eval) mean reward per model version, with error bars of one standard error over that version's
  held-out episodes (and the training-episode mean for comparison);
- the same held-out means against wall time: seconds from the first recorded episode's start (when the loop
  began playing) to the moment the version's last held-out episode finished (`trajectories.finished_at`),
  i.e. when that evaluation result became known.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from recorder.queries import list_versions
from recorder.schema import Trajectory

T = Trajectory.__table__


def standard_error(mean: float | None, mean_of_squares: float | None, count: int) -> float | None:
    """Standard error of the mean from the first two moments; None with fewer than two episodes."""
    if mean is None or mean_of_squares is None or count < 2:
        return None
    # Sample variance from the moments; rounding can push an all-equal group a hair below zero.
    variance = max(mean_of_squares - mean * mean, 0.0) * count / (count - 1)
    return math.sqrt(variance / count)


def _seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    if (start.tzinfo is None) != (end.tzinfo is None):  # SQLite hands back naive UTC, PostgreSQL aware
        start, end = start.replace(tzinfo=None), end.replace(tzinfo=None)
    return (end - start).total_seconds()


def version_rewards(engine: Engine) -> list[dict[str, Any]]:
    """Per model version: status, held-out (eval) and training-episode mean reward, standard error and counts,
    and `eval_wall_s` (see the module docstring)."""
    reward = T.c.total_reward
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                T.c.model_version,
                T.c.is_eval,
                sa.func.avg(reward),
                sa.func.count(),
                sa.func.avg(reward * reward),
                sa.func.max(T.c.finished_at),
            )
            .where(T.c.status == "finished")
            .group_by(T.c.model_version, T.c.is_eval)
        ).all()
        origin = conn.execute(sa.select(sa.func.min(T.c.started_at))).scalar()
    by_version: dict[int, dict[str, Any]] = {}
    for version, is_eval, mean, count, mean_sq, last_finished in rows:
        kind = "eval" if is_eval else "train"
        mean = float(mean) if mean is not None else None
        mean_sq = float(mean_sq) if mean_sq is not None else None
        entry = by_version.setdefault(version, {})
        entry[f"{kind}_mean_reward"] = mean
        entry[f"{kind}_episodes"] = count
        entry[f"{kind}_stderr"] = standard_error(mean, mean_sq, count)
        if is_eval:
            entry["eval_wall_s"] = _seconds_between(origin, last_finished)
    result = []
    for v in list_versions(engine):
        metrics = v["metrics"] or {}
        result.append(
            {
                "version": v["version"],
                "status": v["status"],
                "kind": v["kind"],
                "eval_mean_reward": None,
                "eval_episodes": 0,
                "eval_stderr": None,
                "eval_wall_s": None,
                "train_mean_reward": None,
                "train_episodes": 0,
                "train_stderr": None,
                **by_version.get(v["version"], {}),
                "loss": metrics.get("loss"),
                "training_batch_id": v["training_batch_id"],
            }
        )
    return result


def reward_series(versions: list[dict[str, Any]], kind: str = "eval") -> dict[str, list[float]]:
    """The points reward.png draws for `kind` ("eval" or "train"): versions with a mean reward, in version
    order, with their standard errors (0 where unknown) and, for eval, wall offsets (NaN where unknown)."""
    points = sorted((v for v in versions if v.get(f"{kind}_mean_reward") is not None), key=lambda v: v["version"])
    return {
        "version": [v["version"] for v in points],
        "mean": [v[f"{kind}_mean_reward"] for v in points],
        "stderr": [v.get(f"{kind}_stderr") or 0.0 for v in points],
        "wall_s": [math.nan if v.get("eval_wall_s") is None else v["eval_wall_s"] for v in points],
    }


def plot_rewards(versions: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    held_out, training = reward_series(versions, "eval"), reward_series(versions, "train")
    fig, (by_version, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    if held_out["version"]:
        by_version.errorbar(
            held_out["version"], held_out["mean"], yerr=held_out["stderr"], marker="o", capsize=4,
            label="held-out scenarios (± 1 s.e.)",
        )  # fmt: skip
    if training["version"]:
        by_version.errorbar(
            training["version"], training["mean"], yerr=training["stderr"], marker="s", capsize=3, alpha=0.6,
            linestyle="--", label="training episodes (± 1 s.e.)",
        )  # fmt: skip
    by_version.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_version.set(title="mean reward per model version", xlabel="model version", ylabel="mean reward")
    if held_out["version"] or training["version"]:
        by_version.legend()

    timed = [i for i, wall in enumerate(held_out["wall_s"]) if not math.isnan(wall)]
    if timed:
        walls = [held_out["wall_s"][i] for i in timed]
        means = [held_out["mean"][i] for i in timed]
        by_time.errorbar(walls, means, yerr=[held_out["stderr"][i] for i in timed], marker="o", capsize=4)
        for i, wall, mean in zip(timed, walls, means, strict=True):
            by_time.annotate(
                f"v{held_out['version'][i]}", (wall, mean), textcoords="offset points", xytext=(4, 6)
            )  # fmt: skip
    by_time.margins(x=0.08)  # room for the version labels at either end
    by_time.set(
        title="held-out mean reward over the run",
        xlabel="seconds since the first episode, when the version's evaluation ended",
        ylabel="mean reward",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: Path) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    plot_rewards(report["versions"], out_dir / "reward.png")
    return [str(out_dir / "report.json"), str(out_dir / "reward.png")]
