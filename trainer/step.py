"""One GRPO update on a worker's tensors: token log-probs, the policy loss, accumulation, the step.

The policy loss is `trainer.policy_loss` looked up in trainer.algorithms.POLICY_LOSSES, and turning its
per-token values into the batch loss is trainer.algorithms.aggregate's alone (`trainer.aggregation`): this
module only hands it the whole batch's sizes (LossScale)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainer.algorithms import POLICY_LOSSES, ClipConfig, aggregate, kl_k3, truncated_is_weights
from trainer.config import TrainerConfig
from trainer.data import TrainingTensors
from trainer.packing import attention_allowed, pack, plan_micro_batches
from trainer.tree_attention import attention_implementation, plan_tree_attention, uses_tree_attention


def token_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    temperatures: torch.Tensor | None = None,
) -> torch.Tensor:
    """[rows, length] log p(token t | tokens < t); position 0 has no prediction and gets 0.

    `temperatures` ([rows, length], the temperature each token was sampled at) divides the logits that
    predict each token, so the log-probs are of the distribution that really sampled (vLLM records its
    processed log-probs, after temperature). With `loss_mask`, the vocabulary projection runs only from the
    first position any row trains on (the prompt's logits are never needed): for agent turns, long prompts and
    short replies, that skips most of the lm-head work. Positions before it get 0.
    """
    length = input_ids.shape[1]
    first = 1
    if loss_mask is not None and bool(loss_mask.any()):
        first = max(1, int(loss_mask.any(dim=0).nonzero()[0]))
    keep = length - first + 1  # logits at positions first-1 .. length-1 predict tokens first .. length
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits[:, :-1]
    if logits.dtype != torch.float64:  # float64 stays float64 (exactness checks); bf16/fp16 go up to float32
        logits = logits.float()
    if temperatures is not None:
        logits = logits / temperatures[:, first:, None].to(logits.dtype)
    targets = input_ids[:, first:]
    # cross_entropy avoids materialising a second [rows, length, vocab] tensor of log-softmax values
    logp = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return F.pad(logp, (first, 0))


def _attention_for(model: Any, allowed: torch.Tensor) -> torch.Tensor:
    """A custom [1, 1, q, k] attention mask in the form the model's attention takes: boolean for SDPA (the
    default), additive (0 or the dtype's minimum) for eager attention."""
    mask = allowed[None, None]
    if attention_implementation(model) == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def packed_token_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    temperatures: torch.Tensor | None = None,
    share_prefixes: bool = True,
) -> torch.Tensor:
    """token_logprobs' values at the policy tokens (0 elsewhere), from one forward of the rows packed without
    padding, each prefix they share computed once (trainer.packing). The LM head runs only at the positions
    that predict a policy token. Rows are right-padded: attention_mask marks each row's tokens."""
    rows, length = input_ids.shape
    device = input_ids.device
    lengths = attention_mask.sum(dim=1).tolist()
    host_ids = input_ids.cpu().numpy()
    layout = pack([host_ids[r, : int(lengths[r])] for r in range(rows)], share_prefixes)
    where = np.zeros((rows, length), dtype=np.int64)  # packed index of each row position
    for r, index in enumerate(layout.row_index):
        where[r, : len(index)] = index
    policy = loss_mask.detach().cpu() > 0
    policy[:, 0] = False  # the first token has no prediction
    row_at, position_at = policy.nonzero(as_tuple=True)
    sources = torch.from_numpy(where[row_at.numpy(), position_at.numpy() - 1]).to(device)
    empty = sources.numel() == 0
    if empty:  # still a forward with a graph: DDP's and FSDP's backward collectives must run on every worker
        sources = torch.zeros(1, dtype=torch.long, device=device)
    if uses_tree_attention(model):  # each segment attends to its own keys only (trainer.tree_attention)
        attention: dict[str, Any] = {"tree_attention": plan_tree_attention(layout, device)}
    else:  # the whole square, masked
        attention = {"attention_mask": _attention_for(model, attention_allowed(layout).to(device))}
    logits = model(
        input_ids=torch.from_numpy(layout.tokens).to(device)[None],
        position_ids=torch.from_numpy(layout.positions).to(device)[None],
        logits_to_keep=sources,
        **attention,
    ).logits[0]
    if logits.dtype != torch.float64:
        logits = logits.float()
    out = torch.zeros((rows, length), dtype=logits.dtype, device=device)
    if empty:
        return out + logits.sum() * 0.0
    row_at, position_at = row_at.to(device), position_at.to(device)
    if temperatures is not None:
        logits = logits / temperatures[row_at, position_at, None].to(logits.dtype)
    logp = -F.cross_entropy(logits, input_ids[row_at, position_at], reduction="none")
    return out.index_put((row_at, position_at), logp)


