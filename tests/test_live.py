"""Live mode on the simulated engine and trainer (real Ray, real recorder, real database, real controller):
agents keep playing while batches train, admission keeps every trained token within max_staleness, versions
roll out replica by replica, and `pause`/`resume`/`stop` steer the controller's loop.

The checks read the database, not the loop's own counters: what was played while a batch trained, and how
many versions behind its batch's parent every trained trajectory was sampled.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import ray
import sqlalchemy as sa

from cluster.config import ZigguratConfig
from cluster.loop import run_loop, shutdown
from rollout.config import EngineConfig, SimulatedEngineConfig
from tests.test_controller import loop_config

pytestmark = pytest.mark.slow


def live_config(url: str, model: str, tmp_path: Path, name: str, max_staleness: int = 1, **controller: object):
    """Two simulated rollout actors on the lowercase task, a simulated trainer: every phase takes a known time.
    A group (16 tokens at 6 tokens/s) takes about as long as a batch's training job (its actor's start and one
    0.6 s update), so the fleet has something to play while a batch trains: one job per batch unless a test
    asks for the persistent trainer, whose later batches take under a second here."""
    config = loop_config(url, model, tmp_path, name)
    return config.model_copy(
        update={
            "engine": EngineConfig(
                backend="simulated",
                max_model_len=1024,
                simulated=SimulatedEngineConfig(tokens_per_s=6.0, batch_tokens_per_s=2000.0, load_s=0.02),
            ),
            "rollout": config.rollout.model_copy(
                update={"placement_strategy": None, "actor_resources": {}, "group_size": 2, "max_tokens": 16}
            ),
            "controller": config.controller.model_copy(
                update={
                    "mode": "live",
                    "min_groups": 4,
                    "live_groups_per_actor": 2,
                    "live_versions": 3,
                    "persistent_trainer": False,
                    **controller,
                }
            ),
            "trainer": config.trainer.model_copy(
                update={
                    "backend": "simulated",
                    "simulated_update_s": 0.6,
                    "updates_per_batch": 1,
                    "batch_max_groups": 4,
                    "max_staleness": max_staleness,
                    "reward_source": "env",
                }
            ),
        }
    )


def _trained_lags(url: str) -> list[int]:
    """parent version - sampling version of every trajectory in a completed batch (from the database)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT b.parent_version - t.model_version FROM training_batches b "
                    "JOIN training_batch_trajectories m ON m.batch_id = b.id "
                    "JOIN trajectories t ON t.id = m.trajectory_id WHERE b.status = 'completed'"
                )
            ).all()
        return [int(r[0]) for r in rows]
    finally:
        engine.dispose()


