"""The rollout fleet on 2 real rollout actors of the tiny model: calls with a deadline report each actor's
answer or error by name, and `Controller.release` applies the deploy rules (deploy_only_if_better)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from cluster.fleet import RolloutFleet
from cluster.loop import serving_config, shutdown
from tests.test_controller import loop_config

pytestmark = pytest.mark.slow

# Ray workers import this module as `test_fleet` only if they can; ship its functions by value instead.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def fleet(ray_session: Any, tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RolloutFleet]:
    """Two started rollout actors (with the recorder they record into), on a migrated SQLite database."""
    from recorder.actor import start_recorder
    from recorder.migrate import upgrade

    tmp = tmp_path_factory.mktemp("fleet")
    url = f"sqlite:///{tmp / 'fleet.db'}"
    upgrade(url)
    config = serving_config(loop_config(url, tiny_model_dir, tmp, "fleet", deploy_only_if_better=True))
    recorder = start_recorder(config.database, config.recorder)
    try:
        yield RolloutFleet.start(config, tiny_model_dir)
    finally:
        shutdown(config)
        del recorder


def _by_name(actor_self: Any, behaviour: dict[str, str]) -> str:
    """Runs inside each actor: raise, stall or answer, by the actor's own name."""
    name = ray.get_runtime_context().get_actor_name()
    if behaviour.get(name) == "raise":
        raise ValueError(f"{name} refuses")
    if behaviour.get(name) == "stall":
        time.sleep(6)  # blocks this actor's event loop, so kept short
    return name


def test_a_call_reports_a_missed_deadline_and_an_error_by_name_without_hiding_the_others(fleet):
    first, second = fleet.names()
    assert fleet.names() == ["fleet-rollout-0", "fleet-rollout-1"] and set(fleet) == {first, second}

    started = time.monotonic()
    results, errors = fleet.call("__ray_call__", _by_name, {second: "stall"}, timeout_s=2)
    assert time.monotonic() - started < 5  # the deadline held; the stalled actor was not waited for
    assert results == {first: first}
    assert errors == {second: "no answer within 2 s"}

    results, errors = fleet.call("__ray_call__", _by_name, {first: "raise"}, timeout_s=30)
    assert results == {second: second}
    assert list(errors) == [first] and "fleet-rollout-0 refuses" in errors[first]

    results, errors = fleet.call("__ray_call__", _by_name, {}, timeout_s=30, names=[second])
    assert results == {second: second} and errors == {}


def test_attach_finds_the_running_actors_and_health_names_every_expected_one(fleet):
    attached = RolloutFleet.attach(fleet.config)
    assert attached.names() == fleet.names()
    health = attached.health()
    assert all(health[name]["alive"] and health[name]["served_version"] == 0 for name in fleet)
    bigger = fleet.config.model_copy(
        update={"rollout": fleet.config.rollout.model_copy(update={"actors": 3, "placement_strategy": None})}
    )
    missing = RolloutFleet.attach(bigger).health()
    assert missing["fleet-rollout-2"] == {"alive": False, "error": "not running"}


def test_release_refuses_an_adapter_that_scores_worse_and_deploys_one_that_does_not(fleet, tiny_model_dir):
    from cluster.controller import Controller
    from recorder import queries
    from tests.test_trainer_job import hand_made_adapter

    controller = Controller(fleet.config)  # in this process, on the running actors found by name
    db = controller.db
    try:
        adapter = hand_made_adapter(tiny_model_dir, controller.store / "by-hand-v1", seed=1)
        version = queries.register_version(
            db, base_model=tiny_model_dir, kind="lora", artifact_uri=str(adapter), status="ready"
        )
        # No adapter can beat a base score of 1e6: deploy_only_if_better refuses it after evaluating it.
        queries.update_version(db, 0, metrics={"eval_mean_reward": 1e6})
        refused = controller.release(version)
        assert refused["deployed"] is False and "swap" not in refused, refused
        assert "deploy_only_if_better" in refused["reason"]
        rollout = fleet.config.rollout
        assert refused["evaluation"]["episodes"] == len(rollout.eval_seeds) * rollout.eval_group_size
        assert queries.get_version(db, version)["status"] == "ready"
        assert set(controller.health()["served_versions"].values()) == {0}

        queries.update_version(db, 0, metrics={"eval_mean_reward": -1e6})
        released = controller.release(version)
        assert released["deployed"] is True and released["canary"] is False
        assert released["swap"]["actors"] == fleet.names()
        assert controller.deployed_version() == version
        assert set(controller.health()["served_versions"].values()) == {version}
        groups = len(rollout.eval_seeds)
        assert controller.progress() == {"evaluation": (groups, groups), "training": None}
    finally:
        db.dispose()