def _dummy_forward(model: Any, device: torch.device) -> torch.Tensor:
    """A one-token pass that keeps a worker with fewer rows in step with the others' collectives."""
    dummy = torch.zeros((1, 1), dtype=torch.long, device=device)
    return model(input_ids=dummy, attention_mask=torch.ones_like(dummy)).logits


def rows_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    temperatures: torch.Tensor | None,
    packing: str,
) -> torch.Tensor:
    """Log-probs of right-padded rows by `trainer.packing`: packed (shared_prefix, rows) or padded. All give the
    same values at the policy tokens, the only ones the loss reads."""
    if packing == "padded":
        return token_logprobs(model, input_ids, attention_mask, loss_mask, temperatures)
    return packed_token_logprobs(model, input_ids, attention_mask, loss_mask, temperatures, packing == "shared_prefix")


def micro_batches(model: Any, batch: TrainingTensors, config: TrainerConfig) -> list[slice]:
    """This worker's micro-batches: runs of consecutive rows within `trainer.micro_batch_tokens` (and
    micro_batch_rows), planned for the least compute with `model`'s attention (trainer.packing)."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    host_ids = batch.input_ids.cpu().numpy()
    rows = [host_ids[r, : int(lengths[r])] for r in range(len(lengths))]
    return plan_micro_batches(
        rows,
        config.packing,
        config.micro_batch_tokens,
        config.micro_batch_rows,
        config.attention_cost_tokens,
        tree_attention=uses_tree_attention(model),
    )


def policy_logprobs(
    model: Any, batch: TrainingTensors, config: TrainerConfig, steps: int | None = None
) -> torch.Tensor:
    """Log-probs of every row under the current policy, without gradients, one forward per micro-batch.

    `steps`: forwards every worker must run (the largest count on any worker); under FSDP each forward
    all-gathers parameters, so a worker with fewer micro-batches runs one-token passes to keep in step."""
    plan = micro_batches(model, batch, config)
    with torch.no_grad():
        parts = [
            rows_logprobs(
                model,
                batch.input_ids[part],
                batch.attention_mask[part],
                batch.loss_mask[part],
                batch.temperatures[part],
                config.packing,
            )
            for part in plan
        ]
        for _ in range(max(0, (steps or 0) - len(parts))):
            _dummy_forward(model, batch.input_ids.device)
    return torch.cat(parts) if parts else torch.zeros_like(batch.loss_mask)


def forward_is_deterministic(model: Any) -> bool:
    """No dropout active: a forward under gradients gives the same log-probs as one without (so the first
    update's forward is also the pre-batch policy's)."""
    return not any(isinstance(m, torch.nn.Dropout) and m.training and m.p > 0 for m in model.modules())


LogprobFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(input ids, attention mask, loss mask, temperatures) -> reference log-probs."""