def _played_while_training(url: str) -> list[int]:
    """For every completed batch, training trajectories that finished (were recorded) between its claim and its
    completion: while its job started and trained."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            batches = conn.execute(
                sa.text("SELECT created_at, finished_at FROM training_batches WHERE status = 'completed' ORDER BY id")
            ).all()
            return [
                conn.execute(
                    sa.text(
                        "SELECT count(*) FROM trajectories "
                        "WHERE is_eval = :no AND finished_at > :a AND finished_at < :b"
                    ),
                    {"no": False, "a": start, "b": end},
                ).scalar_one()
                for start, end in batches
            ]
    finally:
        engine.dispose()


@pytest.mark.parametrize("max_staleness", [0, 1])
def test_agents_play_while_batches_train_and_no_trained_token_is_staler_than_allowed(
    ray_session, tiny_model_dir, tmp_path, max_staleness
):
    from recorder import queries
    from recorder.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'live.db'}"
    upgrade(url)
    config: ZigguratConfig = live_config(url, tiny_model_dir, tmp_path, f"live{max_staleness}", max_staleness)
    try:
        report = run_loop(config, tmp_path / "out")
    finally:
        shutdown(config)
    live = report["live"]
    assert live["state"] == "stopped" and live["versions_trained"] >= 3, live
    assert report["final_version"] >= 3, report["versions"]

    lags = _trained_lags(url)
    assert lags and max(lags) <= max_staleness, sorted(set(lags))
    engine = sa.create_engine(url)
    try:
        # admission, not discards: nothing played became too stale to train
        ready = queries.readiness(engine, "env", 2, parent_version=report["final_version"], max_staleness=max_staleness)
        assert ready.stale == 0, ready
    finally:
        engine.dispose()
    during = _played_while_training(url)
    if max_staleness == 0:
        # a group sampled while a batch trains would be a version behind when trained: none is admitted
        assert sum(during) <= 2 * config.rollout.group_size * 2, during  # only groups already admitted finish
    else:
        assert all(n > 0 for n in during), during  # the fleet kept playing through every batch
    released = [e for e in report["iterations"] if e["event"] == "released"]
    assert released and all(e["deployed"] for e in released), released
    assert all(len(e["actors"]) == 2 for e in released)


def test_pause_resume_and_stop_steer_the_controllers_loop(ray_session, tiny_model_dir, tmp_path, capsys):
    """`ziggurat pause|resume|stop`, the command line's own entry point, steer the loop inside the controller."""
    import json
    import logging

    import yaml

    from cluster.cli import main as ziggurat
    from recorder.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'steer.db'}"
    upgrade(url)
    config = live_config(url, tiny_model_dir, tmp_path, "steer", live_versions=None)
    config_file = tmp_path / "steer.yaml"
    config_file.write_text(yaml.safe_dump(json.loads(config.model_dump_json())))

    def steer(action: str) -> dict:
        capsys.readouterr()
        levels = {name: logging.getLogger(name).level for name in ("", "ziggurat")}
        try:
            assert ziggurat([action, "--config", str(config_file)]) == 0
        finally:  # the command line sets the console's log levels: later tests keep theirs
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
        printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        return json.loads(printed[-1])

    with _live_loop(config, tiny_model_dir) as controller:

        def status() -> dict:
            return ray.get(controller.live_status.remote(), timeout=30)

        deadline = time.monotonic() + 60
        while status()["groups_played"] < 4:
            assert time.monotonic() < deadline, status()
            time.sleep(0.2)
        assert steer("pause")["state"] == "paused"
        deadline = time.monotonic() + 60
        while status()["groups_in_flight"]:
            assert time.monotonic() < deadline, status()
            time.sleep(0.1)
        played = status()["groups_played"]
        time.sleep(1.5)
        assert status()["groups_played"] == played  # paused: nothing new was admitted

        assert steer("resume")["state"] == "running"
        deadline = time.monotonic() + 60
        while status()["groups_played"] <= played:
            assert time.monotonic() < deadline, status()
            time.sleep(0.2)

        assert steer("stop")["state"] in ("stopping", "stopped")
        deadline = time.monotonic() + 120
        while status()["state"] != "stopped":
            assert time.monotonic() < deadline, status()
            time.sleep(0.2)
        final = status()
        assert final["groups_in_flight"] == 0 and not final["training"], final


def test_a_sync_controller_refuses_to_start_a_live_loop(ray_session, tiny_model_dir, tmp_path):
    from cluster.controller import ControllerError, start_controller
    from recorder.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'sync.db'}"
    upgrade(url)
    config = live_config(url, tiny_model_dir, tmp_path, "syncref")
    config = config.model_copy(update={"controller": config.controller.model_copy(update={"mode": "sync"})})
    try:
        controller = start_controller(config)
        with pytest.raises(ray.exceptions.RayTaskError) as raised:
            ray.get(controller.start_live.remote(), timeout=30)
        assert isinstance(raised.value.cause, ControllerError)
        assert "controller.mode: live" in str(raised.value.cause)
    finally:
        shutdown(config)


