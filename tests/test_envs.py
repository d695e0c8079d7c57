"""Environments: deterministic per seed, exact rewards, malformed actions as outcomes, no leaked outcomes."""

from __future__ import annotations

import json

import pytest

from rollout.envs import ENVIRONMENTS, make_env


def test_registry_names_and_unknown_names():
    assert {"arithmetic", "market"} <= set(ENVIRONMENTS)
    with pytest.raises(KeyError, match="unknown environment 'chess'; registered: arithmetic, lowercase, market"):
        make_env("chess")


def test_arithmetic_is_exact_and_deterministic():
    env = make_env("arithmetic")
    question = env.reset(seed=3)
    assert make_env("arithmetic").reset(seed=3) == question
    a, op, b = question.removeprefix("What is ").removesuffix("?").split()
    answer = int(a) + int(b) if op == "+" else int(a) * int(b)
    assert env.step(f"It is {answer}.").reward == 1.0
    env.reset(seed=3)
    assert env.step(str(answer + 1)).reward == 0.0
    env.reset(seed=3)
    result = env.step("no idea")
    assert result.reward == -0.1 and result.done and result.info["error"] == "no integer in the answer"


def _play(seed: int, actions: list[str]) -> list:
    env = make_env("market")
    trace = [env.reset(seed)]
    for action in actions:
        trace.append(env.step(action))
    return trace


def test_market_episodes_are_deterministic_per_seed():
    actions = ['{"type": "buy_yes", "market": 1, "amount": 100}', '{"type": "hold"}', '{"type": "hold"}']
    first, again, other = _play(7, actions), _play(7, actions), _play(8, actions)
    assert first[0] == again[0] and [r.reward for r in first[1:]] == [r.reward for r in again[1:]]
    assert first[0] != other[0]


def test_market_observations_never_show_the_outcome():
    env = make_env("market")
    observation = env.reset(seed=11)
    for market in env.markets:
        assert f"{market.probability}" not in observation
    assert "resolve" in env.system_prompt() and "outcome" not in observation.lower()


def test_market_profit_is_computed_by_hand():
    env = make_env("market", ticks=1)
    env.reset(seed=5)
    market = env.markets[0]
    price = market.yes_price
    result = env.step(json.dumps({"type": "buy_yes", "market": 1, "amount": 100}))
    shares = 100 / price
    expected_pnl = (shares if market.outcome else 0.0) - 100
    assert result.done and result.info["pnl"] == pytest.approx(expected_pnl, abs=1e-3)
    assert result.reward == pytest.approx(expected_pnl / 100 + 0.02, abs=1e-5)


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ("I think I'll buy", "no JSON object"),
        ('{"type": "buy_yes", "market": 1, "amount": 100', "no JSON object"),
        ('{"type": "short", "market": 1}', "type must be one of"),
        ('{"type": "buy_no", "market": 9, "amount": 10}', "market must be an id from 1 to 3"),
        ('{"type": "buy_no", "market": 2, "amount": -5}', "amount must be a number of dollars"),
        ('{"type": "buy_yes", "market": 2, "amount": 5000}', "amount must be a number of dollars"),
    ],
)
def test_malformed_actions_are_penalised_not_raised(reply, error):
    env = make_env("market")
    env.reset(seed=1)
    result = env.step(reply)
    assert error in result.info["error"] and result.reward == pytest.approx(-0.05)
    assert not result.done and env.balance == 1000.0  # treated as a hold: nothing changed


def test_selling_closes_a_position_at_the_current_price():
    env = make_env("market", ticks=3)
    env.reset(seed=2)
    env.step('{"type": "buy_no", "market": 2, "amount": 200}')
    shares, price = env.markets[1].no_shares, 1 - env.markets[1].yes_price
    env.step('{"type": "sell", "market": 2}')
    assert env.markets[1].no_shares == 0 and env.balance == pytest.approx(800 + shares * price)


def test_lowercase_env_rewards_the_share_of_lowercase_letters():
    from rollout.envs import make_env

    env = make_env("lowercase")
    assert env.reset(3) == make_env("lowercase").reset(3)  # deterministic per seed
    assert env.step("the sea is calm").reward == 1.0
    assert env.step("The Sea!").reward == pytest.approx(5 / 8)
    assert env.step("   ").reward == 0.0
    with pytest.raises(RuntimeError, match="reset"):
        make_env("lowercase").step("x")
    narrow = make_env("lowercase", alphabet="abcde ")
    narrow.reset(1)
    assert narrow.step("a bad deed").reward == 1.0 and narrow.step("beef!").reward == pytest.approx(3 / 5)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"type": "buy_yes", "market": "2", "amount": 100.0, "note": "x"}', {"type": "buy_yes", "market": 2}),
        ('{"type": "buy_no", "market": 1.0, "amount": "50"', {"type": "buy_no", "market": 1}),
        ('{"type": "sell", "market": 3} and then {"type": "hold"}', {"type": "sell", "market": 3}),
    ],
)
def test_lenient_market_parsing_reads_fields_from_broken_json(reply, expected):
    strict, lenient = make_env("market"), make_env("market", lenient=True)
    strict.reset(1), lenient.reset(1)
    parsed = lenient.step(reply).info["action"]
    assert parsed is not None and {k: parsed[k] for k in expected} == expected
    if "note" not in reply and "then" not in reply:
        assert strict.step(reply).info["error"]  # strict parsing refuses the same reply


def test_market_prefill_is_the_start_of_a_json_action():
    env = make_env("market", prefill=True, lenient=True)
    env.reset(2)
    assert env.response_prefix == '{"type": "'
    assert env.step(env.response_prefix + 'hold"}').info["action"] == {"type": "hold"}
    assert make_env("market").response_prefix == ""


def test_partial_format_credit_rewards_getting_closer_to_a_valid_action():
    def format_term(reply: str, partial: bool = True) -> float:
        env = make_env("market", partial_format=partial, format_penalty=0.3, format_bonus=0.1, ticks=2)
        env.reset(5)
        return env.step(reply).info["format"]

    wrong_type, wrong_market = '{"type": "buy"}', '{"type": "buy_yes", "market": "Osaka", "amount": 10}'
    wrong_amount, valid = (
        '{"type": "buy_no", "market": 2, "amount": -1}',
        '{"type": "buy_no", "market": 2, "amount": 10}',
    )
    assert [format_term(r) for r in (wrong_type, wrong_market, wrong_amount, valid)] == pytest.approx(
        [-0.3, -0.2, -0.1, 0.1]
    )
    assert format_term(wrong_amount, partial=False) == pytest.approx(-0.3)


def test_unknown_env_settings_are_named():
    with pytest.raises(ValueError, match=r"'lowercase' does not take the setting\(s\) \['ticks'\].*takes: alphabet"):
        make_env("lowercase", ticks=2)


def test_market_order_limit_rejects_larger_orders_and_is_in_the_prompt():
    env = make_env("market", max_amount=100)
    env.reset(3)
    assert "Orders are limited to $100." in env.system_prompt()
    too_big = env.step('{"type": "buy_yes", "market": 1, "amount": 150}')
    assert too_big.info["action"] is None and "(0, 100.00]" in too_big.info["error"]
    assert env.step('{"type": "buy_yes", "market": 1, "amount": 100}').info["error"] is None
    assert env.balance == pytest.approx(900)
    with pytest.raises(ValueError, match="max_amount must be a positive number of dollars"):
        make_env("market", max_amount=0)
