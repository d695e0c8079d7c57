"""`ziggurat status` for a person: the controller's (or the database's) status as a few aligned tables."""

from __future__ import annotations

import logging
from typing import Any

from cluster.config import ZigguratConfig

log = logging.getLogger("ziggurat.cli")


def rewards_by_version(config: ZigguratConfig, status: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Held-out reward (mean, standard error, episodes) per version for the table; the controller's status
    carries only the mean, so the database is asked too. Best effort: the table still prints without it."""
    from cluster.report import version_rewards

    if status.get("controller") == "not running":
        return {v["version"]: v for v in status.get("versions", [])}
    try:
        engine = config.database.create_engine()
        try:
            return {v["version"]: v for v in version_rewards(engine)}
        finally:
            engine.dispose()
    except Exception as exc:  # the table is still useful without the reward column
        log.warning("no rewards from the database: %s: %s", type(exc).__name__, exc)
        return {}


def _table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    return [indent + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in (header, *rows)]  # fmt: skip


def _reward_cell(row: dict[str, Any] | None, metrics: dict[str, Any]) -> str:
    mean = (row or {}).get("eval_mean_reward", metrics.get("eval_mean_reward"))
    if mean is None:
        return "-"
    stderr = (row or {}).get("eval_stderr")
    episodes = (row or {}).get("eval_episodes", metrics.get("eval_episodes"))
    shown = f"{mean:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")
    return shown + (f" ({episodes} ep)" if episodes else "")


def _training_line(item: dict[str, Any]) -> str:
    """One training batch, from the controller's health (progress flattened in) or a database row."""
    progress = {**((item.get("stats") or {}).get("progress") or {}), **item}
    batch = progress.get("batch_id", progress.get("id"))
    line = f"batch {batch} {progress.get('status', '?')}"
    if progress.get("total"):
        line += f", {progress.get('done', 0)}/{progress['total']} updates ({100 * progress.get('fraction', 0):.0f}%)"
    if progress.get("loss") is not None:
        line += f", loss {progress['loss']:.4f}"
    return line


def format_status(status: dict[str, Any], config: ZigguratConfig, rewards: dict[int, dict[str, Any]]) -> str:
    """`ziggurat status` for a person: deployed version, rollout actors, training, readiness, versions.
    Works on the controller's status and on the database-only one (no controller running)."""
    running = status.get("controller") != "not running"
    versions = status.get("versions", [])
    deployed = status.get("deployed_version")
    if deployed is None:
        deployed = next((v["version"] for v in reversed(versions) if v.get("status") == "deployed"), 0)
    lines = [
        f"controller   {config.controller.name}: " + ("running" if running else "not running (read from the database)"),
        f"deployed     v{deployed}",
    ]
    health = status.get("health") or {}
    actors = health.get("actors") or {}
    if actors:
        rows = []
        for name, actor in sorted(actors.items()):
            served = actor.get("served_version")
            note = actor.get("error") or ("swapping" if actor.get("swapping") else "")
            if actor.get("awaiting_restore"):
                note = "awaiting restore"
            rows.append([
                name, "yes" if actor.get("alive") else "NO", "-" if served is None else f"v{served}",
                str(actor.get("episodes_in_flight", "-")), str(note)[:60],
            ])  # fmt: skip
        lines += ["rollout actors", *_table(["ACTOR", "ALIVE", "SERVES", "IN FLIGHT", "NOTE"], rows)]
    elif running:
        lines.append("rollout actors  none reported")
    for part, state in (("database", health.get("database")), ("recorder", health.get("recorder"))):
        if state and not state.get("reachable", state.get("alive", True)):
            lines.append(f"{part:<12} DOWN: {state.get('error', '?')}")
    training = health.get("training") if running else status.get("training")
    lines.append("training     " + ("; ".join(_training_line(t) for t in training) if training else "idle"))
    readiness = status.get("readiness") or {}
    unmet = readiness.get("unmet")
    if unmet is None and not readiness.get("ready"):
        unmet = [
            f"trainable groups: {readiness.get('groups_with_variance', 0)} of {config.controller.min_groups} needed"
        ]
    summary = (
        f"{readiness.get('groups_with_variance', 0)} trainable groups, "
        f"{readiness.get('trainable_trajectories', 0)} trajectories"
    )
    lines.append(f"readiness    {'ready to train' if readiness.get('ready') else 'not ready'} ({summary})")
    lines += [f"  - {reason}" for reason in unmet or []]
    if versions:
        rows = [
            [f"v{v['version']}", str(v.get("status", "?")), str(v.get("kind", "?")),
             "-" if v.get("training_batch_id") is None else str(v["training_batch_id"]),
             _reward_cell(rewards.get(v["version"]), v.get("metrics") or {})]
            for v in versions
        ]  # fmt: skip
        lines += ["versions", *_table(["VERSION", "STATUS", "KIND", "BATCH", "HELD-OUT REWARD"], rows)]
    return "\n".join(lines)