def _wait(condition, timeout_s: float, what: str, describe=None) -> float:
    """Poll `condition` (exceptions count as not yet) until it holds; returns the seconds it took. On a timeout
    the error says what `describe()` returns (the loop's status, say), so a stall names where it stopped."""
    started = time.monotonic()
    last: object = None
    while time.monotonic() - started < timeout_s:
        try:
            if condition():
                return time.monotonic() - started
        except Exception as exc:  # an actor restarting answers nothing for a while
            last = exc
        time.sleep(0.2)
    state = ""
    if describe is not None:
        try:
            state = f"; state: {describe()}"
        except Exception as exc:
            state = f"; state unknown: {exc!r}"
    raise AssertionError(f"{what} within {timeout_s} s (last error: {last!r}){state}")


@contextmanager
def _live_loop(config: ZigguratConfig, model_dir: str, versions: int | None = None) -> Iterator[Any]:
    """The recorder, the rollout fleet and the controller of `config` (its fresh database migrated), the
    controller's live loop started to train `versions` versions (None: until stopped); yields the controller
    and stops everything on the way out."""
    from cluster.controller import start_controller
    from cluster.fleet import RolloutFleet
    from recorder.actor import start_recorder

    recorder = start_recorder(config.database, config.recorder)  # the actor lives while a handle does
    try:
        RolloutFleet.start(config, model_dir)
        controller = start_controller(config)
        started = ray.get(controller.start_live.remote(versions), timeout=60)
        assert started["until_version"] == versions, started
        yield controller
    finally:
        shutdown(config)
        del recorder


def test_live_mode_goes_on_through_a_crashed_rollout_actor_and_a_crashed_controller(
    ray_session, tiny_model_dir, tmp_path
):
    """Kill a rollout actor, then the controller (Ray restarts both) while the loop runs: the lost groups are
    played again, the restarted actor is restored before it takes traffic, the restarted controller resumes
    the loop towards the same version, and the database holds every finished episode whole, exactly once."""
    from cluster.fleet import rollout_actor_name
    from recorder.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'faults.db'}"
    upgrade(url)
    config = live_config(url, tiny_model_dir, tmp_path, "faults", live_versions=None)
    with _live_loop(config, tiny_model_dir, versions=4) as controller:

        def status() -> dict:
            return ray.get(controller.live_status.remote(), timeout=10)

        _wait(lambda: status()["versions_trained"] >= 1, 120, "a first version trained")
        victim = rollout_actor_name(config, 1)
        played = status()["groups_played"]
        ray.kill(ray.get_actor(victim, namespace=config.ray.namespace), no_restart=False)

        def restored() -> bool:
            health = ray.get(controller.health.remote(), timeout=10)
            deployed = ray.get(controller.deployed_version.remote(), timeout=10)
            return health["served_versions"][victim] == deployed and status()["groups_played"] > played + 2

        actor_recovery_s = _wait(restored, 120, "the killed rollout actor restored and the loop playing on")

        uptime = status()["uptime_s"]
        ray.kill(controller, no_restart=False)  # a restarted controller finds the loop's state file and resumes
        controller_recovery_s = _wait(  # a loop younger than the killed one's: the new incarnation's
            lambda: (s := status()) is not None and s["state"] == "running" and s["uptime_s"] < uptime,
            300,
            "the restarted controller's loop",
        )
        _wait(lambda: status()["state"] == "stopped", 300, "the resumed loop reaching version 4")
        print(f"recovery: rollout actor {actor_recovery_s:.1f} s, controller {controller_recovery_s:.1f} s")

        served = ray.get(controller.health.remote(), timeout=30)["served_versions"]
        deployed = ray.get(controller.deployed_version.remote(), timeout=30)
        assert deployed >= 4 and set(served.values()) == {deployed}, (deployed, served)

    assert max(_trained_lags(url)) <= config.trainer.max_staleness
    _assert_episodes_whole_and_trained_once(url)


