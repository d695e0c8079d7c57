"""Training jobs the controller launches in-cluster: one detached Ray actor per batch.

The actor is detached and named after its batch (`<controller>-train-b<batch id>`), and the name is stored
on the batch row (`ray_job_id`), so a restarted controller finds the running job from the database alone.
The job itself (`cluster.train_job.run_training`) writes every state change to the database: version
`training` -> `ready`/`failed`, batch `running` -> `completed`/`failed`, progress after every update.
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from cluster.config import ZigguratConfig

log = logging.getLogger(__name__)

ACTOR_PREFIX = "actor:"  # batch.ray_job_id of in-cluster jobs; Ray Jobs API ids have no prefix


class TrainingRun:
    """Runs one batch's training; `run` returns the new version (or raises with the job's error)."""

    def __init__(self, config_json: str) -> None:
        from cluster.logs import configure_logging

        configure_logging()
        self._config = ZigguratConfig.model_validate_json(config_json)

    def run(self, batch_id: int) -> int | None:
        if self._config.trainer.backend == "simulated":  # tests and benchmarks of the orchestration only
            from cluster.simulated_training import run_simulated_training

            return run_simulated_training(self._config, batch_id=batch_id)
        from cluster.train_job import run_training

        return run_training(self._config, batch_id=batch_id)


def job_name(controller_name: str, batch_id: int) -> str:
    return f"{controller_name}-train-b{batch_id}"


def job_id(config: ZigguratConfig, batch_id: int) -> str:
    """What the batch row stores as `ray_job_id` for its in-cluster job."""
    return ACTOR_PREFIX + job_name(config.controller.name, batch_id)


def launch(config: ZigguratConfig, batch_id: int) -> Any:
    """Start the training actor for `batch_id`; returns the ref of its result (the new version)."""
    name = job_name(config.controller.name, batch_id)
    actor = (
        ray.remote(TrainingRun)
        .options(name=name, namespace=config.ray.namespace, lifetime="detached", num_cpus=0, max_restarts=0)
        .remote(config.model_dump_json())
    )
    return actor.run.remote(batch_id)


def is_in_cluster(ray_job_id: str | None) -> bool:
    """Whether a batch's job is one the controller launched (a named actor it can look up)."""
    return bool(ray_job_id) and ray_job_id.startswith(ACTOR_PREFIX)


def find(config: ZigguratConfig, ray_job_id: str | None) -> Any:
    """The live training actor behind a batch's `ray_job_id`, or None if it is gone."""
    if not ray_job_id or not ray_job_id.startswith(ACTOR_PREFIX):
        return None
    try:
        return ray.get_actor(ray_job_id[len(ACTOR_PREFIX) :], namespace=config.ray.namespace)
    except ValueError:
        return None


def stop(config: ZigguratConfig, ray_job_id: str | None) -> None:
    actor = find(config, ray_job_id)
    if actor is not None:
        ray.kill(actor, no_restart=True)


def overdue(batch: dict[str, Any], timeout_s: float) -> bool:
    """Open for longer than `timeout_s` (controller.training_timeout_s): its job is presumed dead, whoever ran it."""
    from datetime import UTC, datetime

    since = batch["started_at"] or batch["created_at"]
    if since is None:
        return True
    if since.tzinfo is None:  # SQLite hands timestamps back without their zone; they were written in UTC
        since = since.replace(tzinfo=UTC)
    return (datetime.now(UTC) - since).total_seconds() > timeout_s


def alive(config: ZigguratConfig, batch: dict[str, Any]) -> bool:
    """Whether the job behind an open batch is still there: its training actor, or the persistent trainer
    service with the batch queued or in progress."""
    from cluster import trainer_service

    ray_job_id = batch["ray_job_id"] or ""
    if ray_job_id.startswith(trainer_service.SERVICE_PREFIX):
        return trainer_service.serving(config, batch["id"])
    return find(config, ray_job_id) is not None


def is_ours(ray_job_id: str | None) -> bool:
    """A job the controller started (a training actor or the trainer service), which it can check on."""
    from cluster import trainer_service

    return is_in_cluster(ray_job_id) or bool(ray_job_id) and ray_job_id.startswith(trainer_service.SERVICE_PREFIX)
