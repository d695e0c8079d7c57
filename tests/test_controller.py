"""The closed loop end to end on the tiny model, real PostgreSQL, 2 rollout actors and a Ray Train job:
rollouts -> judged groups -> readiness -> training -> version 1 -> hot-swap -> rollback, with the agent gateway
started by the loop serving each deployed version."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import ray
import sqlalchemy as sa

from cluster.config import load_config
from cluster.fleet import RolloutFleet
from cluster.loop import run_loop, shutdown
from gateway.config import GatewayConfig
from recorder.schema import RewardJudgment, Trajectory
from rollout.config import EngineConfig

pytestmark = pytest.mark.slow


def loop_config(url: str, model: str, tmp_path: Path, name: str, **controller: object):
    base = load_config()
    return base.model_copy(
        update={
            "model": base.model.model_copy(update={"name": model, "store_dir": tmp_path / "store"}),
            "database": base.database.model_copy(update={"url": url}),
            "recorder": base.recorder.model_copy(update={"actor_name": f"{name}-recorder"}),
            "engine": EngineConfig(device="cpu", max_model_len=1024, kv_cache_gib=1, max_num_seqs=32),
            "rollout": base.rollout.model_copy(
                update={
                    "env": "lowercase",
                    "env_settings": {},
                    "actors": 2,
                    "placement_strategy": "PACK",  # both actors placed at once, through one placement group
                    "actor_resources": {"rollout_slot": 1},
                    "group_size": 4,
                    "groups_per_iteration": 4,
                    "max_turns": 1,
                    "max_tokens": 8,
                    "eval_seeds": [0, 1],
                    "eval_group_size": 2,
                    "episode_timeout_s": 120,
                }  # fmt: skip
            ),
            "controller": base.controller.model_copy(
                update={"name": name, "min_groups": 2, "iterations": 1, "poll_interval_s": 0.2, **controller}
            ),
            "trainer": base.trainer.model_copy(
                update={
                    "num_workers": 2,
                    "micro_batch_rows": 8,
                    "reward_source": "combined",
                    "learning_rate": 1e-3,
                    "updates_per_batch": 1,
                }  # fmt: skip
            ),
        }
    )


def _gateway_version(config) -> int:
    """The version that served one chat call through the loop's gateway."""
    body = json.dumps({"model": "ziggurat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    request = urllib.request.Request(
        f"http://127.0.0.1:{config.gateway.port}/v1/chat/completions", data=body.encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as response:
        assert json.loads(response.read())["choices"][0]["message"]["content"] is not None
        return int(response.headers["X-Ziggurat-Version"])


def test_closed_loop_trains_deploys_to_both_actors_and_rolls_back(
    ray_session, postgres, tiny_model_dir, tmp_path, gateway_port
):
    url = postgres.create_database("closed_loop")
    config = loop_config(url, tiny_model_dir, tmp_path, "e2e")
    # The agent gateway starts with the loop and serves whatever the controller deploys.
    gateway = GatewayConfig(
        enabled=True, port=gateway_port, auth="none", app_name="e2e-gateway", ledger_name="e2e-ledger"
    )
    config = config.model_copy(update={"gateway": gateway})
    try:
        report = run_loop(config, tmp_path / "out")
        (iteration,) = report["iterations"]
        assert iteration["training"]["trained"] is True and iteration["training"]["version"] == 1
        assert iteration["deployed"] is True and sorted(iteration["swap"]["actors"]) == [
            "e2e-rollout-0",
            "e2e-rollout-1",
        ]
        assert report["final_version"] == 1
        assert {v["version"]: v["status"] for v in report["versions"]} == {0: "retired", 1: "deployed"}
        assert report["base_eval_mean_reward"] is not None and report["final_eval_mean_reward"] is not None
        assert json.loads((tmp_path / "out" / "report.json").read_text())["final_version"] == 1
        # every phase's wall time, summed over iterations, within the run's
        assert set(iteration["phases_s"]) == {"rollouts", "evaluation", "training", "release"}
        phases = {"start", "base_evaluation", "rollouts", "evaluation", "training", "release"}
        assert set(report["phases_s"]) == phases
        assert report["phases_s"]["training"] == pytest.approx(iteration["phases_s"]["training"], abs=0.1)
        assert 0 < sum(report["phases_s"].values()) <= report["wall_s"] + 0.5
        assert (tmp_path / "out" / "reward.png").stat().st_size > 1000

        db = sa.create_engine(url)
        with db.connect() as conn:
            trained_on = conn.execute(
                sa.select(sa.func.count()).where(Trajectory.training_batch_id.is_not(None))
            ).scalar_one()
            combined = conn.execute(sa.select(sa.func.count()).where(RewardJudgment.judge == "combined")).scalar_one()
            evals = conn.execute(
                sa.select(Trajectory.model_version, sa.func.count()).where(Trajectory.is_eval).group_by("model_version")
            ).all()
            spans = conn.execute(
                sa.select(Trajectory.is_eval, sa.func.min(Trajectory.started_at), sa.func.max(Trajectory.finished_at))
                .where(Trajectory.model_version == 0, Trajectory.status == "finished")
                .group_by(Trajectory.is_eval)
            ).all()
        assert trained_on > 0 and combined >= 16  # every finished episode was judged
        assert dict(evals) == {0: 4, 1: 4}  # held-out scenarios, played on each version, never trained on
        # The base version's evaluation played alongside the first rollout round (controller.
        # evaluate_alongside_rollouts), by the episodes' own start and end times: each began before the other ended.
        (evaluated_from, evaluated_to), (played_from, played_to) = (
            span for _, *span in sorted(spans, key=lambda row: not row[0])
        )
        assert evaluated_from < played_to and played_from < evaluated_to, spans

        actors = RolloutFleet.start(config, tiny_model_dir)  # the running, named actors
        after_swap = actors.play([5000, 5001], "after swap")
        assert {v for g in after_swap for v in g["model_versions"]} == {1}
        assert _gateway_version(config) == 1

        controller = ray.get_actor("e2e", namespace=config.ray.namespace)
        rolled = ray.get(controller.rollback.remote(), timeout=120)
        assert rolled["version"] == 0 and rolled["rolled_back"] == [1]
        after_rollback = actors.play([5002, 5003], "after rollback")
        assert {v for g in after_rollback for v in g["model_versions"]} == {0}
        assert _gateway_version(config) == 0
        health = ray.get(controller.health.remote(), timeout=60)
        assert all(a["alive"] and a["served_version"] == 0 for a in health["actors"].values())
        assert health["database"]["reachable"] and health["recorder"]["alive"]
        status = ray.get(controller.status.remote(), timeout=60)
        assert status["deployed_version"] == 0
        assert {v["version"]: v["status"] for v in status["versions"]} == {0: "deployed", 1: "rolled_back"}
        assert status["readiness"]["ready"] and status["readiness"]["groups_with_variance"] == 4  # the 4 new groups
        with db.connect() as conn:
            versions = dict(
                conn.execute(
                    sa.select(Trajectory.id, Trajectory.model_version).where(
                        Trajectory.group_id.in_([g["group_id"] for g in after_swap + after_rollback])
                    )
                ).all()
            )
        assert sorted(set(versions.values())) == [0, 1]
        db.dispose()

        # Canary: half the actors get version 1; after enough episodes it is promoted or rolled back on reward.
        canary = ray.get(controller.deploy.remote(1, 0.5), timeout=120)
        assert canary["canary"] and canary["actors"] == ["e2e-rollout-0"]
        served = ray.get(controller.health.remote(), timeout=60)["actors"]
        assert {n: a["served_version"] for n, a in served.items()} == {"e2e-rollout-0": 1, "e2e-rollout-1": 0}
        assert not ray.get(controller.settle_canary.remote(1), timeout=60)["decided"]  # no episodes yet
        actors.play(list(range(6000, 6004)), "canary")
        settled = ray.get(controller.settle_canary.remote(1), timeout=120)
        assert settled["decided"] and settled["promoted"] == (
            settled["canary_mean_reward"] >= settled["deployed_mean_reward"]
        )
        final = ray.get(controller.health.remote(), timeout=60)["actors"]
        expected = 1 if settled["promoted"] else 0
        assert all(a["served_version"] == expected for a in final.values())
    finally:
        shutdown(config)


def test_readiness_says_what_is_missing_and_artifacts_must_come_from_the_store(ray_session, tiny_model_dir, tmp_path):
    from cluster.controller import Controller, ControllerError
    from recorder import queries
    from recorder.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'c.db'}"
    upgrade(url)
    controller = Controller(loop_config(url, tiny_model_dir, tmp_path, "unit"))
    ready = controller.readiness()
    assert not ready["ready"]
    assert ready["unmet"] == [
        "trainable groups: 0 of 2 needed (0 judged groups, 0 too small or with equal rewards; 0 finished but not "
        "judged by 'combined'; 0 failed the quality gate; 0 older than version 0)"
    ]
    assert controller.deployed_version() == 0 and controller.versions()[0]["kind"] == "base"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{}")
    for uri in (str(outside), str(tmp_path / "store" / ".." / "elsewhere")):
        version = queries.register_version(controller.db, base_model=tiny_model_dir, kind="lora", artifact_uri=uri)
        queries.update_version(controller.db, version, status="ready")
        with pytest.raises(ControllerError, match="outside the model store"):
            controller.deploy(version)


def test_rollout_actors_that_cannot_be_placed_fail_with_the_missing_resources(ray_session, tiny_model_dir, tmp_path):
    from ray.util.placement_group import get_placement_group, remove_placement_group

    from cluster.fleet import rollout_placement

    config = loop_config(f"sqlite:///{tmp_path / 'p.db'}", tiny_model_dir, tmp_path, "unplaceable")
    config = config.model_copy(
        update={
            "rollout": config.rollout.model_copy(update={"gpus_per_actor": 1, "placement_strategy": "STRICT_SPREAD"}),
            "engine": config.engine.model_copy(update={"start_timeout_s": 2}),
        }
    )
    try:
        with pytest.raises(TimeoutError, match=r"'GPU': 1.0\}\) could not be placed .*check `ray status`"):
            rollout_placement(config)
    finally:
        remove_placement_group(get_placement_group("unplaceable-rollout"))  # a pending group would hold nothing
