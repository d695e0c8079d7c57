"""One training run: `python -m trainer.job --config configs/local.yaml [--batch-id N]`.

Claims a batch of trainable groups (or takes the given one), trains it with GRPO as a Ray Train
`TorchTrainer`, writes the result to the model store as the next version, registers that version as
`ready` with its metrics, and marks the batch completed. On failure the version is marked failed, the batch
failed (its trajectories released for another try) with the error, and the process exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from cluster.config import DEFAULT_CONFIG, ZigguratConfig, load_config
from cluster.logs import configure_logging

log = logging.getLogger("ziggurat.trainer")


def _store_dir(config: ZigguratConfig) -> Path:
    return Path(os.environ.get("ZIGGURAT_STORE") or config.model.store_dir).expanduser().resolve()


def _parent(engine: Any) -> dict[str, Any] | None:
    """The newest version that finished training (what the next one continues from)."""
    from recorder.queries import list_versions

    usable = [v for v in list_versions(engine) if v["status"] in ("ready", "canary", "deployed") and v["artifact_uri"]]
    return usable[-1] if usable else None


def run_training(config: ZigguratConfig, batch_id: int | None = None) -> int | None:
    """Train one batch into a new model version; returns the version, or None if nothing is trainable."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoConfig

    from cluster.models import resolve_model
    from cluster.ray_runtime import init_ray
    from recorder import queries
    from recorder.migrate import check_schema
    from recorder.store import create_db_engine
    from trainer.loop import STATE_FILE, train_loop_per_worker
    from trainer.model import MANIFEST, MERGED_DIR

    settings = config.trainer
    init_ray(config.ray)
    url = config.database.resolved_url()
    engine = create_db_engine(url)
    check_schema(engine)
    parent = _parent(engine)
    if batch_id is None:
        min_version = 0
        if settings.max_staleness is not None and parent is not None:
            min_version = max(0, parent["version"] - settings.max_staleness)
        batch_id = queries.claim_batch(
            engine,
            max_groups=settings.batch_max_groups,
            min_group_size=settings.min_group_size,
            reward_source=settings.reward_source,
            min_version=min_version,
        )
        if batch_id is None:
            log.info("no trainable groups yet (readiness: %s)", queries.readiness(engine, settings.reward_source))
            engine.dispose()
            return None
    base = resolve_model(config.model)
    version = queries.register_version(
        engine,
        base_model=base,
        kind=settings.mode,
        parent_version=parent["version"] if parent else None,
        training_batch_id=batch_id,
        status="training",
    )
    queries.mark_batch(
        engine, batch_id, "running", target_version=version, ray_job_id=os.environ.get("RAY_JOB_SUBMISSION_ID")
    )
    store = _store_dir(config)
    try:
        model_config = AutoConfig.from_pretrained(base)
        pad = model_config.pad_token_id if model_config.pad_token_id is not None else model_config.eos_token_id
        # Ray Train propagates this from the driver to its controller and workers.
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(settings.health_check_interval_s)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "trainer": settings.model_dump(),
                "database": config.database.model_dump(mode="json"),  # workers read the password from their env
                "batch_id": batch_id,
                "reward_source": settings.reward_source,
                "base_model": base,
                "init_from": parent["artifact_uri"] if parent else None,
                "target_version": version,
                "pad_token_id": pad or 0,
                "wandb_dir": str(store),
            },
            scaling_config=ScalingConfig(
                num_workers=settings.num_workers,
                use_gpu=settings.use_gpu,
                resources_per_worker=settings.resources_per_worker or None,
            ),
            run_config=RunConfig(
                # Ray Train restores a run whose folder already exists. Version and batch numbers restart with
                # every fresh database while the store stays, so the name is unique per job: a new job never
                # picks up another database's checkpoint (worker failures resume within this fit()).
                name=f"v{version}-batch{batch_id}-{uuid.uuid4().hex[:8]}",
                storage_path=str(store / "ray_runs"),
                failure_config=FailureConfig(max_failures=settings.max_failures),
            ),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training of batch {batch_id} reported no checkpoint: {result.error}")
        artifact = store / f"v{version}"
        with result.checkpoint.as_directory() as folder:
            shutil.copytree(folder, artifact, dirs_exist_ok=True)
        (artifact / STATE_FILE).unlink(missing_ok=True)  # optimizer state belongs to the run, not the version
        manifest = json.loads((artifact / MANIFEST).read_text())
        manifest.update(version=version, base_model=base, training_batch=batch_id, parent=parent and parent["version"])
        (artifact / MANIFEST).write_text(json.dumps(manifest, indent=2))
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
        if config.serves_merged():  # rollout engines serve the adapter folded into the base weights
            from trainer.model import merge_adapter

            started = time.perf_counter()
            merge_adapter(base, artifact, artifact / MERGED_DIR)
            metrics["merge_s"] = round(time.perf_counter() - started, 3)
        queries.update_version(
            engine,
            version,
            status="ready",
            artifact_uri=str(artifact),
            metrics=metrics,
            wandb_run_id=(result.metrics or {}).get("wandb_run_id"),
        )
        queries.mark_batch(engine, batch_id, "completed", stats={"final": metrics})
        log.info("version %d ready at %s", version, artifact)
        return version
    except BaseException as exc:
        queries.update_version(engine, version, status="failed", metrics={"error": f"{type(exc).__name__}: {exc}"})
        queries.mark_batch(engine, batch_id, "failed", error=f"{type(exc).__name__}: {exc}", release=True)
        raise
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.job", description=__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--batch-id", type=int, default=None, help="train this batch instead of claiming one")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        version = run_training(load_config(args.config), args.batch_id)
    except Exception as exc:
        log.error("training failed: %s: %s", type(exc).__name__, exc)
        return 1
    print(json.dumps({"version": version}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
