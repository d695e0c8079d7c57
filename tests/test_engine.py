"""The vLLM wrapper on the shared tiny-model engine: tokens in, tokens and sampled log-probs out."""

from __future__ import annotations

import pytest

from rollout.engine import EngineError

pytestmark = pytest.mark.slow


def test_group_of_samples_has_tokens_and_logprobs(tiny_engine):
    prompt = tiny_engine.chat_prompt([{"role": "user", "content": "Buy YES or NO?"}])
    generation = tiny_engine.generate(prompt, n=4, max_tokens=12, temperature=1.0)
    assert generation.prompt_token_ids == prompt
    assert generation.model_version == 0
    assert len(generation.completions) == 4
    for completion in generation.completions:
        assert 1 <= len(completion.token_ids) <= 12
        assert len(completion.logprobs) == len(completion.token_ids)
        assert all(lp <= 0.0 for lp in completion.logprobs)
        assert completion.finish_reason in ("stop", "length")
    # A random model sampled at temperature 1 over a 49k vocabulary: the 4 samples differ.
    assert len({tuple(c.token_ids) for c in generation.completions}) > 1


def test_logprobs_match_a_transformers_forward_pass(tiny_engine, tiny_model_dir):
    """What vLLM records as the behaviour log-prob is what the trainer will recompute."""
    import torch
    from transformers import AutoModelForCausalLM

    prompt = tiny_engine.chat_prompt([{"role": "user", "content": "Hold or sell?"}])
    completion = tiny_engine.generate(prompt, max_tokens=16, temperature=1.0).completions[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt + completion.token_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    expected = logprobs.gather(1, targets[:, None])[:, 0][len(prompt) - 1 :]
    assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=2e-3), (
        completion.logprobs[:4],
        expected[:4].tolist(),
    )


def test_greedy_is_deterministic_and_batches(tiny_engine):
    prompts = [tiny_engine.chat_prompt([{"role": "user", "content": f"market {i}"}]) for i in range(6)]
    first = tiny_engine.generate_many(prompts, temperature=0.0, max_tokens=8)
    second = tiny_engine.generate_many(prompts, temperature=0.0, max_tokens=8)
    assert [g.completions[0].token_ids for g in first] == [g.completions[0].token_ids for g in second]
    assert [g.prompt_token_ids for g in first] == prompts


def test_max_tokens_is_respected(tiny_engine):
    prompt = tiny_engine.chat_prompt([{"role": "user", "content": "Talk."}])
    completion = tiny_engine.generate(prompt, max_tokens=3, temperature=1.0).completions[0]
    assert len(completion.token_ids) <= 3
    if len(completion.token_ids) == 3:
        assert completion.finish_reason == "length"


def test_empty_prompt_is_a_clear_error(tiny_engine):
    with pytest.raises(EngineError, match="prompt_token_ids is empty"):
        tiny_engine.generate([], max_tokens=4)


def test_a_call_past_its_deadline_fails_clearly_and_the_engine_lives_on(tiny_engine):
    prompt = tiny_engine.chat_prompt([{"role": "user", "content": "Say a lot."}])
    with pytest.raises(EngineError, match="did not answer within"):
        tiny_engine.generate(prompt, max_tokens=900, temperature=1.0, timeout_s=0.05)
    after = tiny_engine.generate(prompt, max_tokens=4, temperature=0.0)
    assert len(after.completions[0].token_ids) >= 1


def _random_adapter(base: str, folder, seed: int) -> str:
    """A LoRA adapter with random (non-zero) A and B, so it visibly changes the tiny model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(folder))
    return str(folder)


def test_adapters_load_without_serving_then_flip_reload_in_place_and_unload(tiny_engine, tiny_model_dir, tmp_path):
    prompt = tiny_engine.chat_prompt([{"role": "user", "content": "Which market should I buy?"}])

    def greedy() -> tuple[int, list[int]]:
        generation = tiny_engine.generate(prompt, max_tokens=12, temperature=0.0)
        return generation.model_version, generation.completions[0].token_ids

    version, base = greedy()
    adapter = _random_adapter(tiny_model_dir, tmp_path / "v7", seed=1)
    tiny_engine.load_adapter(7, adapter)
    assert greedy() == (0, base)  # loaded is not served: phase 1 of a hot-swap changes nothing
    tiny_engine.activate(7)
    version, first = greedy()
    assert version == 7 and first != base
    _random_adapter(tiny_model_dir, tmp_path / "v7", seed=2)  # a re-train rewrites the same version's folder
    tiny_engine.load_adapter(7, adapter)
    assert greedy() == (7, first)  # without reload the engine keeps the weights it has
    tiny_engine.load_adapter(7, adapter, reload=True)
    version, reloaded = greedy()
    assert version == 7 and reloaded not in (first, base)
    with pytest.raises(EngineError, match="being served"):
        tiny_engine.unload_adapter(7)
    tiny_engine.activate(0)
    tiny_engine.unload_adapter(7)
    assert greedy() == (0, base)
    with pytest.raises(EngineError, match="not loaded"):
        tiny_engine.activate(7)
    with pytest.raises(EngineError, match="not a LoRA adapter folder"):
        tiny_engine.load_adapter(8, str(tmp_path))


def test_full_weights_swap_in_place_after_running_requests_finish(tiny_engine, tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    prompt = tiny_engine.chat_prompt([{"role": "user", "content": "Hold, buy or sell?"}])

    def greedy() -> tuple[int, list[int]]:
        generation = tiny_engine.generate(prompt, max_tokens=12, temperature=0.0)
        return generation.model_version, generation.completions[0].token_ids

    _, base = greedy()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    model.save_pretrained(tmp_path / "v3")  # a "full fine-tune" of the same architecture

    running = tiny_engine.submit(tiny_engine.engine.generate(prompt, max_tokens=64, min_tokens=64, temperature=0.0))
    tiny_engine.load_weights(3, str(tmp_path / "v3"))
    assert running.result(timeout=120).model_version == 0  # admitted before the swap: finished on the old weights
    version, tuned = greedy()
    assert version == 3 and tuned != base
    with pytest.raises(EngineError, match="full weights"):
        tiny_engine.activate(0)
    with pytest.raises(EngineError, match="no .safetensors"):
        tiny_engine.load_weights(4, str(tmp_path))
    tiny_engine.load_weights(0, tiny_model_dir)  # back to the base model
    assert greedy() == (0, base)


def test_a_seeded_request_prefilled_in_chunks_does_not_kill_the_cpu_engine(tiny_engine):
    # vLLM 0.32's CPU sampler rewinds a seeded request's generator after a partial prefill, which a CPU generator
    # cannot do: the engine core dies. 12 prompts of 700 tokens (8400 > the 4096 tokens vLLM schedules per step on
    # a CPU) are prefilled in chunks; on the CPU engine their seeds are ignored and all of them are served.
    prompts = [[100 + (i * 37 + j) % 400 for j in range(700)] for i in range(12)]
    generations = tiny_engine.generate_many(prompts, timeout_s=300, max_tokens=4, temperature=1.0, seed=1)
    assert all(len(g.completions[0].token_ids) == 4 for g in generations)
    after = tiny_engine.generate(prompts[0][:20], max_tokens=2, temperature=1.0)  # still serving
    assert len(after.completions[0].token_ids) == 2
