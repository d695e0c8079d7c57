"""One training run: `python -m cluster.train_job --config configs/local.yaml [--batch-id N]`.

Claims a batch of trainable groups from the deployed version (or takes the given one), trains it with GRPO
as a Ray Train `TorchTrainer` starting from that parent, writes the result to the model store as the next
version, registers that version as `ready` with its metrics, and marks the batch completed. On failure the
version is marked failed, the batch failed (its trajectories released for another try) with the error, and
the process exits non-zero. A batch with nothing to train is failed before any version is registered.

The workers get one frozen `TrainJobSpec` (trainer.spec) and record each update's metrics on the batch's row
(`stats["updates"]`); the job itself starts no experiment tracker.
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
from cluster.logs import configure_logging, library_log_level

log = logging.getLogger("ziggurat.trainer")


def _store_dir(config: ZigguratConfig) -> Path:
    return Path(os.environ.get("ZIGGURAT_STORE") or config.model.store_dir).expanduser().resolve()


class NothingToTrain(RuntimeError):
    """A claimed batch turned out to hold nothing trainable; it was failed and its groups released."""


def _lineage(engine: Any) -> int:
    """The version a batch claimed now trains from: the deployed one (0, the base model, if none is)."""
    from recorder import queries

    return queries.deployed_version(engine)


def _parent(engine: Any, batch: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
    """The version `batch` trains from (its number, and its row when one is registered: version 0 may not
    be). That is the parent recorded when it was claimed, against which its staleness was judged; a batch
    claimed outside any lineage takes the deployed version now."""
    from recorder import queries

    number = batch["parent_version"] if batch["parent_version"] is not None else _lineage(engine)
    try:
        return number, queries.get_version(engine, number)
    except KeyError:
        return number, None


def _nothing_to_train(engine: Any, batch_id: int, settings: Any) -> str | None:
    """Why the batch would train nothing (checked before a version is registered), or None."""
    from recorder import queries
    from trainer.data import build_rows

    groups = queries.load_batch(engine, batch_id, settings.reward_source)
    rows, stats = build_rows(groups, settings.advantage, settings.advantage_eps)
    if rows:
        return None
    return (
        f"training batch {batch_id} has nothing to train with reward '{settings.reward_source}': "
        f"{stats.groups} groups loaded, {stats.groups_without_signal} with equal rewards, "
        f"{stats.trajectories} trajectories with rows; its groups were released. Train it with the "
        "trainer.reward_source it was claimed with, or let the job claim a batch itself"
    )


def _release_unstarted(engine: Any, batch_id: int, exc: BaseException) -> None:
    """Fail (and release) a batch still pending when its job could not start: left pending, it would block its
    parent's lineage, which holds one open batch at a time."""
    from recorder import queries

    try:
        queries.fail_batch(engine, batch_id, f"the job did not start: {type(exc).__name__}: {exc}", expected="pending")
    except queries.BatchStateConflict:
        pass  # started or ended elsewhere meanwhile: that outcome stands


def _prepare(
    config: ZigguratConfig, engine: Any, batch_id: int | None
) -> tuple[int, int, dict[str, Any] | None] | None:
    """(batch id, parent version number, parent row) of a pending batch with something to train: the given
    one, or one claimed from the deployed version; None if no group is trainable."""
    from recorder import queries

    settings = config.trainer
    if batch_id is None:
        lineage = _lineage(engine)
        batch_id = queries.claim_batch(
            engine,
            max_groups=settings.batch_max_groups,
            min_group_size=settings.min_group_size,
            reward_source=settings.reward_source,
            parent_version=lineage,
            max_staleness=settings.max_staleness,
        )
        if batch_id is None:
            ready = queries.readiness(
                engine, settings.reward_source, settings.min_group_size, parent_version=lineage,
                max_staleness=settings.max_staleness,
            )  # fmt: skip
            log.info("no trainable groups yet (readiness: %s)", ready)
            return None
    try:
        number, parent = _parent(engine, queries.get_batch(engine, batch_id))
        problem = _nothing_to_train(engine, batch_id, settings)
    except BaseException as exc:
        _release_unstarted(engine, batch_id, exc)
        raise
    if problem is not None:
        queries.fail_batch(engine, batch_id, problem, expected="pending")
        raise NothingToTrain(problem)
    return batch_id, number, parent


def publish_version(
    config: ZigguratConfig,
    store: Path,
    batch_id: int,
    version: int,
    parent: dict[str, Any] | None,
    folder: Path,
    metrics: dict[str, Any],
    *,
    base_model: str,
) -> Path:
    """Write `folder` (a checkpoint: the weights, and the STATE_FILE, left out) into the model store as
    `version`, with its merged weights if the rollout serves them merged (`metrics["merge_s"]` is added) and a
    manifest; returns the version's folder. Shared by the one-batch job and the trainer service."""
    from cluster import artifacts
    from trainer.loop import STATE_FILE
    from trainer.model import MERGED_DIR

    # Version numbers restart with every fresh database while the store stays: the folder name is unique,
    # the version is assembled in a staging folder (merged weights included) and renamed into place once.
    name = artifacts.version_folder_name(version, batch_id)
    staging, artifact = artifacts.staging_folder(store, name), store / name
    try:
        shutil.copytree(folder, staging)
        (staging / STATE_FILE).unlink(missing_ok=True)  # optimizer state belongs to the run, not the version
        if config.serves_merged():  # rollout engines serve the adapter folded into the base weights
            from trainer.model import merge_adapter

            started = time.perf_counter()
            merge_adapter(base_model, staging, staging / MERGED_DIR)
            metrics["merge_s"] = round(time.perf_counter() - started, 3)
        parent_version = parent and parent["version"]
        artifacts.write_manifest(
            staging, version=version, base_model=base_model, training_batch=batch_id, parent=parent_version
        )
        artifacts.publish(staging, artifact)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after a publish; half a version after a failure
    return artifact


