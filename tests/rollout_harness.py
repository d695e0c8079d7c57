"""A real RolloutWorker in the test process, serving the session's shared tiny engine, recording through a real
recorder actor into SQLite: what a rollout actor does, without starting another vLLM engine (~20 s here).

Also a two-turn environment, so a swap can land between an episode's turns, and the artifacts tests load."""

from __future__ import annotations

from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

from rollout.envs import StepResult, register_env

T = TypeVar("T")


@contextmanager
def recording_into_sqlite(folder: Path, actor_name: str) -> Iterator[tuple[str, Any]]:
    """A migrated SQLite database in `folder` and a real recorder actor writing to it: (url, RecorderConfig)."""
    from recorder.actor import start_recorder, stop_recorder
    from recorder.config import DatabaseConfig, RecorderConfig
    from recorder.migrate import upgrade

    url = f"sqlite:///{folder / 'recorded.db'}"
    upgrade(url)
    settings = RecorderConfig(actor_name=actor_name)
    recorder = start_recorder(DatabaseConfig(url=url), settings)
    try:
        yield url, settings
    finally:
        stop_recorder(recorder)


@register_env("two-turns")
class TwoTurnsEnv:
    """Every episode takes exactly two turns, whatever the policy says (the reward is the reply's length)."""

    name = "two-turns"

    def __init__(self) -> None:
        self._turn = 0

    def system_prompt(self) -> str:
        return "Answer in a few words."

    def reset(self, seed: int) -> str:
        self._turn = 0
        return f"Scenario {seed}: what do you see?"

    def step(self, action: str) -> StepResult:
        self._turn += 1
        done = self._turn >= 2
        return StepResult("And now?", min(len(action), 100) / 100, done, {"action": {"text": action[:100]}})


def in_process_worker(tiny_engine: Any, model_dir: str, engine_config: Any, recorder: Any, judge: Any = None) -> Any:
    """A RolloutWorker whose coroutines run on the tiny engine's loop (call them through `run_on`)."""
    from rollout.actor import RolloutWorker

    return RolloutWorker(
        model_dir, engine_config, recorder, judge, restore_on_restart=False, engine_instance=tiny_engine.engine
    )


def run_on(tiny_engine: Any, coroutine: Coroutine[Any, Any, T], timeout_s: float = 180.0) -> T:
    return tiny_engine.submit(coroutine).result(timeout=timeout_s)


def rows(url: str, query: Any) -> list[Any]:
    db = sa.create_engine(url)
    try:
        with db.connect() as conn:
            return list(conn.execute(query).all())
    finally:
        db.dispose()


def perturbed_weights(base: str, folder: Path, scale: float = 0.5, seed: int = 0) -> str:
    """A "full fine-tune" of the tiny model: the same architecture with visibly different weights."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * scale)
    model.save_pretrained(folder)
    return str(folder)
