"""GRPO algorithms against hand-computed values and edge cases (pure torch, no Ray)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.algorithms import (
    ADVANTAGES,
    POLICY_LOSSES,
    ClipConfig,
    aggregate,
    clipped_policy_loss,
    dr_grpo_advantages,
    grpo_advantages,
    has_signal,
    kl_k3,
)


def test_grpo_advantages_match_the_reference_vector():
    advantages = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), eps=1e-6)
    # mean 0.5, unbiased std sqrt(1/3) = 0.57735; 0.5 / (0.57735 + 1e-6) = 0.866024
    assert advantages.tolist() == pytest.approx([0.866024, -0.866024, -0.866024, 0.866024], abs=1e-6)


def test_dr_grpo_only_centres():
    assert dr_grpo_advantages(torch.tensor([3.0, 1.0])).tolist() == [1.0, -1.0]
    assert set(ADVANTAGES) >= {"grpo", "dr_grpo"} and set(POLICY_LOSSES) >= {"clipped"}


@pytest.mark.parametrize("rewards", [[2.0], [0.5, 0.5, 0.5]])
def test_a_group_without_signal_gets_zero_advantage(rewards):
    r = torch.tensor(rewards)
    assert torch.all(grpo_advantages(r) == 0) and torch.all(dr_grpo_advantages(r) == 0)
    assert not has_signal(r)
    assert has_signal(torch.tensor([0.5, 0.4]))


@pytest.mark.parametrize("bad", [[1.0, math.nan], [math.inf, 0.0]])
def test_non_finite_rewards_are_refused(bad):
    with pytest.raises(ValueError, match="rewards must be finite"):
        grpo_advantages(torch.tensor(bad))


def _loss(ratio: float, advantage: float, clip: ClipConfig) -> float:
    logp = torch.tensor([[math.log(ratio)]])
    terms = clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([advantage]), torch.ones(1, 1), clip)
    return terms.per_token.item()


def test_clipping_by_hand():
    clip = ClipConfig(eps_low=0.2, eps_high=0.28, tis_cap=None)
    assert _loss(1.0, 2.0, clip) == pytest.approx(-2.0)  # on-policy: -A
    assert _loss(1.5, 1.0, clip) == pytest.approx(-1.28)  # A > 0: gain capped at 1 + eps_high
    assert _loss(0.5, 1.0, clip) == pytest.approx(-0.5)  # A > 0, ratio low: the unclipped term is smaller
    assert _loss(0.5, -1.0, clip) == pytest.approx(0.8)  # A < 0: clipped at 1 - eps_low
    assert _loss(5.0, -1.0, clip) == pytest.approx(5.0)  # A < 0, huge ratio: unbounded without dual clip
    assert _loss(5.0, -1.0, ClipConfig(dual_clip=3.0, tis_cap=None)) == pytest.approx(3.0)  # -c * A


def test_gradient_vanishes_where_clipped():
    logp = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    terms = clipped_policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), ClipConfig())
    terms.per_token.sum().backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == pytest.approx(-1.1)
    assert terms.clip_fraction.item() == pytest.approx(0.5)


def test_truncated_importance_weight_against_the_behaviour_policy():
    logp = old = torch.zeros(1, 2)
    behaviour = torch.log(torch.tensor([[0.5, 0.1]]))  # old/behaviour = 2 and 10 -> capped at 3
    terms = clipped_policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), ClipConfig(tis_cap=3.0), behaviour)
    assert terms.per_token[0].tolist() == pytest.approx([-2.0, -3.0])


def test_mask_and_empty_mask():
    logp = torch.randn(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    terms = clipped_policy_loss(logp, logp.clone(), torch.tensor([1.0, -1.0]), mask)
    assert terms.per_token[0, 2] == 0 and torch.all(terms.per_token[1] == 0)
    empty = torch.zeros(2, 3)
    for mode in ("token_mean", "sequence_mean"):
        value = aggregate(
            clipped_policy_loss(logp, logp.clone(), torch.tensor([1.0, 1.0]), empty).per_token, empty, mode
        )
        assert value.item() == 0 and torch.isfinite(value)


def test_aggregation_modes_by_hand():
    per_token = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(6 / 3)
    assert aggregate(per_token, mask, "token_mean", global_tokens=12).item() == pytest.approx(6 / 12)
    assert aggregate(per_token, mask, "sequence_mean").item() == pytest.approx((2.0 + 2.0) / 2)
    assert aggregate(per_token, mask, "constant", constant=2 * 3).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="must be one of"):
        aggregate(per_token, mask, "mean")


def test_kl_k3_is_zero_at_equality_and_positive_elsewhere():
    logp = torch.tensor([-1.0, -2.0])
    assert torch.all(kl_k3(logp, logp) == 0)
    assert kl_k3(torch.tensor([-1.0]), torch.tensor([-2.0])).item() == pytest.approx(math.exp(-1) + 1 - 1)


def test_the_config_names_only_registered_losses_and_estimators():
    from typing import get_args

    from pydantic import ValidationError

    from trainer.algorithms import AGGREGATIONS
    from trainer.config import TrainerConfig

    with pytest.raises(ValidationError, match=r"trainer.policy_loss 'ppo' is not registered; choose one of: clipped"):
        TrainerConfig(policy_loss="ppo")
    with pytest.raises(ValidationError, match=r"trainer.advantage 'rloo' is not registered; choose one of: dr_grpo"):
        TrainerConfig(advantage="rloo")
    assert TrainerConfig(policy_loss="clipped", advantage="dr_grpo").policy_loss == "clipped"
    # the config's aggregation modes are exactly the ones `aggregate` decides between
    assert set(get_args(TrainerConfig.model_fields["aggregation"].annotation)) == set(AGGREGATIONS)


def test_a_registered_loss_is_accepted_by_name(monkeypatch):
    from trainer.config import TrainerConfig

    monkeypatch.setitem(POLICY_LOSSES, "custom", lambda *args, **kwargs: clipped_policy_loss(*args, **kwargs))
    assert TrainerConfig(policy_loss="custom").policy_loss == "custom"
