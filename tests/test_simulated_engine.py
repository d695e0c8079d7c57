"""The simulated engine (engine.backend: simulated): its token rates, its aggregate cap, PolicyEngine's version
rules, and a rollout actor on it recording exactly what it returned. No vLLM, no GPU."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from recorder.records import unpack_logprobs, unpack_tokens
from recorder.schema import LlmCall, Trajectory
from rollout.config import EngineConfig, SimulatedEngineConfig
from rollout.engine import EngineError, Generation
from rollout.simulated import SimulatedEngine
from tests.rollout_harness import recording_into_sqlite, rows


def _config(**simulated: object) -> EngineConfig:
    return EngineConfig(backend="simulated", max_model_len=1024, simulated=SimulatedEngineConfig(**simulated))


async def _timed(coroutine: object) -> tuple[object, float]:
    started = time.perf_counter()
    result = await coroutine  # type: ignore[misc]
    return result, time.perf_counter() - started


def test_one_sequence_decodes_at_tokens_per_s(tiny_model_dir):
    async def scenario() -> tuple[Generation, float, list[int]]:
        engine = await SimulatedEngine.start(tiny_model_dir, _config(tokens_per_s=200.0))
        try:
            prompt = engine.chat_prompt([{"role": "user", "content": "Say something."}])
            generation, elapsed = await _timed(engine.generate(prompt, max_tokens=100))
            return generation, elapsed, prompt  # type: ignore[return-value]
        finally:
            engine.shutdown()

    generation, elapsed, prompt = asyncio.run(scenario())
    assert 0.4 <= elapsed <= 0.9, f"100 tokens at 200 tok/s took {elapsed:.3f} s (expected ~0.5 s)"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "Say something."}]  # the real chat template's token ids
    assert prompt == list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    )
    (completion,) = generation.completions
    assert len(completion.token_ids) == len(completion.logprobs) == 100 and completion.finish_reason == "length"
    assert not set(completion.token_ids) & set(tokenizer.all_special_ids)
    assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    logprobs = np.array(completion.logprobs)
    assert np.isfinite(logprobs).all() and (logprobs < 0).all()
    by_token: dict[int, set[float]] = {}
    for token, logprob in zip(completion.token_ids, completion.logprobs, strict=True):
        by_token.setdefault(token, set()).add(logprob)
    assert all(len(values) == 1 for values in by_token.values())  # one fixed distribution: same token, same log-prob
    assert generation.prompt_token_ids == prompt and generation.model_version == 0


def test_the_aggregate_cap_slows_every_sequence(tiny_model_dir):
    per_sequence, capped_total, sequences, tokens = 200.0, 800.0, 16, 50

    async def sixteen(batch_tokens_per_s: float) -> float:
        engine = await SimulatedEngine.start(
            tiny_model_dir, _config(tokens_per_s=per_sequence, batch_tokens_per_s=batch_tokens_per_s)
        )
        try:
            prompt = engine.chat_prompt([{"role": "user", "content": "Count."}])
            _, elapsed = await _timed(asyncio.gather(*(engine.generate(prompt, max_tokens=tokens) for _ in range(16))))
            return elapsed
        finally:
            engine.shutdown()

    uncapped = asyncio.run(sixteen(1e6))
    capped = asyncio.run(sixteen(capped_total))
    step_uncapped = 1 / per_sequence
    step_capped = max(1 / per_sequence, sequences / capped_total)
    expected_ratio = step_capped / step_uncapped  # 4.0
    assert uncapped == pytest.approx(tokens * step_uncapped, rel=0.5)
    assert capped == pytest.approx(tokens * step_capped, rel=0.3)
    assert 0.8 * expected_ratio <= capped / uncapped <= 1.25 * expected_ratio, (uncapped, capped, expected_ratio)


def test_max_num_seqs_queues_and_a_cancelled_request_frees_its_slot(tiny_model_dir):
    async def scenario() -> tuple[float, float]:
        config = EngineConfig(
            backend="simulated", max_model_len=4096, max_num_seqs=4,
            simulated=SimulatedEngineConfig(tokens_per_s=200.0, batch_tokens_per_s=1e6),
        )  # fmt: skip
        engine = await SimulatedEngine.start(tiny_model_dir, config)
        try:
            prompt = [1, 2, 3]
            # 8 requests of 20 tokens, 4 slots: two waves of 0.1 s
            _, waves = await _timed(asyncio.gather(*(engine.generate(prompt, max_tokens=20) for _ in range(8))))
            # 4 slots held by a long request (n=4) that hits its deadline: the next request starts at once
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(engine.generate(prompt, n=4, max_tokens=2000), 0.1)
            _, after_cancel = await _timed(engine.generate(prompt, max_tokens=20))
            return waves, after_cancel  # type: ignore[return-value]
        finally:
            engine.shutdown()

    waves, after_cancel = asyncio.run(scenario())
    assert 0.18 <= waves <= 0.4, waves
    assert after_cancel <= 0.4, after_cancel  # not 10 s behind the cancelled request


def test_versions_follow_policy_engine_rules(tiny_model_dir, tmp_path: Path):
    adapter, weights = tmp_path / "v1", tmp_path / "v2"
    adapter.mkdir()
    weights.mkdir()
    (weights / "manifest.json").write_text("{}")  # the simulated trainer's folders hold only a manifest

    async def scenario() -> None:
        engine = await SimulatedEngine.start(tiny_model_dir, _config(tokens_per_s=100.0, load_s=0.05))
        try:
            prompt = [5, 6, 7]
            with pytest.raises(EngineError, match="does not exist"):
                await engine.load_adapter(1, str(tmp_path / "missing"))
            with pytest.raises(EngineError, match="does not exist"):
                await engine.load_weights(2, str(tmp_path / "missing"))
            await engine.load_adapter(1, str(adapter))
            assert engine.loaded_versions == [1]
            assert (await engine.generate(prompt, max_tokens=2, version=1)).model_version == 1
            assert (await engine.generate(prompt, max_tokens=2)).model_version == 0  # still serving the base
            with pytest.raises(EngineError, match="version 7 is not loaded"):
                await engine.generate(prompt, max_tokens=2, version=7)
            with pytest.raises(EngineError, match="not loaded"):
                engine.activate(7)
            engine.activate(1)
            assert (await engine.generate(prompt, max_tokens=2)).model_version == 1
            assert (await engine.generate(prompt, max_tokens=2, base_weights=True)).model_version == 0
            with pytest.raises(EngineError, match="being served"):
                await engine.unload_adapter(1)

            # Full weights: a request running when load_weights starts finishes on the old version first.
            loop = asyncio.get_running_loop()
            finished: dict[str, float] = {}

            async def mark(name: str, coroutine: object) -> object:
                result = await coroutine  # type: ignore[misc]
                finished[name] = loop.time()
                return result

            old = asyncio.ensure_future(mark("old", engine.generate(prompt, max_tokens=40)))  # 0.4 s
            await asyncio.sleep(0.1)
            swap_started = loop.time()
            swap = asyncio.ensure_future(mark("swap", engine.load_weights(2, str(weights))))
            await asyncio.sleep(0.05)
            new = asyncio.ensure_future(mark("new", engine.generate(prompt, max_tokens=2)))
            first, _, second = await asyncio.wait_for(asyncio.gather(old, swap, new), 10)
            assert first.model_version == 1 and second.model_version == 2  # type: ignore[attr-defined]
            assert finished["old"] <= finished["swap"] <= finished["new"]
            assert finished["swap"] - swap_started >= 0.25  # it waited for the running request (~0.3 s left)
            assert (engine.version, engine.weights_version, engine.loaded_versions) == (2, 2, [])
            with pytest.raises(EngineError, match="full weights"):
                engine.activate(1)

            # A drain past its deadline leaves the weights as they were.
            slow = asyncio.ensure_future(engine.generate(prompt, max_tokens=50))
            await asyncio.sleep(0.05)
            with pytest.raises(EngineError, match="still running"):
                await engine.load_weights(3, str(weights), drain_timeout_s=0.1)
            assert (await slow).model_version == 2 and engine.weights_version == 2
        finally:
            engine.shutdown()

    asyncio.run(scenario())


def test_a_rollout_worker_on_the_simulated_backend_records_what_it_returned(ray_session, tiny_model_dir, tmp_path):
    from rollout.actor import RolloutWorker

    config = _config(tokens_per_s=400.0, batch_tokens_per_s=4000.0)
    returned: list[Generation] = []

    async def scenario(recorder: object) -> dict:
        worker = RolloutWorker(tiny_model_dir, config, recorder, restore_on_restart=False)  # type: ignore[arg-type]
        try:
            assert await worker.ready() == 0
            engine = worker._engine
            assert isinstance(engine, SimulatedEngine)  # _policy started the configured backend
            generate = engine.generate

            async def keep(*args: object, **kwargs: object) -> Generation:
                generation = await generate(*args, **kwargs)  # type: ignore[arg-type]
                returned.append(generation)
                return generation

            engine.generate = keep  # type: ignore[method-assign]
            return await asyncio.wait_for(
                worker.run_group("market", seed=3, group_size=3, max_turns=2, max_tokens=12), 60
            )
        finally:
            await asyncio.wait_for(worker.close(), 60)

    with recording_into_sqlite(tmp_path, "simulated-engine-recorder") as (url, recorder):
        summary = asyncio.run(scenario(recorder))
    assert summary["statuses"] == ["finished"] * 3 and summary["rejected"] == 0, summary
    calls = rows(url, sa.select(LlmCall.__table__).order_by("trajectory_id", "step_index"))
    trajectories = rows(url, sa.select(Trajectory.__table__))
    assert len(trajectories) == 3 and {t.model_version for t in trajectories} == {0}
    assert len(calls) == len(returned) == 6  # 3 episodes x 2 turns (a random policy never ends a market early)
    by_completion = {tuple(g.completions[0].token_ids): g for g in returned}
    assert len(by_completion) == 6
    for call in calls:
        generation = by_completion[tuple(unpack_tokens(call.completion_token_ids).tolist())]
        completion = generation.completions[0]
        assert unpack_tokens(call.prompt_token_ids).tolist() == generation.prompt_token_ids
        recorded = unpack_logprobs(call.completion_logprobs)
        assert np.allclose(recorded, completion.logprobs, rtol=1e-6, atol=1e-5)
        assert all(math.isfinite(x) and x < 0 for x in recorded)
        assert call.text == completion.text and call.finish_reason == "length" and call.model_version == 0


def test_the_simulated_backend_is_never_the_default_and_its_rates_are_validated():
    from pydantic import ValidationError

    assert EngineConfig().backend == "vllm"
    for bad in ({"tokens_per_s": 0}, {"batch_tokens_per_s": -1}, {"completion_tokens": 0}, {"load_s": -0.1}):
        with pytest.raises(ValidationError):
            SimulatedEngineConfig(**bad)
    with pytest.raises(ValidationError):
        EngineConfig(simulated={"token_per_s": 10})  # a misspelt key is refused, not ignored
    assert EngineConfig(backend="simulated", simulated={"completion_tokens": 8}).simulated.completion_tokens == 8
