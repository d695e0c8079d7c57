"""From a claimed batch's groups to padded training tensors (pure numpy/torch; no Ray, no database).

Each trajectory becomes one row when its LLM calls form one growing conversation (every prompt starts with
the previous prompt + completion, which the rollout guarantees by extending tokens rather than
re-tokenising), otherwise one row per call. The loss mask covers only tokens the policy sampled; the prompt,
observations and tool output are context. Groups whose rewards are all equal are dropped and counted, never
trained on. Staleness is not judged here: it was judged once, when the batch was claimed (recorder.batches).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from recorder.queries import CallData, GroupData
from trainer.algorithms import ADVANTAGES, has_signal


@dataclass
class Row:
    tokens: np.ndarray
    policy_mask: np.ndarray
    """1 where the token was sampled by the policy (and so carries a behaviour log-prob)."""
    behaviour_logprobs: np.ndarray
    temperatures: np.ndarray
    """The temperature each policy token was sampled at (1.0 at context tokens)."""
    advantage: float
    model_version: int
    group_index: int


@dataclass
class BatchStats:
    groups: int = 0
    groups_without_signal: int = 0
    groups_stale: int = 0
    trajectories: int = 0
    rows: int = 0
    policy_tokens: int = 0
    reward_mean: float = 0.0
    reward_std: float = 0.0


@dataclass
class TrainingTensors:
    input_ids: torch.Tensor
    """[rows, length] token ids, right-padded."""
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    """[rows, length] 1.0 at tokens the policy sampled; the loss at position t uses the logits at t - 1."""
    behaviour_logprobs: torch.Tensor
    """[rows, length] the sampler's log-prob of each policy token (0 elsewhere)."""
    temperatures: torch.Tensor
    """[rows, length] the temperature each policy token was sampled at (1.0 elsewhere): the trainer divides the
    logits that predict a token by it, to score the token under the distribution that sampled it."""
    advantages: torch.Tensor
    """[rows] the trajectory's advantage, repeated over its rows."""
    model_versions: torch.Tensor
    group_index: torch.Tensor
    stats: BatchStats = field(default_factory=BatchStats)


RowArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""(tokens, policy mask, behaviour log-probs, temperatures) of one training row."""


def sampling_temperature(call: CallData) -> float:
    """The temperature whose distribution vLLM sampled and scored (its processed log-probs). Greedy calls
    (temperature ~0) are scored at 1.0: vLLM's sampler replaces a zero temperature by 1 before the softmax."""
    return call.temperature if call.temperature >= 1e-5 else 1.0


def _rows_for_trajectory(calls: list[CallData]) -> list[RowArrays]:
    """Rows of (tokens, policy mask, behaviour log-probs, temperatures): one if the calls extend each other,
    else one per call."""
    rows: list[RowArrays] = []
    for call in calls:
        prompt, completion = call.prompt_token_ids, call.completion_token_ids
        temperature = np.full(len(completion), sampling_temperature(call), np.float32)
        if rows:
            tokens, mask, logprobs, temperatures = rows[-1]
            if len(prompt) >= len(tokens) and np.array_equal(prompt[: len(tokens)], tokens):
                extra = len(prompt) - len(tokens)  # new context (an observation) between the two turns
                rows[-1] = (
                    np.concatenate([tokens, prompt[len(tokens) :], completion]),
                    np.concatenate([mask, np.zeros(extra, np.float32), np.ones(len(completion), np.float32)]),
                    np.concatenate([logprobs, np.zeros(extra, np.float32), call.completion_logprobs]),
                    np.concatenate([temperatures, np.ones(extra, np.float32), temperature]),
                )
                continue
        rows.append(
            (
                np.concatenate([prompt, completion]),
                np.concatenate([np.zeros(len(prompt), np.float32), np.ones(len(completion), np.float32)]),
                np.concatenate([np.zeros(len(prompt), np.float32), call.completion_logprobs]),
                np.concatenate([np.ones(len(prompt), np.float32), temperature]),
            )
        )
    return rows


