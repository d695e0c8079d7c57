"""Loading the policy for training (LoRA adapters via peft, or full weights) and saving what was trained.

torch, transformers and peft are imported where they are used: the model store (cluster.artifacts,
cluster.models) imports this module for the manifest's name and `sha256_file` alone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from trainer.config import TrainerConfig

MANIFEST = "ziggurat_version.json"
MERGED_DIR = "merged"
"""Subfolder of a LoRA version holding its adapter merged into the base weights (engine.lora_serving: merged)."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read 1 MiB at a time (the checksums in a version's manifest)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_policy(base_model: str, config: TrainerConfig, device: str = "cpu", adapter: str | None = None) -> Any:
    """The base model, wrapped with fresh (or `adapter`'s) LoRA weights when config.mode is lora."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.tree_attention import use_tree_attention

    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype).to(device)
    use_tree_attention(model)  # packed rows: each segment attends only to what its rows may see
    if config.activation_checkpointing:
        # transformers checkpoints layers only in training mode; non-reentrant needs no grad-requiring inputs
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    if config.mode == "full":
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter is not None:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [m for m in config.lora.target_modules if m in present]
    if not targets:
        raise ValueError(
            f"none of trainer.lora.target_modules {config.lora.target_modules} exist in {base_model}; "
            f"its linear layers include: {sorted(present)[:20]}"
        )
    lora = LoraConfig(
        r=config.lora.rank,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def merge_adapter(base_model: str, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """The base weights with a LoRA adapter folded in, saved as a full checkpoint (safetensors) that vLLM
    swaps in like any full-weights version."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(out, safe_serialization=True)
    return out


def save_policy(
    model: Any,
    out_dir: str | Path,
    manifest: dict[str, Any],
    tokenizer_source: str | None = None,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Write the adapter (LoRA) or the full weights as safetensors, plus a manifest with checksums.

    `state_dict` is the gathered full state of a sharded (FSDP) model; otherwise the model's own is written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unwrapped = getattr(model, "module", model)  # DDP
    if state_dict is None:
        unwrapped.save_pretrained(out, safe_serialization=True)
    else:
        unwrapped.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    if tokenizer_source is not None and manifest.get("kind") == "full":
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(out)
    checksums = {p.name: sha256_file(p) for p in sorted(out.glob("*.safetensors"))}
    (out / MANIFEST).write_text(json.dumps({**manifest, "checksums": checksums}, indent=2, default=str))
    return out
