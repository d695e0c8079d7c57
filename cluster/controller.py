"""The controller: readiness, training jobs, model versions, hot-swap, rollback and health.

A named Ray actor whose state that matters lives in the database (batches with their job ids and
progress, versions with their statuses), so a restarted controller carries on where the last one stopped:
`recover()` finds training jobs that were running, waits for live ones and fails dead ones.

Hot-swap is two-phase: every target rollout actor loads the version first (`prepare`), and only if all of
them did within `controller.swap_timeout_s` does any of them flip (`activate`). In-flight episodes finish
on the version they started with (the engine pins it per episode). Rollout actors are found by name
(`<controller>-rollout-<i>`), so they survive a controller restart and the other way round.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import ray

from cluster import training
from cluster.config import ZigguratConfig

log = logging.getLogger("ziggurat.controller")

LIVE_STATUSES = ("ready", "canary", "deployed", "retired", "rolled_back")  # versions that can be served


class SwapFailed(RuntimeError):
    """A version could not be loaded by every target actor in time; nobody switched to it."""


class ControllerError(RuntimeError):
    """A controller request that cannot be carried out; the message says why and what to do."""


def rollout_actor_name(config: ZigguratConfig, index: int) -> str:
    return f"{config.controller.name}-rollout-{index}"


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


class Controller:
    """Create with `start_controller`; every method is a remote call with a deadline on the caller's side."""

    def __init__(self, config: ZigguratConfig) -> None:
        from cluster.logs import configure_logging
        from cluster.models import resolve_model
        from recorder import queries
        from recorder.migrate import check_schema
        from recorder.store import create_db_engine

        configure_logging()
        self.config = config
        self.db = create_db_engine(config.database.resolved_url())
        check_schema(self.db)
        self.base_model = resolve_model(config.model)
        queries.ensure_base_version(self.db, self.base_model)
        self.store = Path(config.model.store_dir).expanduser().resolve()
        self._metrics = _Metrics()
        self._training: dict[int, Any] = {}  # batch id -> result ref of a job this incarnation launched

    # ---- rollout actors -------------------------------------------------------------------------
    def _workers(self) -> dict[str, Any]:
        """The rollout actors that exist now, by name (missing ones are reported by `health`)."""
        found = {}
        for index in range(self.config.rollout.actors):
            name = rollout_actor_name(self.config, index)
            try:
                found[name] = ray.get_actor(name, namespace=self.config.ray.namespace)
            except ValueError:
                continue
        return found

    def _gather(self, refs: dict[str, Any], timeout_s: float) -> tuple[dict[str, Any], dict[str, str]]:
        """Results by name, and errors by name (a missed deadline is an error)."""
        results, errors = {}, {}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        ready_set = set(ready)
        for name, ref in refs.items():
            if ref not in ready_set:
                errors[name] = f"no answer within {timeout_s:.0f} s"
                continue
            try:
                results[name] = ray.get(ref, timeout=0)
            except Exception as exc:  # an actor error is reported per actor, never raised past the swap
                errors[name] = f"{type(exc).__name__}: {exc}"
        return results, errors

    # ---- versions -------------------------------------------------------------------------------
    def _merged(self, version: dict[str, Any]) -> bool:
        """Served as the adapter merged into the base weights (engine.lora_serving: merged)."""
        return version["kind"] == "lora" and self.config.serves_merged()

    def _served_artifact(self, version: dict[str, Any]) -> tuple[str | None, str]:
        """What rollout actors load to serve `version`, and as what kind: the adapter, or (with
        engine.lora_serving: merged) the adapter merged into the base weights, served as full weights."""
        from trainer.model import MERGED_DIR

        if self._merged(version):
            return self._artifact(version, subfolder=MERGED_DIR), "full"
        return self._artifact(version), version["kind"]

    def _artifact(self, version: dict[str, Any], subfolder: str | None = None) -> str | None:
        """The version's folder, which must lie inside the model store (never load from elsewhere)."""
        if version["kind"] == "base":
            return None
        uri = version["artifact_uri"]
        path = Path(uri or "").expanduser().resolve()
        if subfolder is not None:
            path = (path / subfolder).resolve()
        if not uri or not path.is_relative_to(self.store):
            raise ControllerError(f"version {version['version']}'s artifact {uri!r} is outside the model store")
        if not path.is_dir():
            raise ControllerError(f"version {version['version']}'s folder {path} does not exist")
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        if pickles:
            raise ControllerError(
                f"version {version['version']}'s folder {path} holds pickled files {pickles}; only safetensors "
                "weights are served (loading a pickle runs arbitrary code)"
            )
        expected = "adapter_config.json" if version["kind"] == "lora" and subfolder is None else "config.json"
        if not (path / expected).is_file() or not any(path.glob("*.safetensors")):
            raise ControllerError(
                f"version {version['version']}'s folder {path} holds no {expected} and safetensors weights"
            )
        return str(path)

    def deployed_version(self) -> int:
        from recorder import queries

        deployed = [v["version"] for v in queries.list_versions(self.db, status="deployed")]
        return max(deployed) if deployed else 0

    def versions(self) -> list[dict[str, Any]]:
        from recorder import queries

        return [
            {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
            for row in queries.list_versions(self.db)
        ]

    # ---- hot-swap -------------------------------------------------------------------------------
    def deploy(self, version: int, canary_fraction: float | None = None) -> dict[str, Any]:
        """Load `version` into the target actors, then flip them all; nobody flips if any load fails."""
        from recorder import queries

        row = queries.get_version(self.db, version)
        if row["status"] not in LIVE_STATUSES:
            raise ControllerError(f"version {version} is {row['status']}; only {', '.join(LIVE_STATUSES)} deploy")
        artifact, kind = self._served_artifact(row)
        workers = self._workers()
        if not workers:
            raise ControllerError("no rollout actors are running; start them (ziggurat run) before deploying")
        fraction = self.config.controller.canary_fraction if canary_fraction is None else canary_fraction
        canary = 0 < fraction < 1
        names = sorted(workers)
        targets = names[: max(1, math.ceil(fraction * len(names)))] if canary else names
        started = time.perf_counter()
        loaded, errors = self._gather(
            {n: workers[n].prepare.remote(version, artifact, kind) for n in targets},
            self.config.controller.swap_timeout_s,
        )
        if errors:
            self._gather({n: workers[n].unload.remote(version) for n in loaded}, self.config.controller.swap_timeout_s)
            self._metrics.swaps.inc(1, tags={"outcome": "failed"})
            if row["status"] == "ready":  # a fresh version that cannot be loaded is unusable
                queries.update_version(self.db, version, status="failed", metrics={"swap_errors": errors})
            raise SwapFailed(f"version {version} was not loaded by {sorted(errors)}: {errors}; nobody switched")
        load_s = time.perf_counter() - started
        previous, errors = self._gather(
            {n: workers[n].activate.remote(version) for n in targets}, self.config.controller.swap_timeout_s
        )
        swap_s = time.perf_counter() - started
        if errors:  # activation is a pointer switch in the actor; failing here means the actor died
            self._metrics.swaps.inc(1, tags={"outcome": "partial"})
            raise SwapFailed(f"version {version} loaded everywhere but {sorted(errors)} did not switch: {errors}")
        for name in targets:
            self._metrics.served.set(version, tags={"actor": name})
        if canary:
            queries.update_version(self.db, version, status="canary", metrics={"canary_actors": targets})
        else:
            for other in queries.list_versions(self.db, status="deployed"):
                if other["version"] != version:
                    queries.update_version(self.db, other["version"], status="retired")
            queries.update_version(self.db, version, status="deployed", metrics={"deploy_swap_s": round(swap_s, 4)})
            self._metrics.deployed.set(version)
        self._metrics.swaps.inc(1, tags={"outcome": "canary" if canary else "deployed"})
        log.info("version %d serving on %s (load %.3f s, swap %.3f s)", version, targets, load_s, swap_s)
        return {
            "version": version,
            "actors": targets,
            "previous": previous,
            "canary": canary,
            "load_s": load_s,
            "swap_s": swap_s,
        }

    def settle_canary(self, version: int, min_episodes: int = 8) -> dict[str, Any]:
        """Promote a canary version to every actor if its episodes since the canary began score at least the
        deployed version's (within `controller.canary_tolerance`), else roll it back."""
        import sqlalchemy as sa

        from recorder import queries
        from recorder.schema import Trajectory

        row = queries.get_version(self.db, version)
        if row["status"] != "canary":
            raise ControllerError(f"version {version} is {row['status']}, not a canary")
        deployed = self.deployed_version()
        t = Trajectory.__table__
        with self.db.connect() as conn:
            rows = conn.execute(
                sa.select(t.c.model_version, sa.func.avg(t.c.total_reward), sa.func.count())
                .where(
                    t.c.status == "finished",
                    t.c.is_eval.is_(False),
                    t.c.started_at >= row["updated_at"],
                    t.c.model_version.in_([version, deployed]),
                )
                .group_by(t.c.model_version)
            ).all()
        means = {v: (float(mean), count) for v, mean, count in rows}
        if min(means.get(version, (0, 0))[1], means.get(deployed, (0, 0))[1]) < min_episodes:
            return {"decided": False, "episodes": {v: c for v, (_, c) in means.items()}, "needed": min_episodes}
        canary_mean, deployed_mean = means[version][0], means[deployed][0]
        outcome = {"canary_mean_reward": canary_mean, "deployed_mean_reward": deployed_mean, "decided": True}
        if canary_mean >= deployed_mean - self.config.controller.canary_tolerance:
            return {**outcome, "promoted": True, **self.deploy(version, canary_fraction=1.0)}
        result = self.deploy(deployed, canary_fraction=1.0)
        queries.update_version(self.db, version, status="rolled_back", metrics={"canary": outcome})
        return {**outcome, "promoted": False, **result}

    def rollback(self, version: int | None = None) -> dict[str, Any]:
        """Serve `version` (default: the newest earlier version that was deployed) and mark the current
        one rolled back."""
        from recorder import queries

        current = self.deployed_version()
        canaries = [v["version"] for v in queries.list_versions(self.db, status="canary")]
        if version is None:
            earlier = [v["version"] for v in queries.list_versions(self.db, status="retired") if v["version"] < current]
            version = max(earlier) if earlier else 0
            if canaries and not earlier:  # rolling back a canary means returning to what is deployed
                version = current
        result = self.deploy(version)
        for bad in {current, *canaries} - {version}:
            queries.update_version(self.db, bad, status="rolled_back")
        return {**result, "rolled_back": sorted({current, *canaries} - {version})}

    def sync_workers(self) -> dict[str, Any]:
        """Make every rollout actor serve the deployed version (after actors or the controller restarted)."""
        served = self.health()["actors"]
        target = self.deployed_version()
        if all(a.get("served_version") == target for a in served.values() if a.get("alive")):
            return {"version": target, "changed": False}
        return {**self.deploy(target), "changed": True}

    # ---- readiness and training -----------------------------------------------------------------
    def readiness(self) -> dict[str, Any]:
        """Whether a batch can be claimed now, and for every unmet condition, what is missing."""
        from recorder import queries

        settings, trainer = self.config.controller, self.config.trainer
        min_version = 0
        if trainer.max_staleness is not None:
            min_version = max(0, self.deployed_version() - trainer.max_staleness)
        ready = queries.readiness(self.db, trainer.reward_source, trainer.min_group_size, min_version)
        unmet = []
        if ready.groups_with_variance < settings.min_groups:
            unmet.append(
                f"trainable groups: {ready.groups_with_variance} of {settings.min_groups} needed "
                f"({ready.groups} judged groups, {ready.groups - ready.groups_with_variance} too small or with "
                f"equal rewards; {ready.finished - ready.judged} finished but not judged by "
                f"'{trainer.reward_source}'; {ready.failed_quality} failed the quality gate; {ready.stale} older "
                f"than version {min_version})"
            )
        running = queries.list_batches(self.db, statuses=("pending", "running"))
        if running:
            unmet.append(f"training batch {running[0]['id']} is still {running[0]['status']}")
        self._metrics.trainable.set(ready.groups_with_variance)
        return {"ready": not unmet, "unmet": unmet, "min_version": min_version, **ready.__dict__}

    def train(self) -> dict[str, Any]:
        """Claim a batch and train it as an in-cluster job; wait for it. Returns the outcome."""
        from recorder import queries

        self.recover()
        readiness = self.readiness()
        if not readiness["ready"]:
            return {"trained": False, "unmet": readiness["unmet"]}
        trainer = self.config.trainer
        batch_id = queries.claim_batch(
            self.db,
            max_groups=trainer.batch_max_groups,
            min_group_size=trainer.min_group_size,
            reward_source=trainer.reward_source,
            min_version=readiness["min_version"],
        )
        if batch_id is None:
            return {"trained": False, "unmet": ["another claimer took the trainable groups"]}
        # The job id goes on the row before the job starts, so a controller that dies in between leaves a
        # batch whose job `recover` can look for (and fail, finding none).
        queries.mark_batch(self.db, batch_id, "pending", ray_job_id=training.job_id(self.config, batch_id))
        self._training[batch_id] = training.launch(self.config, batch_id)
        log.info("training batch %d in-cluster", batch_id)
        return self.wait_training(batch_id)

    def wait_training(self, batch_id: int) -> dict[str, Any]:
        """Follow a batch's job through its database row until it ends, dies, or passes its deadline."""
        from recorder import queries

        settings = self.config.controller
        deadline = time.monotonic() + settings.training_timeout_s
        while True:
            batch = queries.get_batch(self.db, batch_id)
            progress = (batch["stats"] or {}).get("progress", {})
            self._metrics.progress.set(float(progress.get("fraction", 0.0)))
            if batch["status"] in ("completed", "failed"):
                break
            ref = self._training.get(batch_id)
            if ref is not None and ray.wait([ref], timeout=0)[0]:
                try:
                    ray.get(ref, timeout=0)
                except Exception as exc:  # the job's own error is already on the row; this is a fallback
                    self._fail_batch(batch, f"training job failed: {type(exc).__name__}: {exc}")
                continue
            if ref is None and training.find(self.config, batch["ray_job_id"]) is None:
                self._fail_batch(batch, f"training job {batch['ray_job_id']} is gone (its process died)")
                continue
            if time.monotonic() > deadline:
                training.stop(self.config, batch["ray_job_id"])
                self._fail_batch(
                    batch, f"training passed controller.training_timeout_s ({settings.training_timeout_s} s)"
                )
                continue
            time.sleep(settings.poll_interval_s)
        self._training.pop(batch_id, None)
        training.stop(self.config, batch["ray_job_id"])
        version = batch["target_version"]
        outcome = {"trained": batch["status"] == "completed", "batch_id": batch_id, "version": version}
        if batch["status"] == "failed":
            outcome["error"] = batch["error"]
        return outcome

    def _fail_batch(self, batch: dict[str, Any], error: str) -> None:
        from recorder import queries

        log.error("batch %d: %s", batch["id"], error)
        queries.mark_batch(self.db, batch["id"], "failed", error=error, release=True)
        if batch["target_version"] is not None:
            queries.update_version(self.db, batch["target_version"], status="failed", metrics={"error": error})

    def recover(self) -> list[dict[str, Any]]:
        """Pick up training jobs a previous controller left: wait for live ones, fail dead ones."""
        from recorder import queries

        outcomes = []
        for batch in queries.list_batches(self.db, statuses=("pending", "running")):
            if batch["id"] in self._training:
                continue
            if training.find(self.config, batch["ray_job_id"]) is None:
                self._fail_batch(batch, f"training job {batch['ray_job_id']!r} was lost with the controller")
                outcomes.append({"trained": False, "batch_id": batch["id"], "recovered": "failed"})
            else:
                log.info("batch %d: picking up running job %s", batch["id"], batch["ray_job_id"])
                outcomes.append({**self.wait_training(batch["id"]), "recovered": "resumed"})
        return outcomes

    # ---- evaluation, health, status -------------------------------------------------------------
    def evaluate(self, version: int) -> dict[str, Any]:
        """Play the held-out scenarios on `version` (loaded for the purpose, not served) and record the
        mean reward on the version."""
        from recorder import queries

        rollout = self.config.rollout
        workers = self._workers()
        if not workers:
            raise ControllerError("no rollout actors are running to evaluate on")
        row = queries.get_version(self.db, version)
        names = sorted(workers)
        if self._merged(row):
            if version != self.deployed_version():  # merged weights can only be sampled once swapped in
                raise ControllerError(
                    f"version {version} is not deployed; with engine.lora_serving: merged a LoRA version is "
                    "evaluated after it is deployed"
                )
        else:
            artifact = self._artifact(row)
            self._gather(
                {n: workers[n].prepare.remote(version, artifact) for n in names},
                self.config.controller.swap_timeout_s,
            )
        refs = {
            f"{seed}": workers[names[i % len(names)]].run_group.remote(
                **rollout.group_call(seed, evaluation=True), version=version
            )
            for i, seed in enumerate(rollout.eval_seeds)
        }
        groups, errors = self._gather(refs, self.config.controller.call_timeout_s)
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

    def health(self) -> dict[str, Any]:
        """Rollout actors alive and generating, database reachable, training state."""
        import sqlalchemy as sa

        from recorder import queries

        workers = self._workers()
        answers, errors = self._gather({n: w.health.remote() for n, w in workers.items()}, 10.0)
        actors: dict[str, dict[str, Any]] = {n: {"alive": True, **a} for n, a in answers.items()}
        actors.update({n: {"alive": False, "error": e} for n, e in errors.items()})
        for index in range(self.config.rollout.actors):
            actors.setdefault(rollout_actor_name(self.config, index), {"alive": False, "error": "not running"})
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
        return {
            "deployed_version": self.deployed_version(),
            "readiness": self.readiness(),
            "health": self.health(),
            "versions": [
                {k: v[k] for k in ("version", "status", "kind", "training_batch_id")} | {"metrics": v["metrics"]}
                for v in self.versions()
            ],
        }


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