def build_rows(
    groups: list[GroupData],
    advantage: str = "grpo",
    eps: float = 1e-6,
) -> tuple[list[Row], BatchStats]:
    estimator = ADVANTAGES[advantage]
    stats = BatchStats(groups=len(groups))
    rows: list[Row] = []
    used_rewards: list[float] = []
    for group_index, group in enumerate(groups):
        rewards = torch.tensor(group.rewards)
        if not has_signal(rewards):
            stats.groups_without_signal += 1
            continue
        advantages = estimator(rewards, eps)
        used_rewards += group.rewards.tolist()
        for trajectory, adv in zip(group.trajectories, advantages.tolist(), strict=True):
            stats.trajectories += 1
            for tokens, mask, logprobs, temperatures in _rows_for_trajectory(trajectory.calls):
                rows.append(Row(tokens, mask, logprobs, temperatures, adv, trajectory.model_version, group_index))
                stats.policy_tokens += int(mask.sum())
    stats.rows = len(rows)
    if used_rewards:
        stats.reward_mean = float(np.mean(used_rewards))
        stats.reward_std = float(np.std(used_rewards))
    return rows, stats


def collate(rows: list[Row], pad_id: int, stats: BatchStats | None = None) -> TrainingTensors:
    """Right-pad rows into tensors (an empty list gives tensors with zero rows)."""
    length = max((len(r.tokens) for r in rows), default=0)
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    loss_mask = torch.zeros((n, length), dtype=torch.float32)
    behaviour = torch.zeros((n, length), dtype=torch.float32)
    temperatures = torch.ones((n, length), dtype=torch.float32)
    for i, row in enumerate(rows):
        size = len(row.tokens)
        input_ids[i, :size] = torch.from_numpy(row.tokens.astype(np.int64))
        attention[i, :size] = 1
        loss_mask[i, :size] = torch.from_numpy(row.policy_mask)
        behaviour[i, :size] = torch.from_numpy(row.behaviour_logprobs.astype(np.float32))
        temperatures[i, :size] = torch.from_numpy(row.temperatures.astype(np.float32))
    return TrainingTensors(
        input_ids=input_ids,
        attention_mask=attention,
        loss_mask=loss_mask,
        behaviour_logprobs=behaviour,
        temperatures=temperatures,
        advantages=torch.tensor([r.advantage for r in rows], dtype=torch.float32),
        model_versions=torch.tensor([r.model_version for r in rows], dtype=torch.long),
        group_index=torch.tensor([r.group_index for r in rows], dtype=torch.long),
        stats=stats or BatchStats(),
    )


def shard_groups(groups: list[GroupData], rank: int, world_size: int) -> list[GroupData]:
    """Whole groups per worker (a group's advantages are computed together), balanced by token count."""
    loads = [0] * world_size
    mine: list[GroupData] = []
    sizes = [
        sum(len(c.prompt_token_ids) + len(c.completion_token_ids) for t in g.trajectories for c in t.calls)
        for g in groups
    ]
    for index in sorted(range(len(groups)), key=lambda i: (-sizes[i], groups[i].group_id)):
        worker = loads.index(min(loads))
        loads[worker] += sizes[index]
        if worker == rank:
            mine.append(groups[index])
    return mine


def version_lag_tokens(groups: list[GroupData], parent_version: int) -> dict[int, int]:
    """Completion tokens of a batch by how many versions behind the batch's parent sampled them (0: the
    parent itself): what off-policy correction has to cover, and what admission control bounds."""
    lags: dict[int, int] = {}
    for group in groups:
        for trajectory in group.trajectories:
            for call in trajectory.calls:
                lag = parent_version - call.model_version
                lags[lag] = lags.get(lag, 0) + len(call.completion_token_ids)
    return dict(sorted(lags.items()))


def lag_percentiles(lags: dict[int, int]) -> dict[str, float]:
    """p50, p99 and max of a token-weighted lag histogram (`version_lag_tokens`); empty: zeros."""
    total = sum(lags.values())
    if not total:
        return {"version_lag_p50": 0.0, "version_lag_p99": 0.0, "version_lag_max": 0.0}
    out: dict[str, float] = {}
    for name, share in (("version_lag_p50", 0.5), ("version_lag_p99", 0.99)):
        seen = 0
        for lag, tokens in lags.items():
            seen += tokens
            if seen >= share * total:
                out[name] = float(lag)
                break
    out["version_lag_max"] = float(max(lags))
    return out
