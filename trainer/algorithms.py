"""GRPO's pieces as pure torch functions behind small registries (no Ray, no model): easy to test and swap.

A new advantage estimator or policy loss is one decorated function; the trainer looks them up by the names
in its config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def _registrar(table: dict[str, F]) -> Callable[[str], Callable[[F], F]]:
    """`@register(name)` for one registry table."""

    def register(name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            table[name] = fn
            return fn

        return add

    return register


AdvantageFn = Callable[[torch.Tensor, float], torch.Tensor]
ADVANTAGES: dict[str, AdvantageFn] = {}
register_advantage = _registrar(ADVANTAGES)


def _check_rewards(rewards: torch.Tensor) -> torch.Tensor:
    if rewards.ndim != 1:
        raise ValueError(f"rewards of one group must be a 1-D tensor, got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"rewards must be finite, got {rewards.tolist()}")
    return rewards.to(torch.float64)


@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean) / (std + eps) within one group, unbiased std. A group of one, or of equal rewards, gets 0."""
    r = _check_rewards(rewards)
    if r.numel() < 2:
        return torch.zeros_like(r)
    centered = r - r.mean()
    if torch.all(centered == 0):
        return torch.zeros_like(r)
    return centered / (r.std(unbiased=True) + eps)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Dr. GRPO: r - mean, without dividing by the std (which favours low-variance, too-easy groups)."""
    del eps
    r = _check_rewards(rewards)
    return r - r.mean() if r.numel() > 1 else torch.zeros_like(r)


def has_signal(rewards: torch.Tensor) -> bool:
    """A group teaches something only if its rewards differ; equal-reward groups are dropped and counted."""
    return rewards.numel() > 1 and bool((rewards != rewards[0]).any())


TIS_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class ClipConfig:
    eps_low: float = 0.2
    """Lower clip: ratio >= 1 - eps_low."""
    eps_high: float = 0.28
    """Upper clip (DAPO clip-higher: larger than eps_low keeps exploring low-probability tokens)."""
    dual_clip: float | None = None
    """For negative advantages, cap the loss at -dual_clip * A (c = 3 is usual); None disables it."""
    log_ratio_clamp: float = 20.0
    """Clamp log(pi/pi_old) before exp, so one wild token cannot overflow."""
    tis_cap: float | None = 2.0
    """Truncated importance weight min(pi_old/mu, cap) against the behaviour policy mu that sampled the
    tokens (vLLM, possibly versions behind); None disables the correction."""
    tis_level: Literal["token", "sequence"] = "token"
    """Where the truncated importance weight is taken: `token` (each token's own ratio) or `sequence` (one
    weight per row, the product of its policy tokens' ratios); see truncated_is_weights."""

    def __post_init__(self) -> None:
        if self.tis_level not in TIS_LEVELS:
            raise ValueError(f"tis_level must be one of {', '.join(TIS_LEVELS)}, got {self.tis_level!r}")


@dataclass(frozen=True)
class LossTerms:
    per_token: torch.Tensor
    """The per-token loss (zero where the mask is zero)."""
    clip_fraction: torch.Tensor
    """Share of masked tokens whose ratio was clipped."""
    approx_kl: torch.Tensor
    """Mean k3 estimate of KL(pi_old || pi) over masked tokens, for monitoring."""


LossFn = Callable[..., LossTerms]
POLICY_LOSSES: dict[str, LossFn] = {}
register_loss = _registrar(POLICY_LOSSES)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def truncated_is_weights(
    old_logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    mask: torch.Tensor,
    cap: float | None,
    level: str = "token",
    log_clamp: float = 20.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance weights of the trainer's pre-batch policy pi_old against the sampler mu, and where
    the cap bit: (weights [batch, tokens], clipped [batch, tokens] bool), both detached.

    token: each token's weight min(pi_old/mu, cap). sequence: one weight per row, min(prod pi_old/mu, cap) over
    the row's policy tokens, i.e. exp of the masked sum of log-ratios; a capped row counts as clipped at every
    one of its policy tokens. Log-ratios (summed, at sequence level) are clamped to +-`log_clamp` before exp,
    so nothing overflows. `cap` None: no truncation (the plain ratio, never clipped). Weights are 1 and
    clipped is False where the mask is 0, so what lies outside the mask (prompt positions) cannot leak in.
    """
    if level not in TIS_LEVELS:
        raise ValueError(f"tis level must be one of {', '.join(TIS_LEVELS)}, got {level!r}")
    inside = mask > 0
    old_logp, behaviour_logp = old_logp.detach(), behaviour_logp.detach()
    if level == "token":
        weight = torch.exp((old_logp - behaviour_logp).clamp(-log_clamp, log_clamp))
    else:
        # float64 sum: a long row's thousands of small log-ratios should not lose their precision
        log_ratio = torch.where(inside, old_logp.double() - behaviour_logp.double(), 0.0)
        row = torch.exp(log_ratio.sum(dim=1).clamp(-log_clamp, log_clamp)).to(old_logp.dtype)
        weight = row[:, None].expand_as(old_logp)
    clipped = inside & (weight > cap) if cap is not None else torch.zeros_like(inside)
    if cap is not None:
        weight = weight.clamp(max=cap)
    return torch.where(inside, weight, torch.ones_like(weight)), clipped


@register_loss("clipped")
def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: ClipConfig = ClipConfig(),
    behaviour_logp: torch.Tensor | None = None,
) -> LossTerms:
    """PPO/GRPO clipped surrogate per token: -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A).

    Shapes: logp, old_logp, mask, behaviour_logp are [batch, tokens]; advantages is [batch] or
    [batch, tokens]. `old_logp` is the trainer's policy before this update (equal to `logp` detached on the
    first step of an on-policy batch). With `behaviour_logp` and `clip.tis_cap`, each token's loss is
    multiplied by its detached truncated importance weight (truncated_is_weights at `clip.tis_level`), so the
    gradient is the weight times the surrogate's.
    """
    mask = mask.to(logp.dtype)
    if advantages.ndim == 1:
        advantages = advantages[:, None].expand_as(logp)
    advantages = advantages.to(logp.dtype)
    log_ratio = (logp - old_logp).clamp(-clip.log_ratio_clamp, clip.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped_ratio = ratio.clamp(1 - clip.eps_low, 1 + clip.eps_high)
    loss = -torch.min(unclipped, clipped_ratio * advantages)
    if clip.dual_clip is not None:
        loss = torch.where(advantages < 0, torch.min(loss, -clip.dual_clip * advantages), loss)
    if behaviour_logp is not None and clip.tis_cap is not None:
        weight, _ = truncated_is_weights(
            old_logp, behaviour_logp, mask, clip.tis_cap, clip.tis_level, clip.log_ratio_clamp
        )
        loss = loss * weight
    was_clipped = ((ratio < 1 - clip.eps_low) | (ratio > 1 + clip.eps_high)).to(logp.dtype)
    return LossTerms(
        per_token=loss * mask,
        clip_fraction=_masked_mean(was_clipped, mask).detach(),
        approx_kl=_masked_mean(kl_k3(logp.detach(), old_logp), mask),
    )


AGGREGATIONS = ("token_mean", "sequence_mean", "constant")


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    global_tokens: float | None = None,
    constant: float | None = None,
    global_sequences: float | None = None,
) -> torch.Tensor:
    """This micro-batch's share of the whole batch's loss (a scalar); summed over every micro-batch on every
    worker it gives the batch loss, however the batch is split.

    token_mean: sum / tokens, with `global_tokens` = masked tokens across all workers and micro-batches
    (DAPO/verl), so every token weighs the same. sequence_mean: the mean over sequences of each sequence's
    token mean (original GRPO), with `global_sequences` = sequences across all workers, so every sequence weighs
    the same. constant: sum / `constant` (Dr. GRPO: sequences x a fixed completion-token budget), free of length
    bias. Without the global counts, this micro-batch is taken as the whole batch.
    """
    mask = mask.to(per_token.dtype)
    if mode == "token_mean":
        denominator = global_tokens if global_tokens is not None else mask.sum()
        return (per_token * mask).sum() / max(float(denominator), 1.0)
    if mode == "sequence_mean":
        lengths = mask.sum(dim=1)
        present = lengths > 0
        if not present.any():
            return per_token.sum() * 0
        sequences = global_sequences if global_sequences is not None else float(present.sum())
        return ((per_token * mask).sum(dim=1)[present] / lengths[present]).sum() / max(float(sequences), 1.0)
    if mode == "constant":
        if constant is None or constant <= 0:
            raise ValueError("aggregation 'constant' needs a positive constant (e.g. sequences x max length)")
        return (per_token * mask).sum() / constant
    raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {mode!r}")
