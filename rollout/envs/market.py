"""A prediction-market trading environment modelled on the agents this replaces (DESIGN.md §5).

An agent sees its balance, positions and a few binary markets (question, YES/NO price, a noisy but
informative news line) for a few ticks, and answers each tick with one JSON action. At the end every market
resolves; YES shares pay 1 if it happened, NO shares pay 1 if it did not. The reward is the profit in units
of `pnl_scale` dollars, plus a small per-tick format term (valid JSON action or not). Everything is drawn
from the seed, so a GRPO group shares its start state; the outcomes never appear in an observation.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from rollout.envs.base import StepResult, register_env

QUESTIONS = [
    "Will it rain in {city} on Saturday?",
    "Will {team} win their next match?",
    "Will the {city} marathon record be broken this year?",
    "Will {company} announce layoffs this quarter?",
    "Will the {city} metro strike end within a week?",
    "Will {company} shares close higher on Friday?",
]
CITIES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Austin"]
TEAMS = ["the Falcons", "Rovers FC", "the Tigers", "Atletico Sur"]
COMPANIES = ["Acme Robotics", "Blue Orchard", "Northwind", "Helios Energy"]
ACTIONS = ("buy_yes", "buy_no", "sell", "hold")
_JSON_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)


@dataclass
class Market:
    id: int
    question: str
    probability: float
    """The true chance of YES (hidden)."""
    outcome: bool
    """How it resolves (hidden)."""
    yes_price: float
    yes_shares: float = 0.0
    no_shares: float = 0.0
    news: list[str] = field(default_factory=list)


@register_env("market")
class MarketEnv:
    name = "market"

    def __init__(
        self,
        markets: int = 3,
        ticks: int = 3,
        balance: float = 1000.0,
        news_accuracy: float = 0.7,
        pnl_scale: float = 100.0,
        format_bonus: float = 0.02,
        format_penalty: float = 0.05,
        prefill: bool = False,
        lenient: bool = False,
        partial_format: bool = False,
        max_amount: float | None = None,
    ) -> None:
        """`prefill` starts every reply with '{"type": "' for the policy (small models rarely open a JSON object
        on their own); `lenient` also accepts an action whose fields are readable but whose JSON is broken
        (extra text, a missing brace, the market id as "2" or 2.0); `partial_format` shrinks the format penalty
        of an invalid action by the share of its fields (type, market, amount) that were right, so a policy
        that gets closer to a valid action scores better before it gets there. `max_amount` is the exchange's
        order limit in dollars (default: the whole balance); a larger order is rejected like any invalid one."""
        if max_amount is not None and max_amount <= 0:
            raise ValueError(f"max_amount must be a positive number of dollars, got {max_amount}")
        self.n_markets, self.ticks, self.start_balance = markets, ticks, balance
        self.news_accuracy, self.pnl_scale = news_accuracy, pnl_scale
        self.format_bonus, self.format_penalty = format_bonus, format_penalty
        self.response_prefix = '{"type": "' if prefill else ""
        self.lenient = lenient
        self.partial_format = partial_format
        self.max_amount = max_amount
        self._credit = 0.0  # share of the last action's fields that were valid
        self.markets: list[Market] = []
        self.balance = balance
        self.tick = 0
        self._rng = random.Random(0)

    def system_prompt(self) -> str:
        # One concrete action: small models copy the schema's "a" | "b" alternatives literally without it.
        example = '{"type": "buy_yes", "market": 2, "amount": 50}'
        limit = f" Orders are limited to ${self.max_amount:g}." if self.max_amount is not None else ""
        return (
            "You trade binary prediction markets. Each turn answer with exactly one JSON object: "
            '{"type": "buy_yes" | "buy_no" | "sell" | "hold", "market": <id>, "amount": <dollars>}. '
            "buy_yes/buy_no spend `amount` dollars at the current price; sell closes your position in a market; "
            "hold does nothing. Markets resolve after the last turn: a YES share pays $1 if the event happens."
            f"{limit} Example reply: {example}"
        )

    def reset(self, seed: int) -> str:
        self._rng = random.Random(seed)
        rng = self._rng
        self.balance, self.tick, self.markets = self.start_balance, 0, []
        for market_id in range(1, self.n_markets + 1):
            template = rng.choice(QUESTIONS)
            question = template.format(city=rng.choice(CITIES), team=rng.choice(TEAMS), company=rng.choice(COMPANIES))
            probability = rng.uniform(0.1, 0.9)
            outcome = rng.random() < probability
            price = min(0.95, max(0.05, probability + rng.gauss(0, 0.15)))
            self.markets.append(Market(market_id, question, probability, outcome, round(price, 2)))
        self._publish_news()
        return self._observation()

    def _publish_news(self) -> None:
        for market in self.markets:
            hint_yes = market.outcome if self._rng.random() < self.news_accuracy else not market.outcome
            source = self._rng.choice(["Local press", "A trader on the forum", "An analyst note", "A wire report"])
            market.news.append(f"{source} leans {'YES' if hint_yes else 'NO'}.")
            drift = (market.probability - market.yes_price) * 0.3 + self._rng.gauss(0, 0.03)
            market.yes_price = round(min(0.95, max(0.05, market.yes_price + drift)), 2)

    def _observation(self) -> str:
        lines = [f"Turn {self.tick + 1} of {self.ticks}. Balance: ${self.balance:.2f}."]
        for m in self.markets:
            position = f"{m.yes_shares:.1f} YES, {m.no_shares:.1f} NO" if m.yes_shares or m.no_shares else "none"
            lines.append(
                f"Market {m.id}: {m.question} YES ${m.yes_price:.2f} / NO ${1 - m.yes_price:.2f}. "
                f"Your position: {position}. News: {m.news[-1]}"
            )
        lines.append("Your action (one JSON object):")
        return "\n".join(lines)

    def _parse(self, text: str) -> tuple[dict[str, Any] | None, str | None]:
        self._credit = 0.0
        match = _JSON_OBJECT.search(text)
        if match is None:
            if self.lenient and (fields := _fields(text)):
                return self._validate(fields)
            return None, "no JSON object in the reply"
        try:
            action = json.loads(match.group())
        except json.JSONDecodeError as exc:
            if self.lenient and (fields := _fields(text)):
                return self._validate(fields)
            return None, f"invalid JSON: {exc.msg}"
        return self._validate(action)

    def _validate(self, action: Any) -> tuple[dict[str, Any] | None, str | None]:
        if self.lenient and isinstance(action, dict):
            action = {**action, "market": _as_int(action.get("market")), "amount": _as_number(action.get("amount"))}
        if not isinstance(action, dict) or action.get("type") not in ACTIONS:
            return None, f"type must be one of {', '.join(ACTIONS)}"
        self._credit = 1 / 3
        if action["type"] == "hold":
            return {"type": "hold"}, None
        market = action.get("market")
        if not isinstance(market, int) or not 1 <= market <= len(self.markets):
            return None, f"market must be an id from 1 to {len(self.markets)}"
        self._credit = 2 / 3
        if action["type"] == "sell":
            return {"type": "sell", "market": market}, None
        amount = action.get("amount")
        ceiling = self.balance if self.max_amount is None else min(self.balance, self.max_amount)
        if not isinstance(amount, int | float) or isinstance(amount, bool) or not 0 < amount <= ceiling:
            return None, f"amount must be a number of dollars in (0, {ceiling:.2f}]"
        return {"type": action["type"], "market": market, "amount": float(amount)}, None

    def _apply(self, action: dict[str, Any]) -> None:
        if action["type"] == "hold":
            return
        market = self.markets[int(action["market"]) - 1]
        if action["type"] == "sell":
            self.balance += market.yes_shares * market.yes_price + market.no_shares * (1 - market.yes_price)
            market.yes_shares = market.no_shares = 0.0
            return
        amount = float(action["amount"])
        self.balance -= amount
        if action["type"] == "buy_yes":
            market.yes_shares += amount / market.yes_price
        else:
            market.no_shares += amount / (1 - market.yes_price)

    def step(self, action: str) -> StepResult:
        if not self.markets:
            raise RuntimeError("call reset(seed) before step()")
        parsed, error = self._parse(action)
        if parsed is not None:
            self._apply(parsed)
        credit = self._credit if self.partial_format else 0.0
        format_term = self.format_bonus if error is None else -self.format_penalty * (1 - credit)
        self.tick += 1
        info: dict[str, Any] = {"action": parsed, "error": error, "format": round(format_term, 6)}
        if self.tick < self.ticks:
            self._publish_news()
            return StepResult(self._observation(), format_term, False, info)
        payout = sum(m.yes_shares if m.outcome else m.no_shares for m in self.markets)
        final_value = self.balance + payout
        pnl = final_value - self.start_balance
        info.update(pnl=round(pnl, 4), final_value=round(final_value, 4))
        return StepResult("The markets have resolved.", pnl / self.pnl_scale + format_term, True, info)


_FIELD = re.compile(r'"(type|market|amount)"\s*:\s*"?([A-Za-z_]+|-?\d+(?:\.\d+)?)')


def _fields(text: str) -> dict[str, Any]:
    """`"key": value` pairs readable in broken JSON (the first of each key)."""
    found: dict[str, Any] = {}
    for key, value in _FIELD.findall(text):
        found.setdefault(key, value)
    return found if "type" in found else {}


def _as_int(value: Any) -> Any:
    number = _as_number(value)
    return int(number) if isinstance(number, float) and number.is_integer() else number


def _as_number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
