"""Environments agents act in, looked up by name: `make_env("arithmetic", **settings)`."""

from rollout.envs.base import ENVIRONMENTS, Environment, StepResult, make_env, register_env

# Importing the built-in environments registers them.
from rollout.envs import arithmetic, lowercase, market  # noqa: F401  isort: skip

__all__ = ["ENVIRONMENTS", "Environment", "StepResult", "make_env", "register_env"]
