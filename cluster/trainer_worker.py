"""The per-worker loop of the persistent trainer service (cluster.trainer_service): batch after batch.

Every rank long-polls the service actor for the next assignment (the same one for every rank), loads its
share with the one-batch job's pieces (trainer.loop), and decides, identically on every rank, whether the
model it holds is the batch's parent (then model and optimizer carry on) or a new one must be built. Whatever
can fail for one batch alone (reading it, building its model, a token outside the vocabulary) is tried on
every rank before the first collective, and the ranks agree on the outcome: a batch any rank cannot train is
failed on its row and the loop carries on. Errors inside the updates propagate: Ray Train restarts the worker
group and the new group resumes the batch from its last checkpoint (`first_unfinished` + the STATE_FILE's
queue index).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("ziggurat.trainer_service")


@dataclass
class Held:
    """The model a worker keeps between batches."""

    model: Any
    optimizer: torch.optim.Optimizer
    reference: Any
    version: int | None
    """The published version its weights are; None while (or after) a batch moves them."""


@dataclass
class Worker:
    """One rank's state for as long as its worker group lives."""

    config: Any  # ZigguratConfig
    service: Any  # the TrainerService handle
    store: Path
    rank: int
    world: int
    device: torch.device
    engine: Any
    call_timeout_s: float
    held: Held | None = None
    builds: int = 0
    served: int = 0
    trained_index: int | None = None

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order (a collective; the identity on one worker)."""
        if self.world == 1 or not dist.is_initialized():
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def finished(self, index: int, outcome: dict[str, Any]) -> None:
        import ray

        ray.get(self.service.finished.remote(index, outcome), timeout=self.call_timeout_s)


def check_vocabulary(batch: Any, model: Any, batch_id: int) -> None:
    """A token id past the model's embedding would fail inside the first forward, on one rank only (a hang
    for the others until the collective timeout): refuse the batch before any collective instead."""
    if batch.input_ids.numel() == 0:
        return
    size = getattr(model, "module", model).get_input_embeddings().num_embeddings
    top = int(batch.input_ids.max())
    if top >= size:
        raise ValueError(
            f"training batch {batch_id} holds token id {top}, outside the model's vocabulary of {size}: its "
            "trajectories were not tokenised for this base model (check model.name and the rollout's engine)"
        )


def row_problem(engine: Any, spec: Any) -> str | None:
    """Why the batch's row says not to train it (the controller failed it meanwhile, ...), or None."""
    from recorder import queries

    row = queries.get_batch(engine, spec.batch_id)
    if row["status"] != "running" or row["target_version"] != spec.target_version:
        return (
            f"training batch {spec.batch_id} is {row['status']} with target version {row['target_version']}, "
            f"not running towards version {spec.target_version}: skipped"
        )
    return None


def _release_note(worker: Worker, previous: dict[str, Any] | None) -> None:
    """Rank 0's outcome of the batch this group trained last: a published version is what the model is."""
    if previous and previous.get("ok") and worker.held is not None and previous["index"] == worker.trained_index:
        worker.held.version = previous["version"]


def serve_one(worker: Worker, assignment: Any, resume_dir: str | None, state: dict[str, Any]) -> None:
    """Train one assignment on every rank; rank 0 publishes it (or fails it) and tells the service."""
    from recorder import queries
    from trainer.loop import load_policy, load_tensors, prepare_training, run_updates
    from trainer.memory import reset_peak, resident_gb
    from trainer.step import reference_logprobs

    spec, index, rank = assignment.spec, assignment.index, worker.rank
    settings = spec.trainer
    started = time.perf_counter()
    held_before = resident_gb()  # what the worker holds between batches: the model, and no cache (purged)
    reset_peak()  # this batch's reports give its own peak, not an earlier batch's or an earlier publish's
    # decided from what every rank holds alike, before anything that can fail on one rank only
    reuse = not state and worker.held is not None and worker.held.version == assignment.parent_version
    problem = error = None
    raw: Any = None
    batch = stats = None
    try:
        if rank == 0:
            problem = row_problem(worker.engine, spec)
        batch, stats = load_tensors(worker.engine, spec, rank, worker.world, worker.device)
        if not reuse:
            worker.held = None  # free the old model before loading the new one
            raw = load_policy(spec, worker.device, resume_dir or spec.init_from)
        check_vocabulary(batch, raw if raw is not None else worker.held.model if worker.held else None, spec.batch_id)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        log.warning("batch %d, rank %d: cannot train it: %s", spec.batch_id, rank, error)
    verdicts = worker.gather({"rank": rank, "problem": problem, "error": error})
    errors = [f"rank {v['rank']}: {v['error']}" for v in verdicts if v["error"]]
    if verdicts[0]["problem"] or errors:
        if not reuse:
            worker.held = None  # every rank alike: nobody keeps a half-loaded model
        if rank == 0:
            outcome = {"index": index, "batch_id": spec.batch_id, "ok": False}
            if verdicts[0]["problem"]:
                log.warning("%s", verdicts[0]["problem"])
                outcome["skipped"] = verdicts[0]["problem"]
            else:
                message = f"the trainer service could not train batch {spec.batch_id}: {'; '.join(errors)}"
                outcome["error"] = message
                try:
                    queries.fail_batch(worker.engine, spec.batch_id, message)
                except queries.BatchStateConflict as conflict:
                    log.warning("batch %d: %s", spec.batch_id, conflict)
            worker.finished(index, outcome)
        return
    if not reuse:
        model, optimizer = prepare_training(raw, settings, worker.world, state.get("optimizer"))
        worker.held = Held(model, optimizer, reference_logprobs(model, settings, spec.base_model), None)
        worker.builds += 1
    held = worker.held
    assert held is not None
    held.version, worker.trained_index = None, index  # its weights leave the parent from here on
    worker.served += 1
    outcome = run_updates(
        held.model,
        held.optimizer,
        batch,
        stats,
        spec,
        state,
        rank,
        worker.world,
        held.reference,
        extra_report={
            "model_builds": worker.builds,
            "reused_model": int(reuse),
            "setup_s": time.perf_counter() - started,
            "service_batches": worker.served,
            **({"rss_before_batch_gb": held_before} if held_before is not None else {}),
        },
        extra_state={"index": index, "batch_id": spec.batch_id},
        keep_final=True,
    )
    _give_back(spec.batch_id, "updates")  # before the publish, so its merge does not stack on the cache
    if rank == 0:
        worker.finished(index, publish(worker, assignment, outcome.report, outcome.final_folder or resume_dir))
        if outcome.final_folder:
            shutil.rmtree(outcome.final_folder, ignore_errors=True)
        _give_back(spec.batch_id, "publish")


