"""A verifiable single-turn task for tests and benchmarks: add or multiply two numbers, exact reward."""

from __future__ import annotations

import random
import re

from rollout.envs.base import StepResult, register_env

_NUMBER = re.compile(r"-?\d+")


@register_env("arithmetic")
class ArithmeticEnv:
    """Reward 1 for the exact answer as the first integer in the reply, 0 for a wrong one, -0.1 for none."""

    name = "arithmetic"

    def __init__(self, max_operand: int = 20, operations: str = "+*") -> None:
        self.max_operand = max_operand
        self.operations = operations
        self._answer: int | None = None

    def system_prompt(self) -> str:
        return "Answer with the number only."

    def reset(self, seed: int) -> str:
        rng = random.Random(seed)
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        operation = rng.choice(self.operations)
        self._answer = a + b if operation == "+" else a * b
        return f"What is {a} {operation} {b}?"

    def step(self, action: str) -> StepResult:
        if self._answer is None:
            raise RuntimeError("call reset(seed) before step()")
        match = _NUMBER.search(action)
        if match is None:
            return StepResult("", -0.1, True, {"error": "no integer in the answer", "action": None})
        given = int(match.group())
        correct = given == self._answer
        return StepResult("", 1.0 if correct else 0.0, True, {"action": {"answer": given}, "correct": correct})
