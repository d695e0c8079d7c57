"""The controller: readiness, training jobs, model versions, deploy policy, hot-swap, rollback and health.

A named Ray actor whose state that matters lives in the database (batches with their job ids and
progress, versions with their statuses), so a restarted controller carries on where the last one stopped:
`recover()` finds training jobs that were running, waits for live ones and fails dead ones.

Hot-swap (two-phase: everyone loads, then everyone flips), canaries and restoring restarted actors are in
cluster/hotswap.py, which this class inherits. Rollout actors are found by name on every call
(cluster.fleet.RolloutFleet.attach), so they survive a controller restart and the other way round.

The deploy policy is here too, so the loop and `ziggurat deploy` follow the same rules: `release(version)`
evaluates a new version before anyone serves it where it can (an adapter, not merged), refuses it if it is
worse than the deployed one (`controller.deploy_only_if_better`), deploys it (fully or as a canary), and
evaluates full and merged versions once they are served.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import ray
from sqlalchemy.exc import DBAPIError

from cluster import training
from cluster.config import ZigguratConfig
from cluster.fleet import RolloutFleet, gather
from cluster.hotswap import HotSwap
from cluster.live import LiveLoop
from cluster.live_steering import LiveSteering
from recorder.errors import is_connectivity

log = logging.getLogger("ziggurat.controller")

LIVE_STATUSES = ("ready", "canary", "deployed", "retired", "rolled_back")  # versions that can be served

# Serialises claiming a batch and launching its job against `recover` in this process: the actor runs up to
# 8 calls at once, and recover must never fail a batch that train() claimed a moment ago but has not yet
# recorded as its own. Across processes the database keeps one open batch per parent.
_CLAIMING = threading.Lock()


class SwapFailed(RuntimeError):
    """A version could not be loaded by every target actor in time; nobody switched to it."""


class ControllerError(RuntimeError):
    """A controller request that cannot be carried out; the message says why and what to do."""


class _Metrics:
    """Gauges and counters on Ray's metrics endpoint (exported with a `ray_` prefix)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge

        self.served = Gauge("ziggurat_served_version", "Model version each rollout actor serves", tag_keys=("actor",))
        self.deployed = Gauge("ziggurat_deployed_version", "Model version the controller has deployed")
        self.progress = Gauge("ziggurat_training_progress", "Fraction of the running training job done")
        self.swaps = Counter("ziggurat_swaps", "Hot-swaps by outcome", tag_keys=("outcome",))
        self.eval_reward = Gauge("ziggurat_eval_mean_reward", "Held-out mean reward per version", tag_keys=("version",))
        self.trainable = Gauge("ziggurat_trainable_groups", "Groups ready for training")


