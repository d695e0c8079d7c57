"""The trainer scores recorded tokens under the distribution that sampled them: vLLM's processed log-probs at
the call's temperature, recorded through the store, must equal the trainer's own log-probs of those tokens."""

from __future__ import annotations

import pytest
import torch

from cluster.config import ConfigError, parse_config
from recorder import queries
from recorder.migrate import upgrade
from recorder.records import LlmCallRecord
from recorder.store import TrajectoryStore
from tests.recorder_data import finished, step, trajectory
from trainer.data import build_rows, collate
from trainer.step import token_logprobs

pytestmark = pytest.mark.slow


def test_trainer_logprobs_of_recorded_tokens_equal_the_samplers_at_its_temperature(
    tiny_engine, tiny_model_dir, tmp_path
):
    from transformers import AutoModelForCausalLM

    temperature = 0.5
    prompt = tiny_engine.chat_prompt([{"role": "user", "content": "Name a market and a price."}])
    generation = tiny_engine.generate(prompt, n=4, max_tokens=16, temperature=temperature)
    url = f"sqlite:///{tmp_path / 'ziggurat.db'}"
    upgrade(url)
    store = TrajectoryStore(url)
    records = []
    for i, completion in enumerate(generation.completions):
        tid = f"t{i}"
        call = LlmCallRecord.from_tokens(
            tid, 0, 0, generation.model_version, prompt, completion.token_ids, completion.logprobs,
            text=completion.text, finish_reason=completion.finish_reason,
            sampling_params={"temperature": temperature, "max_tokens": 16},
        )  # fmt: skip
        records += [trajectory(tid, "g"), step(tid, 0), call, finished(tid, "g", reward=float(i % 2))]
    store.write(records)
    groups = queries.load_trainable_groups(store.engine)
    store.dispose()
    rows, _ = build_rows(groups)
    batch = collate(rows, pad_id=0)
    assert batch.loss_mask.sum() == sum(len(c.token_ids) for c in generation.completions)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        at_sampling = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask, batch.temperatures)
        at_one = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
    policy = batch.loss_mask.bool()
    recorded = batch.behaviour_logprobs[policy]
    assert torch.allclose(at_sampling[policy], recorded, atol=2e-3), (at_sampling[policy] - recorded).abs().max()
    assert (at_one[policy] - recorded).abs().max() > 0.1  # the unscaled distribution is a different one


@pytest.mark.parametrize(
    ("key", "value"),
    [("top_p", 0.9), ("top_k", 50), ("min_p", 0.05), ("repetition_penalty", 1.1), ("presence_penalty", 0.5),
     ("frequency_penalty", 0.5)],
)  # fmt: skip
def test_sampling_the_trainer_cannot_reproduce_is_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError) as caught:
        parse_config({"rollout": {key: value}}, source="test.yaml")
    assert f"rollout.{key}" in str(caught.value) and "temperature" in str(caught.value)


def test_greedy_training_rollouts_are_refused():
    with pytest.raises(ConfigError, match="temperature"):
        parse_config({"rollout": {"temperature": 0.0}}, source="test.yaml")
