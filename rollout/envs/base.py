"""The environment interface: reset(seed) -> observation; step(action text) -> observation, reward, done, info.

An environment is deterministic given its seed, so every episode of a GRPO group starts from the same state
(the group's scenario). Actions arrive as the policy's raw text; an environment parses them itself, and a
malformed action is an outcome (a penalty and an `error` in info), never an exception.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class StepResult:
    observation: str
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)
    """Anything worth recording: the parsed action (`action`), a parse `error`, reward components."""


class Environment(Protocol):
    name: str

    def reset(self, seed: int) -> str:
        """Start an episode in the state that `seed` determines; return the first observation."""
        ...

    def step(self, action: str) -> StepResult:
        """Apply the policy's text; a malformed action is penalised and explained in `info['error']`."""
        ...

    def system_prompt(self) -> str:
        """Instructions shown to the policy before the first observation."""
        ...


ENVIRONMENTS: dict[str, Callable[..., Environment]] = {}


def register_env(name: str) -> Callable[[Callable[..., Environment]], Callable[..., Environment]]:
    def add(factory: Callable[..., Environment]) -> Callable[..., Environment]:
        ENVIRONMENTS[name] = factory
        return factory

    return add


def make_env(name: str, **settings: Any) -> Environment:
    if name not in ENVIRONMENTS:
        raise KeyError(f"unknown environment {name!r}; registered: {', '.join(sorted(ENVIRONMENTS))}")
    import inspect

    factory = ENVIRONMENTS[name]
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise ValueError(
            f"environment {name!r} does not take the setting(s) {unknown} (rollout.env_settings); "
            f"it takes: {', '.join(accepted) or 'none'}"
        )
    return factory(**settings)