def reference_logprobs(model: Any, config: TrainerConfig, base_model: str | None = None) -> LogprobFn | None:
    """The frozen reference policy for the KL term (None when kl_beta is 0): `trainer.kl_reference` if set,
    else the base model, whatever version this batch trains from.

    LoRA without a configured reference: the same model with its adapter switched off (no second copy in
    memory). Otherwise a frozen copy of the reference model is loaded onto the policy's device.
    """
    if config.kl_beta <= 0:
        return None
    inner = getattr(model, "module", model)  # DDP wraps the model
    if config.mode == "lora" and config.kl_reference is None:

        def with_adapter_off(
            ids: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor, temperatures: torch.Tensor
        ) -> torch.Tensor:
            with inner.disable_adapter():
                return rows_logprobs(inner, ids, attention, mask, temperatures, config.packing)

        return with_adapter_off
    source = config.kl_reference or base_model
    if source is None:
        raise ValueError("a full-weights KL reference needs the base model's path (or trainer.kl_reference)")
    from transformers import AutoModelForCausalLM

    parameter = next(inner.parameters())
    frozen = AutoModelForCausalLM.from_pretrained(source, dtype=parameter.dtype).to(parameter.device).eval()
    for weight in frozen.parameters():
        weight.requires_grad_(False)
    return lambda ids, attention, mask, temperatures: rows_logprobs(
        frozen, ids, attention, mask, temperatures, config.packing
    )


def clip_config(config: TrainerConfig) -> ClipConfig:
    return ClipConfig(
        eps_low=config.clip_eps_low,
        eps_high=config.clip_eps_high,
        dual_clip=config.dual_clip,
        tis_cap=config.tis_cap,
        tis_level=config.tis_level,
    )


MISMATCH_MAX_KEYS = ("abs_logprob_diff_max",)
"""sampler_mismatch's entries to reduce across workers with max; all its others are sums."""


def sampler_mismatch(old_logprobs: torch.Tensor, batch: TrainingTensors, config: TrainerConfig) -> dict[str, float]:
    """How far the sampler's recorded log-probs (mu) are from the trainer's pre-batch policy (pi_old) on this
    worker's policy tokens, as SUMS to all-reduce by name across workers (`abs_logprob_diff_max` with max).

    `old_logprobs` [rows, length] is the full batch's pre-batch log-probs (policy_logprobs), so micro-batching
    plays no part. Entries: `policy_tokens` (masked tokens); `mismatch_k1_sum`, the sum of behaviour - old
    (the tokens were drawn from mu, so its mean is the k1 estimate of KL(mu || pi_old)); `mismatch_k3_sum`, the
    sum of exp(old - behaviour) - (old - behaviour) - 1 (the k3 estimate, >= 0 per token; the log-ratio is
    clamped like the loss's, so one wild token cannot make it inf); `tis_clipped_sum`, tokens whose truncated
    importance weight was capped (at sequence level every policy token of a capped row); `tis_weight_sum`, the
    sum of the weights the loss applies (with `tis_cap` None the loss applies none: each counts 1, never
    clipped); `abs_logprob_diff_max`, the largest |old - behaviour| (0 without tokens).

    Reported numbers, after reducing: kl_k1 = mismatch_k1_sum / policy_tokens, kl_k3 = mismatch_k3_sum /
    policy_tokens, tis_clip_fraction = tis_clipped_sum / policy_tokens, tis_weight_mean = tis_weight_sum /
    policy_tokens (each over max(policy_tokens, 1)), abs_logprob_diff_max as is.
    """
    clip = clip_config(config)
    device = old_logprobs.device
    inside = (batch.loss_mask > 0).to(device)
    behaviour = batch.behaviour_logprobs.detach().to(device)
    # float64 sums; the weights below are computed in the loss's own dtypes, so they are the loss's weights
    diff = torch.where(inside, old_logprobs.detach().double() - behaviour.double(), 0.0)  # log(pi_old / mu)
    clamped = diff.clamp(-clip.log_ratio_clamp, clip.log_ratio_clamp)
    if clip.tis_cap is None:
        weights, clipped = torch.ones_like(diff), torch.zeros_like(inside)
    else:
        level, log_clamp = clip.tis_level, clip.log_ratio_clamp
        weights, clipped = truncated_is_weights(old_logprobs, behaviour, inside, clip.tis_cap, level, log_clamp)
    return {
        "policy_tokens": float(inside.sum()),
        "mismatch_k1_sum": float(-diff.sum()),
        "mismatch_k3_sum": float(torch.where(inside, torch.exp(clamped) - clamped - 1, 0.0).sum()),
        "tis_clipped_sum": float(clipped.sum()),
        "tis_weight_sum": float(torch.where(inside, weights.to(torch.float64), 0.0).sum()),
        "abs_logprob_diff_max": float(diff.abs().max()) if diff.numel() else 0.0,
    }


