"""The agent gateway beside the loop: started after the rollout fleet when `gateway.enabled`, stopped first (its
ledger's records stored) when the loop shuts down."""

from __future__ import annotations

import logging
from typing import Any

from cluster.config import ZigguratConfig
from cluster.fleet import rollout_actor_name

log = logging.getLogger(__name__)


def start(config: ZigguratConfig, model_path: str) -> str:
    """Start the gateway over this config's rollout actors; returns its base URL."""
    from gateway.app import start_gateway

    url = start_gateway(
        config.gateway,
        config.database,
        model_name=config.model.name,
        model_path=model_path,
        worker_names=[rollout_actor_name(config, index) for index in range(config.rollout.actors)],
        max_model_len=config.engine.max_model_len,
    )
    log.warning("agent gateway serving %s at %s/v1 (OpenAI API; auth: %s)", config.model.name, url, config.gateway.auth)
    return url


def stop(config: ZigguratConfig) -> dict[str, Any]:
    """Stop the gateway (if this process started it) and store what its ledger holds."""
    from gateway.app import stop_gateway

    try:
        return stop_gateway(config.gateway)
    except Exception as exc:  # shutting down: say what was lost rather than hide the rest of the shutdown
        log.error("the gateway did not stop cleanly (%s: %s)", type(exc).__name__, str(exc)[:300])
        return {}
