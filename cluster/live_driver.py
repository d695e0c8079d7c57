"""`ziggurat run` in live mode: start everything, hand the loop to the controller, follow it, write the report.

    start Ray, the recorder, the rollout fleet and the controller (as in sync mode)
    controller.evaluate(deployed version)    -> the base line on the held-out scenarios
    controller.start_live(versions)          -> the controller's own loop (cluster.live) runs from here on
    follow controller.live_status() every second: one console line per event (a version trained, released,
        refused, canaried, a group replayed), until the loop has trained `versions` versions and stopped
    write report.json and reward.png, as in sync mode, with the live loop's events and counters

The driver only watches: stop it (Ctrl-C, a lost connection) and the controller goes on as long as its actor
lives (`controller.detached`), steered by `ziggurat status|pause|resume|stop|deploy|rollback`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from cluster import console
from cluster.config import ZigguratConfig

log = logging.getLogger("ziggurat.loop")


def run_live(config: ZigguratConfig, out_dir: Path) -> dict[str, Any]:
    from cluster.loop import evaluate, start, write
    from cluster.tracking import LoopTracker

    started = time.perf_counter()
    _, controller, model_path = start(config)
    tracker = LoopTracker(config, out_dir, enabled=config.controller.wandb)
    try:
        controller.call("recover", timeout=config.controller.training_timeout_s)
        controller.call("sync_workers")
        if config.rollout.eval_seeds:
            evaluate(controller, tracker, controller.call("deployed_version"))
        versions = config.controller.live_versions or config.controller.iterations
        console.phase(f"live mode: the controller plays, trains and releases until {versions} version(s) trained")
        controller.call("start_live", versions)
        status = follow(controller, tracker, config)
        entries = [e for e in status["events"] if e["event"] in ("trained", "released", "canary_settled")]
        report = write(config, controller, model_path, entries, None, out_dir, started, tracker.run_id)
        report["live"] = {k: v for k, v in status.items() if k != "events"}
        return report
    finally:
        tracker.finish()


def follow(controller: Any, tracker: Any, config: ZigguratConfig) -> dict[str, Any]:
    """Print the live loop's events as they come until it stops; returns its last status with every event."""
    seen, events = 0, []
    deadline = time.monotonic() + config.controller.training_timeout_s * max(
        config.controller.live_versions or config.controller.iterations, 1
    )
    while True:
        status = controller.call("live_status", seen, timeout=30)
        for event in status["events"]:
            seen = max(seen, event["n"])
            events.append(event)
            _show(event, tracker)
        if status["state"] in ("stopped", "failed"):
            if status["state"] == "failed":
                raise RuntimeError(f"the live loop failed: {status['error']}")
            return {**status, "events": events}
        if time.monotonic() > deadline:
            controller.call("stop_live")
            raise TimeoutError("the live loop did not finish its versions within controller.training_timeout_s each")
        time.sleep(1.0)


def _show(event: dict[str, Any], tracker: Any) -> None:
    kind = event["event"]
    if kind == "trained":
        console.phase(f"live: batch {event['batch_id']} trained -> version {event['version']} ({event['train_s']} s)")
    elif kind == "released":
        evaluation = event.get("evaluation")
        if evaluation:
            console.phase(f"version {evaluation['version']}: held-out mean reward {evaluation['mean_reward']:.4f}")
            tracker.log_evaluation(evaluation["version"], evaluation["mean_reward"], evaluation["episodes"])
        if event.get("reason"):
            console.phase(f"version {event['version']} not deployed: {event['reason']}")
        else:
            where = "as a canary on" if event.get("canary") else "rolled out to"
            actors = ", ".join(event.get("actors") or [])
            console.phase(f"version {event['version']} {where} {actors} ({(event.get('swap_s') or 0):.2f} s)")
            if event.get("failed_actors"):
                console.phase(f"  taken out of traffic (failed to load): {sorted(event['failed_actors'])}")
    elif kind == "canary_settled":
        verdict = "promoted" if event.get("promoted") else "rolled back"
        console.phase(f"canary version {event['canary_version']} {verdict}: {event.get('reason')}")
    elif kind in ("training_failed", "swap_failed", "group_dropped", "failed"):
        console.phase(f"live: {kind}: {event.get('error')}")