def _give_back(batch_id: int, after: str) -> None:
    """Return what the allocator caches to the OS (trainer.memory.release_freed_memory): the next batch costs
    some page faults again (about 3 s of system time per batch on the market job), but a worker that lives
    batch after batch no longer grows by what every batch leaves behind."""
    from trainer.memory import release_freed_memory, resident_gb

    released = release_freed_memory()
    now = resident_gb() or 0.0
    log.info("batch %d: %.2f GB handed back after its %s; %.2f GB resident", batch_id, released, after, now)


def publish(worker: Worker, assignment: Any, report: dict[str, Any] | None, folder: str | None) -> dict[str, Any]:
    """Rank 0: the trained weights into the store as the batch's version and the batch completed, as the
    one-batch job does it (train_job.publish_version); on failure the batch is failed."""
    from cluster.train_job import publish_version
    from recorder import queries
    from trainer.memory import peak_memory_gb, reset_peak

    spec = assignment.spec
    reset_peak()
    outcome: dict[str, Any] = {"index": assignment.index, "batch_id": spec.batch_id, "version": spec.target_version}
    try:
        if folder is None or report is None:
            raise RuntimeError(f"batch {spec.batch_id} left no checkpoint to publish")
        metrics = {k: v for k, v in report.items() if isinstance(v, int | float)}
        try:
            parent = queries.get_version(worker.engine, assignment.parent_version)
        except KeyError:
            parent = None  # version 0, the base model, may be unregistered
        artifact = publish_version(
            worker.config, worker.store, spec.batch_id, spec.target_version, parent, Path(folder), metrics,
            base_model=spec.base_model,
        )  # fmt: skip
        metrics["publish_peak_rss_gb"] = peak_memory_gb()["peak_rss_gb"]  # the merge's, if it merges
        queries.complete_batch(
            worker.engine, spec.batch_id, spec.target_version, artifact_uri=str(artifact), metrics=metrics
        )
        log.info("version %d ready at %s", spec.target_version, artifact)
        return {**outcome, "ok": True, "artifact": str(artifact)}
    except Exception as exc:
        error = f"publishing version {spec.target_version} failed: {type(exc).__name__}: {exc}"
        log.error("batch %d: %s", spec.batch_id, error)
        try:
            queries.fail_batch(worker.engine, spec.batch_id, error)
        except queries.BatchStateConflict as conflict:  # the controller failed it meanwhile: that stands
            log.warning("batch %d: %s", spec.batch_id, conflict)
        return {**outcome, "ok": False, "error": error}


def serve_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker of the service: `loop_config` holds the config (JSON), the service's name and
    namespace, the model store and the poll interval. Returns when the service says stop."""
    import ray
    import ray.train

    from cluster.config import ZigguratConfig
    from cluster.logs import configure_logging
    from trainer.loop import read_checkpoint, worker_layout

    configure_logging()
    config = ZigguratConfig.model_validate_json(loop_config["config"])
    rank, world, device = worker_layout(config.trainer)
    service = ray.get_actor(loop_config["service"], namespace=loop_config["namespace"])
    poll_s = float(loop_config["poll_s"])
    worker = Worker(
        config, service, Path(loop_config["store"]), rank, world, device, config.database.create_engine(),
        call_timeout_s=config.ray.call_timeout_s,
    )  # fmt: skip
    # A restarted group: the last checkpoint, used if it belongs to the batch the service says is unfinished.
    resume_dir, state = read_checkpoint(ray.train.get_checkpoint())
    index = ray.get(service.first_unfinished.remote(), timeout=worker.call_timeout_s)
    try:
        while True:
            reply = None
            while reply is None:  # idle: no collective runs, so no collective timeout can trip
                reply = ray.get(
                    service.next_batch.remote(index, rank, timeout_s=poll_s), timeout=poll_s + worker.call_timeout_s
                )
            _release_note(worker, reply.get("previous"))
            if reply.get("stop"):
                return
            assignment = reply["assignment"]
            mine = state.get("index") == assignment.index and state.get("batch_id") == assignment.spec.batch_id
            if state and not mine:  # an earlier batch's checkpoint: that batch is finished
                state, resume_dir = {}, _discard(resume_dir)
            if mine:
                log.info("batch %d: resuming after update %d", assignment.spec.batch_id, state["updates_done"])
            serve_one(worker, assignment, resume_dir, state)
            state, resume_dir = {}, _discard(resume_dir)
            index += 1
    finally:
        _discard(resume_dir)
        worker.engine.dispose()


def _discard(folder: str | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
