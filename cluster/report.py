"""What the loop achieved, read from the database: mean reward per model version, as JSON and a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from recorder.queries import list_versions
from recorder.schema import Trajectory

T = Trajectory.__table__


def version_rewards(engine: Engine) -> list[dict[str, Any]]:
    """Per model version: status, held-out (eval) and training-episode mean reward and counts."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(T.c.model_version, T.c.is_eval, sa.func.avg(T.c.total_reward), sa.func.count())
            .where(T.c.status == "finished")
            .group_by(T.c.model_version, T.c.is_eval)
        ).all()
    by_version: dict[int, dict[str, Any]] = {}
    for version, is_eval, mean, count in rows:
        kind = "eval" if is_eval else "train"
        by_version.setdefault(version, {})[f"{kind}_mean_reward"] = float(mean) if mean is not None else None
        by_version[version][f"{kind}_episodes"] = count
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
                "train_mean_reward": None,
                "train_episodes": 0,
                **by_version.get(v["version"], {}),
                "loss": metrics.get("loss"),
                "training_batch_id": v["training_batch_id"],
            }
        )
    return result


def plot_rewards(versions: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4))
    for key, label in (("eval_mean_reward", "held-out scenarios"), ("train_mean_reward", "training episodes")):
        points = [(v["version"], v[key]) for v in versions if v.get(key) is not None]
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label=label)
    axis.set(title="mean reward per model version", xlabel="model version", ylabel="mean reward")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: Path) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    plot_rewards(report["versions"], out_dir / "reward.png")
    return [str(out_dir / "report.json"), str(out_dir / "reward.png")]
