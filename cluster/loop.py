"""The closed loop on one config: agents act, a trained model replaces the served one, agents get better.

    start Ray, the recorder, the rollout fleet (`rollout.actors` actors) and the controller
    controller.evaluate(deployed version)   -> its score on the held-out scenarios
    repeat `controller.iterations` times:
        fleet.play(`groups_per_iteration` training scenarios)   -> GRPO groups, judged as they finish
        (the evaluation of the version they play on runs alongside; the loop waits for it here)
        controller.settle_canaries()  -> a canary from the last iteration is promoted or rolled back on reward
        controller.train()            -> claims a batch when ready, runs the Ray Train job, registers version N
        controller.release(N)         -> evaluate, deploy (fully or as a canary) or refuse, by the config's rules
                                         (a version evaluated once served is evaluated alongside the next round)
    a canary released by the last iteration gets one more rollout round and is settled
    write report.json and reward.png (with the version each actor really serves, from controller.health)

The loop holds no state the database has: what is deployed and how each version scored are asked of the
controller. Everything runs through named actors, so `ziggurat status` in another shell sees the same state.
Each phase prints one console line (cluster.console), long ones a progress bar, and the loop is one W&B run
(cluster.tracking.LoopTracker).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from cluster import console
from cluster.config import ZigguratConfig
from cluster.controller import start_controller
from cluster.fleet import ACTOR_LOST, RolloutFleet, rollout_actor_name, rollout_placement, wait_until_back

if TYPE_CHECKING:
    from cluster.tracking import LoopTracker

__all__ = ["rollout_actor_name", "rollout_placement", "run_loop", "serving_config", "shutdown"]

# Ray destroys a non-detached actor once no handle to it is left, even a named one: the recorder and the
# controller a loop starts stay alive (and reachable by name from `ziggurat status`) until `shutdown`.
_keep_alive: dict[str, Any] = {}

log = logging.getLogger("ziggurat.loop")


def serving_config(config: ZigguratConfig) -> ZigguratConfig:
    """LoRA versions are hot-swapped as adapters, so the engines must accept adapters of the trained rank."""
    if config.trainer.mode != "lora":
        return config
    rank = max(config.engine.max_lora_rank, config.trainer.lora.rank)
    engine = config.engine.model_copy(update={"enable_lora": True, "max_lora_rank": rank})
    return config.model_copy(update={"engine": engine})


class ControllerClient:
    """The controller actor as the driver calls it: a call lost with a crashed controller is made again once
    it is back (every call the loop makes is idempotent), and the long ones draw a progress bar."""

    def __init__(self, handle: Any, config: ZigguratConfig) -> None:
        self.handle, self.settings = handle, config.controller

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        return self._retried(method, lambda: ray.get(self._remote(method, *args), timeout=timeout or self._timeout))

    def follow(
        self, method: str, *args: Any, desc: str, unit: str, progress: str, timeout: float, started: Any = None
    ) -> Any:
        """`call`, with a bar fed by the controller's `progress()[progress]` ((done, total)) while it runs.
        `started`: the ref of this very call made earlier with `start`, waited on first."""
        first = [started]

        def attempt() -> Any:
            ref, first[0] = first[0], None
            return self._follow(method, args, desc, unit, progress, timeout, ref)

        return self._retried(method, attempt)

    def start(self, method: str, *args: Any) -> Any:
        """Make the call and return its ref without waiting: finish it with `follow(..., started=ref)`."""
        return self._remote(method, *args)

    def train(self) -> dict[str, Any]:
        """controller.train; if the controller crashes meanwhile, its restart picks the job up from the database."""
        timeout = self.settings.training_timeout_s + 60
        try:
            return self._follow("train", (), "training", "update", "training", timeout)
        except ACTOR_LOST:
            console.phase("the controller crashed during training; its restart picks the job up")
        resumed = self._back()
        if resumed:
            return resumed[-1]
        return self.follow("train", desc="training", unit="update", progress="training", timeout=timeout)

    def served_versions(self) -> dict[str, int | None]:
        """What each rollout actor really serves (a canary serves on some of them only)."""
        return self.call("health")["served_versions"]

    @property
    def _timeout(self) -> float:
        return self.settings.call_timeout_s

    def _remote(self, method: str, *args: Any) -> Any:
        return getattr(self.handle, method).remote(*args)

    def _follow(
        self, method: str, args: tuple, desc: str, unit: str, progress: str, timeout: float, ref: Any = None
    ) -> Any:
        def probe() -> tuple[float, float] | None:
            return ray.get(self.handle.progress.remote(), timeout=2)[progress]

        return console.follow(ref or self._remote(method, *args), probe, desc, unit, timeout)

    def _retried(self, method: str, attempt: Callable[[], Any]) -> Any:
        tries = 0
        while True:
            try:
                return attempt()
            except ACTOR_LOST:
                if tries == self.settings.group_retries:
                    raise
                console.phase(f"the controller crashed during {method}; calling it again once it is back")
                tries += 1
                self._back()

    def _back(self) -> list[dict[str, Any]]:
        """Wait for a restarted controller (its `recover` picks up training jobs), then restore the actors."""
        settings = self.settings
        resumed = wait_until_back(self.handle, "recover", settings.restart_timeout_s, settings.training_timeout_s)
        self.call("sync_workers")
        return resumed


def run_loop(config: ZigguratConfig, out_dir: Path) -> dict[str, Any]:
    from cluster.tracking import LoopTracker

    started = time.perf_counter()
    config = serving_config(config)
    if config.controller.mode == "live":  # the controller runs the loop; the driver follows it
        from cluster.live_driver import run_live

        return run_live(config, out_dir)
    phases: dict[str, float] = {}
    # the base version's evaluation plays alongside the first rollout round, if there is one
    alongside = config.controller.evaluate_alongside_rollouts and config.controller.iterations > 0
    with timed(phases, "start"):
        fleet, controller, model_path = start(config)
    tracker = LoopTracker(config, out_dir, enabled=config.controller.wandb)
    try:
        with timed(phases, "start"):
            controller.call("recover", timeout=config.controller.training_timeout_s)
            controller.call("sync_workers")
        evaluation = None
        if config.rollout.eval_seeds:
            with timed(phases, "base_evaluation"):
                evaluation = evaluate(controller, tracker, controller.call("deployed_version"), wait=not alongside)
        seeds = SeedCounter(config)
        iterations = []
        for number in range(1, config.controller.iterations + 1):
            last = number == config.controller.iterations
            entry, evaluation = iteration(number, fleet, controller, tracker, seeds.take(), evaluation, not last)
            iterations.append(entry)
        canary_round = None
        if any(v["status"] == "canary" for v in controller.call("versions")):  # the last iteration's canary
            with timed(phases, "canary_round"):
                canary_round = play_canary_round(fleet, controller, tracker, len(iterations) + 1, seeds.take())
        for entry in iterations:
            for phase, seconds in entry["phases_s"].items():
                phases[phase] = round(phases.get(phase, 0.0) + seconds, 1)
        return write(config, controller, model_path, iterations, canary_round, out_dir, started, tracker.run_id, phases)
    finally:
        tracker.finish()


def start(config: ZigguratConfig) -> tuple[RolloutFleet, ControllerClient, str]:
    """Ray, the database schema, the recorder, the rollout fleet and the controller, all up."""
    from cluster.models import resolve_model
    from cluster.ray_runtime import init_ray
    from recorder.actor import start_recorder
    from recorder.migrate import upgrade

    console.phase(f"starting Ray, the recorder, {config.rollout.actors} rollout actor(s) and the controller")
    init_ray(config.ray)
    if config.database.auto_upgrade:
        upgrade(config.database.resolved_url())
    _keep_alive.setdefault(config.recorder.actor_name, start_recorder(config.database, config.recorder))
    model_path = resolve_model(config.model)
    fleet = RolloutFleet.start(config, model_path)
    handle = _keep_alive.setdefault(config.controller.name, start_controller(config))
    if config.gateway.enabled:
        from cluster import gateway_service

        gateway_service.start(config, model_path)
    return fleet, ControllerClient(handle, config), model_path


@contextmanager
def timed(phases: dict[str, float], phase: str) -> Iterator[None]:
    """Add the block's wall time to phases[phase] (seconds, 0.1 s), for report.json's per-phase times."""
    began = time.perf_counter()
    try:
        yield
    finally:
        phases[phase] = round(phases.get(phase, 0.0) + time.perf_counter() - began, 1)


class SeedCounter:
    """Training scenarios are numbered on from `rollout.train_seed_start`, never played twice in a loop."""

    def __init__(self, config: ZigguratConfig) -> None:
        self.next, self.size = config.rollout.train_seed_start, config.rollout.groups_per_iteration

    def take(self) -> list[int]:
        self.next += self.size
        return list(range(self.next - self.size, self.next))


def iteration(
    number: int,
    fleet: RolloutFleet,
    controller: ControllerClient,
    tracker: LoopTracker,
    seeds: list[int],
    evaluation: PendingEvaluation | None = None,
    next_round: bool = False,
) -> tuple[dict[str, Any], PendingEvaluation | None]:
    """Play (alongside `evaluation` of the served version, if one runs), settle the last canary, train, release:
    one entry of report.json's `iterations`, with each phase's wall time in `phases_s` (`evaluation`: the time
    the evaluation ran on after the rollouts; release: the swap, and the new version's evaluation unless it is
    left running for the `next_round`, returned)."""
    served, actors_served = controller.call("deployed_version"), controller.served_versions()
    entry: dict[str, Any] = {"iteration": number, "served_version": served, "served_versions": actors_served}
    phases: dict[str, float] = {}
    with timed(phases, "rollouts"):
        entry.update(rollouts(fleet, controller, tracker, seeds, f"iteration {number}: rollouts", number, served))
    if evaluation is not None:  # before anything changes what is served or trains
        with timed(phases, "evaluation"):
            finish_evaluation(controller, tracker, evaluation)
    # A canary lives for one rollout round: decided now, on that round's rewards, before anything trains.
    settled = settle(controller)
    if settled:
        entry["canary_settled"] = settled
        entry["deployed_after_settling"] = controller.call("deployed_version")
        entry["served_versions_after_settling"] = controller.served_versions()
    with timed(phases, "training"):
        entry["training"] = outcome = train(controller, tracker, fleet.config, number)
    evaluation = None
    if outcome.get("trained"):
        with timed(phases, "release"):
            released, evaluation = release(controller, tracker, outcome["version"], next_round)
            entry.update(released)
    entry["phases_s"] = phases
    return entry, evaluation


def rollouts(
    fleet: RolloutFleet,
    controller: ControllerClient,
    tracker: LoopTracker,
    seeds: list[int],
    desc: str,
    number: int,
    served: int,
) -> dict[str, Any]:
    """One rollout round on the fleet; its mean reward, episodes and throughput."""
    groups = fleet.play(seeds, desc, controller.handle)
    rewards = [r for g in groups for r in g["rewards"]]
    stats = {
        "train_mean_reward": _mean(rewards),
        "episodes": len(rewards),
        "tokens_per_s": _mean([g["tokens_per_s"] for g in groups]),
    }
    console.phase(f"{desc}: mean reward {_fmt(stats['train_mean_reward'])} over {len(rewards)} episodes")
    tracker.log_rollouts(number, served, stats["train_mean_reward"], len(rewards), stats["tokens_per_s"])
    return stats


def settle(controller: ControllerClient) -> list[dict[str, Any]]:
    """controller.settle_canaries(final): every canary is promoted or rolled back now, on its round's rewards."""
    settled = controller.call("settle_canaries", True)
    for canary in settled:
        verdict = "promoted" if canary.get("promoted") else "rolled back"
        console.phase(f"canary version {canary['canary_version']} {verdict}: {canary['reason']}")
    return settled


