"""The persistent trainer: Ray Train workers that stay up between batches, model and optimizer loaded.

`TrainerService` is a detached named actor (`<controller>-trainer`) that runs ONE `TorchTrainer.fit()` in a
background thread for as long as it lives. `submit(batch_id)` does what the one-batch job (cluster.train_job)
does before its fit(): checks the batch has something to train, moves it pending -> running with its new
version registered (`ray_job_id` = `job_id(config)`), and queues it. The workers long-poll the actor for the
next assignment (no collective runs while they idle, so an idle service never trips the collective timeout),
train it, and rank 0 publishes the version and completes the batch exactly as the job does
(`train_job.publish_version`). A batch whose parent is the version the workers just produced trains on the
model and optimizer they hold; any other (the first, or after a rollback) is built from its parent's folder.

Failures: a batch that cannot be loaded, built or published is failed on its row and the workers carry on.
Every update is checkpointed (weights, optimizer, pre-batch log-probs, batch and queue position), so a killed
worker makes Ray Train restart the group (FailureConfig) and the new group resumes that batch where it was.
When fit() itself ends (failures exhausted), every batch still open in the queue is failed with its error.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from typing import Any

import ray

from cluster.config import ZigguratConfig

log = logging.getLogger("ziggurat.trainer_service")

SERVICE_PREFIX = "service:"  # batch.ray_job_id of batches the service trains
POLL_S = 5.0  # how long one worker's next_batch call waits for an assignment before asking again


def config_fingerprint(config: ZigguratConfig) -> str:
    """What tells a service started from another configuration (a changed learning rate, database or model)
    from one this configuration may reuse."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]


def service_name(config: ZigguratConfig) -> str:
    return f"{config.controller.name}-trainer"


def job_id(config: ZigguratConfig) -> str:
    """What a batch row the service trains stores as `ray_job_id`."""
    return SERVICE_PREFIX + service_name(config)


class ServiceStopped(RuntimeError):
    """The service's workers have ended (stopped, or failed past trainer.max_failures): it takes no batch."""


