"""A controller killed mid-training: its restarted incarnation picks the job up from the database."""

from __future__ import annotations

import time

import pytest
import ray

from cluster.controller import start_controller
from recorder import queries
from recorder.store import create_db_engine
from tests.test_controller import loop_config
from tests.test_trainer_job import _record_groups

pytestmark = pytest.mark.slow


def test_a_restarted_controller_resumes_waiting_for_the_running_job(ray_session, postgres, tiny_model_dir, tmp_path):
    from recorder.migrate import upgrade

    url = postgres.create_database("controller_restart")
    upgrade(url)
    _record_groups(url, groups=3, size=4)
    # the one-job-per-batch path (the persistent trainer's restart is tests/test_live.py's)
    config = loop_config(url, tiny_model_dir, tmp_path, "restart", persistent_trainer=False)
    config = config.model_copy(
        update={"trainer": config.trainer.model_copy(update={"reward_source": "env", "updates_per_batch": 3})}
    )
    controller = start_controller(config)
    db = create_db_engine(url)
    try:
        training = controller.train.remote()
        deadline = time.monotonic() + 300
        while not (batches := queries.list_batches(db, statuses=("running",))):  # the job has really started
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        ray.kill(controller, no_restart=False)  # Ray restarts it; the call in flight is lost with it
        with pytest.raises((ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
            ray.get(training, timeout=120)
        deadline = time.monotonic() + 120
        while True:  # the restarted controller answers once its __init__ has run again
            try:
                (outcome,) = ray.get(controller.recover.remote(), timeout=600)
                break
            except ray.exceptions.ActorUnavailableError:
                assert time.monotonic() < deadline, "the controller never came back"
                time.sleep(0.5)
        assert outcome["recovered"] == "resumed" and outcome["trained"] is True
        batch = queries.get_batch(db, batches[0]["id"])
        assert batch["status"] == "completed" and batch["stats"]["progress"] == {
            **batch["stats"]["progress"],
            "done": 3,
            "total": 3,
            "fraction": 1.0,
        }
        assert queries.get_version(db, outcome["version"])["status"] == "ready"
        assert ray.get(controller.recover.remote(), timeout=60) == []  # nothing left to pick up
    finally:
        ray.kill(controller, no_restart=True)
        db.dispose()


def test_a_job_that_died_with_nobody_watching_is_failed_and_its_groups_released(ray_session, tiny_model_dir, tmp_path):
    from recorder.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'lost.db'}"
    upgrade(url)
    _record_groups(url, groups=2, size=4)
    config = loop_config(url, tiny_model_dir, tmp_path, "lost")
    db = create_db_engine(url)
    batch_id = queries.claim_batch(db, max_groups=2)
    queries.mark_batch(db, batch_id, "running", ray_job_id="actor:lost-train-b1")  # no such actor is alive
    controller = start_controller(
        config.model_copy(update={"trainer": config.trainer.model_copy(update={"reward_source": "env"})})
    )
    try:
        (outcome,) = ray.get(controller.recover.remote(), timeout=60)
        assert outcome == {"trained": False, "batch_id": batch_id, "recovered": "failed"}
        batch = queries.get_batch(db, batch_id)
        assert batch["status"] == "failed" and "ended without finishing its batch" in batch["error"]
        assert queries.readiness(db).groups_with_variance == 2  # released: trainable again
    finally:
        ray.kill(controller, no_restart=True)
        db.dispose()


def test_a_job_someone_else_runs_is_left_alone_until_it_is_overdue(ray_session, tiny_model_dir, tmp_path):
    """`ziggurat train` or a Ray Jobs submission runs a batch the controller cannot look up: recovering must not
    fail it (and then claim its groups again from the same parent) while it may still be running."""
    import datetime

    import sqlalchemy as sa

    from recorder.migrate import upgrade
    from recorder.schema import TrainingBatch

    url = f"sqlite:///{tmp_path / 'external.db'}"
    upgrade(url)
    _record_groups(url, groups=2, size=4)
    config = loop_config(url, tiny_model_dir, tmp_path, "external", training_timeout_s=600)
    db = create_db_engine(url)
    batch_id = queries.claim_batch(db, max_groups=2)
    queries.mark_batch(db, batch_id, "running", ray_job_id="raysubmit_someone_else")
    controller = start_controller(
        config.model_copy(update={"trainer": config.trainer.model_copy(update={"reward_source": "env"})})
    )
    try:
        (outcome,) = ray.get(controller.recover.remote(), timeout=60)
        assert outcome == {"trained": False, "batch_id": batch_id, "recovered": "external"}
        assert queries.get_batch(db, batch_id)["status"] == "running"
        an_hour_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
        with db.begin() as conn:
            table = TrainingBatch.__table__
            conn.execute(sa.update(table).where(table.c.id == batch_id).values(started_at=an_hour_ago))
        (outcome,) = ray.get(controller.recover.remote(), timeout=60)
        assert outcome == {"trained": False, "batch_id": batch_id, "recovered": "failed"}
        assert queries.readiness(db).groups_with_variance == 2  # released once overdue
    finally:
        ray.kill(controller, no_restart=True)
        db.dispose()
