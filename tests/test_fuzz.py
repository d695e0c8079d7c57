"""Property-based fuzzing of every input boundary: recorder records, configs, env actions, judge output.

Every bad input must be rejected with a message (never an unexpected exception), and whatever is accepted
must be stored and read back exactly: no corrupt row.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config import ConfigError, parse_config
from recorder.records import JudgmentRecord, LlmCallRecord, StepRecord, TrajectoryRecord, validate
from recorder.schema import Step
from recorder.store import TrajectoryStore
from rollout.config import JudgeConfig
from rollout.envs import make_env
from rollout.judges import JudgedTrajectory, JudgeOutputError, llm_judgments, parse_scores

anything = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=80), st.binary(max_size=16), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)  # fmt: skip
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from recorder.migrate import upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.db'}"
    upgrade(url)
    store = TrajectoryStore(url)
    store.write([TrajectoryRecord("fuzz-t", "market", "s", "g", 0)])
    yield store
    store.dispose()


@FUZZ
@given(index=anything, observation=anything, action=anything, reward=anything, done=anything, error=anything)
def test_fuzzed_steps_are_stored_exactly_or_rejected_naming_the_field(store, index, observation, action, reward,
                                                                      done, error):  # fmt: skip
    record = StepRecord("fuzz-t", index, observation, action=action, env_reward=reward, done=done, error=error)
    problem = validate(record)
    result = store.write([record])
    if problem is not None:
        assert result.written == 0 and result.rejected and result.rejected[0][1] == problem
        assert any(field in problem for field in ("step_index", "observation", "action", "env_reward", "done",
                                                  "error", "malformed"))  # fmt: skip
        return
    assert result.written == 1, result.rejected
    with store.engine.connect() as conn:
        row = (
            conn.execute(sa.select(Step.__table__).where(Step.trajectory_id == "fuzz-t", Step.step_index == index))
            .mappings()
            .one()
        )
    assert row["observation"] == observation and row["error"] == error and row["done"] == done
    assert row["env_reward"] == reward and math.isfinite(row["env_reward"])


@FUZZ
@given(
    prompt=st.lists(st.integers(-5, 2**31), max_size=6),
    completion=st.lists(st.integers(-5, 2**31), max_size=6),
    logprobs=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=7),
    version=anything,
)
def test_fuzzed_llm_calls_never_store_bad_token_arrays(prompt, completion, logprobs, version):
    try:
        record = LlmCallRecord.from_tokens("fuzz-t", 0, 0, version, prompt, completion, logprobs)
    except (ValueError, OverflowError, TypeError) as exc:  # cannot even be packed: refused at the source
        assert str(exc)
        return
    problem = validate(record)
    ok_arrays = (
        len(completion) == len(logprobs)
        and min(prompt + completion, default=0) >= 0
        and all(math.isfinite(x) and x <= 1e-3 for x in logprobs)
        and isinstance(version, int) and not isinstance(version, bool) and version >= 0
        and len(prompt) > 0 and len(completion) > 0
    )  # fmt: skip
    if not ok_arrays:
        assert problem is not None
    if problem is None:
        assert np.isfinite(np.frombuffer(record.completion_logprobs, "<f4")).all()


@FUZZ
@given(score=anything, rank=anything, trajectory=anything, judge=anything)
def test_fuzzed_judgments_are_validated(score, rank, trajectory, judge):
    problem = validate(JudgmentRecord(trajectory, judge, "llm", score, rank_in_group=rank))
    valid_score = isinstance(score, int | float) and not isinstance(score, bool) and math.isfinite(score)
    if not valid_score or not isinstance(trajectory, str) or not trajectory:
        assert problem is not None


sections = st.sampled_from(["ray", "model", "engine", "database", "recorder", "trainer", "judge", "rollout",
                            "controller", "bogus"])  # fmt: skip
keys = st.sampled_from(["address", "name", "dtype", "url", "kv_cache_gib", "learning_rate", "mode", "llm",
                        "weights", "actors", "min_groups", "env", "typo", "eval_seeds", "strategy"])  # fmt: skip


@FUZZ
@given(data=st.one_of(anything, st.dictionaries(sections, st.one_of(anything, st.dictionaries(keys, anything)))))
def test_fuzzed_configs_load_or_fail_with_a_config_error_naming_the_key(data):
    try:
        parse_config(data, "fuzz.yaml")
    except ConfigError as exc:
        message = str(exc)
        assert "fuzz.yaml" in message and ("key '" in message or "top level" in message)


@FUZZ
@given(action=st.text(max_size=300), seed=st.integers(0, 10_000))
def test_fuzzed_actions_are_outcomes_never_crashes(action, seed):
    for env in (make_env("market", lenient=True, partial_format=True), make_env("market"), make_env("arithmetic"),
                make_env("lowercase")):  # fmt: skip
        env.reset(seed)
        result = env.step(action)
        assert math.isfinite(result.reward)
        if env.name == "market" and result.info["action"] is None:
            assert result.info["error"]


@FUZZ
@given(
    text=st.text(max_size=200) | st.builds(lambda xs: f'{{"scores": {xs}}}', st.lists(anything, max_size=4).map(str))
)
def test_fuzzed_judge_output_yields_valid_scores_or_a_recorded_fallback(text):
    try:
        scores, _ = parse_scores(text, 3)
        assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
    except JudgeOutputError as exc:
        assert str(exc)

    async def reply(_: str) -> str:
        return text

    group = [JudgedTrajectory(f"t{i}", "x", float(i)) for i in range(3)]
    records = asyncio.run(llm_judgments(group, JudgeConfig(llm=True, weights={"llm": 1.0}), reply, "m", "v"))
    assert len(records) == 3 and all(0.0 <= r.score <= 1.0 and validate(r) is None for r in records)
