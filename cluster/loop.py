"""The closed loop on one config: agents act, a trained model replaces the served one, agents get better.

    start Ray, the recorder, `rollout.actors` rollout actors and the controller
    evaluate the served version on the held-out scenarios
    repeat `controller.iterations` times:
        play `groups_per_iteration` training scenarios (GRPO groups, judged as they finish)
        controller.train()    -> claims a batch when ready, runs the Ray Train job, registers version N
        controller.evaluate() -> version N on the held-out scenarios, before anyone serves it
        controller.deploy()   -> hot-swap version N into every rollout actor
    write report.json and reward.png

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
from cluster.controller import rollout_actor_name, start_controller

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


def start_rollout_actors(config: ZigguratConfig, model_path: str) -> dict[str, Any]:
    """The named rollout actors (existing ones are reused), all started before returning."""
    from rollout.actor import RolloutWorker

    actors = {}
    for index in range(config.rollout.actors):
        name = rollout_actor_name(config, index)
        actors[name] = (
            ray.remote(RolloutWorker)
            .options(
                name=name,
                namespace=config.ray.namespace,
                get_if_exists=True,
                max_restarts=3,
                max_concurrency=256,
                num_cpus=0,
            )  # fmt: skip
            .remote(model_path, config.engine, config.recorder, config.judge)
        )
    ray.get([a.ready.remote() for a in actors.values()], timeout=config.engine.start_timeout_s)
    for name, actor in actors.items():
        _keep_alive.setdefault(name, actor)  # the first (owning) handle keeps it alive; later ones borrow
    return actors


def play(config: ZigguratConfig, actors: dict[str, Any], seeds: list[int], desc: str) -> list[dict[str, Any]]:
    """One GRPO group per seed, spread over the actors; returns each group's summary."""
    names = sorted(actors)
    refs = [
        actors[names[i % len(names)]].run_group.remote(**config.rollout.group_call(seed))
        for i, seed in enumerate(seeds)
    ]
    deadline = time.monotonic() + config.controller.call_timeout_s
    results = []
    with tqdm(total=len(refs), desc=desc, unit="group") as bar:
        pending = refs
        while pending:
            done, pending = ray.wait(pending, timeout=max(deadline - time.monotonic(), 0))
            if not done:
                raise TimeoutError(f"{len(pending)} rollout groups missed controller.call_timeout_s")
            results += ray.get(done, timeout=10)
            bar.update(len(done))
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
        return ray.get(getattr(controller, method).remote(*args), timeout=timeout)

    call("recover", timeout=settings.training_timeout_s)
    call("sync_workers")
    served = call("deployed_version")
    evaluations = {served: call("evaluate", served)["mean_reward"]} if rollout.eval_seeds else {}
    iterations = []
    next_seed = rollout.train_seed_start
    for iteration in range(1, settings.iterations + 1):
        seeds = list(range(next_seed, next_seed + rollout.groups_per_iteration))
        next_seed += rollout.groups_per_iteration
        groups = play(config, actors, seeds, f"iteration {iteration}: rollouts")
        rewards = [r for g in groups for r in g["rewards"]]
        entry: dict[str, Any] = {
            "iteration": iteration,
            "served_version": served,
            "train_mean_reward": _mean(rewards),
            "episodes": len(rewards),
            "tokens_per_s": _mean([g["tokens_per_s"] for g in groups]),
        }
        log.info("iteration %d: mean reward %s on version %d; training", iteration, entry["train_mean_reward"], served)
        outcome = call("train", timeout=settings.training_timeout_s + 60)
        entry["training"] = outcome
        if outcome.get("trained"):
            version = outcome["version"]
            # Adapters are evaluated before anyone serves them; full weights can only be sampled once swapped in.
            before = config.trainer.mode == "lora" and settings.evaluate_before_deploy
            if rollout.eval_seeds and before:
                evaluations[version] = call("evaluate", version)["mean_reward"]
            worse = evaluations.get(version, 0.0) < evaluations.get(served, float("-inf"))
            if settings.deploy_only_if_better and before and worse:
                entry["deployed"] = False
            else:
                entry["swap"] = call("deploy", version)
                entry["deployed"], served = True, version
                if rollout.eval_seeds and not before:
                    evaluations[version] = call("evaluate", version)["mean_reward"]
        iterations.append(entry)
    from cluster.report import version_rewards, write_report
    from recorder.store import create_db_engine

    db = create_db_engine(config.database.resolved_url())
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
        "iterations": iterations,
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
    _keep_alive.clear()