@dataclass(frozen=True)
class LossScale:
    """The whole batch's sizes, the same on every worker, so each micro-batch's loss is its share of the batch
    loss and the gradient does not depend on how many workers split the batch."""

    tokens: float
    """Policy (trained) tokens on all workers."""
    sequences: float
    """Rows with at least one policy token, on all workers."""
    constant: float
    """Dr. GRPO's normaliser: sequences x the completion-token budget per sequence."""
    world: int = 1
    """Workers whose gradients DDP/FSDP average; each worker's loss is scaled by it, so the average of the
    workers' gradients is the gradient of the batch loss."""


def local_sizes(batch: TrainingTensors) -> tuple[float, float, float]:
    """(policy tokens, sequences, most policy tokens in one row) of this worker's rows."""
    per_row = batch.loss_mask.sum(dim=1)
    longest = float(per_row.max()) if per_row.numel() else 0.0
    return float(per_row.sum()), float((per_row > 0).sum()), longest


def loss_scale(config: TrainerConfig, tokens: float, sequences: float, longest: float, world: int = 1) -> LossScale:
    """The batch's LossScale from its global sizes (sums over workers; `longest` is the max over workers)."""
    budget = config.constant_tokens if config.constant_tokens is not None else max(longest, 1.0)
    return LossScale(tokens=tokens, sequences=sequences, constant=max(sequences, 1.0) * budget, world=world)