def train(controller: ControllerClient, tracker: LoopTracker, config: ZigguratConfig, number: int) -> dict[str, Any]:
    """controller.train, then the finished batch's numbers to W&B."""
    from recorder import queries

    console.phase(f"iteration {number}: training on the judged groups")
    outcome = controller.train()
    if not outcome.get("trained"):
        console.phase(f"iteration {number}: no new version ({outcome.get('error') or outcome.get('unmet')})")
        return outcome
    console.phase(f"iteration {number}: trained batch {outcome['batch_id']} -> version {outcome['version']}")
    if tracker.enabled:
        try:  # tracking observes: a failed read of the batch's numbers never ends a run that trained
            db = config.database.create_engine()
            try:
                tracker.log_training(outcome["version"], queries.get_batch(db, outcome["batch_id"]))
            finally:
                db.dispose()
        except Exception as exc:
            log.warning("batch %s not logged to W&B: %s: %s", outcome["batch_id"], type(exc).__name__, exc)
    return outcome


@dataclass
class PendingEvaluation:
    """A held-out evaluation left running on the controller (`controller.evaluate_alongside_rollouts`)."""

    version: int
    ref: Any


def evaluate(
    controller: ControllerClient, tracker: LoopTracker, version: int, wait: bool = True
) -> PendingEvaluation | None:
    """controller.evaluate(version); with `wait` False it is started and returned, for `finish_evaluation`."""
    pending = PendingEvaluation(version, controller.start("evaluate", version))
    if not wait:
        console.phase(f"evaluating version {version} alongside the next rollout round")
        return pending
    finish_evaluation(controller, tracker, pending)
    return None


