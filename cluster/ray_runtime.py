"""Connecting to Ray the same way everywhere: driver scripts, jobs and the test suite."""

from __future__ import annotations

import logging
import os
from typing import Any

from cluster.config import RayConfig

log = logging.getLogger(__name__)


def init_kwargs(config: RayConfig, temp_dir: str | None = None, **extra: Any) -> dict[str, Any]:
    """What `init_ray` passes to `ray.init` for this config."""
    kwargs: dict[str, Any] = {"address": config.address, "namespace": config.namespace, "log_to_driver": True}
    if config.address == "local":
        kwargs.update(
            num_cpus=config.num_cpus, include_dashboard=config.include_dashboard, dashboard_host=config.dashboard_host
        )
        if temp_dir:
            kwargs["_temp_dir"] = temp_dir
    kwargs.update(extra)
    return kwargs


def init_ray(config: RayConfig, temp_dir: str | None = None, **extra: Any) -> Any:
    """`ray.init` for this config; a no-op returning the current context if Ray is already up.

    RAY_AUTH_MODE is exported explicitly (unless the user set it) because Ray 2.60 switches token auth
    on by itself once ~/.ray/auth_token exists, and a client whose mode differs from the cluster's is
    refused with an unhelpful error.
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", config.auth_mode)
    if ray.is_initialized():
        return ray.get_runtime_context()
    context = ray.init(**init_kwargs(config, temp_dir, **extra))
    log.info("connected to Ray at %s (namespace %s)", context.address_info.get("address"), config.namespace)
    return context
