"""Lineage through the real controller and two real rollout actors on the tiny model: after a canary is
rolled back, the deployed version serves and is the parent of the next trained version."""

from __future__ import annotations

import pytest
import ray

from cluster.fleet import RolloutFleet
from cluster.loop import serving_config, shutdown
from tests.test_controller import loop_config

pytestmark = pytest.mark.slow


def test_a_rolled_back_canary_leaves_the_deployed_version_serving_and_parenting_the_next(
    ray_session, tiny_model_dir, tmp_path
):
    """Deploy v1, v2, canary v3, roll back: v2 serves on every actor, and v4 trains from v2 (not from the
    newest version, the rejected canary)."""
    from cluster.controller import start_controller
    from recorder import queries
    from recorder.migrate import upgrade
    from recorder.store import create_db_engine
    from tests.test_trainer_job import _record_groups, hand_made_adapter

    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    upgrade(url)
    config = loop_config(url, tiny_model_dir, tmp_path, "lineage")
    config = serving_config(  # the engines accept LoRA adapters, as in `ziggurat run`
        config.model_copy(
            update={"trainer": config.trainer.model_copy(update={"reward_source": "env", "num_workers": 1})}
        )
    )
    db = create_db_engine(url)
    try:
        controller = start_controller(config)
        RolloutFleet.start(config, tiny_model_dir)
        for version in (1, 2, 3):
            adapter = hand_made_adapter(tiny_model_dir, tmp_path / "store" / f"by-hand-v{version}", seed=version)
            registered = queries.register_version(
                db, base_model=tiny_model_dir, kind="lora", artifact_uri=str(adapter), status="ready"
            )
            assert registered == version
        ray.get(controller.deploy.remote(1), timeout=300)
        ray.get(controller.deploy.remote(2), timeout=300)
        canary = ray.get(controller.deploy.remote(3, 0.5), timeout=300)
        assert canary["canary"] and canary["actors"] == ["lineage-rollout-0"]

        rolled = ray.get(controller.rollback.remote(), timeout=300)
        assert rolled["version"] == 2 and rolled["rolled_back"] == [3]
        served = ray.get(controller.health.remote(), timeout=60)["actors"]
        assert {name: actor["served_version"] for name, actor in served.items()} == {
            "lineage-rollout-0": 2,
            "lineage-rollout-1": 2,
        }
        statuses = {v["version"]: v["status"] for v in queries.list_versions(db)}
        assert statuses == {0: "retired", 1: "retired", 2: "deployed", 3: "rolled_back"}

        _record_groups(url, groups=2)
        trained = ray.get(controller.train.remote(), timeout=900)
        assert trained["trained"] and trained["version"] == 4, trained
        assert queries.get_version(db, 4)["parent_version"] == 2
        assert queries.get_batch(db, trained["batch_id"])["parent_version"] == 2
    finally:
        shutdown(config)
        db.dispose()


def test_a_version_trained_from_a_parent_rolled_back_meanwhile_is_never_deployed(ray_session, tiny_model_dir, tmp_path):
    """v2 trains from v1; v1 is rolled back before v2 is ready: v2 belongs to a rejected lineage and the
    controller refuses it (before any actor is touched) instead of bringing that lineage back."""
    from cluster.controller import Controller, ControllerError
    from recorder import queries
    from recorder.migrate import upgrade
    from recorder.store import create_db_engine

    url = f"sqlite:///{tmp_path / 'orphan.db'}"
    upgrade(url)
    config = loop_config(url, tiny_model_dir, tmp_path, "orphan")
    controller = Controller(config)  # in this process: the refusal comes before any rollout actor is needed
    db = create_db_engine(url)
    try:
        one = queries.register_version(db, base_model=tiny_model_dir, kind="lora", parent_version=0, status="ready")
        queries.update_version(db, one, status="rolled_back")
        two = queries.register_version(db, base_model=tiny_model_dir, kind="lora", parent_version=one, status="ready")
        with pytest.raises(ControllerError, match=f"trained from version {one}, which is rolled_back"):
            controller.deploy(two)
        assert queries.get_version(db, two)["status"] == "rolled_back"
    finally:
        db.dispose()
        controller.db.dispose()
