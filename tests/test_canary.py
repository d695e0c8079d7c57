"""Canaries settle (issue 13, item 7), and a group with a failed episode is played again (item 8).

The closed loop on the tiny model with 2 rollout actors and `controller.canary_fraction: 0.5`, two iterations:
each new version goes to the first actor only, is decided on the next rollout round's rewards (promoted to
both actors or rolled back), and the report says what every actor really serves."""

from __future__ import annotations

import pytest
import ray
import sqlalchemy as sa

from cluster.fleet import RolloutFleet
from cluster.loop import run_loop, shutdown
from recorder.schema import Trajectory
from tests.rollout_harness import rows
from tests.test_controller import loop_config

pytestmark = pytest.mark.slow


def test_canaries_are_settled_and_the_report_says_what_every_actor_serves(ray_session, tiny_model_dir, tmp_path):
    from recorder.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'canary.db'}"
    upgrade(url)
    config = loop_config(url, tiny_model_dir, tmp_path, "canary", canary_fraction=0.5, iterations=2, group_retries=1)
    config = config.model_copy(update={"trainer": config.trainer.model_copy(update={"num_workers": 1})})
    actors = ["canary-rollout-0", "canary-rollout-1"]
    try:
        report = run_loop(config, tmp_path / "out")
        controller = ray.get_actor("canary", namespace=config.ray.namespace)
        really = {n: a["served_version"] for n, a in ray.get(controller.health.remote(), timeout=60)["actors"].items()}
        assert really == {actors[0]: report["final_version"], actors[1]: report["final_version"]}, report
        first, second = report["iterations"]
        assert first["training"]["trained"] and first["training"]["version"] == 1
        assert first["canary"] is True and first["deployed"] is False and first["swap"]["actors"] == actors[:1]
        assert first["served_versions"] == {actors[0]: 0, actors[1]: 0}

        # Iteration 2 played version 1 on the canary actor and version 0 on the other, then settled it.
        assert second["served_versions"] == {actors[0]: 1, actors[1]: 0}
        (settled,) = second["canary_settled"]
        assert settled["decided"] and settled["canary_version"] == 1
        assert settled["episodes"][1] >= 8 and settled["episodes"][0] >= 8  # both sides played the round
        decided = 1 if settled["promoted"] else 0
        assert settled["promoted"] == (
            settled["canary_mean_reward"] >= settled["deployed_mean_reward"] - config.controller.canary_tolerance
        )
        assert second["served_versions_after_settling"] == {actors[0]: decided, actors[1]: decided}
        assert second["served_version"] == 0 and second["deployed_after_settling"] == decided

        # Version 2 was a canary again; the loop gave it its round and settled it before reporting.
        assert second["canary"] is True and second["training"]["version"] == 2
        (last,) = report["canary_round"]["settled"]
        assert last["decided"] and last["canary_version"] == 2
        final = 2 if last["promoted"] else decided
        assert report["final_version"] == final
        assert report["served_versions"] == {actors[0]: final, actors[1]: final}
        statuses = {v["version"]: v["status"] for v in report["versions"]}
        assert statuses[final] == "deployed" and "canary" not in statuses.values()
        assert statuses[1] == ("rolled_back" if not settled["promoted"] else ("deployed" if final == 1 else "retired"))

        assert ray.get(controller.health.remote(), timeout=60)["served_versions"] == report["served_versions"]

        # A group whose episodes fail (here: an environment setting the env refuses) is recorded as failed,
        # played again up to controller.group_retries times, then reported by name.
        broken = config.model_copy(
            update={"rollout": config.rollout.model_copy(update={"env_settings": {"no_such_setting": 1}})}
        )
        handles = RolloutFleet.start(config, tiny_model_dir)
        with pytest.raises(RuntimeError, match=r"group 7000 on canary-rollout-0 had failed episodes in 2 tries"):
            RolloutFleet(broken, {actors[0]: handles[actors[0]]}).play([7000], "failing group", controller)
        outcomes = rows(
            url, sa.select(Trajectory.status, sa.func.count()).where(Trajectory.scenario_id == "lowercase:7000")
            .group_by(Trajectory.status)
        )  # fmt: skip
        assert dict(outcomes) == {"failed": 2 * config.rollout.group_size}
    finally:
        shutdown(config)
