"""One GRPO update on a worker's tensors: token log-probs, the clipped loss, accumulation, the step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from trainer.algorithms import POLICY_LOSSES, ClipConfig, aggregate, kl_k3
from trainer.config import TrainerConfig
from trainer.data import TrainingTensors


def token_logprobs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """[rows, length] log p(token t | tokens < t); position 0 has no prediction and gets 0.

    With `loss_mask`, the vocabulary projection runs only from the first position any row trains on (the
    prompt's logits are never needed): for agent turns, long prompts and short replies, that skips most of
    the lm-head work. Positions before it get 0.
    """
    length = input_ids.shape[1]
    first = 1
    if loss_mask is not None and bool(loss_mask.any()):
        first = max(1, int(loss_mask.any(dim=0).nonzero()[0]))
    keep = length - first + 1  # logits at positions first-1 .. length-1 predict tokens first .. length
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits[:, :-1].float()
    targets = input_ids[:, first:]
    # cross_entropy avoids materialising a second [rows, length, vocab] tensor of log-softmax values
    logp = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return F.pad(logp, (first, 0))


def _dummy_forward(model: Any, device: torch.device) -> torch.Tensor:
    """A one-token pass that keeps a worker with fewer rows in step with the others' collectives."""
    dummy = torch.zeros((1, 1), dtype=torch.long, device=device)
    return model(input_ids=dummy, attention_mask=torch.ones_like(dummy)).logits


def policy_logprobs(model: Any, batch: TrainingTensors, micro: int, steps: int | None = None) -> torch.Tensor:
    """Log-probs of every row under the current policy, without gradients, `micro` rows per forward.

    `steps`: forwards every worker must run (the largest count on any worker); under FSDP each forward
    all-gathers parameters, so a worker with fewer rows runs one-token passes to keep in step."""
    rows = batch.input_ids.shape[0]
    chunks = range(0, rows, micro)
    with torch.no_grad():
        parts = [
            token_logprobs(
                model,
                batch.input_ids[i : i + micro],
                batch.attention_mask[i : i + micro],
                batch.loss_mask[i : i + micro],
            )
            for i in chunks
        ]
        for _ in range(max(0, (steps or 0) - len(parts))):
            _dummy_forward(model, batch.input_ids.device)
    return torch.cat(parts) if parts else torch.zeros_like(batch.loss_mask)


LogprobFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def reference_logprobs(model: Any, config: TrainerConfig) -> LogprobFn | None:
    """The frozen reference policy for the KL term (None when kl_beta is 0).

    LoRA: the same model with its adapter switched off (no second copy in memory). Full weights: a frozen
    copy taken now, before any update.
    """
    if config.kl_beta <= 0:
        return None
    inner = getattr(model, "module", model)  # DDP wraps the model
    if config.mode == "lora":

        def with_adapter_off(ids: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            with inner.disable_adapter():
                return token_logprobs(inner, ids, attention, mask)

        return with_adapter_off
    import copy

    frozen = copy.deepcopy(inner).eval()
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
    return lambda ids, attention, mask: token_logprobs(frozen, ids, attention, mask)


def clip_config(config: TrainerConfig) -> ClipConfig:
    return ClipConfig(
        eps_low=config.clip_eps_low, eps_high=config.clip_eps_high, dual_clip=config.dual_clip, tis_cap=config.tis_cap
    )


def grpo_update(
    model: Any,
    optimizer: torch.optim.Optimizer,
    batch: TrainingTensors,
    old_logprobs: torch.Tensor,
    config: TrainerConfig,
    global_tokens: float,
    reference: LogprobFn | None = None,
    micro_steps: int | None = None,
) -> dict[str, float]:
    """Accumulate gradients over micro-batches, clip, step. `global_tokens` = policy tokens on all workers.

    Under DDP every backward is a collective, so every worker must run the same number of micro-steps:
    pass `micro_steps` = the largest count on any worker; a worker with fewer rows runs zero-weighted
    passes on a one-token dummy to keep in step.
    """
    loss_fn = POLICY_LOSSES["clipped"]
    clip = clip_config(config)
    optimizer.zero_grad(set_to_none=True)
    totals = {"loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0, "kl_ref": 0.0, "entropy": 0.0}
    rows = batch.input_ids.shape[0]
    micro = config.micro_batch_rows
    local_steps = -(-rows // micro)
    for step in range(max(micro_steps or local_steps, local_steps)):
        part = slice(step * micro, (step + 1) * micro)
        ids, attention, mask = batch.input_ids[part], batch.attention_mask[part], batch.loss_mask[part]
        if ids.numel() == 0:  # out of rows: a zero-weighted pass keeps DDP's/FSDP's collectives in step
            if config.kl_beta > 0 and reference is not None:
                with torch.no_grad():
                    dummy = torch.zeros((1, 1), dtype=torch.long, device=batch.input_ids.device)
                    reference(dummy, torch.ones_like(dummy), torch.ones_like(dummy, dtype=torch.float32))
            (_dummy_forward(model, batch.input_ids.device).sum() * 0.0).backward()
            continue
        logp = token_logprobs(model, ids, attention, mask)
        terms = loss_fn(logp, old_logprobs[part], batch.advantages[part], mask, clip, batch.behaviour_logprobs[part])
        per_token = terms.per_token
        if config.kl_beta > 0 and reference is not None:
            with torch.no_grad():
                ref_logp = reference(ids, attention, mask)
            kl = kl_k3(logp, ref_logp) * mask
            per_token = per_token + config.kl_beta * kl
            totals["kl_ref"] += float((kl.sum() / max(global_tokens, 1.0)).detach())
        if config.aggregation == "token_mean":
            loss = aggregate(per_token, mask, "token_mean", global_tokens=global_tokens)
        elif config.aggregation == "constant":
            loss = aggregate(per_token, mask, "constant", constant=float(rows * batch.input_ids.shape[1]))
        else:
            loss = aggregate(per_token, mask, "sequence_mean") * (ids.shape[0] / rows)
        loss.backward()
        weight = float(mask.sum()) / max(global_tokens, 1.0)
        totals["loss"] += float(loss.detach())
        totals["clip_fraction"] += float(terms.clip_fraction) * weight
        totals["approx_kl"] += float(terms.approx_kl.detach()) * weight
        # mean -log p of the sampled tokens: a Monte-Carlo estimate of the policy entropy
        totals["entropy"] += float(-(logp.detach() * mask).sum()) / max(global_tokens, 1.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip))
    optimizer.step()
    return totals
