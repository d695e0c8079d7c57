"""One Weights & Biases run per loop: held-out reward per version, rollout throughput, every training update
and every hot-swap, in one place.

Offline unless WANDB_API_KEY is set (`wandb sync <run_dir>/wandb/offline-run-*` uploads an offline run
later); WANDB_MODE, if set, wins either way (`disabled` turns tracking off). Tracking is an observer: if
W&B fails to start or to log, the loop carries on with a warning and tracking switches itself off.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.logs import redact

if TYPE_CHECKING:
    from cluster.config import ZigguratConfig

log = logging.getLogger("ziggurat.tracking")

PROJECT = "ziggurat"


def wandb_mode() -> str:
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def _numbers(values: dict[str, Any], prefix: str) -> dict[str, float]:
    return {
        f"{prefix}/{key}": value
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def _redacted(value: Any) -> Any:
    """The config with any secret that slipped into a string (e.g. a password in a URL) replaced by ***:
    the config is uploaded with an online run."""
    if isinstance(value, dict):
        return {key: _redacted(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_redacted(item) for item in value]
    return redact(value) if isinstance(value, str) else value


class LoopTracker:
    """Logs into one W&B run; every row carries `version` and `wall_s` (seconds since the tracker started)
    so charts can use either as their x-axis. Eval and swap metrics default to `version`, training and
    rollout metrics to `wall_s`."""

    def __init__(self, config: ZigguratConfig, run_dir: Path, enabled: bool = True) -> None:
        self.run_id: str | None = None
        self._run: Any = None
        self._step = 0
        self._started = time.monotonic()
        if not enabled or wandb_mode() == "disabled":
            return
        # W&B prints a banner and sync hints on stdout; the console belongs to cluster.console.
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb

            run_dir.mkdir(parents=True, exist_ok=True)
            name = config.controller.name
            self._run = wandb.init(
                project=PROJECT,
                group=name,
                name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
                dir=str(run_dir),
                config=_redacted(json.loads(config.model_dump_json())),
                mode=wandb_mode(),
                reinit="create_new",  # a second loop in one process gets its own run, never the first one's
                settings=wandb.Settings(
                    silent=True,
                    console="off",  # W&B would otherwise capture and re-echo the whole console
                    x_disable_stats=True,  # no system-metrics sampler competing with vLLM and training for CPU
                ),
            )
            self._run.define_metric("version")
            self._run.define_metric("wall_s")
            for pattern in ("eval/*", "swap/*"):
                self._run.define_metric(pattern, step_metric="version")
            for pattern in ("train/*", "rollout/*"):
                self._run.define_metric(pattern, step_metric="wall_s")
            self.run_id = self._run.id
            log.info("W&B run %s (%s) in %s", self.run_id, wandb_mode(), run_dir)
        except Exception as exc:
            log.warning("W&B tracking is off: could not start a run (%s: %s)", type(exc).__name__, exc)
            self._run = None

    @property
    def enabled(self) -> bool:
        return self._run is not None

    def _log(self, version: int, row: dict[str, Any]) -> None:
        if self._run is None:
            return
        row = {**row, "version": version, "wall_s": round(time.monotonic() - self._started, 3)}
        try:
            self._run.log(row, step=self._step)
            self._step += 1
        except Exception as exc:
            log.warning("W&B tracking is off: logging failed (%s: %s)", type(exc).__name__, exc)
            self._run = None

    def log_evaluation(self, version: int, mean_reward: float, episodes: int) -> None:
        self._log(version, {"eval/mean_reward": mean_reward, "eval/episodes": episodes})

    def log_rollouts(
        self, iteration: int, version: int, mean_reward: float | None, episodes: int, tokens_per_s: float | None
    ) -> None:
        row: dict[str, Any] = {"rollout/iteration": iteration, "rollout/episodes": episodes}
        if mean_reward is not None:
            row["rollout/mean_reward"] = mean_reward
        if tokens_per_s is not None:
            row["rollout/tokens_per_s"] = tokens_per_s
        self._log(version, row)

    def log_training(self, version: int, batch: dict[str, Any]) -> None:
        """One row per optimizer update recorded in the batch's stats (`stats.updates`), each at its own step;
        a batch without that list logs only its id."""
        stats = batch.get("stats") or {}
        updates = stats.get("updates") or []
        batch_id = {} if batch.get("id") is None else {"train/batch_id": batch["id"]}
        if not isinstance(updates, list) or not updates:
            self._log(version, batch_id)
            return
        for update in updates:
            if isinstance(update, dict):
                self._log(version, {**_numbers(update, "train"), **batch_id})

    def log_swap(self, version: int, swap: dict[str, Any]) -> None:
        row = {f"swap/{key}": swap[key] for key in ("load_s", "swap_s") if isinstance(swap.get(key), int | float)}
        self._log(version, row)

    def finish(self) -> None:
        if self._run is None:
            return
        run, self._run = self._run, None
        try:
            run.finish()
        except Exception as exc:
            log.warning("W&B run %s did not finish cleanly (%s: %s)", self.run_id, type(exc).__name__, exc)
