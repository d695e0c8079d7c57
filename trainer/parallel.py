"""How Ray Train workers share the policy: DDP (a full copy each) or FSDP2 (`fully_shard`, parameters,
gradients and optimizer state sharded across workers) for full fine-tunes too big for one device.

FSDP2 runs on GPUs (NCCL) and on CPUs (gloo); Ray Train's own `prepare_model(parallel_strategy="fsdp")`
refuses CPUs, so sharding is applied here directly. Checkpoints gather a full state dict (a collective:
every rank calls it) so a version folder is ordinary safetensors whatever the strategy.
"""

from __future__ import annotations

from typing import Any

import torch


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (Llama/Qwen/Mistral layout)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers (model.model.layers) in {type(model).__name__} to shard")
    return list(layers)


def wrap(model: Any, strategy: str, world: int) -> Any:
    """DDP or FSDP2 around the model; a single worker trains it as is."""
    if world <= 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    import ray.train.torch

    return ray.train.torch.prepare_model(model, parallel_strategy="ddp")


def checkpoint_state(model: Any, optimizer: torch.optim.Optimizer, strategy: str) -> tuple[Any, dict[str, Any]]:
    """(model state dict or None to let save_pretrained read the model, optimizer state), gathered in full.

    Under FSDP this is a collective: every rank must call it, rank 0 writes what it returns."""
    if strategy != "fsdp" or not torch.distributed.is_initialized():
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=options)


def restore_optimizer(model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any], strategy: str) -> None:
    if strategy != "fsdp" or not torch.distributed.is_initialized():
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_optimizer_state_dict(model, optimizer, state, options=options)