class TrainerService:
    """Create with `ensure`; every method is a remote call the caller waits on with a deadline."""

    def __init__(self, config_json: str) -> None:
        from transformers import AutoConfig

        from cluster.logs import configure_logging
        from cluster.models import resolve_model
        from cluster.train_job import _store_dir
        from recorder.migrate import check_schema

        configure_logging()
        self._config = config = ZigguratConfig.model_validate_json(config_json)
        self._engine = config.database.create_engine()
        check_schema(self._engine)
        self._base = resolve_model(config.model)
        model_config = AutoConfig.from_pretrained(self._base)
        pad = model_config.pad_token_id if model_config.pad_token_id is not None else model_config.eos_token_id
        self._pad = pad or 0
        self._store = _store_dir(config)
        self._cond = threading.Condition()
        self._submitting = threading.Lock()  # one submit at a time: queue order = start order
        self._queue: list[Any] = []  # BatchAssignment, in the order the workers take them
        self._outcomes: dict[int, dict[str, Any]] = {}  # queue index -> what became of it (rank 0 says)
        self._handed = -1  # highest queue index any worker has been given
        self._polled: dict[int, float] = {}  # rank -> when it last asked for work (monotonic)
        self._stopping = False
        self._running, self._error = True, None
        self._started = time.monotonic()
        self.run_name = f"service-{service_name(config)}-{uuid.uuid4().hex[:8]}"
        self._thread = threading.Thread(target=self._fit, name="trainer-service-fit", daemon=True)
        self._thread.start()

    # ---- the long-running fit() -------------------------------------------------------------------
    def _fit(self) -> None:
        from ray.train import CheckpointConfig

        from cluster.train_job import torch_trainer
        from cluster.trainer_worker import serve_loop_per_worker

        settings = self._config.trainer
        error: str | None = None
        try:
            trainer = torch_trainer(
                settings,
                serve_loop_per_worker,
                {
                    "config": self._config.model_dump_json(),
                    "service": service_name(self._config),
                    "namespace": self._config.ray.namespace,
                    "store": str(self._store),
                    "poll_s": POLL_S,
                },
                self.run_name,  # unique per service start: a new service never restores an old run
                self._store,
                # a checkpoint per update for as long as the service lives: keep the last two, not all
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            )
            result = trainer.fit()
            if result.error is not None:
                error = f"{type(result.error).__name__}: {result.error}"
        except BaseException as exc:  # fit() raises once the workers failed past trainer.max_failures
            error = f"{type(exc).__name__}: {exc}"
        with self._cond:
            self._running, self._error = False, error
            self._cond.notify_all()
        if error:
            log.error("trainer service %s: its workers ended: %s", self.run_name, error)
        self._fail_open(f"the trainer service's workers ended before training it: {error or 'stopped'}")

    def _fail_open(self, error: str) -> None:
        """Fail every queued batch that no worker finished (their rows may still be open)."""
        with self._cond:
            open_ones = [a for a in self._queue if a.index not in self._outcomes]
        self._fail_listed(open_ones, error)

    # ---- the controller's side ----------------------------------------------------------------------
    def submit(self, batch_id: int) -> int:
        """Start a pending batch (pending -> running, its version registered) and queue it for the workers;
        returns the version it trains. NothingToTrain (the batch failed, its groups released) as the job."""
        from cluster.train_job import _prepare, _release_unstarted
        from recorder import queries
        from trainer.spec import BatchAssignment, TrainJobSpec

        with self._submitting:
            with self._cond:
                if not self._running or self._stopping:
                    raise ServiceStopped(self._stopped_reason())
            prepared = _prepare(self._config, self._engine, batch_id)
            assert prepared is not None  # a given batch is never claimed: None only comes from claiming
            batch_id, parent_number, parent = prepared
            try:
                version = queries.start_batch(
                    self._engine,
                    batch_id,
                    base_model=self._base,
                    kind=self._config.trainer.mode,
                    parent_version=parent_number,
                    ray_job_id=job_id(self._config),
                )
            except BaseException as exc:
                _release_unstarted(self._engine, batch_id, exc)
                raise
            spec = TrainJobSpec(
                trainer=self._config.trainer,
                database=self._config.database,
                batch_id=batch_id,
                base_model=self._base,
                init_from=parent["artifact_uri"] if parent else None,
                target_version=version,
                pad_token_id=self._pad,
            )
            with self._cond:
                stopped = not self._running or self._stopping
                if not stopped:
                    self._queue.append(BatchAssignment(len(self._queue), spec, parent_number))
                    self._cond.notify_all()
            if stopped:  # the workers ended while it started: nobody would ever train it
                queries.fail_batch(self._engine, batch_id, f"the trainer service stopped: {self._stopped_reason()}")
                raise ServiceStopped(self._stopped_reason())
        log.info("batch %d queued for the trainer service (version %d)", batch_id, version)
        return version

    def stop(self) -> None:
        """End the workers' loop once the batch they are on is done (and so fit()); batches queued behind it
        are failed, their groups released."""
        with self._cond:
            self._stopping = True
            # indexes are positions: what no worker was given yet is the queue's tail
            dropped = [a for a in self._queue[self._handed + 1 :] if a.index not in self._outcomes]
            self._queue = self._queue[: self._handed + 1]
            self._cond.notify_all()
        self._fail_listed(dropped, "the trainer service was stopped before it trained this batch")

    def alive(self) -> dict[str, Any]:
        """Whether fit() still runs, the batch the workers are on, batches done, the error it ended with."""
        with self._cond:
            current = next((a for a in self._queue if a.index not in self._outcomes and a.index <= self._handed), None)
            now = time.monotonic()
            idle = sorted(rank for rank, at in self._polled.items() if now - at < 2 * POLL_S)
            return {
                "running": self._running,
                "stopping": self._stopping,
                # every rank has asked for work once: the worker group is up (a busy one asks again later)
                "ready": self._running and len(self._polled) >= self._config.trainer.num_workers,
                "workers_seen": sorted(self._polled),
                "workers_idle": idle,
                "batch_id": current.spec.batch_id if current else None,
                "queued": [a.spec.batch_id for a in self._queue if a.index not in self._outcomes],
                "batches_done": sum(1 for o in self._outcomes.values() if o.get("ok")),
                "batches_failed": sum(1 for o in self._outcomes.values() if not o.get("ok")),
                "error": self._error,
                "run_name": self.run_name,
                "config": config_fingerprint(self._config),
                "up_s": round(now - self._started, 1),
            }

    # ---- the workers' side ------------------------------------------------------------------------
    def first_unfinished(self) -> int:
        """Queue index a (re)started worker group begins at: the batch in progress when the last one died."""
        with self._cond:
            return next((i for i in range(len(self._queue) + 1) if i not in self._outcomes), len(self._queue))

    def next_batch(self, index: int, rank: int, timeout_s: float = POLL_S) -> dict[str, Any] | None:
        """The assignment at `index` once the one before it is finished, with that one's outcome (every rank
        gets the same answer); `{"stop": True}` when the service stops; None if nothing came in `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                self._polled[rank] = time.monotonic()
                previous_done = index == 0 or (index - 1) in self._outcomes
                if previous_done and index < len(self._queue):
                    self._handed = max(self._handed, index)
                    return {"assignment": self._queue[index], "previous": self._outcomes.get(index - 1)}
                if previous_done and self._stopping:
                    return {"stop": True, "previous": self._outcomes.get(index - 1)}
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def finished(self, index: int, outcome: dict[str, Any]) -> None:
        """Rank 0: what became of assignment `index` ({"ok", "version", "error"}); the next one may start."""
        with self._cond:
            self._outcomes[index] = outcome
            self._cond.notify_all()

    # ---- helpers ------------------------------------------------------------------------------------
    def _stopped_reason(self) -> str:
        if self._error:
            return f"its workers ended with {self._error}; start it again (trainer_service.ensure)"
        return "it was stopped; start it again (trainer_service.ensure)"

    def _fail_listed(self, assignments: list[Any], error: str) -> None:
        from recorder import queries

        for assignment in assignments:
            try:
                queries.fail_batch(self._engine, assignment.spec.batch_id, error)
            except queries.BatchStateConflict:
                pass  # ended meanwhile (completed by rank 0, failed by the controller): that stands


# ---- what the controller calls -------------------------------------------------------------------------
def find(config: ZigguratConfig) -> Any | None:
    """The running service's handle, or None if there is none."""
    try:
        return ray.get_actor(service_name(config), namespace=config.ray.namespace)
    except ValueError:
        return None