def test_live_mode_goes_on_through_a_postgres_outage(ray_session, tiny_model_dir, tmp_path, postgres):
    """PostgreSQL crashes (immediate stop) while the live loop plays and trains, and comes back seconds later:
    the loop goes on to its target version without a driver, and the database holds every finished episode whole
    and every trained group in one completed batch only."""
    from recorder.migrate import upgrade

    url = postgres.create_database("live_outage")
    # The test server trades durability for speed (synchronous_commit off), so a crash would also take back
    # commits it already acknowledged; here a commit must survive the crash, as on a production server.
    durable = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with durable.connect() as conn:
        conn.execute(sa.text("ALTER DATABASE live_outage SET synchronous_commit = on"))
    durable.dispose()
    upgrade(url)
    config = live_config(url, tiny_model_dir, tmp_path, "pg-outage", live_versions=None)
    with _live_loop(config, tiny_model_dir, versions=4) as controller:

        def status() -> dict:
            return ray.get(controller.live_status.remote(), timeout=10)

        _wait(lambda: status()["versions_trained"] >= 1, 120, "a first version trained")
        played = status()["groups_played"]
        postgres.stop(mode="immediate")  # a crash: every connection dies without a goodbye
        time.sleep(4.0)
        postgres.start()
        back = time.monotonic()
        _wait(lambda: status()["groups_played"] > played + 2, 120, "the loop playing on after the outage")
        _wait(lambda: status()["state"] == "stopped", 300, "the loop reaching version 4 after the outage", status)
        after = status()
        print(
            f"live loop through a 4 s PostgreSQL outage: version 4 {time.monotonic() - back:.1f} s after it ended; "
            f"outages seen {after['database_outages']}, groups held {after['groups_held']}"
        )
        assert after["database_outages"] >= 1  # the loop met the outage, not just slept through it
        served = ray.get(controller.health.remote(), timeout=30)["served_versions"]
        deployed = ray.get(controller.deployed_version.remote(), timeout=30)
        assert deployed >= 4 and set(served.values()) == {deployed}, (deployed, served)
        assert after["error"] is None

    assert max(_trained_lags(url)) <= config.trainer.max_staleness
    _assert_episodes_whole_and_trained_once(url)


def test_a_batch_left_open_by_a_job_that_is_gone_does_not_stop_the_live_loop(ray_session, tiny_model_dir, tmp_path):
    """A batch whose job ended without its last write reaching the database (its completion or its failure lost
    in a database crash) is still `running`, and every claim waits on it. The live loop looks into it (no
    training of its own is behind it), fails it, so its groups are trainable again, and trains on."""
    from cluster import trainer_service, training
    from recorder import queries
    from recorder.migrate import upgrade
    from recorder.store import create_db_engine
    from tests.test_trainer_job import _record_groups

    url = f"sqlite:///{tmp_path / 'open.db'}"
    upgrade(url)
    # the persistent trainer asked for, which the simulated trainer has no use for: one sleeping job per batch
    config = live_config(url, tiny_model_dir, tmp_path, "open-batch", live_versions=None, persistent_trainer=True)
    _record_groups(url, groups=2, size=2)
    db = create_db_engine(url)
    try:
        left_open = queries.claim_batch(db, max_groups=2, reward_source="env")
        # an id of the form the controller gives its own jobs, whose actor is gone
        queries.mark_batch(db, left_open, "running", ray_job_id=training.job_id(config, left_open))
        with _live_loop(config, tiny_model_dir, versions=2) as controller:

            def status() -> dict:
                return ray.get(controller.live_status.remote(), timeout=10)

            _wait(lambda: status()["state"] == "stopped", 120, "two versions trained past the open batch", status)
            assert status()["error"] is None
            assert any(e["event"] == "recovering" and e["batch_id"] == left_open for e in status()["events"])
            assert trainer_service.find(config) is None
        batch = queries.get_batch(db, left_open)
        assert batch["status"] == "failed" and "ended without finishing its batch" in batch["error"], batch
        completed = queries.list_batches(db, statuses=("completed",))
        assert len(completed) >= 2, completed
    finally:
        db.dispose()