def accumulate_gradients(
    model: Any,
    batch: TrainingTensors,
    old_logprobs: torch.Tensor | None,
    config: TrainerConfig,
    scale: LossScale,
    reference: LogprobFn | None = None,
    micro_steps: int | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Backward over every micro-batch (gradients accumulate in the parameters); returns this worker's share
    of the batch's metrics (sum them over workers) and the old log-probs the ratio was taken against.

    `old_logprobs` None: this update is on-policy (the batch's first, from the weights that scored it), so each
    micro-batch's own forward, detached, is its old log-probs (forward_is_deterministic must hold): no separate
    pass for them. They are returned for the batch's later updates.

    Under DDP every backward is a collective, so every worker must run the same number of micro-steps:
    pass `micro_steps` = the largest count on any worker; a worker with fewer runs zero-weighted passes on a
    one-token dummy to keep in step.
    """
    loss_fn = POLICY_LOSSES[config.policy_loss]
    clip = clip_config(config)
    totals = {"loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0, "kl_ref": 0.0, "entropy": 0.0}
    plan = micro_batches(model, batch, config)
    tokens = max(scale.tokens, 1.0)
    taken = old_logprobs
    for step in range(max(micro_steps or 0, len(plan))):
        if step >= len(plan):  # out of rows: a zero-weighted pass keeps DDP's/FSDP's collectives in step
            if config.kl_beta > 0 and reference is not None:
                with torch.no_grad():
                    dummy = torch.zeros((1, 1), dtype=torch.long, device=batch.input_ids.device)
                    ones = torch.ones_like(dummy, dtype=torch.float32)
                    reference(dummy, torch.ones_like(dummy), ones, ones)
            (_dummy_forward(model, batch.input_ids.device).sum() * 0.0).backward()
            continue
        part = plan[step]
        ids, attention, mask = batch.input_ids[part], batch.attention_mask[part], batch.loss_mask[part]
        temperatures = batch.temperatures[part]
        logp = rows_logprobs(model, ids, attention, mask, temperatures, config.packing)
        if old_logprobs is None:
            if taken is None:
                taken = torch.zeros(batch.loss_mask.shape, dtype=logp.dtype, device=logp.device)
            taken[part] = logp.detach()
        old = taken[part]
        terms = loss_fn(logp, old, batch.advantages[part], mask, clip, batch.behaviour_logprobs[part])
        per_token = terms.per_token
        if config.kl_beta > 0 and reference is not None:
            with torch.no_grad():
                ref_logp = reference(ids, attention, mask, temperatures)
            kl = kl_k3(logp, ref_logp) * mask
            per_token = per_token + config.kl_beta * kl
            totals["kl_ref"] += float((kl.sum() / tokens).detach())
        loss = aggregate(
            per_token,
            mask,
            config.aggregation,
            global_tokens=scale.tokens,
            constant=scale.constant,
            global_sequences=scale.sequences,
        )
        (loss * scale.world).backward()  # DDP/FSDP divide the summed gradients by the world size
        weight = float(mask.sum()) / tokens
        totals["loss"] += float(loss.detach())
        totals["clip_fraction"] += float(terms.clip_fraction) * weight
        totals["approx_kl"] += float(terms.approx_kl.detach()) * weight
        # mean -log p of the sampled tokens: a Monte-Carlo estimate of the policy entropy
        totals["entropy"] += float(-(logp.detach() * mask).sum()) / tokens
    return totals, (taken if taken is not None else torch.zeros_like(batch.loss_mask))


def _optimizer_step(
    model: Any,
    optimizer: torch.optim.Optimizer,
    batch: TrainingTensors,
    old_logprobs: torch.Tensor | None,
    config: TrainerConfig,
    scale: LossScale,
    reference: LogprobFn | None,
    micro_steps: int | None,
) -> tuple[dict[str, float], torch.Tensor]:
    optimizer.zero_grad(set_to_none=True)
    totals, old = accumulate_gradients(model, batch, old_logprobs, config, scale, reference, micro_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
        norm = norm.full_tensor()
    totals["grad_norm"] = float(norm)
    optimizer.step()
    return totals, old


def grpo_update(
    model: Any,
    optimizer: torch.optim.Optimizer,
    batch: TrainingTensors,
    old_logprobs: torch.Tensor,
    config: TrainerConfig,
    scale: LossScale,
    reference: LogprobFn | None = None,
    micro_steps: int | None = None,
) -> dict[str, float]:
    """One optimizer step on the batch: accumulate gradients over micro-batches, clip the global norm, step."""
    return _optimizer_step(model, optimizer, batch, old_logprobs, config, scale, reference, micro_steps)[0]


def on_policy_update(
    model: Any,
    optimizer: torch.optim.Optimizer,
    batch: TrainingTensors,
    config: TrainerConfig,
    scale: LossScale,
    reference: LogprobFn | None = None,
    micro_steps: int | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """A batch's first update, from the weights that scored it: grpo_update with the pre-batch log-probs taken
    from its own forwards (returned, for the later updates and the sampler-mismatch report), saving the
    separate no-gradient pass. Needs forward_is_deterministic(model)."""
    if not forward_is_deterministic(model):
        raise ValueError("dropout is active: the update's forwards are not the pre-batch policy; use policy_logprobs")
    return _optimizer_step(model, optimizer, batch, None, config, scale, reference, micro_steps)


def single_worker_scale(batch: TrainingTensors, config: TrainerConfig) -> LossScale:
    """The LossScale of a batch trained in one process (tests, Tune trials)."""
    return loss_scale(config, *local_sizes(batch))
