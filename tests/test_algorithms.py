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


# --- truncated importance weights (token and sequence level), against explicit float64 loops ---

# Rows of (policy mask, old - behaviour log-ratio per token). Row 0's policy tokens multiply to
# exp(0.5 + 0.6 + 0.2) = 3.67 > cap 2.5 (capped); row 1's to exp(0.3 - 0.1 - 0.4 + 0.5) = 1.35 (not capped);
# row 2's to exp(-0.9 - 0.8) = 0.18 (small, not capped); row 3 has no policy token. The positions outside the
# mask carry large ratios that must not count.
_MASKS = [[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
_LOG_RATIOS = [
    [9.0, 0.5, 0.6, 0.2, 7.0, -8.0],
    [5.0, -6.0, 0.3, -0.1, -0.4, 0.5],
    [-0.9, 4.0, -0.8, 3.0, 9.0, 9.0],
    [3.0, 3.0, 3.0, 3.0, 3.0, 3.0],
]
_CAP = 2.5


def _tis_batch(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    old = -torch.rand(4, 6, generator=generator, dtype=torch.float64) * 3 - 0.1
    behaviour = old - torch.tensor(_LOG_RATIOS, dtype=torch.float64)
    logp = old + (torch.rand(4, 6, generator=generator, dtype=torch.float64) - 0.5) * 0.8  # some PPO-clipped
    return {
        "logp": logp.to(dtype),
        "old": old.to(dtype),
        "behaviour": behaviour.to(dtype),
        "mask": torch.tensor(_MASKS, dtype=dtype),
        "advantages": torch.tensor([1.0, -0.7, 0.4, 2.0], dtype=dtype),
    }


def _loop_weights(level: str, cap: float) -> tuple[list[list[float]], list[list[bool]]]:
    """The truncated importance weights by hand: 1 outside the mask."""
    weights, clipped = [], []
    for mask, ratios in zip(_MASKS, _LOG_RATIOS, strict=True):
        if level == "sequence":
            product = 1.0
            for m, r in zip(mask, ratios, strict=True):
                if m:
                    product *= math.exp(r)
            row = [min(product, cap) if m else 1.0 for m in mask]
            hit = [bool(m) and product > cap for m in mask]
        else:
            row = [min(math.exp(r), cap) if m else 1.0 for m, r in zip(mask, ratios, strict=True)]
            hit = [bool(m) and math.exp(r) > cap for m, r in zip(mask, ratios, strict=True)]
        weights.append(row)
        clipped.append(hit)
    return weights, clipped


def _loop_loss(batch: dict[str, torch.Tensor], weights: list[list[float]], eps_low: float, eps_high: float):
    """Per-token clipped surrogate times the given weight, written out token by token in float64."""
    logp, old = batch["logp"].double().tolist(), batch["old"].double().tolist()
    out = []
    for i, mask in enumerate(_MASKS):
        a = float(batch["advantages"][i])
        row = []
        for t, m in enumerate(mask):
            ratio = math.exp(logp[i][t] - old[i][t])
            surrogate = -min(ratio * a, min(max(ratio, 1 - eps_low), 1 + eps_high) * a)
            row.append(surrogate * weights[i][t] * m)
        out.append(row)
    return out


def test_the_loop_example_covers_a_capped_and_an_uncapped_row():
    _, clipped = _loop_weights("sequence", _CAP)
    assert any(clipped[0]) and not any(clipped[1]) and not any(clipped[2])


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_truncated_is_weights_match_the_loops(level):
    from trainer.algorithms import truncated_is_weights

    batch = _tis_batch()
    expected, expected_clipped = _loop_weights(level, _CAP)
    weights, clipped = truncated_is_weights(batch["old"], batch["behaviour"], batch["mask"], _CAP, level)
    assert weights.shape == clipped.shape == (4, 6) and clipped.dtype == torch.bool
    assert torch.allclose(weights, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert clipped.tolist() == expected_clipped


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_sequence_level_loss_matches_the_loops(dtype, tolerance):
    batch = _tis_batch(dtype)
    clip = ClipConfig(eps_low=0.2, eps_high=0.28, tis_cap=_CAP, tis_level="sequence")
    terms = clipped_policy_loss(
        batch["logp"], batch["old"], batch["advantages"], batch["mask"], clip, batch["behaviour"]
    )
    weights, _ = _loop_weights("sequence", _CAP)
    expected = torch.tensor(_loop_loss(batch, weights, 0.2, 0.28), dtype=torch.float64)
    assert torch.allclose(terms.per_token.double(), expected, rtol=tolerance, atol=tolerance)
    # the sequence weight really differs from the token one here, so the test tells the levels apart
    token_weights, _ = _loop_weights("token", _CAP)
    assert not torch.allclose(
        expected, torch.tensor(_loop_loss(batch, token_weights, 0.2, 0.28), dtype=torch.float64), atol=1e-3
    )


def test_token_level_loss_matches_the_loops_and_the_previous_formula():
    batch = _tis_batch(torch.float32)
    clip = ClipConfig(eps_low=0.2, eps_high=0.28, tis_cap=_CAP)
    assert clip.tis_level == "token"
    logp, old, behaviour, mask, advantages = (batch[k] for k in ("logp", "old", "behaviour", "mask", "advantages"))
    terms = clipped_policy_loss(logp, old, advantages, mask, clip, behaviour)
    weights, _ = _loop_weights("token", _CAP)
    expected = torch.tensor(_loop_loss(batch, weights, 0.2, 0.28), dtype=torch.float64)
    assert torch.allclose(terms.per_token.double(), expected, rtol=1e-5, atol=1e-5)
    # bit for bit the formula the token level had before sequence level existed
    ratio = torch.exp((logp - old).clamp(-20, 20))
    a = advantages[:, None].expand_as(logp)
    previous = -torch.min(ratio * a, ratio.clamp(0.8, 1.28) * a)
    previous = previous * torch.exp((old - behaviour).clamp(-20, 20)).clamp(max=_CAP) * mask
    assert torch.equal(terms.per_token, previous)


def test_sequence_weights_cannot_overflow():
    """A long row whose log-ratios sum to thousands: capped, finite, never inf * 0."""
    from trainer.algorithms import truncated_is_weights

    old = torch.zeros(2, 400)
    behaviour = torch.full((2, 400), -5.0)  # each token's ratio e^5; the row's product e^2000
    behaviour[1] = 5.0  # the row's product e^-2000: weight (nearly) 0, still finite
    mask = torch.ones(2, 400)
    weights, clipped = truncated_is_weights(old, behaviour, mask, 3.0, "sequence")
    assert torch.isfinite(weights).all() and torch.all(weights[0] == 3.0) and bool(clipped[0].all())
    assert float(weights[1].max()) < 1e-8 and not bool(clipped[1].any())
    assert torch.all(truncated_is_weights(old, behaviour, mask, None, "sequence")[0][0] == math.exp(20.0))


def test_sequence_level_gradient_is_the_weight_times_the_surrogates():
    """Weights are detached: d loss / d logp = w_row * d surrogate / d logp, and d/d old_logp is exactly the
    ratio's (minus d/d logp), with nothing flowing through the weight."""
    batch = _tis_batch()
    clip = ClipConfig(eps_low=0.2, eps_high=0.28, tis_cap=_CAP, tis_level="sequence")
    logp = batch["logp"].clone().requires_grad_(True)
    old = batch["old"].clone().requires_grad_(True)
    terms = clipped_policy_loss(logp, old, batch["advantages"], batch["mask"], clip, batch["behaviour"])
    terms.per_token.sum().backward()
    weights, _ = _loop_weights("sequence", _CAP)
    expected = torch.zeros(4, 6, dtype=torch.float64)
    for i, mask in enumerate(_MASKS):
        a = float(batch["advantages"][i])
        for t, m in enumerate(mask):
            ratio = math.exp(float(batch["logp"][i, t] - batch["old"][i, t]))
            # -min(r A, clip(r) A): the unclipped term is the active one (gradient -A r) unless the clip binds
            clip_binds = (a > 0 and ratio > 1.28) or (a < 0 and ratio < 0.8)
            expected[i, t] = 0.0 if clip_binds or not m else -a * ratio * weights[i][t]
    assert (expected != 0).sum() >= 6 and (expected == 0).sum() > (torch.tensor(_MASKS) == 0).sum()
    assert torch.allclose(logp.grad, expected, rtol=1e-12, atol=1e-15)
    assert torch.allclose(old.grad, -expected, rtol=1e-12, atol=1e-15)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return clipped_policy_loss(
            x, batch["old"], batch["advantages"], batch["mask"], clip, batch["behaviour"]
        ).per_token

    assert torch.autograd.gradcheck(loss_of, (batch["logp"].clone().requires_grad_(True),), eps=1e-7, atol=1e-6)


def test_an_unknown_tis_level_is_refused():
    from trainer.algorithms import truncated_is_weights

    with pytest.raises(ValueError, match="tis_level must be one of token, sequence, got 'row'"):
        ClipConfig(tis_level="row")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tis level must be one of token, sequence"):
        truncated_is_weights(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), 2.0, "row")


def test_the_trainer_config_validates_tis_level_and_the_simulated_backend():
    from typing import get_args

    from pydantic import ValidationError

    from trainer.algorithms import TIS_LEVELS
    from trainer.config import TrainerConfig

    with pytest.raises(ValidationError, match=r"tis_level\n  Input should be 'token' or 'sequence'"):
        TrainerConfig(tis_level="row")
    assert TrainerConfig().tis_level == "token" and TrainerConfig(tis_level="sequence").tis_level == "sequence"
    assert set(get_args(TrainerConfig.model_fields["tis_level"].annotation)) == set(TIS_LEVELS)
    assert TrainerConfig().backend == "torch"  # simulated is never a default
    simulated = TrainerConfig(backend="simulated", simulated_update_s=0.05)
    assert simulated.backend == "simulated" and simulated.simulated_update_s == 0.05
    assert TrainerConfig.model_validate({"backend": "simulated"}).simulated_update_s == 1.0
    with pytest.raises(ValidationError, match="backend"):
        TrainerConfig(backend="jax")
    with pytest.raises(ValidationError, match="simulated_update_s"):
        TrainerConfig(backend="simulated", simulated_update_s=0)