def _assert_episodes_whole_and_trained_once(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            # every finished episode whole: as many step rows and LLM calls as the steps it says it took
            broken = conn.execute(
                sa.text(
                    "SELECT t.id, t.step_count, (SELECT count(*) FROM steps s WHERE s.trajectory_id = t.id), "
                    "(SELECT count(*) FROM llm_calls c WHERE c.trajectory_id = t.id) FROM trajectories t "
                    "WHERE t.status = 'finished'"
                )
            ).all()
            assert broken and all(r[1] == r[2] == r[3] for r in broken), [r for r in broken if not r[1] == r[2] == r[3]]
            # a group lost with an actor is played again as a new group, and a batch failed by an outage or a
            # dead controller releases its groups for another batch: still no group is in two batches that trained
            twice = conn.execute(
                sa.text(
                    "SELECT m.trajectory_id FROM training_batch_trajectories m "
                    "JOIN training_batches b ON b.id = m.batch_id WHERE b.status = 'completed' "
                    "GROUP BY m.trajectory_id HAVING count(*) > 1"
                )
            ).all()
            assert not twice
    finally:
        engine.dispose()


def test_live_mode_trains_real_adapters_on_the_persistent_trainer_and_restarts_it_when_killed(
    ray_session, tiny_model_dir, tmp_path
):
    """Simulated engines, the real trainer: the live loop hands batches to one long-running Ray Train job,
    which keeps its model between them and publishes real adapters. Killing the whole trainer (its service
    actor, and with it the Ray Train run) once a version is out: the controller starts a new one and the loop
    carries on to its last version, each batch trained once."""
    import threading

    from cluster import trainer_service
    from recorder import queries
    from recorder.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'persistent.db'}"
    upgrade(url)
    config = live_config(url, tiny_model_dir, tmp_path, "persist", live_versions=4, persistent_trainer=True)
    config = config.model_copy(
        update={
            "trainer": config.trainer.model_copy(update={"backend": "torch", "num_workers": 1, "updates_per_batch": 1}),
            "rollout": config.rollout.model_copy(update={"eval_seeds": []}),
        }
    )
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["report"] = run_loop(config, tmp_path / "out")
        except BaseException as exc:  # reported by the assertion below
            outcome["error"] = exc

    runner = threading.Thread(target=run, daemon=True)
    engine = sa.create_engine(url)
    try:
        runner.start()
        _wait(
            lambda: "error" in outcome or queries.deployed_version(engine) >= 1,
            240,
            "a first version from the persistent trainer",
        )
        assert "error" not in outcome, outcome
        service = trainer_service.find(config)
        assert service is not None
        ray.kill(service, no_restart=True)
        runner.join(timeout=420)
        assert not runner.is_alive() and "report" in outcome, outcome
        report = outcome["report"]
        assert report["live"]["state"] == "stopped" and report["final_version"] >= 4, report["live"]
        batches = sorted((b for b in queries.list_batches(engine) if b["status"] == "completed"), key=lambda b: b["id"])
        assert {b["ray_job_id"] for b in batches} == {"service:persist-trainer"}
        reused = [b["stats"]["updates"][0]["reused_model"] for b in batches]
        # built twice (the first service, then the one started after the kill), reused in between and after
        assert reused[0] == 0 and reused.count(0) == 2 and 1 in reused, reused
        for version in {b["target_version"] for b in batches}:
            assert (Path(queries.get_version(engine, version)["artifact_uri"]) / "adapter_model.safetensors").is_file()
    finally:
        runner.join(timeout=60)
        shutdown(config)
        engine.dispose()
    assert max(_trained_lags(url)) <= config.trainer.max_staleness
    _assert_episodes_whole_and_trained_once(url)