def finish_evaluation(controller: ControllerClient, tracker: LoopTracker, pending: PendingEvaluation | None) -> None:
    """Wait for an evaluation (called again if the controller crashed meanwhile) and log its score."""
    if pending is None:
        return
    version, timeout = pending.version, controller.settings.call_timeout_s
    desc = f"evaluating version {version}"
    result = controller.follow(
        "evaluate", version, desc=desc, unit="group", progress="evaluation", timeout=timeout, started=pending.ref
    )
    _evaluated(tracker, result)


def release(
    controller: ControllerClient, tracker: LoopTracker, version: int, next_round: bool = False
) -> tuple[dict[str, Any], PendingEvaluation | None]:
    """controller.release: evaluated, then deployed (fully or as a canary) or refused, by the config's rules.
    An evaluation due once the version serves is started and returned, not waited for, when a `next_round` of
    rollouts is to play alongside it (`controller.evaluate_alongside_rollouts`)."""
    desc, timeout = f"releasing version {version}", 3 * controller.settings.call_timeout_s
    defer = next_round and controller.settings.evaluate_alongside_rollouts
    outcome = controller.follow(
        "release", version, None, defer, desc=desc, unit="group", progress="evaluation", timeout=timeout
    )
    if "evaluation" in outcome:
        _evaluated(tracker, outcome["evaluation"])
    if "swap" in outcome:
        swap = outcome["swap"]
        tracker.log_swap(version, swap)
        where = "as a canary on" if outcome["canary"] else "deployed to"
        console.phase(f"version {version} {where} {', '.join(swap['actors'])} (swap {swap['swap_s']:.2f} s)")
    entry = {k: outcome[k] for k in ("deployed", "canary", "swap") if k in outcome}
    if "reason" in outcome:
        console.phase(f"version {version} not deployed: {outcome['reason']}")
        entry["not_deployed"] = outcome["reason"]
    pending = None
    if outcome.get("evaluation_deferred"):
        pending = evaluate(controller, tracker, version, wait=False)
    return entry, pending


