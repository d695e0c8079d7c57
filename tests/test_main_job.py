"""The main job end to end on the embedded defaults: local Ray, SQLite, vLLM on the CPU (tiny model)."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa

from cluster.config import load_config
from cluster.run import DEMO_TASKS, run
from recorder.records import unpack_logprobs, unpack_tokens
from recorder.schema import LlmCall

pytestmark = pytest.mark.slow


def test_main_job_records_every_sampled_call_as_tokens(ray_session, tiny_engine, tmp_path):
    config = load_config()  # configs/local.yaml, with the database moved into the test's folder
    config = config.model_copy(
        update={
            "database": config.database.model_copy(update={"url": f"sqlite:///{tmp_path / 'z.db'}"}),
            "recorder": config.recorder.model_copy(update={"actor_name": "main-job-recorder"}),
        }
    )
    summary = run(config, group_size=3, max_tokens=8, engine=tiny_engine)
    assert summary["recorded"] == len(DEMO_TASKS) * 3 * 4  # start, step, call, finish per episode
    assert summary["finished_trajectories_in_store"] == len(DEMO_TASKS) * 3

    engine = sa.create_engine(config.database.url)
    with engine.connect() as conn:
        calls = conn.execute(sa.select(LlmCall.__table__)).mappings().all()  # typed: JSON comes back parsed
        groups = conn.execute(
            sa.text("SELECT group_id, count(*), min(scenario_id) FROM trajectories GROUP BY group_id")
        ).all()
    engine.dispose()
    assert sorted(size for _, size, _ in groups) == [3, 3, 3]
    assert {scenario for _, _, scenario in groups} == {q for q, _ in DEMO_TASKS}
    for call in calls:
        prompt = unpack_tokens(call["prompt_token_ids"])
        completion = unpack_tokens(call["completion_token_ids"])
        logprobs = unpack_logprobs(call["completion_logprobs"])
        assert len(completion) == len(logprobs) == call["completion_tokens"] >= 1
        assert np.all(logprobs <= 0)
        # The recorded prompt is exactly what the engine's chat template produced for the question.
        question = call["messages"][0]["content"]
        assert prompt.tolist() == tiny_engine.chat_prompt([{"role": "user", "content": question}])
