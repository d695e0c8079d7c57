"""Hot-swap, canaries and keeping actors in step: the part of the controller that changes what actors serve.

Two-phase: every target rollout actor loads the version first (`prepare`), and only if all of them did within
`controller.swap_timeout_s` does any of them flip (`activate`). A flip that replaces the engine's weights (a
full or merged version) first lets the actor's groups in flight on the old version finish
(`controller.drain_timeout_s`), so an episode never samples two versions. A canary goes to a fraction of the
actors and is settled on reward (cluster.canary); `sync_workers` puts every actor back on what it should
serve after a restart. `Controller` inherits these methods; they use its database, config and actor handles.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

log = logging.getLogger("ziggurat.controller")


class HotSwap:
    """Deploy, settle canaries and resynchronise actors (mixed into `cluster.controller.Controller`)."""

    # Provided by Controller.
    db: Any
    config: Any
    _metrics: Any
    _workers: Any
    _gather: Any
    _served_artifact: Any
    deployed_version: Any
    health: Any

    def _swap(self, row: dict[str, Any], workers: dict[str, Any], targets: list[str]) -> dict[str, Any]:
        """Two-phase swap of `targets` to the version in `row`: all load it, then all flip; statuses unchanged."""
        from cluster.controller import SwapFailed
        from recorder import queries

        version, settings = row["version"], self.config.controller
        artifact, kind = self._served_artifact(row)  # verified before any actor is asked to load it
        started = time.perf_counter()
        loaded, errors = self._gather(
            {n: workers[n].prepare.remote(version, artifact, kind) for n in targets}, settings.swap_timeout_s
        )
        if errors:
            self._gather({n: workers[n].unload.remote(version) for n in loaded}, settings.swap_timeout_s)
            self._metrics.swaps.inc(1, tags={"outcome": "failed"})
            if row["status"] == "ready":  # a fresh version that cannot be loaded is unusable
                queries.update_version(self.db, version, status="failed", metrics={"swap_errors": errors})
            raise SwapFailed(f"version {version} was not loaded by {sorted(errors)}: {errors}; nobody switched")
        load_s = time.perf_counter() - started
        # Replacing full weights first lets the groups in flight on the old version finish (drain_timeout_s),
        # then vLLM reloads in place (engine.swap_timeout_s).
        flip_timeout = settings.drain_timeout_s + self.config.engine.swap_timeout_s + settings.swap_timeout_s
        previous, errors = self._gather(
            {n: workers[n].activate.remote(version, settings.drain_timeout_s) for n in targets}, flip_timeout
        )
        swap_s = time.perf_counter() - started
        if errors:  # every actor had the version loaded: failing here means an actor died or its engine broke
            self._metrics.swaps.inc(1, tags={"outcome": "partial"})
            raise SwapFailed(f"version {version} loaded everywhere but {sorted(errors)} did not switch: {errors}")
        for name in targets:
            self._metrics.served.set(version, tags={"actor": name})
        log.info("version %d serving on %s (load %.3f s, swap %.3f s)", version, targets, load_s, swap_s)
        return {"version": version, "actors": targets, "previous": previous, "load_s": load_s, "swap_s": swap_s}

    def deploy(self, version: int, canary_fraction: float | None = None) -> dict[str, Any]:
        """Load `version` into the target actors, then flip them all; nobody flips if any load fails. A canary
        (0 < fraction < 1) goes to the first actors only and is settled by `settle_canaries`."""
        from cluster import canary as canaries
        from cluster.controller import LIVE_STATUSES, ControllerError
        from recorder import queries

        row = queries.get_version(self.db, version)
        if row["status"] not in LIVE_STATUSES:
            raise ControllerError(f"version {version} is {row['status']}; only {', '.join(LIVE_STATUSES)} deploy")
        if row["status"] == "ready" and row["parent_version"] is not None:
            parent = queries.get_version(self.db, row["parent_version"])
            if parent["status"] in ("rolled_back", "failed"):  # rolled back while this version trained from it
                reason = f"trained from version {parent['version']}, which is {parent['status']}"
                queries.update_version(self.db, version, status="rolled_back", metrics={"rejected": reason})
                raise ControllerError(
                    f"version {version} is not deployed: {reason}; train the next one from the deployed version"
                )
        workers = self._workers()
        if not workers:
            self._served_artifact(row)  # an unservable folder is the first thing to fix: say so first
            raise ControllerError("no rollout actors are running; start them (ziggurat run) before deploying")
        fraction = self.config.controller.canary_fraction if canary_fraction is None else canary_fraction
        canary = 0 < fraction < 1
        names = sorted(workers)
        targets = names[: max(1, math.ceil(fraction * len(names)))] if canary else names
        if canary and len(targets) == len(names):
            raise ControllerError(
                f"a canary fraction of {fraction} covers all {len(names)} rollout actors, leaving none on the "
                "deployed version to compare it with; use a smaller fraction, more actors, or deploy fully"
            )
        result = self._swap(row, workers, targets)
        if canary:
            started = canaries.started_metrics(targets, self.deployed_version())
            queries.update_version(self.db, version, status="canary", metrics=started)
        else:
            canaries.mark_deployed(self.db, version, result["swap_s"])
            self._metrics.deployed.set(version)
        self._metrics.swaps.inc(1, tags={"outcome": "canary" if canary else "deployed"})
        return {**result, "canary": canary}

    def settle_canary(self, version: int, min_episodes: int | None = None, final: bool = False) -> dict[str, Any]:
        """Promote a canary version to every actor if its episodes since the canary began score at least the
        deployed version's (within `controller.canary_tolerance`), else roll it back. Undecided until both
        sides have `min_episodes` (controller.canary_min_episodes), unless `final` or past its deadline."""
        from cluster import canary as canaries
        from cluster.controller import ControllerError
        from recorder import queries

        settings = self.config.controller
        row = queries.get_version(self.db, version)
        if row["status"] != "canary":
            raise ControllerError(f"version {version} is {row['status']}, not a canary")
        deployed = self.deployed_version()
        means = canaries.episode_means(self.db, [version, deployed], canaries.since(row))
        needed = settings.canary_min_episodes if min_episodes is None else min_episodes
        verdict = canaries.judge(means, version, deployed, settings, needed, final or canaries.overdue(row, settings))
        outcome = verdict.as_dict()
        if not verdict.decided:
            return {**outcome, "version": version, "needed": needed}
        log.info("canary %d %s: %s", version, "promoted" if verdict.promoted else "rolled back", verdict.reason)
        if verdict.promoted:
            result = self.deploy(version, canary_fraction=1.0)
            queries.update_version(self.db, version, metrics={"canary": outcome})
        else:
            result = self.deploy(deployed, canary_fraction=1.0)
            queries.update_version(self.db, version, status="rolled_back", metrics={"canary": outcome})
        served = {n: a.get("served_version") for n, a in self.health()["actors"].items()}
        return {**outcome, **result, "canary_version": version, "served_versions": served}

    def settle_canaries(self, final: bool = False) -> list[dict[str, Any]]:
        """Settle every canary that can be decided now (or, with `final`, every canary): the loop calls this
        after each rollout round, so no canary outlives the round that follows it."""
        from recorder import queries

        return [self.settle_canary(row["version"], final=final) for row in queries.list_versions(self.db, "canary")]

    def sync_workers(self) -> dict[str, Any]:
        """Make every rollout actor serve what it should (after actors or the controller restarted): a canary's
        actors the canary version, every other actor the deployed version. Version statuses stay as they are."""
        from cluster import canary as canaries
        from recorder import queries

        served = self.health()["actors"]
        target = self.deployed_version()
        wanted = {name: target for name in served} | canaries.canary_actors(queries.list_versions(self.db, "canary"))
        stale = sorted(n for n, a in served.items() if a.get("alive") and a.get("served_version") != wanted.get(n))
        if not stale:
            return {"version": target, "changed": False}
        workers = self._workers()
        swaps = [
            self._swap(queries.get_version(self.db, version), workers, [n for n in stale if wanted[n] == version])
            for version in sorted({wanted[n] for n in stale})
        ]
        return {"version": target, "changed": True, "actors": stale, "swaps": swaps}
