"""The simulated trainer (`trainer.backend: simulated`): the training job's ledger, without a model.

For tests and benchmarks of the orchestration only (cluster.live, bench/live.py): a batch goes through the
same database transitions as a real job (claimed, pending -> running with its version registered, progress
after every update, completed with the version ready), each update takes `trainer.simulated_update_s`, and
the published version folder is a stand-in adapter (a one-number safetensors file and an adapter config)
with the real manifest and checksums, so hot-swap verifies it as it would a trained one. The simulated
engine (engine.backend: simulated) serves it; the config refuses the simulated trainer with a vLLM engine.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from cluster.config import ZigguratConfig

log = logging.getLogger("ziggurat.trainer")


def run_simulated_training(config: ZigguratConfig, batch_id: int | None = None) -> int | None:
    """Train `batch_id` (or a batch claimed now) for `trainer.updates_per_batch` simulated updates into a new
    version; returns the version, or None if nothing is trainable."""
    from cluster import artifacts
    from cluster.models import resolve_model
    from cluster.train_job import _prepare, _release_unstarted, _store_dir
    from recorder import queries
    from trainer.data import lag_percentiles, version_lag_tokens

    settings = config.trainer
    engine = config.database.create_engine()
    claimed: int | None = None
    try:
        prepared = _prepare(config, engine, batch_id)
        if prepared is None:
            return None
        batch_id, parent_number, parent = prepared
        claimed = batch_id
        base = resolve_model(config.model)
        version = queries.start_batch(
            engine, batch_id, base_model=base, kind="lora", parent_version=parent_number, ray_job_id=None
        )
    except BaseException as exc:
        if claimed is not None:
            _release_unstarted(engine, claimed, exc)
        engine.dispose()
        raise
    try:
        groups = queries.load_batch(engine, batch_id, settings.reward_source)
        lags = version_lag_tokens(groups, parent_number)
        started = time.perf_counter()
        for update in range(settings.updates_per_batch):
            time.sleep(settings.simulated_update_s)
            report = {"update": update + 1, "loss": 0.0, "elapsed_s": settings.simulated_update_s}
            queries.set_batch_progress(
                engine, batch_id, update + 1, settings.updates_per_batch, loss=0.0, report=report
            )
        store = _store_dir(config)
        name = artifacts.version_folder_name(version, batch_id)
        staging, artifact = artifacts.staging_folder(store, name), store / name
        try:
            write_stand_in_adapter(staging, version)
            parent_version = parent and parent["version"]
            artifacts.write_manifest(
                staging, version=version, base_model=base, training_batch=batch_id, parent=parent_version,
                simulated=True,
            )  # fmt: skip
            artifacts.publish(staging, artifact)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        metrics: dict[str, Any] = {
            "simulated": 1,
            "train_s": round(time.perf_counter() - started, 3),
            "trajectories": sum(len(g.trajectories) for g in groups),
            "tokens": sum(lags.values()),
            **lag_percentiles(lags),
            "version_lag_tokens": {str(lag): tokens for lag, tokens in lags.items()},
        }
        queries.complete_batch(engine, batch_id, version, artifact_uri=str(artifact), metrics=metrics)
        log.info("simulated version %d ready at %s", version, artifact)
        return version
    except BaseException as exc:
        try:
            queries.fail_batch(engine, batch_id, f"{type(exc).__name__}: {exc}")
        except queries.BatchStateConflict as conflict:
            log.warning("batch %d: %s", batch_id, conflict)
        raise
    finally:
        engine.dispose()


def write_stand_in_adapter(folder: Path, version: int) -> None:
    """An adapter-shaped folder: what servable_folder checks for (adapter_config.json, safetensors weights)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=False)
    (folder / "adapter_config.json").write_text(json.dumps({"simulated": True, "version": version}))
    save_file({"version": torch.tensor([float(version)])}, str(folder / "adapter_model.safetensors"))
