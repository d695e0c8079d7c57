"""Fault injection: kill -9 a rollout actor, the recorder, the controller and a training worker, and stop
PostgreSQL, each at a random moment of the phase where it is busy, in a short run of the real system (tiny
model, 2 rollout actors, real PostgreSQL, Ray Train).

Every test asserts that nothing acknowledged was lost or stored twice, that the served version only ever
changed through the controller, and that the system recovered before the test's own deadline. The random
moments come from ZIGGURAT_FAULT_SEED (printed; set it to replay a run). Each test prints one `fault:` JSON
line with what happened and how long recovery took (`pytest -s` shows them).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
import sqlalchemy as sa

from cluster.fleet import RolloutFleet
from cluster.loop import run_loop, shutdown
from recorder import queries
from recorder.schema import LlmCall, Step, Trajectory
from recorder.store import create_db_engine
from tests.test_controller import loop_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# This module is imported as `test_faults`, which Ray workers cannot import: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

FAULT_SEED = int(os.environ.get("ZIGGURAT_FAULT_SEED", random.randrange(1_000_000)))
print(f"ZIGGURAT_FAULT_SEED={FAULT_SEED}")


@dataclass
class System:
    config: Any
    url: str
    model: str
    tmp: Path
    db: sa.Engine
    actors: dict[str, Any] = field(default_factory=dict)

    @property
    def controller(self) -> Any:
        return ray.get_actor(self.config.controller.name, namespace=self.config.ray.namespace)

    def deployed(self) -> int:
        return ray.get(self.controller.deployed_version.remote(), timeout=60)

    def served(self) -> dict[str, int | None]:
        health = ray.get(self.controller.health.remote(), timeout=60)["actors"]
        return {name: actor.get("served_version") for name, actor in health.items()}


@pytest.fixture(scope="module")
def system(ray_session, postgres, tiny_model_dir, tmp_path_factory) -> Any:
    """A running system on its own database, with version 1 trained and deployed (so a restart that fell
    back to the base weights would show)."""
    from recorder.migrate import upgrade

    url = postgres.create_database("faults")
    upgrade(url)
    tmp = tmp_path_factory.mktemp("faults")
    config = loop_config(url, tiny_model_dir, tmp, "faults")
    config = config.model_copy(
        update={
            "rollout": config.rollout.model_copy(update={"eval_seeds": [], "max_tokens": 48}),
            "trainer": config.trainer.model_copy(update={"updates_per_batch": 3}),
            "controller": config.controller.model_copy(update={"restart_timeout_s": 240}),
        }
    )
    first = run_loop(config, tmp / "setup")
    assert first["final_version"] == 1
    system = System(config, url, tiny_model_dir, tmp, create_db_engine(url))  # pings: survives a restart
    system.actors = RolloutFleet.start(config, tiny_model_dir)
    yield system
    shutdown(config)
    system.db.dispose()


def _getpid(actor_self: Any) -> int:
    return os.getpid()


def pid_of(actor: Any) -> int:
    """The process id of a running actor (waits while it restarts)."""
    deadline = time.monotonic() + 240
    while True:
        try:
            return ray.get(actor.__ray_call__.remote(_getpid), timeout=60)
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            assert time.monotonic() < deadline, "the actor never came back"
            time.sleep(0.5)


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


class Fault(threading.Thread):
    """Waits for `when()` to hold, then for a random delay, then runs `inject()` once."""

    def __init__(self, when: Callable[[], bool], delay_s: float, inject: Callable[[], Any], within_s: float = 300):
        super().__init__(daemon=True)
        self.when, self.delay_s, self.inject, self.within_s = when, delay_s, inject, within_s
        self.fired_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        deadline = time.monotonic() + self.within_s
        try:
            while not self.when():
                if time.monotonic() > deadline:
                    raise TimeoutError("the phase to inject the fault into never came")
                time.sleep(0.05)
            time.sleep(self.delay_s)
            self.fired_at = time.monotonic()
            self.inject()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def finish(self) -> float:
        self.join(timeout=60)
        assert self.error is None, f"fault injection failed: {self.error!r}"
        assert self.fired_at is not None, "the fault was never injected"
        return self.fired_at


def report(name: str, **facts: Any) -> None:
    print("fault:", json.dumps({"fault": name, "seed": FAULT_SEED, **facts}, default=str))


def assert_groups_stored_exactly_once(system: System, groups: list[dict[str, Any]], seeds: list[int]) -> dict:
    """Every episode of every acknowledged group is in the database once, with all its steps and LLM calls;
    every scenario was played; an episode lost with a crashed actor never counts as finished."""
    assert sorted(int(g["scenario_id"].split(":")[1]) for g in groups) == sorted(seeds)
    ids = [t for g in groups for t in g["trajectory_ids"]]
    assert len(ids) == len(set(ids)) == len(seeds) * system.config.rollout.group_size
    with system.db.connect() as conn:
        rows = conn.execute(
            sa.select(Trajectory.id, Trajectory.status, Trajectory.step_count).where(Trajectory.id.in_(ids))
        ).all()
        steps, calls = (
            dict(
                conn.execute(
                    sa.select(table.trajectory_id, sa.func.count())
                    .where(table.trajectory_id.in_(ids))
                    .group_by(table.trajectory_id)
                ).all()
            )
            for table in (Step, LlmCall)
        )
        scenarios = [f"{system.config.rollout.env}:{s}" for s in seeds]
        unfinished = conn.execute(
            sa.select(sa.func.count()).where(Trajectory.scenario_id.in_(scenarios), Trajectory.status == "running")
        ).scalar_one()
    assert len(rows) == len(ids), f"{len(ids) - len(rows)} acknowledged trajectories are missing"
    for trajectory_id, status, step_count in rows:
        assert status == "finished" and step_count >= 1
        assert steps.get(trajectory_id) == step_count == calls.get(trajectory_id), (trajectory_id, step_count)
    return {"episodes": len(ids), "steps": sum(steps.values()), "lost_with_the_actor_unfinished": unfinished}


def episodes_in_flight(system: System) -> bool:
    answers = ray.get([a.health.remote() for a in system.actors.values()], timeout=60)
    return any(a["episodes_in_flight"] for a in answers)


def rollout_phase(system: System, seeds: list[int], inject: Callable[[], Any], delay_s: float):
    """Play `seeds` through the loop's rollout phase and inject the fault while episodes are in flight."""
    fault = Fault(lambda: episodes_in_flight(system), delay_s, inject)
    fault.start()
    started = time.monotonic()
    groups = system.actors.play(seeds, "under fault", system.controller)
    ended = time.monotonic()
    fired = fault.finish()
    assert fired < ended, "the fault came after the rollouts had finished; it tested nothing"
    return groups, {"fault_at_s": round(fired - started, 2), "recovered_in_s": round(ended - fired, 2)}