def status(config: ZigguratConfig, timeout_s: float | None = None) -> dict[str, Any] | None:
    """The service's `alive()` (running, batch, batches done, error), None if there is no service; a service
    that does not answer in time reads as not running, with the reason."""
    handle = find(config)
    if handle is None:
        return None
    try:
        return ray.get(handle.alive.remote(), timeout=timeout_s or config.ray.call_timeout_s)
    except (ray.exceptions.RayError, TimeoutError) as exc:
        return {"running": False, "ready": False, "error": f"the trainer service does not answer: {exc}"}


def serving(config: ZigguratConfig, batch_id: int) -> bool:
    """Whether the running service has `batch_id` queued or in progress: the liveness of a batch whose
    `ray_job_id` is `job_id(config)` (a new service, or none, means its job is gone)."""
    state = status(config)
    return bool(state and state["running"] and batch_id in state.get("queued", ()))


def _start(config: ZigguratConfig) -> Any:
    return (
        ray.remote(TrainerService)
        .options(
            name=service_name(config),
            namespace=config.ray.namespace,
            lifetime="detached",
            get_if_exists=True,  # two callers starting it at once get the same one
            num_cpus=0,
            max_restarts=0,  # the controller starts a new one (ensure): a restart would lose the queue anyway
            # every rank long-polls next_batch at once, and submit/alive/stop must still answer
            max_concurrency=config.trainer.num_workers + 8,
        )
        .remote(config.model_dump_json())
    )


def _kill(config: ZigguratConfig, handle: Any, timeout_s: float) -> None:
    """Kill the service and wait (up to `timeout_s`) until its name is free for a new one."""
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while find(config) is not None and time.monotonic() < deadline:
        time.sleep(0.2)


def ensure(config: ZigguratConfig, timeout_s: float = 300.0) -> Any:
    """The service, started if there is none (or if the one there has ended), once all its workers are up
    and asking for batches; TimeoutError if they are not within `timeout_s`, ServiceStopped if they ended."""
    handle = find(config)
    if handle is not None:
        state = status(config)
        if not state or not state["running"] or state.get("stopping"):
            log.info("trainer service ended (%s): starting a new one", (state or {}).get("error") or "stopped")
            _kill(config, handle, timeout_s=30)
            handle = None
        elif state.get("config") != config_fingerprint(config):
            # a detached service outlives a loop that crashed; one left from another configuration would
            # train this run's batches with that run's settings
            log.warning("trainer service %s was started from another configuration: replacing it", state["run_name"])
            stop(config, timeout_s=timeout_s)
            handle = None
    if handle is None:
        handle = _start(config)
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            state = ray.get(handle.alive.remote(), timeout=max(left, 1.0))
        except ray.exceptions.RayActorError as exc:  # __init__ failed: no model, no database, ...
            raise ServiceStopped(f"the trainer service could not start: {exc}") from exc
        except ray.exceptions.GetTimeoutError:
            state = {"running": True, "ready": False, "workers_seen": []}
        if state["ready"]:
            return handle
        if not state["running"]:
            raise ServiceStopped(f"the trainer service's workers ended while starting: {state['error']}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the trainer service's {config.trainer.num_workers} workers were not all up within {timeout_s} s "
                f"(ranks that asked for a batch: {state.get('workers_seen')}); it is left running: check the "
                "cluster has the workers' resources (trainer.resources_per_worker), or stop it (stop(config))"
            )
        time.sleep(0.5)


def submit(config: ZigguratConfig, batch_id: int, timeout_s: float | None = None) -> int:
    """Hand a pending batch to the running service; returns the version it trains (registered, training)."""
    handle = find(config)
    if handle is None:
        raise ServiceStopped(f"no trainer service {service_name(config)} is running; start it with ensure(config)")
    return ray.get(handle.submit.remote(batch_id), timeout=timeout_s or config.ray.call_timeout_s)


def stop(config: ZigguratConfig, timeout_s: float = 120.0) -> None:
    """Stop the service: the workers finish the batch they are on (queued ones are failed), then the actor
    goes; after `timeout_s` it goes anyway (its batch then fails by the controller's recovery)."""
    handle = find(config)
    if handle is None:
        return
    deadline = time.monotonic() + timeout_s
    try:
        ray.get(handle.stop.remote(), timeout=config.ray.call_timeout_s)
        while time.monotonic() < deadline:
            if not ray.get(handle.alive.remote(), timeout=config.ray.call_timeout_s)["running"]:
                break
            time.sleep(0.5)
    except (ray.exceptions.RayError, TimeoutError) as exc:
        log.warning("trainer service did not stop cleanly (%s); killing it", exc)
    _kill(config, handle, timeout_s=30)
