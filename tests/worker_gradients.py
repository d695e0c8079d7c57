"""A Ray Train worker that computes one batch's GRPO gradient, for the 1-worker vs 2-worker comparison.

Importable by Ray's workers as `tests.worker_gradients` (the suite puts the repository on their PYTHONPATH).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from recorder.queries import CallData, GroupData, TrajectoryData

AGGREGATIONS = ("token_mean", "sequence_mean", "constant")


def uneven_groups() -> list[GroupData]:
    """Groups of different sizes, prompt and completion lengths (one multi-turn), so that two workers get
    different numbers of rows, sequences and tokens: an equal split would hide a per-worker normaliser."""
    rng = np.random.default_rng(5)
    shapes = [(2, 9, [3, 7]), (3, 5, [2, 6, 4]), (4, 14, [1, 2, 3, 5]), (2, 4, [8, 2])]
    groups = []
    for g, (size, prompt_len, lengths) in enumerate(shapes):
        prompt = rng.integers(100, 40000, prompt_len).astype(np.int32)
        trajectories = []
        for i, length in enumerate(lengths):
            completion = rng.integers(100, 40000, length).astype(np.int32)
            calls = [CallData(0, 0, 0, prompt, completion, -rng.random(length).astype(np.float32) * 3 - 8, 0.7)]
            if g == 2 and i == 0:  # a second turn that extends the first: one row with two policy spans
                follow = np.concatenate([prompt, completion, rng.integers(100, 40000, 3).astype(np.int32)])
                second = rng.integers(100, 40000, 4).astype(np.int32)
                calls.append(CallData(1, 0, 0, follow, second, -rng.random(4).astype(np.float32) - 9, 0.7))
            trajectories.append(TrajectoryData(f"g{g}-t{i}", 0, float((i * 7 + g) % 3), calls))
        assert size == len(trajectories)
        groups.append(GroupData(f"g{g}", f"s{g}", trajectories))
    return groups


def batch_gradients(model_path: str, packing: str, strategy: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Each aggregation mode's gradient (averaged over workers, before clipping) of one GRPO micro-batched pass
    over this worker's share of `uneven_groups()`. In a single process (world 1) there is no collective."""
    from trainer.config import TrainerConfig
    from trainer.data import build_rows, collate, shard_groups
    from trainer.loop import all_reduce_named, batch_loss_scale
    from trainer.model import build_policy
    from trainer.parallel import wrap
    from trainer.step import accumulate_gradients, micro_batches, policy_logprobs

    rows, _ = build_rows(shard_groups(uneven_groups(), rank, world))
    batch = collate(rows, pad_id=0)
    gradients = {}
    for mode in AGGREGATIONS:
        config = TrainerConfig(mode="full", aggregation=mode, packing=packing, micro_batch_rows=2, num_workers=world)
        model = wrap(build_policy(model_path, config).double(), strategy, world)
        scale = batch_loss_scale(batch, config, world)
        steps = all_reduce_named({"steps": len(micro_batches(model, batch, config))}, op="max")["steps"]
        current = policy_logprobs(model, batch, config, steps=int(steps))
        # an anchor away from the current policy (by token id, so the same on any split): ratios != 1, some clip
        old = current + 0.3 * torch.sin(batch.input_ids.to(current.dtype)) * batch.loss_mask
        model.zero_grad(set_to_none=True)
        accumulate_gradients(model, batch, old, config, scale, micro_steps=int(steps))
        # FSDP2 leaves each worker a shard of every gradient (a DTensor): gather the whole one
        full = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in model.parameters()]
        gradients[mode] = torch.cat([g.detach().flatten().cpu() for g in full])
    return gradients


def gradients_per_worker(loop_config: dict[str, Any]) -> None:
    """batch_gradients on a Ray Train worker; rank 0 saves them to `loop_config["out"]`."""
    import ray.train

    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    gradients = batch_gradients(loop_config["model"], loop_config["packing"], loop_config["strategy"], rank, world)
    if rank == 0:
        torch.save(gradients, loop_config["out"])
