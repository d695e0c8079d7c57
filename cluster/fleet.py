"""The rollout actors as one group: started, found by name, called with a deadline, played on, shut down.

The actors are named Ray actors (`<controller>-rollout-<i>`), so the loop that starts them (`RolloutFleet.start`)
and the controller that swaps versions into them (`RolloutFleet.attach`) see the same ones, and either can
restart without the other. A fleet is a mapping of actor name -> handle, in name order.

    fleet = RolloutFleet.start(config, model_path)          # placement group, actors, all ready (with a bar)
    results, errors = fleet.call("health", timeout_s=10)      # errors by name; a missed deadline is an error
    groups = fleet.play(seeds, "iteration 1: rollouts", controller)   # GRPO groups, replayed on a crash
    fleet.shutdown()
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ray

from cluster import console
from cluster.config import ZigguratConfig

log = logging.getLogger("ziggurat.fleet")

# Ray destroys a non-detached actor once no handle to it is left, even a named one: the actors a fleet
# starts stay alive (and reachable by name from `ziggurat status` and the controller) until `shutdown`.
_keep_alive: dict[str, Any] = {}

ACTOR_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


def rollout_actor_name(config: ZigguratConfig, index: int) -> str:
    return f"{config.controller.name}-rollout-{index}"


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


def lost_with_actor(exc: BaseException) -> bool:
    """A call that failed because its actor crashed (or came back and is not yet restored), not on its own."""
    from rollout.actor import RolloutRestarted

    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
    return isinstance(exc, ACTOR_LOST) or isinstance(cause, RolloutRestarted)


def wait_until_back(actor: Any, method: str, timeout_s: float, call_timeout_s: float = 10.0) -> Any:
    """Call `method` on a restarting actor until it answers (each try within `call_timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(getattr(actor, method).remote(), timeout=call_timeout_s)
        except (*ACTOR_LOST, ray.exceptions.GetTimeoutError) as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"actor did not come back within {timeout_s:.0f} s ({type(exc).__name__})") from exc
            time.sleep(0.5)


def gather(
    refs: dict[str, Any], timeout_s: float, on_each: Callable[[], None] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Results by key, and errors by key: a missed deadline is an error, and one failed call never hides the
    others' results. `on_each` is called as each call ends (a progress count)."""
    keys = {ref: key for key, ref in refs.items()}
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while keys:
        done, _ = ray.wait(list(keys), num_returns=1, timeout=max(deadline - time.monotonic(), 0))
        if not done:
            break
        key = keys.pop(done[0])
        try:
            results[key] = ray.get(done[0], timeout=0)
        except Exception as exc:  # reported per key, never raised past the caller
            errors[key] = f"{type(exc).__name__}: {exc}"
        if on_each is not None:
            on_each()
    errors.update({key: f"no answer within {timeout_s:.0f} s" for key in keys.values()})
    return results, errors


class RolloutFleet(Mapping[str, Any]):
    """The named rollout actors of one config, by name. `start` starts them (or reuses running ones); `attach`
    takes the ones running now, as the controller does on every call (a missing one is reported by
    `health`)."""

    def __init__(self, config: ZigguratConfig, actors: dict[str, Any]) -> None:
        self.config = config
        self.actors = dict(sorted(actors.items()))

    # ---- the mapping: name -> handle --------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        return self.actors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.actors)

    def __len__(self) -> int:
        return len(self.actors)

    def names(self) -> list[str]:
        return list(self.actors)

    def expected_names(self) -> list[str]:
        """Every actor the config asks for, running or not."""
        return [rollout_actor_name(self.config, index) for index in range(self.config.rollout.actors)]

    # ---- starting and finding -------------------------------------------------------------------
    @classmethod
    def start(cls, config: ZigguratConfig, model_path: str) -> RolloutFleet:
        """The named rollout actors (existing ones are reused), all ready within engine.start_timeout_s."""
        from rollout.actor import RolloutWorker

        rollout = config.rollout
        placement = rollout_placement(config)
        actors = {}
        for index in range(rollout.actors):
            scheduling = {}
            if placement is not None:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                scheduling["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement, index)
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
                    num_gpus=rollout.gpus_per_actor,
                    resources=rollout.actor_resources or None,
                    **scheduling,
                )  # fmt: skip
                .remote(model_path, config.engine, config.recorder, config.judge)
            )
        fleet = cls(config, actors)
        with console.bar(len(actors), "starting rollout actors", unit="actor") as bar:
            _, errors = fleet.call("ready", timeout_s=config.engine.start_timeout_s, on_each=lambda: bar.update(1))
        if errors:
            raise RuntimeError(f"rollout actors did not start within engine.start_timeout_s: {errors}")
        for name, actor in actors.items():
            _keep_alive.setdefault(name, actor)  # the first (owning) handle keeps it alive; later ones borrow
        return fleet

    @classmethod
    def attach(cls, config: ZigguratConfig) -> RolloutFleet:
        """The rollout actors that exist now, found by name."""
        found = {}
        for index in range(config.rollout.actors):
            name = rollout_actor_name(config, index)
            try:
                found[name] = ray.get_actor(name, namespace=config.ray.namespace)
            except ValueError:
                continue
        return cls(config, found)

    # ---- calling --------------------------------------------------------------------------------
    def call(
        self,
        method: str,
        *args: Any,
        timeout_s: float,
        names: list[str] | None = None,
        on_each: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """`method(*args, **kwargs)` on every actor (or on `names`) at once; results by name and errors by name,
        a missed `timeout_s` counting as an error."""
        targets = self.names() if names is None else names
        refs = {name: getattr(self.actors[name], method).remote(*args, **kwargs) for name in targets}
        return gather(refs, timeout_s, on_each)

    def health(self, timeout_s: float = 10.0) -> dict[str, dict[str, Any]]:
        """Every expected actor by name: `alive` and its own health answer, or `alive: False` and why."""
        answers, errors = self.call("health", timeout_s=timeout_s)
        actors: dict[str, dict[str, Any]] = {n: {"alive": True, **a} for n, a in answers.items()}
        actors.update({n: {"alive": False, "error": e} for n, e in errors.items()})
        for name in self.expected_names():
            actors.setdefault(name, {"alive": False, "error": "not running"})
        return dict(sorted(actors.items()))

    def play(self, seeds: list[int], desc: str, controller: Any = None) -> list[dict[str, Any]]:
        """One GRPO group per seed, spread over the actors; returns each group's summary.

        A group lost with a crashed actor is played again (a new group, same seed) once the actor is back and
        the controller has restored the version it serves, up to `controller.group_retries` times. What the lost
        group had recorded stays in the database as an unfinished trajectory, which is never trained on. A group
        with a failed episode (recorded as failed, the group left unjudged) is played again the same way."""
        config, settings, names = self.config, self.config.controller, self.names()

        def submit(seed: int, name: str) -> Any:
            return self.actors[name].run_group.remote(**config.rollout.group_call(seed))

        pending = {
            submit(seed, names[i % len(names)]): (seed, names[i % len(names)], 0) for i, seed in enumerate(seeds)
        }
        deadline = time.monotonic() + settings.call_timeout_s
        results = []
        with console.bar(len(seeds), desc, unit="group") as bar:
            while pending:
                done, _ = ray.wait(list(pending), timeout=max(deadline - time.monotonic(), 0))
                if not done:
                    raise TimeoutError(f"{len(pending)} rollout groups missed controller.call_timeout_s")
                for ref in done:
                    seed, name, tries = pending.pop(ref)
                    group = self._finished_group(ref, seed, name, tries)
                    if group is not None:
                        results.append(group)
                        bar.update(1)
                        continue
                    wait_until_back(self.actors[name], "health", settings.restart_timeout_s)
                    if controller is not None:
                        ray.get(controller.sync_workers.remote(), timeout=settings.call_timeout_s)
                    pending[submit(seed, name)] = (seed, name, tries + 1)
        return results

    def _finished_group(self, ref: Any, seed: int, name: str, tries: int) -> dict[str, Any] | None:
        """The group's summary, or None if it is to be played again; raises once its retries are spent."""
        retries = self.config.controller.group_retries
        try:
            group = ray.get(ref, timeout=10)
        except Exception as exc:
            if not lost_with_actor(exc) or tries >= retries:
                raise
            log.warning("group %d lost with actor %s (%s); replaying it", seed, name, type(exc).__name__)
            return None
        if not group.get("failed"):
            return group
        if tries >= retries:
            raise RuntimeError(
                f"group {seed} on {name} had failed episodes in {tries + 1} tries (controller.group_retries: "
                f"{retries}); last errors: {group['errors'][:3]}. Fix what they name, or raise "
                "controller.group_retries if the failures are transient"
            )
        log.warning("group %d on %s had failed episodes (%s); replaying it", seed, name, group["errors"][:1])
        return None

    # ---- stopping -------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Flush and stop every actor the config names (running ones found by name) and free their placement."""
        for name, actor in RolloutFleet.attach(self.config).items():
            try:
                ray.get(actor.close.remote(), timeout=120)
            except Exception as exc:  # a busy or dead actor: what it had not flushed is reported, not waited on
                log.warning("rollout actor %s did not close cleanly (%s: %s)", name, type(exc).__name__, exc)
            finally:
                ray.kill(actor, no_restart=True)
            _keep_alive.pop(name, None)
        if self.config.rollout.placement_strategy is not None:
            from ray.util.placement_group import get_placement_group, remove_placement_group

            try:
                remove_placement_group(get_placement_group(rollout_placement_name(self.config)))
            except ValueError:
                pass