def torch_trainer(
    settings: Any, loop: Any, loop_config: dict[str, Any], run_name: str, store: Path, **run_options: Any
) -> Any:
    """A TorchTrainer for `settings` (a TrainerConfig), as the one-batch job and the trainer service build it:
    its workers, collective and start deadlines, failure recovery and quiet logs. `run_name` must be unique per
    run (Ray Train restores a run whose folder exists under `store`/ray_runs); `run_options` join RunConfig."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Ray Train propagates these from the driver to its controller and workers.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(settings.health_check_interval_s)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(settings.worker_start_timeout_s)
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        # a worker stuck in a collective (a peer died mid all-reduce) fails the attempt instead of hanging
        torch_config=TorchConfig(timeout_s=int(settings.collective_timeout_s)),
        scaling_config=ScalingConfig(
            num_workers=settings.num_workers,
            use_gpu=settings.use_gpu,
            resources_per_worker=settings.resources_per_worker or None,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(store / "ray_runs"),
            # worker failures resumed from the last checkpoint; a worker start that misses its deadline is retried
            # once (Ray Train's default, -1, retries a start that can never be placed forever)
            failure_config=FailureConfig(max_failures=settings.max_failures, controller_failure_limit=1),
            # Ray Train's per-run INFO (worker group started, run finished) only with --verbose.
            logging_config=LoggingConfig(log_level=library_log_level()),
            worker_runtime_env={"env_vars": allocator_env(settings.allocator)},
            **run_options,
        ),
    )


# jemalloc keeps what it freed for the next update instead of returning it to the OS (which glibc does for large
# blocks, and an update then re-faults gigabytes of pages): the same tensors in half the resident memory.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def allocator_env(allocator: str) -> dict[str, str]:
    """Environment variables that give a training worker process `allocator` (trainer.allocator)."""
    if allocator == "system":
        return {}
    import ray

    library = Path(ray.__file__).parent / "core" / "libjemalloc.so"
    if not library.is_file():
        log.warning("trainer.allocator is jemalloc but %s is missing; the workers use the system malloc", library)
        return {}
    preload = ":".join(p for p in (str(library), os.environ.get("LD_PRELOAD", "")) if p)
    return {"LD_PRELOAD": preload, "MALLOC_CONF": JEMALLOC_CONF}


def run_training(config: ZigguratConfig, batch_id: int | None = None) -> int | None:
    """Train one batch into a new model version; returns the version, or None if nothing is trainable."""
    from transformers import AutoConfig

    from cluster.models import resolve_model
    from cluster.ray_runtime import init_ray
    from recorder import queries
    from recorder.migrate import check_schema
    from trainer.loop import train_loop_per_worker
    from trainer.spec import TrainJobSpec

    settings = config.trainer
    init_ray(config.ray)
    engine = config.database.create_engine()
    claimed: int | None = None  # a batch this call claimed, failed (and released) if the job never starts
    try:
        check_schema(engine)
        prepared = _prepare(config, engine, batch_id)
        if prepared is None:
            engine.dispose()
            return None
        batch_id, parent_number, parent = prepared
        claimed = batch_id
        base = resolve_model(config.model)
        # pending -> running and the new version's row in one transaction: a second job given the same batch,
        # or a second batch from this parent, is refused here and registers nothing.
        version = queries.start_batch(
            engine,
            batch_id,
            base_model=base,
            kind=settings.mode,
            parent_version=parent_number,
            ray_job_id=os.environ.get("RAY_JOB_SUBMISSION_ID"),
        )
    except BaseException as exc:
        if claimed is not None:
            _release_unstarted(engine, claimed, exc)
        engine.dispose()
        raise
    store = _store_dir(config)
    try:
        model_config = AutoConfig.from_pretrained(base)
        pad = model_config.pad_token_id if model_config.pad_token_id is not None else model_config.eos_token_id
        spec = TrainJobSpec(
            trainer=settings,
            database=config.database,  # no password: workers read it from their env, as this process does
            batch_id=batch_id,
            base_model=base,
            init_from=parent["artifact_uri"] if parent else None,
            target_version=version,
            pad_token_id=pad or 0,
        )
        # Ray Train restores a run whose folder already exists. Version and batch numbers restart with every
        # fresh database while the store stays, so the name is unique per job: a new job never picks up another
        # database's checkpoint (worker failures resume within this fit()).
        run_name = f"v{version}-batch{batch_id}-{uuid.uuid4().hex[:8]}"
        # Ray Train takes a dict; the workers read the spec from it once
        trainer = torch_trainer(settings, train_loop_per_worker, {"spec": spec}, run_name, store)
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training of batch {batch_id} reported no checkpoint: {result.error}")
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
        with result.checkpoint.as_directory() as folder:
            artifact = publish_version(config, store, batch_id, version, parent, Path(folder), metrics, base_model=base)
        # The batch completes and its version becomes ready together; a batch the controller failed meanwhile
        # (its deadline passed) raises BatchStateConflict here and its version never becomes ready.
        queries.complete_batch(
            engine,
            batch_id,
            version,
            artifact_uri=str(artifact),
            metrics=metrics,
        )
        log.info("version %d ready at %s", version, artifact)
        return version
    except BaseException as exc:
        try:
            queries.fail_batch(engine, batch_id, f"{type(exc).__name__}: {exc}")
        except queries.BatchStateConflict as conflict:  # already ended elsewhere: keep the first outcome
            log.warning("batch %d: %s", batch_id, conflict)
        raise
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.train_job", description=__doc__)
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
