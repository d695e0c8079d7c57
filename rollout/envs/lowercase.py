"""A verifiable single-turn format task with a dense reward: write in lowercase letters only.

Reward = the share of the reply's characters that are lowercase ASCII letters or spaces (0 for an empty
reply). Every sample scores differently, even from a random model, so it gives GRPO a signal at any skill
level; tests and the learning check use it with the tiny model, where exact-answer tasks score all zeros.
"""

from __future__ import annotations

import random
import string

from rollout.envs.base import StepResult, register_env

TOPICS = ("the sea", "a market", "rain", "a city at night", "bread", "a river", "the moon", "a quiet street")
_ALLOWED = frozenset(string.ascii_lowercase + " ")


def lowercase_share(text: str) -> float:
    text = text.strip()
    return sum(ch in _ALLOWED for ch in text) / len(text) if text else 0.0


@register_env("lowercase")
class LowercaseEnv:
    name = "lowercase"

    def __init__(self) -> None:
        self._topic: str | None = None

    def system_prompt(self) -> str:
        return "Reply in lowercase letters and spaces only: no capitals, digits or punctuation."

    def reset(self, seed: int) -> str:
        self._topic = random.Random(seed).choice(TOPICS)
        return f"Write one short sentence about {self._topic}."

    def step(self, action: str) -> StepResult:
        if self._topic is None:
            raise RuntimeError("call reset(seed) before step()")
        share = lowercase_share(action)
        return StepResult("", share, True, {"action": {"text": action[:200]}, "lowercase_share": share})
