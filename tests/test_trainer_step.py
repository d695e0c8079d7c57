"""A GRPO update on the tiny model (LoRA via peft) moves probability toward positive-advantage tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recorder.queries import CallData, GroupData, TrajectoryData
from trainer.config import TrainerConfig
from trainer.data import build_rows, collate
from trainer.model import build_policy
from trainer.step import grpo_update, single_worker_scale, token_logprobs


def _batch(rewards: list[float], completions: list[list[int]]):
    prompt = np.array([1, 520, 9531, 198], np.int32)
    trajectories = [
        TrajectoryData(
            f"t{i}", 0, reward, [CallData(0, 0, 0, prompt, np.array(c, np.int32), np.full(len(c), -10.8, np.float32))]
        )
        for i, (reward, c) in enumerate(zip(rewards, completions, strict=True))
    ]
    rows, stats = build_rows([GroupData("g", "s", trajectories)])
    return collate(rows, pad_id=2, stats=stats)


def test_token_logprobs_align_with_a_manual_computation(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 50, 60, 70]])
    got = token_logprobs(model, ids, torch.ones_like(ids))
    logits = model(ids).logits
    expected = torch.log_softmax(logits[0, 2], -1)[70]
    assert got.shape == (1, 4) and got[0, 0] == 0 and got[0, 3].item() == pytest.approx(expected.item(), abs=1e-5)
    # With a loss mask, only the trained positions are computed, and they are the same numbers.
    mask = torch.tensor([[0, 0, 1, 1]])
    masked = token_logprobs(model, ids, torch.ones_like(ids), mask)
    assert torch.allclose(masked[:, 2:], got[:, 2:], atol=1e-5) and torch.all(masked[:, :2] == 0)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_updates_raise_the_good_completion_and_lower_the_bad_one(tiny_model_dir, mode):
    torch.manual_seed(0)
    config = TrainerConfig(mode=mode, learning_rate=1e-2 if mode == "lora" else 1e-3, updates_per_batch=1)
    model = build_policy(tiny_model_dir, config)
    batch = _batch([1.0, 0.0], [[100, 101, 102], [200, 201, 202]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    scale = single_worker_scale(batch, config)
    with torch.no_grad():
        before = (token_logprobs(model, batch.input_ids, batch.attention_mask) * batch.loss_mask).sum(1)
    for _ in range(5):
        with torch.no_grad():
            old = token_logprobs(model, batch.input_ids, batch.attention_mask)
        metrics = grpo_update(model, optimizer, batch, old, config, scale)
    with torch.no_grad():
        after = (token_logprobs(model, batch.input_ids, batch.attention_mask) * batch.loss_mask).sum(1)
    assert after[0] > before[0] + 0.1 and after[1] < before[1] - 0.1
    assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    if mode == "lora":
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) < 0.2 * sum(
            p.numel() for p in model.parameters()
        )


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_the_kl_reference_is_the_policy_before_training(tiny_model_dir, mode):
    from trainer.step import reference_logprobs

    config = TrainerConfig(mode=mode, kl_beta=0.1, learning_rate=5e-2, micro_batch_rows=4)
    assert reference_logprobs(build_policy(tiny_model_dir, TrainerConfig(mode=mode)), TrainerConfig()) is None
    model = build_policy(tiny_model_dir, config)
    reference = reference_logprobs(model, config, tiny_model_dir)
    batch = _batch([1.0, 0.0], [[300, 301], [400, 401]])
    before = token_logprobs(model, batch.input_ids, batch.attention_mask).detach()
    old = before.clone()
    for _ in range(3):
        metrics = grpo_update(
            model,
            torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate),
            batch,
            old,
            config,
            single_worker_scale(batch, config),
            reference=reference,
        )
    after = token_logprobs(model, batch.input_ids, batch.attention_mask).detach()
    assert not torch.allclose(after, before)  # the policy moved ...
    mask = batch.loss_mask  # ... its reference did not
    got = reference(batch.input_ids, batch.attention_mask, mask, batch.temperatures)
    assert torch.allclose(got * mask, before * mask, atol=1e-5)
    assert metrics["kl_ref"] > 0


def test_a_full_weights_kl_reference_is_the_base_model_not_the_parent_version(tiny_model_dir, tmp_path):
    """A batch that trains from version N (full weights) is still pulled toward the base model, not toward N."""
    from trainer.step import reference_logprobs

    parent = build_policy(tiny_model_dir, TrainerConfig(mode="full"))
    with torch.no_grad():  # the parent version: the base weights moved
        for weight in parent.parameters():
            weight.add_(torch.randn_like(weight) * 0.05)
    parent.save_pretrained(tmp_path / "parent")
    config = TrainerConfig(mode="full", kl_beta=0.1)
    model = build_policy(str(tmp_path / "parent"), config)
    batch = _batch([1.0, 0.0], [[300, 301], [400, 401]])
    reference = reference_logprobs(model, config, tiny_model_dir)
    mask = batch.loss_mask
    got = reference(batch.input_ids, batch.attention_mask, mask, batch.temperatures) * mask
    base = build_policy(tiny_model_dir, TrainerConfig(mode="full"))
    with torch.no_grad():
        expected = token_logprobs(base, batch.input_ids, batch.attention_mask) * mask
        from_parent = token_logprobs(model, batch.input_ids, batch.attention_mask) * mask
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got - from_parent).abs().max() > 1e-2


def test_a_resumed_run_anchors_its_ratios_at_the_policy_before_the_batch(tiny_model_dir):
    """After a worker restart the weights are k updates in; the ratio's anchor must stay the pre-batch policy
    kept with the checkpoint, not be recomputed from the restored weights."""
    from trainer.loop import pre_batch_logprobs

    config = TrainerConfig(mode="full", learning_rate=1e-2)
    model = build_policy(tiny_model_dir, config)
    batch = _batch([1.0, 0.0], [[100, 101, 102], [200, 201, 202]])
    before, saved = pre_batch_logprobs(model, batch, config, 1, {}, rank=0, world=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    grpo_update(model, optimizer, batch, before, config, single_worker_scale(batch, config))  # update 1
    resumed, _ = pre_batch_logprobs(model, batch, config, 1, {"old_logprobs": saved}, rank=0, world=1)
    with torch.no_grad():
        restored = token_logprobs(model, batch.input_ids, batch.attention_mask)
    mask = batch.loss_mask
    assert torch.equal(resumed, before)
    assert ((restored - before) * mask).abs().max() > 1e-3  # recomputing would have anchored elsewhere
    with pytest.raises(RuntimeError, match="num_workers"):
        pre_batch_logprobs(model, batch, config, 1, {"old_logprobs": saved}, rank=1, world=2)


def test_the_update_uses_the_configured_policy_loss(tiny_model_dir, monkeypatch):
    """trainer.policy_loss picks the loss from the registry: a registered loss is the one every micro-batch calls."""
    from trainer.algorithms import POLICY_LOSSES, clipped_policy_loss

    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return clipped_policy_loss(*args, **kwargs)

    monkeypatch.setitem(POLICY_LOSSES, "counted", counted)
    config = TrainerConfig(policy_loss="counted", micro_batch_rows=1)
    model = build_policy(tiny_model_dir, config)
    batch = _batch([1.0, 0.0], [[100, 101, 102], [200, 201, 202]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    with torch.no_grad():
        old = token_logprobs(model, batch.input_ids, batch.attention_mask)
    metrics = grpo_update(model, optimizer, batch, old, config, single_worker_scale(batch, config))
    assert len(calls) == 2 and np.isfinite(metrics["loss"])  # one call per micro-batch of one row


def _mismatch_tensors(old: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor):
    """TrainingTensors carrying only what sampler_mismatch reads (the ids are placeholders)."""
    from trainer.data import TrainingTensors

    rows, length = mask.shape
    return TrainingTensors(
        input_ids=torch.zeros(rows, length, dtype=torch.long),
        attention_mask=torch.ones(rows, length, dtype=torch.long),
        loss_mask=mask,
        behaviour_logprobs=behaviour,
        temperatures=torch.ones(rows, length),
        advantages=torch.zeros(rows),
        model_versions=torch.zeros(rows, dtype=torch.long),
        group_index=torch.zeros(rows, dtype=torch.long),
    )


def _ragged(rows: int = 5, length: int = 9, seed: int = 3):
    generator = np.random.default_rng(seed)
    mask = np.zeros((rows, length), np.float32)
    for i, (start, stop) in enumerate([(2, 9), (4, 6), (0, 0), (1, 8), (5, 9)][:rows]):
        mask[i, start:stop] = 1
    old = -generator.uniform(0.05, 4.0, (rows, length)).astype(np.float32)
    behaviour = (old + generator.normal(0, 0.6, (rows, length))).astype(np.float32) * mask  # 0 off the mask
    return old, behaviour, mask


def _direct_mismatch(old: np.ndarray, behaviour: np.ndarray, mask: np.ndarray, cap: float, level: str):
    """The sums by hand, in float64 Python, token by token."""
    sums = dict.fromkeys(("policy_tokens", "k1", "k3", "clipped", "weight"), 0.0)
    largest = 0.0
    for i in range(mask.shape[0]):
        tokens = [t for t in range(mask.shape[1]) if mask[i, t] > 0]
        diffs = [float(old[i, t]) - float(behaviour[i, t]) for t in tokens]
        row_weight = math.exp(sum(diffs))
        for d in diffs:
            weight = math.exp(d) if level == "token" else row_weight
            sums["policy_tokens"] += 1
            sums["k1"] += -d
            sums["k3"] += math.exp(d) - d - 1
            sums["clipped"] += weight > cap
            sums["weight"] += min(weight, cap)
            largest = max(largest, abs(d))
    return sums, largest


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_sampler_mismatch_sums_match_a_direct_computation(level):
    from trainer.step import MISMATCH_MAX_KEYS, sampler_mismatch

    old, behaviour, mask = _ragged()
    cap = 1.5
    config = TrainerConfig(tis_cap=cap, tis_level=level)
    got = sampler_mismatch(
        torch.from_numpy(old), _mismatch_tensors(*map(torch.from_numpy, (old, behaviour, mask))), config
    )
    expected, largest = _direct_mismatch(old, behaviour, mask, cap, level)
    assert got["policy_tokens"] == expected["policy_tokens"] == 20
    assert got["mismatch_k1_sum"] == pytest.approx(expected["k1"], rel=1e-9, abs=1e-9)
    assert got["mismatch_k3_sum"] == pytest.approx(expected["k3"], rel=1e-9)
    assert got["tis_clipped_sum"] == expected["clipped"] and 0 < expected["clipped"] < 20  # some capped, not all
    assert got["tis_weight_sum"] == pytest.approx(expected["weight"], rel=1e-6)
    assert got["abs_logprob_diff_max"] == pytest.approx(largest, rel=1e-9) and MISMATCH_MAX_KEYS == (
        "abs_logprob_diff_max",
    )
    assert set(got) == {
        "policy_tokens", "mismatch_k1_sum", "mismatch_k3_sum", "tis_clipped_sum", "tis_weight_sum",
        "abs_logprob_diff_max",
    }  # fmt: skip


def test_sampler_mismatch_weights_are_the_losss_weights():
    """tis_weight_sum is the sum of the weights clipped_policy_loss applies (at logp = old, A = -1 the loss
    of each token is its weight), so the metric and the loss cannot drift apart."""
    from trainer.algorithms import clipped_policy_loss
    from trainer.step import clip_config, sampler_mismatch

    old, behaviour, mask = map(torch.from_numpy, _ragged(seed=11))
    for level in ("token", "sequence"):
        config = TrainerConfig(tis_cap=1.2, tis_level=level)
        terms = clipped_policy_loss(old, old, -torch.ones(5), mask, clip_config(config), behaviour)
        got = sampler_mismatch(old, _mismatch_tensors(old, behaviour, mask), config)
        assert got["tis_weight_sum"] == pytest.approx(float(terms.per_token.double().sum()), rel=1e-6)


def test_sampler_mismatch_is_zero_when_the_sampler_is_the_trainer():
    from trainer.step import sampler_mismatch

    old, _, mask = _ragged()
    old = torch.from_numpy(old)
    behaviour = old * torch.from_numpy(mask)  # the sampler's log-probs are the trainer's, on every policy token
    for level in ("token", "sequence"):
        got = sampler_mismatch(
            old, _mismatch_tensors(old, behaviour, torch.from_numpy(mask)), TrainerConfig(tis_level=level)
        )
        assert got["mismatch_k1_sum"] == got["mismatch_k3_sum"] == got["tis_clipped_sum"] == 0
        assert got["abs_logprob_diff_max"] == 0 and got["tis_weight_sum"] == got["policy_tokens"] == 20


def test_sampler_mismatch_edge_cases():
    from trainer.step import sampler_mismatch

    # one wild token (the sampler gave it a log-prob of -1000): finite sums, the row capped at every token
    old = torch.full((1, 4), -1.0)
    behaviour = torch.tensor([[0.0, -1.0, -1000.0, -1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    got = sampler_mismatch(old, _mismatch_tensors(old, behaviour, mask), TrainerConfig(tis_level="sequence"))
    assert all(math.isfinite(v) for v in got.values())
    assert got["tis_clipped_sum"] == 3 and got["tis_weight_sum"] == pytest.approx(3 * 2.0)
    assert got["abs_logprob_diff_max"] == pytest.approx(999.0) and got["mismatch_k1_sum"] == pytest.approx(-999.0)
    # the correction off: the loss applies no weight, so each token counts 1 and none is clipped
    off = sampler_mismatch(old, _mismatch_tensors(old, behaviour, mask), TrainerConfig(tis_cap=None))
    assert (
        off["tis_weight_sum"] == 3 and off["tis_clipped_sum"] == 0 and off["mismatch_k3_sum"] == got["mismatch_k3_sum"]
    )
    # the trainer finds a sampled token far less likely than the sampler did: a negative log-ratio, still the max
    unlikely = torch.tensor([[-1.0, -1.0, -50.0, -1.0]])
    got = sampler_mismatch(unlikely, _mismatch_tensors(unlikely, old * mask, mask), TrainerConfig())
    assert got["abs_logprob_diff_max"] == pytest.approx(49.0) and got["tis_clipped_sum"] == 0
    # a worker without rows contributes zeros
    empty = torch.zeros(0, 0)
    assert set(sampler_mismatch(empty, _mismatch_tensors(empty, empty, empty), TrainerConfig()).values()) == {0.0}


def test_clip_config_carries_the_tis_level():
    from trainer.step import clip_config

    assert clip_config(TrainerConfig(tis_level="sequence", tis_cap=3.0)).tis_level == "sequence"
    assert clip_config(TrainerConfig()).tis_level == "token"
