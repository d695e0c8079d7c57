"""The closed loop on one config: agents act, a trained model replaces the served one, agents get better.

    start Ray, the recorder, `rollout.actors` rollout actors and the controller
    evaluate the served version on the held-out scenarios
    repeat `controller.iterations` times:
        play `groups_per_iteration` training scenarios (GRPO groups, judged as they finish)
        controller.settle_canaries() -> a canary from the last iteration is promoted or rolled back on reward
        controller.train()    -> claims a batch when ready, runs the Ray Train job, registers version N
        controller.evaluate() -> version N on the held-out scenarios, before anyone serves it
        controller.deploy()   -> hot-swap version N into every rollout actor (or, as a canary, into some)
    a canary deployed by the last iteration gets one more rollout round and is settled
    write report.json and reward.png (with the version each actor really serves, from controller.health)

Everything runs through the named actors, so `ziggurat status` in another shell sees the same state.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from cluster.config import ZigguratConfig
from cluster.controller import ControllerError, rollout_actor_name, start_controller

log = logging.getLogger("ziggurat.loop")

# Ray destroys a non-detached actor once no handle to it is left, even a named one: the actors a loop
# starts stay alive (and reachable by name from `ziggurat status`) until `shutdown`.
_keep_alive: dict[str, Any] = {}


def serving_config(config: ZigguratConfig) -> ZigguratConfig:
    """LoRA versions are hot-swapped as adapters, so the engines must accept adapters of the trained rank."""
    if config.trainer.mode != "lora":
        return config
    rank = max(config.engine.max_lora_rank, config.trainer.lora.rank)
    engine = config.engine.model_copy(update={"enable_lora": True, "max_lora_rank": rank})
    return config.model_copy(update={"engine": engine})


def rollout_placement_name(config: ZigguratConfig) -> str:
    return f"{config.controller.name}-rollout"


def rollout_placement(config: ZigguratConfig) -> Any:
    """The rollout actors' placement group (one bundle per actor), created and ready, or None if not asked for.
    Named, so a restarted driver reuses it instead of reserving the GPUs twice."""
    from ray.util.placement_group import get_placement_group, placement_group

    rollout = config.rollout
    if rollout.placement_strategy is None:
        return None
    name = rollout_placement_name(config)
    try:
        group = get_placement_group(name)
    except ValueError:
        bundle = {**rollout.actor_resources, **({"GPU": rollout.gpus_per_actor} if rollout.gpus_per_actor else {})}
        group = placement_group(
            [dict(bundle) for _ in range(rollout.actors)],
            strategy=rollout.placement_strategy,
            name=name,
            lifetime="detached" if config.controller.detached else None,
        )
    try:
        ray.get(group.ready(), timeout=config.engine.start_timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(
            f"the rollout placement group ({rollout.actors} x {group.bundle_specs[0]}) could not be placed within "
            f"engine.start_timeout_s: the cluster lacks those resources (check `ray status` and ray_cluster.yaml)"
        ) from None
    return group


def start_rollout_actors(config: ZigguratConfig, model_path: str) -> dict[str, Any]:
    """The named rollout actors (existing ones are reused), all started before returning."""
    from rollout.actor import RolloutWorker

    rollout = config.rollout
    placement = rollout_placement(config)
    actors = {}
    for index in range(rollout.actors):
        name = rollout_actor_name(config, index)
        scheduling = {}
        if placement is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            scheduling["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement, index)
        actors[name] = (
            ray.remote(RolloutWorker)
            .options(
                name=name,
                namespace=config.ray.namespace,
                get_if_exists=True,
                max_restarts=3,
                max_concurrency=256,
                num_cpus=0,
                num_gpus=rollout.gpus_per_actor,
                resources=rollout.actor_resources or None,
                **scheduling,
            )  # fmt: skip
            .remote(model_path, config.engine, config.recorder, config.judge)
        )
    ray.get([a.ready.remote() for a in actors.values()], timeout=config.engine.start_timeout_s)
    for name, actor in actors.items():
        _keep_alive.setdefault(name, actor)  # the first (owning) handle keeps it alive; later ones borrow
    return actors


_ACTOR_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


def _lost_with_actor(exc: BaseException) -> bool:
    """A group that failed because its actor crashed (or came back and is not yet restored), not on its own."""
    from rollout.actor import RolloutRestarted

    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
    return isinstance(exc, _ACTOR_LOST) or isinstance(cause, RolloutRestarted)


def wait_until_back(actor: Any, method: str, timeout_s: float, call_timeout_s: float = 10.0) -> Any:
    """Call `method` on a restarting actor until it answers (each try within `call_timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(getattr(actor, method).remote(), timeout=call_timeout_s)
        except (*_ACTOR_LOST, ray.exceptions.GetTimeoutError) as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"actor did not come back within {timeout_s:.0f} s ({type(exc).__name__})") from exc
            time.sleep(0.5)


def play(
    config: ZigguratConfig, actors: dict[str, Any], seeds: list[int], desc: str, controller: Any = None
) -> list[dict[str, Any]]:
    """One GRPO group per seed, spread over the actors; returns each group's summary.

    A group lost with a crashed actor is played again (a new group, same seed) once the actor is back and the
    controller has restored the version it serves, up to `controller.group_retries` times. What the lost group
    had recorded stays in the database as an unfinished trajectory, which is never trained on. A group with a
    failed episode (recorded as failed, the group left unjudged) is played again the same way."""
    names = sorted(actors)
    settings = config.controller

    def submit(seed: int, name: str) -> Any:
        return actors[name].run_group.remote(**config.rollout.group_call(seed))

    pending = {submit(seed, names[i % len(names)]): (seed, names[i % len(names)], 0) for i, seed in enumerate(seeds)}
    deadline = time.monotonic() + settings.call_timeout_s
    results = []
    with tqdm(total=len(seeds), desc=desc, unit="group") as bar:
        while pending:
            done, _ = ray.wait(list(pending), timeout=max(deadline - time.monotonic(), 0))
            if not done:
                raise TimeoutError(f"{len(pending)} rollout groups missed controller.call_timeout_s")
            for ref in done:
                seed, name, tries = pending.pop(ref)
                try:
                    group = ray.get(ref, timeout=10)
                except Exception as exc:
                    if not _lost_with_actor(exc) or tries >= settings.group_retries:
                        raise
                    log.warning("group %d lost with actor %s (%s); replaying it", seed, name, type(exc).__name__)
                else:
                    if not group.get("failed"):
                        results.append(group)
                        bar.update(1)
                        continue
                    if tries >= settings.group_retries:
                        raise RuntimeError(
                            f"group {seed} on {name} had failed episodes in {tries + 1} tries (controller."
                            f"group_retries: {settings.group_retries}); last errors: {group['errors'][:3]}. Fix what "
                            "they name, or raise controller.group_retries if the failures are transient"
                        )
                    errors = group["errors"][:1]
                    log.warning("group %d on %s had failed episodes (%s); replaying it", seed, name, errors)
                wait_until_back(actors[name], "health", settings.restart_timeout_s)
                if controller is not None:
                    ray.get(controller.sync_workers.remote(), timeout=settings.call_timeout_s)
                pending[submit(seed, name)] = (seed, name, tries + 1)
    return results


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run_loop(config: ZigguratConfig, out_dir: Path) -> dict[str, Any]:
    from cluster.models import resolve_model
    from cluster.ray_runtime import init_ray
    from recorder.actor import start_recorder
    from recorder.migrate import upgrade

    started = time.perf_counter()
    config = serving_config(config)
    settings, rollout = config.controller, config.rollout
    init_ray(config.ray)
    if config.database.auto_upgrade:
        upgrade(config.database.resolved_url())
    _keep_alive.setdefault(config.recorder.actor_name, start_recorder(config.database, config.recorder))
    model_path = resolve_model(config.model)
    actors = start_rollout_actors(config, model_path)
    controller = _keep_alive.setdefault(config.controller.name, start_controller(config))

    def call(method: str, *args: Any, timeout: float = settings.call_timeout_s) -> Any:
        """A controller call, made again if the controller crashed under it (these calls are idempotent)."""
        for attempt in range(settings.group_retries + 1):
            try:
                return ray.get(getattr(controller, method).remote(*args), timeout=timeout)
            except _ACTOR_LOST:
                if attempt == settings.group_retries:
                    raise
                log.warning("the controller crashed during %s; calling it again once it is back", method)
                wait_until_back(controller, "recover", settings.restart_timeout_s, settings.training_timeout_s)
                call("sync_workers")

    def train() -> dict[str, Any]:
        """controller.train; if the controller crashes meanwhile, its restart picks the job up from the database."""
        try:
            return ray.get(controller.train.remote(), timeout=settings.training_timeout_s + 60)
        except _ACTOR_LOST:
            log.warning("the controller crashed during training; its restart picks the job up")
        resumed = wait_until_back(controller, "recover", settings.restart_timeout_s, settings.training_timeout_s)
        call("sync_workers")
        return resumed[-1] if resumed else call("train", timeout=settings.training_timeout_s + 60)

    def served_versions() -> dict[str, int | None]:
        """What each rollout actor really serves (a canary serves on some of them only)."""
        return call("health")["served_versions"]

    call("recover", timeout=settings.training_timeout_s)
    call("sync_workers")
    served = call("deployed_version")
    evaluations = {served: call("evaluate", served)["mean_reward"]} if rollout.eval_seeds else {}
    iterations = []
    next_seed = rollout.train_seed_start

    def next_seeds() -> list[int]:
        nonlocal next_seed
        next_seed += rollout.groups_per_iteration
        return list(range(next_seed - rollout.groups_per_iteration, next_seed))

    for iteration in range(1, settings.iterations + 1):
        actors_served = served_versions()
        groups = play(config, actors, next_seeds(), f"iteration {iteration}: rollouts", controller)
        rewards = [r for g in groups for r in g["rewards"]]
        entry: dict[str, Any] = {
            "iteration": iteration,
            "served_version": served,
            "served_versions": actors_served,
            "train_mean_reward": _mean(rewards),
            "episodes": len(rewards),
            "tokens_per_s": _mean([g["tokens_per_s"] for g in groups]),
        }
        # A canary lives for one rollout round: decided now, on that round's rewards, before anything trains.
        settled = call("settle_canaries", True)
        if settled:
            entry["canary_settled"], served = settled, call("deployed_version")
            entry["deployed_after_settling"], entry["served_versions_after_settling"] = served, served_versions()
        log.info("iteration %d: mean reward %s on version %d; training", iteration, entry["train_mean_reward"], served)
        outcome = train()
        entry["training"] = outcome
        if outcome.get("trained"):
            version = outcome["version"]
            # Adapters are evaluated before anyone serves them; full weights can only be sampled once swapped in.
            before = config.trainer.mode == "lora" and not config.serves_merged() and settings.evaluate_before_deploy
            if rollout.eval_seeds and before:
                evaluations[version] = call("evaluate", version)["mean_reward"]
            worse = evaluations.get(version, 0.0) < evaluations.get(served, float("-inf"))
            if settings.deploy_only_if_better and before and worse:
                entry["deployed"] = False
            else:
                try:
                    entry["swap"] = call("deploy", version)
                except ControllerError as exc:  # e.g. its parent was rolled back while it trained
                    entry["deployed"], entry["deploy_error"] = False, str(exc)
                    iterations.append(entry)
                    continue
                entry["canary"] = entry["swap"]["canary"]
                entry["deployed"] = not entry["canary"]  # a canary is deployed once it is promoted
                if entry["deployed"]:
                    served = version
                if rollout.eval_seeds and not before:
                    evaluations[version] = call("evaluate", version)["mean_reward"]
        iterations.append(entry)
    canary_round = None
    if any(v["status"] == "canary" for v in call("versions")):  # the last iteration's canary gets its round too
        groups = play(config, actors, next_seeds(), "canary round", controller)
        canary_round = {
            "train_mean_reward": _mean([r for g in groups for r in g["rewards"]]),
            "settled": call("settle_canaries", True),
        }
        served = call("deployed_version")
    from cluster.report import version_rewards, write_report

    db = config.database.create_engine()
    try:
        versions = version_rewards(db)
    finally:
        db.dispose()
    evals = {v["version"]: v["eval_mean_reward"] for v in versions}
    report = {
        "model": model_path,
        "environment": rollout.env,
        "seed": config.engine.seed,
        "eval_seeds": rollout.eval_seeds,
        "base_eval_mean_reward": evals.get(0),
        "final_version": served,
        "final_eval_mean_reward": evals.get(served),
        "served_versions": served_versions(),
        "iterations": iterations,
        "canary_round": canary_round,
        "versions": versions,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    report["report_files"] = write_report(report, out_dir)
    return report


def shutdown(config: ZigguratConfig) -> None:
    """Flush and stop the rollout actors, the controller and the recorder started by `run_loop`."""
    from recorder.actor import stop_recorder

    namespace = config.ray.namespace
    for index in range(config.rollout.actors):
        try:
            actor = ray.get_actor(rollout_actor_name(config, index), namespace=namespace)
        except ValueError:
            continue
        try:
            ray.get(actor.close.remote(), timeout=120)
        except Exception as exc:  # a busy or dead actor: what it had not flushed is reported, not waited on
            log.warning("rollout actor %d did not close cleanly (%s: %s)", index, type(exc).__name__, exc)
        finally:
            ray.kill(actor, no_restart=True)
    for name in (config.controller.name,):
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        except ValueError:
            pass
    try:
        stop_recorder(ray.get_actor(config.recorder.actor_name, namespace=namespace))
    except ValueError:
        pass
    if config.rollout.placement_strategy is not None:
        from ray.util.placement_group import get_placement_group, remove_placement_group

        try:
            remove_placement_group(get_placement_group(rollout_placement_name(config)))
        except ValueError:
            pass
    _keep_alive.clear()