class Controller(HotSwap, LiveSteering):
    """Create with `start_controller`; every method is a remote call with a deadline on the caller's side."""

    def __init__(self, config: ZigguratConfig) -> None:
        from cluster.logs import configure_logging
        from cluster.models import resolve_model
        from recorder import queries
        from recorder.migrate import check_schema

        configure_logging()
        self.config = config
        self.db = config.database.create_engine()
        check_schema(self.db)
        self.base_model = resolve_model(config.model)
        queries.ensure_base_version(self.db, self.base_model)
        self.store = Path(config.model.store_dir).expanduser().resolve()
        self._metrics = _Metrics()
        self._training: dict[int, Any] = {}  # batch id -> result ref of a job this incarnation launched
        # (done, total) of the latest evaluation (groups) and training job (updates), for `progress()`
        self._evaluating: list[int] | None = None
        self._trained: tuple[float, float] | None = None
        self._live: LiveLoop | None = None  # controller.mode: live (cluster.live)
        self._out_of_service: dict[str, str] = {}  # rollout actor -> why a rolling swap took it out of traffic
        if _restarted_actor():
            self.resume_live_after_restart()  # live mode: the loop it ran goes on (cluster.live_steering)

    def _fleet(self) -> RolloutFleet:
        """The rollout actors that exist now, by name (missing ones are reported by `health`)."""
        return RolloutFleet.attach(self.config)

    # ---- versions -------------------------------------------------------------------------------
    def deployed_version(self) -> int:
        """The deployed version: what every non-canary actor serves, and what the next version trains from."""
        from recorder import queries

        return queries.deployed_version(self.db)

    def versions(self) -> list[dict[str, Any]]:
        from recorder import queries

        return [
            {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
            for row in queries.list_versions(self.db)
        ]

    # ---- readiness and training -----------------------------------------------------------------
    def readiness(self) -> dict[str, Any]:
        """Whether a batch can be claimed now, and for every unmet condition, what is missing."""
        from recorder import queries

        settings, trainer = self.config.controller, self.config.trainer
        parent = self.deployed_version()  # what a batch claimed now trains from, and is judged stale against
        ready = queries.readiness(
            self.db, trainer.reward_source, trainer.min_group_size, parent_version=parent,
            max_staleness=trainer.max_staleness,
        )  # fmt: skip
        unmet = []
        if ready.groups_with_variance < settings.min_groups:
            flat = ready.groups - ready.groups_with_variance - ready.incomplete_groups
            waiting = (
                f"; {ready.incomplete_groups} waiting for another trajectory to finish, be judged or be complete"
                if ready.incomplete_groups
                else ""
            )
            unmet.append(
                f"trainable groups: {ready.groups_with_variance} of {settings.min_groups} needed "
                f"({ready.groups} judged groups, {flat} too small or with equal rewards{waiting}; "
                f"{ready.finished - ready.judged} finished but not judged by '{trainer.reward_source}'; "
                f"{ready.failed_quality} failed the quality gate; {ready.stale} older than version "
                f"{ready.min_version})"
            )
        running = queries.list_batches(self.db, statuses=("pending", "running"))
        if running:
            unmet.append(f"training batch {running[0]['id']} is still {running[0]['status']}")
        self._metrics.trainable.set(ready.groups_with_variance)
        open_batch = running[0]["id"] if running else None
        return {"ready": not unmet, "unmet": unmet, "parent_version": parent, "open_batch": open_batch,
                **ready.__dict__}  # fmt: skip

    def train(self) -> dict[str, Any]:
        """Claim a batch and train it as an in-cluster job; wait for it. Returns the outcome."""
        from recorder import queries

        self.recover()
        trainer, self._trained = self.config.trainer, None
        with _CLAIMING:
            readiness = self.readiness()
            if not readiness["ready"]:
                return {"trained": False, "unmet": readiness["unmet"]}
            try:
                batch_id = queries.claim_batch(
                    self.db,
                    max_groups=trainer.batch_max_groups,
                    min_group_size=trainer.min_group_size,
                    reward_source=trainer.reward_source,
                    parent_version=readiness["parent_version"],
                    max_staleness=trainer.max_staleness,
                )
            except queries.BatchInProgress as exc:  # another claimer (`ziggurat train`, a call) got there first
                return {"trained": False, "unmet": [str(exc)]}
            if batch_id is None:
                return {"trained": False, "unmet": ["another claimer took the trainable groups"]}
            # The job id goes on the row before the job starts, so a controller that dies in between leaves a
            # batch whose job `recover` can look for (and fail, finding none).
            if self.config.trains_on_service():
                failed = self._submit_to_service(batch_id)
                if failed is not None:
                    return failed
            else:
                queries.set_batch_job(self.db, batch_id, training.job_id(self.config, batch_id))
                self._training[batch_id] = training.launch(self.config, batch_id)
        log.info("training batch %d in-cluster", batch_id)
        return self.wait_training(batch_id)

    def _submit_to_service(self, batch_id: int) -> dict[str, Any] | None:
        """Hand a claimed batch to the persistent trainer (started if need be); the outcome if it was refused."""
        from cluster import trainer_service
        from recorder import queries

        queries.set_batch_job(self.db, batch_id, trainer_service.job_id(self.config))
        try:
            trainer_service.ensure(self.config, timeout_s=self.config.controller.restart_timeout_s)
            trainer_service.submit(self.config, batch_id, timeout_s=self.config.controller.call_timeout_s)
        except Exception as exc:  # the batch is released for another try; the message says why
            error = f"the persistent trainer did not take batch {batch_id}: {type(exc).__name__}: {exc}"
            self._fail_batch(queries.get_batch(self.db, batch_id), error)
            return {"trained": False, "batch_id": batch_id, "error": error}
        return None

    def wait_training(self, batch_id: int) -> dict[str, Any]:
        """Follow a batch's job through its database row until it ends, dies, or passes its deadline. A database
        outage is waited out (the job goes on without it) for up to controller.live_database_outage_s past it."""
        settings = self.config.controller
        deadline = time.monotonic() + settings.training_timeout_s
        unreachable = False
        while True:
            try:
                batch = self._batch_if_ended(batch_id, deadline)
            except DBAPIError as exc:
                if not is_connectivity(exc):
                    raise
                # past the deadline the batch is failed once the database answers; waiting for that is bounded
                if time.monotonic() > deadline + settings.live_database_outage_s:
                    self._training.pop(batch_id, None)  # a restarted controller's `recover` settles the batch
                    raise
                if not unreachable:
                    log.warning("batch %d: the database is unreachable, still waiting on the job: %s", batch_id, exc)
                unreachable = True
                time.sleep(settings.poll_interval_s)
                continue
            unreachable = False
            if batch is not None:
                break
            time.sleep(settings.poll_interval_s)
        progress = (batch["stats"] or {}).get("progress", {})
        self._training.pop(batch_id, None)
        training.stop(self.config, batch["ray_job_id"])
        version = batch["target_version"]
        outcome = {"trained": batch["status"] == "completed", "batch_id": batch_id, "version": version}
        self._trained = (progress.get("done", 0), progress.get("total", 0)) if progress else None
        if batch["status"] == "failed":
            outcome["error"] = batch["error"]
        return outcome

    def _batch_if_ended(self, batch_id: int, deadline: float) -> dict[str, Any] | None:
        """The batch's row once it is completed or failed; fails it first if its job died or overran."""
        from recorder import queries

        settings = self.config.controller
        while True:
            batch = queries.get_batch(self.db, batch_id)
            progress = (batch["stats"] or {}).get("progress", {})
            self._metrics.progress.set(float(progress.get("fraction", 0.0)))
            if batch["status"] in ("completed", "failed"):
                return batch
            ref = self._training.get(batch_id)
            if ref is not None and ray.wait([ref], timeout=0)[0]:
                try:
                    ray.get(ref, timeout=0)
                except Exception as exc:  # the job's own error is already on the row; this is a fallback
                    self._fail_batch(batch, f"training job failed: {type(exc).__name__}: {exc}")
                continue
            if ref is None and not training.alive(self.config, batch):
                self._fail_batch(batch, f"training job {batch['ray_job_id']} is gone (its process died)")
                continue
            if time.monotonic() > deadline:
                training.stop(self.config, batch["ray_job_id"])
                self._fail_batch(
                    batch, f"training passed controller.training_timeout_s ({settings.training_timeout_s} s)"
                )
                continue
            return None

    def _fail_batch(self, batch: dict[str, Any], error: str) -> bool:
        """Fail an open batch (and its version); False if it ended meanwhile, which then stands: a job that
        completed just before its deadline keeps its version."""
        from recorder import queries

        try:
            queries.fail_batch(self.db, batch["id"], error)
        except queries.BatchStateConflict as exc:
            log.warning("batch %d: not failed (%s): %s", batch["id"], error, exc)
            return False
        log.error("batch %d: %s", batch["id"], error)
        return True

    def recover(self) -> list[dict[str, Any]]:
        """Pick up training jobs a previous controller left: wait for live ones, fail dead ones."""
        from recorder import queries

        outcomes = []
        for batch in queries.list_batches(self.db, statuses=("pending", "running")):
            error = (
                f"training job {batch['ray_job_id']!r} ended without finishing its batch (lost with a controller, "
                "or its last write never reached the database)"
            )
            if not training.is_ours(batch["ray_job_id"]) and not training.overdue(
                batch, self.config.controller.training_timeout_s
            ):
                # someone else's job (`ziggurat train`, a Ray Jobs submission): alive as far as we can tell, and
                # the database refuses a second batch from its parent meanwhile
                outcomes.append({"trained": False, "batch_id": batch["id"], "recovered": "external"})
                continue
            with _CLAIMING:
                if batch["id"] in self._training:
                    continue
                # A job a previous controller launched that never started its batch may never run at all (its
                # caller died before the call reached it): failed and released, never waited on. Were it about to
                # start, the batch's compare-and-set refuses it.
                unstarted = batch["status"] == "pending" and training.is_in_cluster(batch["ray_job_id"])
                if unstarted:
                    training.stop(self.config, batch["ray_job_id"])
                    error = f"training job {batch['ray_job_id']!r} never started its batch before the controller died"
                lost = unstarted or not training.alive(self.config, batch)
                failed = lost and self._fail_batch(batch, error)
            if failed:
                outcomes.append({"trained": False, "batch_id": batch["id"], "recovered": "failed"})
            elif lost:  # it ended while we looked: report how
                trained = queries.get_batch(self.db, batch["id"])["status"] == "completed"
                ended = {"trained": trained, "batch_id": batch["id"], "version": batch["target_version"]}
                outcomes.append({**ended, "recovered": "ended"})
            else:
                log.info("batch %d: picking up running job %s", batch["id"], batch["ray_job_id"])
                outcomes.append({**self.wait_training(batch["id"]), "recovered": "resumed"})
        return outcomes

    # ---- deploy policy, evaluation, health, status -------------------------------------------------
    def release(
        self, version: int, canary_fraction: float | None = None, defer_evaluation: bool = False
    ) -> dict[str, Any]:
        """Deploy `version` by the config's rules: evaluated first where it can be sampled without being served
        (an adapter, not merged; `controller.evaluate_before_deploy`), refused if that scores below the deployed
        version (`controller.deploy_only_if_better`), deployed (fully or as a canary), and evaluated once served
        if it could not be before. `canary_fraction` as in `deploy`. Returns the evaluation, the swap, `canary`,
        `deployed`, and `reason` when it was not deployed. With `defer_evaluation`, an evaluation due after the
        deploy is left to the caller (`evaluate(version)`; the outcome says `evaluation_deferred`), who can run it
        alongside the next rollout round on the same weights."""
        from recorder import queries

        settings, evaluated = self.config.controller, bool(self.config.rollout.eval_seeds)
        row = queries.get_version(self.db, version)
        before = evaluated and settings.evaluate_before_deploy and row["kind"] == "lora" and not self._merged(row)
        outcome: dict[str, Any] = {"version": version, "deployed": False, "canary": False}
        self._evaluating = None  # progress() counts this release's evaluation, not the last one
        if before:
            outcome["evaluation"] = self.evaluate(version)
            served = self.deployed_version()
            bar = (queries.get_version(self.db, served)["metrics"] or {}).get("eval_mean_reward")
            mean = outcome["evaluation"]["mean_reward"]
            if settings.deploy_only_if_better and served != version and bar is not None and mean < bar:
                outcome["reason"] = (
                    f"held-out mean reward {mean:.4f} is below the deployed version {served}'s {bar:.4f} "
                    "(controller.deploy_only_if_better)"
                )
                queries.update_version(self.db, version, metrics={"not_deployed": outcome["reason"]})
                return outcome
        try:
            outcome["swap"] = self.deploy(version, canary_fraction)
        except ControllerError as exc:  # e.g. its parent was rolled back while it trained
            return {**outcome, "reason": str(exc)}
        outcome["canary"] = outcome["swap"]["canary"]
        outcome["deployed"] = not outcome["canary"]  # a canary is deployed once it is promoted
        if evaluated and not before:
            if defer_evaluation:
                outcome["evaluation_deferred"] = True
            else:
                outcome["evaluation"] = self.evaluate(version)
        return outcome

    def evaluate(self, version: int) -> dict[str, Any]:
        """Play the held-out scenarios on `version` (loaded for the purpose, not served) and record the
        mean reward on the version. `progress()` counts its groups meanwhile."""
        from recorder import queries

        rollout, settings = self.config.rollout, self.config.controller
        artifact, kind = self._served_artifact(queries.get_version(self.db, version))
        fleet = self._fleet()
        if not fleet:
            raise ControllerError("no rollout actors are running to evaluate on")
        if kind == "full":  # full (or merged) weights can only be sampled where they are swapped in
            served = {n: a.get("served_version") for n, a in fleet.health().items()}
            names = sorted(n for n in fleet if served.get(n) == version)
            if not names:
                raise ControllerError(
                    f"version {version} is served by no rollout actor (they serve {served}); full and merged "
                    "versions are evaluated after they are deployed (or on their canary actors)"
                )
        else:
            names = fleet.names()
            _, errors = fleet.call("prepare", version, artifact, timeout_s=settings.swap_timeout_s, names=names)
            if errors:
                raise ControllerError(f"version {version} could not be loaded for evaluation: {errors}")
        refs = {
            f"{seed}": fleet[names[i % len(names)]].run_group.remote(
                **rollout.group_call(seed, evaluation=True), version=version
            )
            for i, seed in enumerate(rollout.eval_seeds)
        }
        done = self._evaluating = [0, len(refs)]
        groups, errors = gather(refs, settings.call_timeout_s, on_each=lambda: done.__setitem__(0, done[0] + 1))
        if errors:
            raise ControllerError(f"evaluation of version {version} failed on scenarios {sorted(errors)}: {errors}")
        rewards = [r for g in groups.values() for r in g["rewards"]]
        mean = sum(rewards) / max(len(rewards), 1)
        queries.update_version(
            self.db,
            version,
            metrics={"eval_mean_reward": mean, "eval_episodes": len(rewards), "eval_seeds": rollout.eval_seeds},
        )
        self._metrics.eval_reward.set(mean, tags={"version": str(version)})
        return {"version": version, "mean_reward": mean, "episodes": len(rewards)}

    def progress(self) -> dict[str, tuple[float, float] | None]:
        """(done, total) of the latest evaluation (groups) and of the open or latest training job (updates),
        None before the first: cheap enough to poll for a progress bar."""
        from recorder import queries

        trained = self._trained
        for batch in queries.list_batches(self.db, statuses=("pending", "running")):
            done = (batch["stats"] or {}).get("progress", {})
            trained = (done.get("done", 0), done.get("total", self.config.trainer.updates_per_batch))
        evaluating = self._evaluating
        return {"evaluation": (evaluating[0], evaluating[1]) if evaluating else None, "training": trained}

    def health(self) -> dict[str, Any]:
        """Rollout actors alive and generating, database reachable, training state."""
        import sqlalchemy as sa

        from recorder import queries

        actors = self._fleet().health()
        try:
            with self.db.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            database: dict[str, Any] = {"reachable": True}
            training_rows = queries.list_batches(self.db, statuses=("pending", "running"))
        except Exception as exc:
            database, training_rows = {"reachable": False, "error": f"{type(exc).__name__}: {exc}"}, []
        try:
            recorder = ray.get_actor(self.config.recorder.actor_name, namespace=self.config.ray.namespace)
            recorder_state: dict[str, Any] = {"alive": True, **ray.get(recorder.stats.remote(), timeout=10)}
        except Exception as exc:
            recorder_state = {"alive": False, "error": f"{type(exc).__name__}: {exc}"}
        return {
            "actors": actors,
            "served_versions": {n: a.get("served_version") for n, a in actors.items()},
            "out_of_service": self.out_of_service(),
            "database": database,
            "recorder": recorder_state,
            "training": [
                {
                    "batch_id": b["id"],
                    "status": b["status"],
                    "job": b["ray_job_id"],
                    **(b["stats"] or {}).get("progress", {}),
                }
                for b in training_rows
            ],
        }

    def status(self) -> dict[str, Any]:
        """Deployed version, readiness, health (with the version each actor really serves) and versions."""
        return {
            "deployed_version": self.deployed_version(),
            "readiness": self.readiness(),
            "health": self.health(),
            "live": None if self._live is None else {k: v for k, v in self._live.status().items() if k != "events"},
            "versions": [
                {k: v[k] for k in ("version", "status", "kind", "training_batch_id")} | {"metrics": v["metrics"]}
                for v in self.versions()
            ],
        }


def _restarted_actor() -> bool:
    """Whether this is a controller actor Ray restarted after a crash (False in a driver, as in tests)."""
    try:
        return ray.get_runtime_context().was_current_actor_reconstructed
    except Exception:  # asked outside a Ray actor process
        return False


def start_controller(config: ZigguratConfig) -> Any:
    """The named controller actor (an existing one is reused), restarted by Ray if it dies."""
    options: dict[str, Any] = {
        "name": config.controller.name,
        "namespace": config.ray.namespace,
        "get_if_exists": True,
        "max_restarts": -1,
        "max_concurrency": 8,  # status and health answer while train() waits on a job
        "num_cpus": 0,
    }
    if config.controller.detached:
        options["lifetime"] = "detached"
    actor = ray.remote(Controller).options(**options).remote(config)
    ray.get(actor.deployed_version.remote(), timeout=config.ray.call_timeout_s)
    return actor
