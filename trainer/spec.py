"""What a training job hands its Ray Train workers: one frozen, typed spec, built once by the driver.

Ray Train's `train_loop_config` must be a dict, so the driver (cluster.train_job) passes `{"spec": spec}` and
every worker reads `loop_config["spec"]` once. Everything a worker needs travels here and nowhere else; there
is no default to fall back on if a field were missing. The database section carries no password: each worker
reads it from its own environment (DatabaseConfig.password_env), as the driver does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from recorder.config import DatabaseConfig
from trainer.config import TrainerConfig


@dataclass(frozen=True)
class TrainJobSpec:
    """One training job's inputs, the same on every worker of every attempt (restarts included)."""

    trainer: TrainerConfig
    """The `trainer:` section: GRPO settings, the worker layout, and the reward the batch trains on
    (`trainer.reward_source`, its only carrier)."""

    database: DatabaseConfig
    """Where the batch's groups are read and progress is written; the password comes from the env."""

    batch_id: int
    """The training batch (already `running`) whose groups the workers train on."""

    base_model: str
    """Folder of the base model: the weights under a LoRA adapter, the full-weights start of a first version,
    and the default KL reference."""

    init_from: str | None
    """The parent version's folder to start from (its adapter, or its full weights), or None to start from the
    base model (version 0). A restarted attempt starts from its own last checkpoint instead."""

    target_version: int
    """The version this job trains (registered `training` when the batch started)."""

    pad_token_id: int
    """Token id that pads rows to one length (the tokenizer's pad token, else its EOS, else 0)."""

    def __post_init__(self) -> None:
        if not isinstance(self.trainer, TrainerConfig):
            raise TypeError(f"TrainJobSpec.trainer must be a TrainerConfig, got {type(self.trainer).__name__}")
        if not isinstance(self.database, DatabaseConfig):
            raise TypeError(f"TrainJobSpec.database must be a DatabaseConfig, got {type(self.database).__name__}")
        if self.pad_token_id < 0:
            raise ValueError(f"TrainJobSpec.pad_token_id must be >= 0, got {self.pad_token_id}")


def spec_from(loop_config: dict[str, Any]) -> TrainJobSpec:
    """The spec in a worker's `train_loop_config`; TypeError if the driver passed anything else."""
    spec = loop_config["spec"]
    if not isinstance(spec, TrainJobSpec):
        raise TypeError(f"train_loop_config['spec'] must be a TrainJobSpec, got {type(spec).__name__}")
    return spec


@dataclass(frozen=True)
class BatchAssignment:
    """One batch handed to the persistent trainer service's workers (cluster.trainer_service): the same
    object to every rank, so every rank makes the same choices (keep the model, resume, skip)."""

    index: int
    """Position in the service's queue: the workers take assignments in this order, one at a time."""

    spec: TrainJobSpec
    """What to train, exactly as a one-batch job gets it."""

    parent_version: int
    """The version the batch trains from: the workers keep their model when they just produced it."""

    def __post_init__(self) -> None:
        if not isinstance(self.spec, TrainJobSpec):
            raise TypeError(f"BatchAssignment.spec must be a TrainJobSpec, got {type(self.spec).__name__}")
