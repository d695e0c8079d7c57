"""Hot-swap, canaries and keeping actors in step: the part of the controller that changes what actors serve.

Two-phase: every target rollout actor loads the version first (`prepare`), and only if all of them did within
`controller.swap_timeout_s` does any of them flip (`activate`). A flip that replaces the engine's weights (a
full or merged version) first lets the actor's groups in flight on the old version finish
(`controller.drain_timeout_s`), so an episode never samples two versions. A canary goes to a fraction of the
actors and is settled on reward (cluster.canary); `sync_workers` puts every actor back on what it should
serve after a restart. `Controller` inherits these methods; they use its database, config and fleet.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.fleet import RolloutFleet

log = logging.getLogger("ziggurat.controller")


class HotSwap:
    """What actors load for a version, deploy, roll back, settle canaries and resynchronise actors (mixed into
    `cluster.controller.Controller`)."""

    # Provided by Controller.
    db: Any
    config: Any
    store: Any
    _metrics: Any
    _fleet: Any
    _out_of_service: dict[str, str]
    deployed_version: Any
    health: Any

    def _merged(self, version: dict[str, Any]) -> bool:
        """Served as the adapter merged into the base weights (engine.lora_serving: merged)."""
        return version["kind"] == "lora" and self.config.serves_merged()

    def _served_artifact(self, version: dict[str, Any]) -> tuple[str | None, str]:
        """What rollout actors load to serve `version`, and as what kind: the adapter, or (with
        engine.lora_serving: merged) the adapter merged into the base weights, served as full weights."""
        from trainer.model import MERGED_DIR

        if self._merged(version):
            return self._artifact(version, subfolder=MERGED_DIR), "full"
        return self._artifact(version), version["kind"]

    def _artifact(self, version: dict[str, Any], subfolder: str | None = None) -> str | None:
        """The version's folder: inside the model store (never load from elsewhere), safetensors only, and
        every file matching the checksums in its manifest."""
        from cluster.artifacts import ArtifactError, servable_folder

        if version["kind"] == "base":
            return None
        try:
            return str(servable_folder(self.store, version, subfolder))
        except ArtifactError as exc:
            from cluster.controller import ControllerError

            raise ControllerError(str(exc)) from None

    def _swap(self, row: dict[str, Any], fleet: RolloutFleet, targets: list[str]) -> dict[str, Any]:
        """Two-phase swap of `targets` to the version in `row`: all load it, then all flip; statuses unchanged."""
        from cluster.controller import SwapFailed
        from recorder import queries

        version, settings = row["version"], self.config.controller
        artifact, kind = self._served_artifact(row)  # verified before any actor is asked to load it
        started = time.perf_counter()
        loaded, errors = fleet.call(
            "prepare", version, artifact, kind, timeout_s=settings.swap_timeout_s, names=targets
        )
        if errors:
            fleet.call("unload", version, timeout_s=settings.swap_timeout_s, names=sorted(loaded))
            self._metrics.swaps.inc(1, tags={"outcome": "failed"})
            if row["status"] == "ready":  # a fresh version that cannot be loaded is unusable
                queries.update_version(self.db, version, status="failed", metrics={"swap_errors": errors})
            raise SwapFailed(f"version {version} was not loaded by {sorted(errors)}: {errors}; nobody switched")
        load_s = time.perf_counter() - started
        # Replacing full weights first lets the groups in flight on the old version finish (drain_timeout_s),
        # then vLLM reloads in place (engine.swap_timeout_s).
        flip_timeout = settings.drain_timeout_s + self.config.engine.swap_timeout_s + settings.swap_timeout_s
        previous, errors = fleet.call(
            "activate", version, settings.drain_timeout_s, timeout_s=flip_timeout, names=targets
        )
        swap_s = time.perf_counter() - started
        if errors:  # every actor had the version loaded: failing here means an actor died or its engine broke
            self._metrics.swaps.inc(1, tags={"outcome": "partial"})
            raise SwapFailed(f"version {version} loaded everywhere but {sorted(errors)} did not switch: {errors}")
        for name in targets:
            self._metrics.served.set(version, tags={"actor": name})
        log.info("version %d serving on %s (load %.3f s, swap %.3f s)", version, targets, load_s, swap_s)
        return {"version": version, "actors": targets, "previous": previous, "load_s": load_s, "swap_s": swap_s}

    def rolling_step(self, targets: int, fraction: float | None = None) -> int:
        """Actors swapped at a time (`fraction`, else controller.rolling_fraction; by default one in live mode,
        all at once in sync mode)."""
        settings = self.config.controller
        fraction = settings.rolling_fraction if fraction is None else fraction
        if fraction is None:
            fraction = 1.0 if settings.mode == "sync" else 1.0 / max(targets, 1)
        return max(1, math.ceil(fraction * targets))

    def _roll(
        self, row: dict[str, Any], fleet: RolloutFleet, targets: list[str], fraction: float | None = None
    ) -> dict[str, Any]:
        """Swap `targets` a share at a time (`rolling_step`), each share two-phase. If the first share fails
        nobody serves the version (SwapFailed, as a two-phase swap); a later share's actors that fail are taken
        out of traffic (`out_of_service`, reported by health), while every other actor goes on."""
        from cluster.controller import SwapFailed

        step = self.rolling_step(len(targets), fraction)
        if step >= len(targets):
            return self._swap(row, fleet, targets)
        started = time.perf_counter()
        served: list[str] = []
        failed: dict[str, str] = {}
        steps: list[float] = []
        previous: dict[str, Any] = {}
        for first in range(0, len(targets), step):
            share = targets[first : first + step]
            try:
                result = self._swap(row, fleet, share)
            except SwapFailed as exc:
                if not served:
                    raise
                for name in share:
                    failed[name] = str(exc)
                    self._out_of_service[name] = f"version {row['version']} failed to load: {exc}"
                log.error("rolling swap to %d: %s taken out of traffic: %s", row["version"], share, exc)
                continue
            served += share
            row = {**row, "status": "rolling"}  # served somewhere now: a later share's failure must not fail it
            steps.append(result["swap_s"])
            previous.update(result["previous"])
            for name in share:
                self._out_of_service.pop(name, None)
        return {
            "version": row["version"], "actors": served, "previous": previous, "failed": failed,
            "load_s": None, "swap_s": time.perf_counter() - started, "steps": len(steps),
            "step_swap_s_max": max(steps) if steps else None, "rolling_step": step,
        }  # fmt: skip

    def out_of_service(self) -> dict[str, str]:
        """Rollout actors a rolling swap took out of traffic, and why (back once a later swap serves them)."""
        return dict(self._out_of_service)

    def canaries(self) -> list[int]:
        """Versions being canaried now."""
        from recorder import queries

        return [row["version"] for row in queries.list_versions(self.db, "canary")]

    def deploy(
        self, version: int, canary_fraction: float | None = None, rolling_fraction: float | None = None
    ) -> dict[str, Any]:
        """Load `version` into the target actors and flip them, a share at a time (`rolling_fraction`, else
        controller.rolling_fraction; see `_roll`). A canary (0 < fraction < 1) goes to the first actors only
        and is settled by `settle_canaries`."""
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
        fleet = self._fleet()
        if not fleet:
            self._served_artifact(row)  # an unservable folder is the first thing to fix: say so first
            raise ControllerError("no rollout actors are running; start them (ziggurat run) before deploying")
        fraction = self.config.controller.canary_fraction if canary_fraction is None else canary_fraction
        canary = 0 < fraction < 1
        names = fleet.names()
        targets = names[: max(1, math.ceil(fraction * len(names)))] if canary else names
        if canary and len(targets) == len(names):
            raise ControllerError(
                f"a canary fraction of {fraction} covers all {len(names)} rollout actors, leaving none on the "
                "deployed version to compare it with; use a smaller fraction, more actors, or deploy fully"
            )
        result = self._roll(row, fleet, targets, rolling_fraction)
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
        needed = settings.canary_min_episodes if min_episodes is None else min_episodes
        verdict = canaries.decide(self.db, row, deployed, settings, needed, final)
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

    def rollback(self, version: int | None = None) -> dict[str, Any]:
        """Serve `version` and mark the current one (and any canary) rolled back. By default: while a canary
        runs, the deployed version (rolling back a canary undoes the canary, nothing more); otherwise the
        newest earlier version that was deployed. The version served after this is the next one's parent."""
        from recorder import queries

        current = self.deployed_version()
        canaries = [v["version"] for v in queries.list_versions(self.db, status="canary")]
        if version is None and canaries:
            version = current
        elif version is None:
            earlier = [v["version"] for v in queries.list_versions(self.db, status="retired") if v["version"] < current]
            version = max(earlier) if earlier else 0
        result = self.deploy(version, canary_fraction=1.0)  # a rollback serves everywhere, never as a canary
        for bad in {current, *canaries} - {version}:
            queries.update_version(self.db, bad, status="rolled_back")
        return {**result, "rolled_back": sorted({current, *canaries} - {version})}

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
        fleet = self._fleet()
        swaps = [
            self._swap(queries.get_version(self.db, version), fleet, [n for n in stale if wanted[n] == version])
            for version in sorted({wanted[n] for n in stale})
        ]
        return {"version": target, "changed": True, "actors": stale, "swaps": swaps}