def assert_served_only_through_the_controller(system: System, deployed: int, groups: list[dict[str, Any]]) -> None:
    assert {v for g in groups for v in g["model_versions"]} == {deployed}
    assert system.deployed() == deployed
    assert set(system.served().values()) == {deployed}


def test_kill9_rollout_actor_mid_rollouts(system):
    rng = random.Random(FAULT_SEED + 1)
    deployed = system.deployed()
    victim = sorted(system.actors)[0]
    pid = pid_of(system.actors[victim])
    seeds = list(range(10_000, 10_016))
    groups, timing = rollout_phase(system, seeds, lambda: kill9(pid), rng.uniform(0, 2))
    stored = assert_groups_stored_exactly_once(system, groups, seeds)
    assert pid_of(system.actors[victim]) != pid  # Ray restarted it
    assert_served_only_through_the_controller(system, deployed, groups)
    report("kill -9 rollout actor", **timing, **stored, served=deployed)


def test_kill9_recorder_mid_rollouts(system):
    rng = random.Random(FAULT_SEED + 2)
    deployed = system.deployed()
    recorder = ray.get_actor(system.config.recorder.actor_name, namespace=system.config.ray.namespace)
    pid = pid_of(recorder)
    seeds = list(range(11_000, 11_016))
    groups, timing = rollout_phase(system, seeds, lambda: kill9(pid), rng.uniform(0, 2))
    stored = assert_groups_stored_exactly_once(system, groups, seeds)
    assert pid_of(recorder) != pid
    assert_served_only_through_the_controller(system, deployed, groups)
    report("kill -9 recorder", **timing, **stored)


