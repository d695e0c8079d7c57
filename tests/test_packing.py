"""Packed training rows (trainer.packing): the layout gives every token exactly its own row's context, and the
packed forward's log-probs and gradients equal the plain padded path's (float64, LoRA and full weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.config import TrainerConfig
from trainer.data import TrainingTensors
from trainer.model import build_policy
from trainer.packing import PrefixTree, attention_allowed, forward_cost, pack, plan_micro_batches, tree_size
from trainer.step import (
    grpo_update,
    on_policy_update,
    packed_token_logprobs,
    policy_logprobs,
    single_worker_scale,
    token_logprobs,
)
from trainer.tree_attention import ATTENTION, plan_tree_attention, uses_tree_attention


def _rows(seed: int) -> list[np.ndarray]:
    """GRPO-shaped rows: groups sharing a prompt (and all sharing a system prefix), samples that share their
    first completion tokens, an identical pair, a row that is a strict prefix of another, and a stranger."""
    rng = np.random.default_rng(seed)
    system = rng.integers(5, 900, 6)
    rows = []
    for group in range(3):
        prompt = np.concatenate([system, rng.integers(5, 900, 4 + 3 * group)])
        first = rng.integers(5, 900, 3)
        for sample in range(3):
            completion = rng.integers(5, 900, 2 + sample)
            rows.append(np.concatenate([prompt, first[: sample + 1], completion]))
    rows.append(rows[0].copy())
    rows.append(rows[4][: len(rows[4]) - 2].copy())
    rows.append(rng.integers(5, 900, 9))
    return rows


@pytest.mark.parametrize("share", [True, False])
def test_every_packed_token_sees_exactly_its_own_rows_context(share):
    rows = _rows(0)
    layout = pack(rows, share_prefixes=share)
    allowed = attention_allowed(layout).numpy()
    for row, index in zip(rows, layout.row_index, strict=True):
        assert np.array_equal(layout.tokens[index], row)
        assert np.array_equal(layout.positions[index], np.arange(len(row)))
        for j, at in enumerate(index):
            # the keys query `at` may read are exactly the packed copies of row[: j + 1]
            assert set(np.flatnonzero(allowed[at])) == set(index[: j + 1].tolist())
    total = sum(len(r) for r in rows)
    assert len(layout.tokens) == tree_size(rows, share) and (len(layout.tokens) < total) == share
    # tree attention: each segment's queries, against the keys it gathers, allow exactly the same pairs
    plan = plan_tree_attention(layout)
    rebuilt = np.zeros_like(allowed)
    for (start, stop), keys, mask in zip(plan.spans, plan.keys, plan.masks, strict=True):
        for query in range(start, stop):
            rebuilt[query, keys[mask[query - start]].numpy()] = True
    assert np.array_equal(rebuilt, allowed)
    tree = PrefixTree(share_prefixes=share)
    for row in rows:
        tree.add(row)
    assert plan.pairs == tree.pairs < len(layout.tokens) ** 2  # what the planner counts is what runs
    if not share:
        assert len(layout.tokens) == total


def test_the_tree_holds_each_shared_prefix_once():
    a, b = np.array([1, 2, 3, 4, 5]), np.array([1, 2, 3, 9])
    assert tree_size([a, b]) == 5 + 1  # [1 2 3] once, then [4 5] and [9]
    assert tree_size([a, a]) == 5
    assert tree_size([a, a[:2]]) == 5  # a row inside another costs nothing
    assert tree_size([a, np.array([7, 8])]) == 7


def test_micro_batches_follow_the_token_budget():
    rows = _rows(1)
    for packing in ("shared_prefix", "rows", "padded"):
        plan = plan_micro_batches(rows, packing, token_budget=40)
        covered = [i for part in plan for i in range(part.start, part.stop)]
        assert covered == list(range(len(rows)))
        for part in plan:
            chunk = rows[part]
            cost = {
                "shared_prefix": tree_size(chunk),
                "rows": sum(len(r) for r in chunk),
                "padded": len(chunk) * max(len(r) for r in chunk),
            }[packing]
            assert cost <= 40 or len(chunk) == 1
    shared, plain = plan_micro_batches(rows, "shared_prefix", 40), plan_micro_batches(rows, "padded", 40)
    assert len(shared) < len(plain)  # sharing fits more rows per forward
    assert all(p.stop - p.start <= 2 for p in plan_micro_batches(rows, "shared_prefix", 10_000, row_cap=2))
    assert len(plan_micro_batches(rows, "rows", 1)) == len(rows)  # over budget: one row each


@pytest.mark.parametrize("packing", ["shared_prefix", "rows", "padded"])
@pytest.mark.parametrize("tree_attention", [True, False])
def test_the_plan_is_the_cheapest_way_to_cut_the_rows(packing, tree_attention):
    """Against every cut of the rows into runs (brute force): the planner's is within budget and costs least."""
    rows = _rows(5)[:9]
    budget, attention = 45, 20

    def cost(part: list[np.ndarray]) -> float | None:
        if packing == "padded":
            tokens, pairs = len(part) * max(map(len, part)), len(part) * max(map(len, part)) ** 2
        else:
            tree = PrefixTree(share_prefixes=packing == "shared_prefix")
            for row in part:
                tree.add(row)
            tokens, pairs = tree.size, tree.pairs if tree_attention else tree.size**2
        return forward_cost(tokens, pairs, attention) if tokens <= budget or len(part) == 1 else None

    def total(cuts: list[int]) -> float | None:
        bounds = [0, *cuts, len(rows)]
        costs = [cost(rows[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return None if None in costs else sum(costs)

    every = [
        [c for bit, c in enumerate(range(1, len(rows))) if mask >> bit & 1] for mask in range(2 ** (len(rows) - 1))
    ]
    best = min(t for t in map(total, every) if t is not None)
    plan = plan_micro_batches(rows, packing, budget, attention_tokens=attention, tree_attention=tree_attention)
    assert len(plan) > 1 and total([p.start for p in plan[1:]]) == pytest.approx(best)


def _tensors(rows: list[np.ndarray], seed: int) -> TrainingTensors:
    generator = torch.Generator().manual_seed(seed)
    length = max(len(r) for r in rows)
    n = len(rows)
    ids = torch.full((n, length), 2, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    mask = torch.zeros((n, length))
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.from_numpy(row)
        attention[i, : len(row)] = 1
        mask[i, 8 : len(row)] = (torch.rand(len(row) - 8, generator=generator) > 0.2).float()  # some prompt too
    temperatures = torch.where(mask > 0, torch.rand((n, length), generator=generator) + 0.5, torch.ones_like(mask))
    return TrainingTensors(
        input_ids=ids,
        attention_mask=attention,
        loss_mask=mask,
        behaviour_logprobs=-torch.rand((n, length), generator=generator) * mask - 9 * mask,
        temperatures=temperatures,
        advantages=torch.randn(n, generator=generator),
        model_versions=torch.zeros(n, dtype=torch.long),
        group_index=torch.zeros(n, dtype=torch.long),
    )


def _logprobs_and_gradients(model, batch: TrainingTensors, packing: str) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    if packing == "padded":
        logp = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.loss_mask, batch.temperatures)
    else:
        logp = packed_token_logprobs(
            model,
            batch.input_ids,
            batch.attention_mask,
            batch.loss_mask,
            batch.temperatures,
            packing == "shared_prefix",
        )
    (logp * batch.loss_mask.double() * batch.advantages[:, None].double()).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return (logp * batch.loss_mask).detach(), grads


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_packed_logprobs_and_gradients_equal_the_padded_paths(tiny_model_dir, mode):
    model = build_policy(tiny_model_dir, TrainerConfig(mode=mode)).double()
    if mode == "lora":  # fresh adapters have B = 0, so no path through them would show up: give them weights
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if "lora_B" in name:
                    weight.normal_(0, 0.05)
    batch = _tensors(_rows(2), seed=2)
    assert uses_tree_attention(model)
    plain_logp, plain_grads = _logprobs_and_gradients(model, batch, "padded")
    assert plain_grads.abs().max() > 0
    inner = model.get_base_model() if mode == "lora" else model
    for attention, packing in [(a, p) for a in (ATTENTION, "sdpa") for p in ("shared_prefix", "rows")]:
        inner.config._attn_implementation = attention  # tree attention, then the whole square masked
        logp, grads = _logprobs_and_gradients(model, batch, packing)
        torch.testing.assert_close(logp, plain_logp, rtol=1e-5, atol=1e-9)
        # rtol 1e-5, not 1e-12: the RMSNorm computes in float32 even in a float64 model, and the shared prefix
        # sums its rows' gradients before that norm's backward, where the plain path sums after it
        torch.testing.assert_close(grads, plain_grads, rtol=1e-5, atol=1e-7 * float(plain_grads.abs().max()))


def test_the_first_updates_own_forward_is_the_pre_batch_policy(tiny_model_dir):
    """on_policy_update (no separate pass for the old log-probs) takes exactly the step that grpo_update takes
    from policy_logprobs' old log-probs, and returns those log-probs."""
    config = TrainerConfig(mode="full", learning_rate=1e-2, micro_batch_tokens=48)
    batch = _tensors(_rows(3), seed=3)
    states, olds, metrics = [], [], []
    for separate in (True, False):
        model = build_policy(tiny_model_dir, config).double()
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
        scale = single_worker_scale(batch, config)
        if separate:
            old = policy_logprobs(model, batch, config)
            metrics.append(grpo_update(model, optimizer, batch, old, config, scale))
        else:
            result, old = on_policy_update(model, optimizer, batch, config, scale)
            metrics.append(result)
        states.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        olds.append(old * batch.loss_mask)
    torch.testing.assert_close(olds[1], olds[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(states[1], states[0], rtol=1e-9, atol=1e-9)
    assert metrics[0]["loss"] == pytest.approx(metrics[1]["loss"], rel=1e-9)
    untouched = torch.cat([p.flatten() for p in build_policy(tiny_model_dir, config).double().parameters()])
    assert (states[0] - untouched).abs().max() > 1e-4  # the step moved the weights
    model.add_module("active_dropout", torch.nn.Dropout(0.1).train())  # a forward would no longer be pi_old's
    with pytest.raises(ValueError, match="dropout"):
        on_policy_update(model, optimizer, batch, config, single_worker_scale(batch, config))


def test_activation_checkpointing_gives_the_same_gradients(tiny_model_dir):
    """trainer.activation_checkpointing recomputes layers in the backward: same log-probs and gradients."""
    batch = _tensors(_rows(4), seed=4)
    results, kept = [], []
    for checkpointing in (False, True):
        model = build_policy(tiny_model_dir, TrainerConfig(mode="full", activation_checkpointing=checkpointing))
        model = model.double()
        assert model.is_gradient_checkpointing == checkpointing
        saved: list[int] = []

        def count(tensor: torch.Tensor, into: list[int] = saved) -> torch.Tensor:
            into.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            results.append(_logprobs_and_gradients(model, batch, "shared_prefix"))
        kept.append(sum(saved))
    (plain_logp, plain_grads), (logp, grads) = results
    torch.testing.assert_close(logp, plain_logp, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads, plain_grads, rtol=1e-9, atol=1e-12)
    assert kept[1] < kept[0]  # the layers' activations were not kept for the backward (equal if it were off)
