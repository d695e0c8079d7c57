from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.config import ModelConfig
from cluster.models import MANIFEST, SMOLLM2_GGUF_SHA256, ModelFetchError, resolve_model


def test_fetched_smollm2_is_a_complete_safetensors_checkpoint(base_model_dir: str):
    folder = Path(base_model_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json", MANIFEST):
        assert (folder / name).is_file(), name
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["source_sha256"] == SMOLLM2_GGUF_SHA256
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert not list(folder.parent.glob(".fetch-*")), "a fetch left its staging folder behind"


def test_resolve_accepts_local_folders_and_hub_ids(base_model_dir: str, tmp_path: Path):
    assert resolve_model(ModelConfig(name=base_model_dir)) == str(Path(base_model_dir).resolve())
    assert resolve_model(ModelConfig(name="Qwen/Qwen2.5-0.5B-Instruct")) == "Qwen/Qwen2.5-0.5B-Instruct"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFetchError, match="has no config.json"):
        resolve_model(ModelConfig(name=str(tmp_path / "empty")))


def test_unfetched_alias_says_how_to_fetch(tmp_path: Path):
    with pytest.raises(ModelFetchError, match="ziggurat models fetch"):
        resolve_model(ModelConfig(cache_dir=tmp_path), fetch=False)


def test_tiny_llama_is_about_three_million_parameters(tiny_model_dir: str, base_model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    parameters = sum(p.numel() for p in model.parameters())
    assert 2_500_000 < parameters < 4_000_000
    tiny_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base_tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    text = "What is the capital of France?"
    assert tiny_tokenizer(text)["input_ids"] == base_tokenizer(text)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, len(tiny_tokenizer)) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_fetched_smollm2_answers_in_vllm(base_model_dir: str):
    """The converted checkpoint loads in vLLM (CPU) and answers a factual question sensibly."""
    from rollout.config import EngineConfig
    from rollout.engine import EngineThread

    config = EngineConfig(device="cpu", dtype="float32", max_model_len=512, kv_cache_gib=1, max_num_seqs=8)
    with EngineThread(base_model_dir, config) as engine:
        prompt = engine.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
        answer = engine.generate(prompt, temperature=0.0, max_tokens=24).completions[0]
    assert "Paris" in answer.text, answer.text
    assert answer.finish_reason == "stop"