def play_canary_round(
    fleet: RolloutFleet, controller: ControllerClient, tracker: LoopTracker, number: int, seeds: list[int]
) -> dict[str, Any]:
    """The rollout round a canary released by the last iteration is settled on (logged as round `number`)."""
    served = controller.call("deployed_version")
    stats = rollouts(fleet, controller, tracker, seeds, "canary round", number, served)
    return {"train_mean_reward": stats["train_mean_reward"], "settled": settle(controller)}


def write(
    config: ZigguratConfig,
    controller: ControllerClient,
    model_path: str,
    iterations: list[dict[str, Any]],
    canary_round: dict[str, Any] | None,
    out_dir: Path,
    started: float,
    wandb_run_id: str | None,
    phases: dict[str, float] | None = None,
) -> dict[str, Any]:
    """report.json and reward.png: every version's scores from the database, what each actor serves now, and
    the wall time of each phase summed over the run (`phases_s`; each iteration has its own)."""
    from cluster.report import version_rewards, write_report

    db = config.database.create_engine()
    try:
        versions = version_rewards(db)
    finally:
        db.dispose()
    evals = {v["version"]: v["eval_mean_reward"] for v in versions}
    final = controller.call("deployed_version")
    report = {
        "model": model_path,
        "environment": config.rollout.env,
        "seed": config.engine.seed,
        "eval_seeds": config.rollout.eval_seeds,
        "base_eval_mean_reward": evals.get(0),
        "final_version": final,
        "final_eval_mean_reward": evals.get(final),
        "served_versions": controller.served_versions(),
        "iterations": iterations,
        "canary_round": canary_round,
        "versions": versions,
        "wall_s": round(time.perf_counter() - started, 1),
        "phases_s": phases or {},
        "wandb_run_id": wandb_run_id,
    }
    report["report_files"] = write_report(report, out_dir)
    console.phase(f"done: version {final} serves, held-out mean reward {_fmt(evals.get(final))}")
    if phases:
        console.phase(
            "wall time by phase: " + ", ".join(f"{phase} {seconds:.0f} s" for phase, seconds in phases.items())
        )
    return report


def _evaluated(tracker: LoopTracker, result: dict[str, Any]) -> None:
    version, mean, episodes = result["version"], result["mean_reward"], result["episodes"]
    console.phase(f"version {version}: held-out mean reward {_fmt(mean)} over {episodes} episodes")
    tracker.log_evaluation(version, mean, episodes)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def shutdown(config: ZigguratConfig) -> None:
    """Flush and stop the rollout actors, the controller, the persistent trainer and the recorder started by
    `run_loop`. The recorder is stopped even when stopping another part fails: a recorder left running would be
    found by name, still writing to its database, by the next loop in this Ray session."""
    from recorder.actor import stop_recorder

    namespace = config.ray.namespace
    try:
        if config.gateway.enabled:  # first: no more calls, and its ledger stores what it holds
            from cluster import gateway_service

            gateway_service.stop(config)
        RolloutFleet(config, {}).shutdown()
        try:
            ray.kill(ray.get_actor(config.controller.name, namespace=namespace), no_restart=True)
        except ValueError:
            pass
        if config.controller.persistent_trainer:
            from cluster import trainer_service

            if trainer_service.find(config) is not None:
                trainer_service.stop(config)
    finally:
        try:
            stop_recorder(ray.get_actor(config.recorder.actor_name, namespace=namespace))
        except ValueError:
            pass
        _keep_alive.clear()
