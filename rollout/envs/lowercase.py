"""A verifiable single-turn format task with a dense reward: write using only the allowed characters.

Reward = the share of the reply's characters that are in `alphabet` (by default lowercase ASCII letters and
the space; 0 for an empty reply). Every sample scores differently, even from a random model, so it gives
GRPO a signal at any skill level; tests and the learning check use it with the tiny model, where
exact-answer tasks score all zeros.
"""

from __future__ import annotations

import random
import string

from rollout.envs.base import StepResult, register_env

TOPICS = ("the sea", "a market", "rain", "a city at night", "bread", "a river", "the moon", "a quiet street")
LOWERCASE = string.ascii_lowercase + " "


def allowed_share(text: str, alphabet: str = LOWERCASE) -> float:
    text = text.strip()
    allowed = frozenset(alphabet)
    return sum(ch in allowed for ch in text) / len(text) if text else 0.0


@register_env("lowercase")
class LowercaseEnv:
    name = "lowercase"

    def __init__(self, alphabet: str = LOWERCASE) -> None:
        """`alphabet`: the characters a reply may use (a narrower one, e.g. "abcde ", is a harder task)."""
        if not alphabet:
            raise ValueError("alphabet must name at least one allowed character")
        self.alphabet = alphabet
        self._topic: str | None = None

    def system_prompt(self) -> str:
        if self.alphabet == LOWERCASE:
            return "Reply in lowercase letters and spaces only: no capitals, digits or punctuation."
        return f"Reply using only these characters: {self.alphabet!r}."

    def reset(self, seed: int) -> str:
        self._topic = random.Random(seed).choice(TOPICS)
        return f"Write one short sentence about {self._topic}."

    def step(self, action: str) -> StepResult:
        if self._topic is None:
            raise RuntimeError("call reset(seed) before step()")
        share = allowed_share(action, self.alphabet)
        return StepResult("", share, True, {"action": {"text": action[:200]}, "allowed_share": share})