def test_postgres_stopped_mid_rollouts(system, postgres):
    rng = random.Random(FAULT_SEED + 3)
    deployed = system.deployed()
    outage_s = rng.uniform(2, 6)

    def outage() -> None:
        postgres.stop(mode="immediate")  # a crash: connections die without a goodbye
        time.sleep(outage_s)
        postgres.start()

    seeds = list(range(12_000, 12_016))
    groups, timing = rollout_phase(system, seeds, outage, rng.uniform(0, 2))
    stored = assert_groups_stored_exactly_once(system, groups, seeds)
    assert_served_only_through_the_controller(system, deployed, groups)
    report("stop PostgreSQL", outage_s=round(outage_s, 2), **timing, **stored)


def _running_batch(system: System, after: int) -> bool:
    return any(b["id"] > after for b in queries.list_batches(system.db, statuses=("running",)))


def _latest_batch(system: System) -> int:
    return max((b["id"] for b in queries.list_batches(system.db)), default=0)


def _training_run_under(system: System, fault: Fault) -> tuple[dict[str, Any], dict[str, Any]]:
    """One loop iteration (play, train, deploy) with `fault` injected; returns the report and the batch."""
    before_batch, before_version = _latest_batch(system), system.deployed()
    fault.start()
    started = time.monotonic()
    result = run_loop(system.config, system.tmp / f"run-{before_batch}")
    ended = time.monotonic()
    fired = fault.finish()
    assert fired < ended
    (iteration,) = result["iterations"]
    assert iteration["served_version"] == before_version  # nobody changed it while the fault played out
    batch = queries.get_batch(system.db, _latest_batch(system))
    assert batch["id"] > before_batch
    if iteration["training"].get("trained"):
        assert batch["status"] == "completed"
        version = queries.get_version(system.db, iteration["training"]["version"])
        assert version["status"] == "deployed" and result["final_version"] == version["version"]
    else:  # the job could not be saved: its batch says why, and the served version is unchanged
        assert batch["status"] == "failed" and batch["error"]
        assert result["final_version"] == before_version
    assert system.deployed() == result["final_version"]
    assert set(system.served().values()) == {result["final_version"]}
    with system.db.connect() as conn:  # the groups it trained on were used once, by this batch only
        members = conn.execute(
            sa.select(sa.func.count()).where(Trajectory.training_batch_id == batch["id"])
        ).scalar_one()
    timing = {"fault_at_s": round(fired - started, 2), "run_s": round(ended - started, 2)}
    return iteration, {**timing, "batch": batch["id"], "batch_status": batch["status"], "trained_on": members}


def test_kill9_controller_mid_training(system):
    rng = random.Random(FAULT_SEED + 4)
    after = _latest_batch(system)
    pid = pid_of(system.controller)
    mid_training: list[bool] = []

    def kill_the_controller() -> None:
        mid_training.append(_running_batch(system, after))
        kill9(pid)

    fault = Fault(lambda: _running_batch(system, after), rng.uniform(0, 3), kill_the_controller)
    iteration, facts = _training_run_under(system, fault)
    assert pid_of(system.controller) != pid
    if mid_training[0]:  # the restarted controller picked the running job up from the database
        assert iteration["training"].get("recovered") == "resumed"
    report("kill -9 controller", **facts, mid_training=mid_training[0], outcome=iteration["training"])


def _training_worker_pids() -> list[int]:
    processes = psutil.process_iter(["cmdline"])
    return [p.pid for p in processes if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def test_kill9_training_worker_mid_training(system):
    rng = random.Random(FAULT_SEED + 5)
    after = _latest_batch(system)
    killed: list[int] = []

    def kill_a_worker() -> None:
        workers = _training_worker_pids()
        assert workers, "the training workers were gone before the fault"
        killed.append(workers[-1])
        kill9(workers[-1])

    # once this batch's workers exist (no other training runs now), within their work: the persistent trainer's
    # workers are already up and the tiny model's 3 updates take about a second, so a later kill (this drew up to
    # 2 s once) could land after the loop had ended
    def training() -> bool:
        return _running_batch(system, after) and bool(_training_worker_pids())

    fault = Fault(training, rng.uniform(0, 0.4), kill_a_worker)
    iteration, facts = _training_run_under(system, fault)
    assert killed
    if iteration["training"].get("trained"):  # Ray Train restarted the worker group from the last checkpoint
        version = queries.get_version(system.db, iteration["training"]["version"])
        assert version["metrics"]["update"] == system.config.trainer.updates_per_batch
        facts["resumed_from_update"] = version["metrics"].get("resumed_from_update")
    report("kill -9 training worker", **facts, outcome=iteration["training"])
