"""Live mode (controller.mode: live): the controller's own loop, run in a thread inside its actor.

    every tick (~50 ms):
        finished groups in, lost or failed ones queued to play again (a new group, same seed)
        every free lane of every rollout actor gets a new group if admission allows it
        readiness passed and nothing trains or releases -> train a batch in the background, then release it
        canaries settled on reward as soon as they can be; restarted actors get the deployed version first

Admission control, not discards (AReaL-style capacity): a group sampled now on version s is the k-th group
not yet trained (k = trainable groups waiting + groups in flight), so it lands in a batch about k // B batches
from now (B = trainer.batch_max_groups), whose parent is the deployed version plus the versions trained before
it. It is admitted only if that parent is at most trainer.max_staleness versions after s, so nothing played is
ever too stale to train and a slow group is never dropped for being slow. Lanes refused by admission are
counted as idle time; while a batch trains, that share is the `idle_fraction_while_training` in `status()`.

The loop holds no state that matters beyond counters: batches, versions and what is deployed live in the
database, so a restarted controller starts a fresh loop that recovers the running training job
(Controller.recover) and carries on. Swaps, canaries and restores run one at a time on one background thread;
training and its release on another, one batch at a time (the next batch trains from what its release left
deployed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from sqlalchemy.exc import DBAPIError

from cluster.fleet import RolloutFleet, lost_with_actor
from recorder.errors import is_connectivity

if TYPE_CHECKING:
    from cluster.controller import Controller

log = logging.getLogger("ziggurat.live")

TICK_S = 0.05
HEALTH_EVERY_S = 5.0
DATABASE_RETRY_S = 1.0
RECOVER_EVERY_S = 5.0  # how often a batch left open by no training of this loop is looked into
ABANDONED_HOLD_FACTOR = 4  # a group with no answer for this many call deadlines no longer holds its lane


@dataclass
class _Group:
    seed: int
    actor: str
    version: int
    started: float
    tries: int = 0


@dataclass
class LiveCounters:
    """What the loop has done since it started (reported by `status()`)."""

    groups_played: int = 0
    groups_trainable: int = 0
    groups_replayed: int = 0
    episodes: int = 0
    versions_trained: int = 0
    versions_released: int = 0
    lane_s: float = 0.0
    """Lane-seconds elapsed (lanes x wall time)."""
    idle_lane_s: float = 0.0
    """Lane-seconds a lane had no group (refused by admission, paused, or waiting for a replay)."""
    training_lane_s: float = 0.0
    """Lane-seconds elapsed while a batch trained."""
    idle_training_lane_s: float = 0.0
    """Of those, lane-seconds with no group."""
    training_s: float = 0.0
    refused: int = 0
    """Admission checks that refused a free lane a group (staleness capacity full)."""
    groups_held: int = 0
    """Groups returned with their records held by the rollout actor (the recorder or database unreachable)."""
    database_outages: int = 0
    """Times the database became unreachable and the loop waited it out."""
    rewards: list[float] = field(default_factory=list)


class LiveLoop:
    """Started by `Controller.start_live`; steered by `pause`, `resume`, `stop`; observed by `status`."""

    def __init__(self, controller: Controller, until_version: int | None = None) -> None:
        """`until_version`: stop once a version numbered at least this has been trained (None: until `stop`)."""
        self.controller, self.config = controller, controller.config
        self.until_version = until_version
        self.on_state: Callable[[str], None] | None = None  # told every state change (the controller persists it)
        self.state = "starting"  # running | paused | stopping | stopped | failed
        self.error: str | None = None
        self.counters = LiveCounters()
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self._event_number = 0
        self._events_lock = threading.Lock()
        self._groups: dict[Any, _Group] = {}  # ref -> group in flight
        # groups given up on for want of an answer may still run on their actor: their lanes stay busy until the
        # call ends (or, for an actor that hangs, ABANDONED_HOLD_FACTOR deadlines), so no actor is over-filled
        self._abandoned: dict[Any, _Group] = {}
        self._replay: deque[tuple[int, int]] = deque()  # (seed, tries) of groups to play again
        self._waiting = 0  # trainable groups finished and not yet claimed (refreshed from readiness)
        self._next_seed = self._first_seed()
        self._trainer = ThreadPoolExecutor(1, thread_name_prefix="ziggurat-live-train")
        self._swapper = ThreadPoolExecutor(1, thread_name_prefix="ziggurat-live-swap")
        self._training: Future | None = None  # train + release of one batch
        self._swapping: Future | None = None  # a canary settlement or an actor restore
        self._served: dict[str, int | None] = {}
        self._fleet: RolloutFleet | None = None
        self._last_health = 0.0
        self._last_readiness = 0.0
        self._last_recover = 0.0
        self._recovering: int | None = None  # the open batch last looked into
        self._last_swap_check = 0.0
        self._database_down_since: float | None = None
        self._last_deployed: int | None = None  # admission goes on with it while the database is away
        self._restore_due = False  # an actor serves nothing (restarted, or its swap failed): restore it
        self._done = False  # the version to stop at has been trained
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="ziggurat-live", daemon=True)

    # ---- steering -------------------------------------------------------------------------------
    def start(self) -> None:
        self._set("running")
        self._event("started", until_version=self.until_version)
        self._thread.start()

    def pause(self) -> None:
        """No new groups and no new batch; groups in flight and a training batch finish."""
        if self.state == "running":
            self._set("paused")
            self._event("paused")

    def resume(self) -> None:
        if self.state == "paused":
            self._set("running")
            self._event("resumed")

    def stop(self) -> None:
        """Stop admitting groups and batches; the loop ends once groups in flight and a batch training now end."""
        if self.state in ("running", "paused", "starting"):
            self._set("stopping")
            self._event("stopping")

    def join(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def status(self, since_event: int = 0) -> dict[str, Any]:
        c = self.counters
        down_since = self._database_down_since  # read once: the loop thread may clear it meanwhile
        return {
            "state": self.state,
            "error": self.error,
            "until_version": self.until_version,
            "uptime_s": round(time.monotonic() - self._started, 1),
            "groups_in_flight": len(self._groups),
            "groups_waiting_for_training": self._waiting,
            "training": self._training is not None,
            "versions_trained": c.versions_trained,
            "versions_released": c.versions_released,
            "groups_played": c.groups_played,
            "groups_trainable": c.groups_trainable,
            "groups_replayed": c.groups_replayed,
            "episodes": c.episodes,
            "admission_refusals": c.refused,
            "database_outages": c.database_outages,
            "groups_held": c.groups_held,
            "database_unreachable_s": None if down_since is None else round(time.monotonic() - down_since, 1),
            "idle_fraction": c.idle_lane_s / c.lane_s if c.lane_s else None,
            "idle_fraction_while_training": c.idle_training_lane_s / c.training_lane_s if c.training_lane_s else None,
            "training_s": round(c.training_s, 2),
            "train_mean_reward": sum(c.rewards) / len(c.rewards) if c.rewards else None,
            "events": [e for e in self._events_copy() if e["n"] > since_event],
        }

    # ---- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            last = time.monotonic()
            while True:
                now = time.monotonic()
                self._account(now - last)
                last = now
                try:
                    self._tick()  # plays on through an outage: groups are collected and admitted before any query
                    if self._database_down_since is not None:
                        self.controller.deployed_version()  # a real query: only its success ends the outage
                        self._database_reachable()
                except DBAPIError as exc:
                    if not is_connectivity(exc):  # bad data or a schema mismatch is a bug, not an outage
                        raise
                    self._database_unreachable(exc)
                    time.sleep(DATABASE_RETRY_S)
                    continue
                if self.state == "stopping" and not self._groups and self._training is None:
                    break
                time.sleep(TICK_S)
            self._finish_swap_on_stop()
            self._set("stopped")
            self._event("stopped")
        except Exception as exc:  # the loop's own bug or a dead database: say so in status, never hang silently
            log.exception("live loop failed")
            self.error = f"{type(exc).__name__}: {exc}"
            self._set("failed")
            self._event("failed", error=self.error)
        finally:
            self._trainer.shutdown(wait=False)
            self._swapper.shutdown(wait=False)

    def _finish_swap_on_stop(self) -> None:
        """A swap still running when the loop stops is waited for (with a deadline); its failure is reported,
        and the loop still stops: what the actors serve is in `health`, the swap's own rules kept it consistent."""
        if self._swapping is None:
            return
        try:
            self._swapping.result(timeout=3 * self.config.controller.swap_timeout_s)
        except Exception as exc:
            self._event("swap_failed", error=f"{type(exc).__name__}: {exc}"[:500])
        self._swapping = None

    def _tick(self) -> None:
        self._collect()
        if self._training is not None and self._training.done():  # also while paused or stopping
            self._finish_training(self._training)
        if self.state == "running":
            self._admit()
            self._drive_training()
        self._drive_swaps()

    def _database_unreachable(self, exc: DBAPIError) -> None:
        """A database outage is waited out (for controller.live_database_outage_s): groups in flight finish and
        new ones are admitted on the last deployed version known; claims and releases wait."""
        now = time.monotonic()
        if self._database_down_since is None:
            self._database_down_since = now
            self.counters.database_outages += 1
            self._event("database_unreachable", error=f"{type(exc).__name__}: {exc}"[:300])
            log.warning("live loop: the database is unreachable, waiting for it: %s", str(exc).splitlines()[0][:300])
            return
        limit = self.config.controller.live_database_outage_s
        if now - self._database_down_since > limit:
            raise RuntimeError(
                f"the database has been unreachable for over {limit:.0f} s (controller.live_database_outage_s): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}; "
                "start the database again, then the loop (`ziggurat run`)"
            ) from exc

    def _database_reachable(self) -> None:
        if self._database_down_since is not None:
            outage_s = time.monotonic() - self._database_down_since
            self._database_down_since = None
            self._event("database_back", outage_s=round(outage_s, 2))

    def _deployed(self) -> int:
        try:
            self._last_deployed = self.controller.deployed_version()
        except DBAPIError as exc:
            if self._last_deployed is None or not is_connectivity(exc):
                raise
        return self._last_deployed

    def _lanes(self, fleet: RolloutFleet) -> dict[str, int]:
        """Free lanes per actor that may take traffic (alive, restored, not taken out by a failed swap)."""
        per_actor = self.config.controller.live_groups_per_actor
        busy: dict[str, int] = {}
        for group in (*self._groups.values(), *self._abandoned.values()):
            busy[group.actor] = busy.get(group.actor, 0) + 1
        out = self.controller.out_of_service()
        return {
            name: per_actor - busy.get(name, 0)
            for name in fleet.names()
            if name not in out and self._served.get(name, 0) is not None
        }

    def _account(self, elapsed: float) -> None:
        lanes = self.config.rollout.actors * self.config.controller.live_groups_per_actor
        idle = max(lanes - len(self._groups), 0)
        c = self.counters
        c.lane_s += lanes * elapsed
        c.idle_lane_s += idle * elapsed
        if self._training is not None:
            c.training_lane_s += lanes * elapsed
            c.idle_training_lane_s += idle * elapsed

    def _admitted(self, version: int, deployed: int) -> bool:
        """Whether a group sampled now on `version` would be trained within trainer.max_staleness versions."""
        trainer = self.config.trainer
        if trainer.max_staleness is None:
            return len(self._groups) + self._waiting < 4 * trainer.batch_max_groups  # a bound on memory, not age
        ahead = self._waiting + len(self._groups)
        parent = deployed + (1 if self._training is not None else 0)
        # A batch is claimed as soon as controller.min_groups are waiting, so it may hold fewer than
        # batch_max_groups: counting batches of the smaller size never admits a group that ends up too stale.
        per_batch = min(trainer.batch_max_groups, self.config.controller.min_groups)
        return parent + ahead // per_batch - version <= trainer.max_staleness

    def _admit(self) -> None:
        fleet = self._probe_health()
        deployed = self._deployed()
        for name, free in self._lanes(fleet).items():
            served = self._served.get(name)
            version = deployed if served is None else served
            for _ in range(free):
                if not self._admitted(version, deployed):
                    self.counters.refused += 1
                    break  # this actor's version is refused; another actor's may not be
                seed, tries = self._replay.popleft() if self._replay else (self._take_seed(), 0)
                # an outage of the recorder or database is played through: the actor holds the records
                call = {**self.config.rollout.group_call(seed), "wait_stored": False}
                ref = fleet[name].run_group.remote(**call)
                self._groups[ref] = _Group(seed, name, version, time.monotonic(), tries)

    def _collect(self) -> None:
        deadline = self.config.controller.call_timeout_s
        now = time.monotonic()
        if self._abandoned:
            ended, _ = ray.wait(list(self._abandoned), num_returns=len(self._abandoned), timeout=0, fetch_local=False)
            for ref in list(self._abandoned):
                if ref in ended or now - self._abandoned[ref].started > ABANDONED_HOLD_FACTOR * deadline:
                    self._abandoned.pop(ref)
        if not self._groups:
            return
        done, _ = ray.wait(list(self._groups), num_returns=len(self._groups), timeout=0, fetch_local=False)
        for ref in list(self._groups):
            group = self._groups[ref]
            if ref not in done:
                if now - group.started > deadline:
                    ray.cancel(ref, force=False)
                    self._abandoned[ref] = self._groups.pop(ref)
                    self._again(group, f"no answer within controller.call_timeout_s ({deadline} s)")
                continue
            self._groups.pop(ref)
            try:
                result = ray.get(ref, timeout=10)
            except Exception as exc:
                if lost_with_actor(exc):
                    self._served[group.actor] = None  # back only once restored (sync_workers)
                    self._last_health = 0.0
                self._again(group, f"{type(exc).__name__}: {exc}")
                continue
            if result.get("failed"):
                self._again(group, f"failed episodes: {result['errors'][:1]}")
                continue
            c = self.counters
            c.groups_played += 1
            c.groups_held += 1 if result.get("held_records") else 0
            c.episodes += len(result["rewards"])
            c.rewards = (c.rewards + list(result["rewards"]))[-2000:]
            if len(set(result["rewards"])) > 1:
                c.groups_trainable += 1
                self._waiting += 1

    def _again(self, group: _Group, why: str) -> None:
        retries = self.config.controller.group_retries
        if group.tries >= retries:
            self._event("group_dropped", seed=group.seed, actor=group.actor, error=why[:300])
            log.error("group %d on %s given up after %d tries: %s", group.seed, group.actor, group.tries + 1, why)
            return
        self.counters.groups_replayed += 1
        self._replay.append((group.seed, group.tries + 1))
        log.warning("group %d on %s is played again: %s", group.seed, group.actor, why[:300])

    def _drive_training(self) -> None:
        if self._training is not None:
            if self._training.done():
                self._finish_training(self._training)
            return
        if self._done:
            self.stop()
            return
        if self._swapping is not None:  # a canary or a restore is changing what is deployed
            return
        now = time.monotonic()
        if now - self._last_readiness < self.config.controller.poll_interval_s:
            return
        self._last_readiness = now
        readiness = self.controller.readiness()
        self._waiting = readiness["groups_with_variance"]
        if readiness["ready"] and not self.controller.canaries():
            # the claim (in the background) takes up to a batch of the waiting groups: admission counts on that
            self._waiting -= min(self._waiting, self.config.trainer.batch_max_groups)
            self._training = self._trainer.submit(self._train_and_release)
        elif readiness["open_batch"] is not None and now - self._last_recover >= RECOVER_EVERY_S:
            # A batch open with no training of this loop behind it blocks every claim: its job ended and its last
            # write was lost (an outage, a crashed database) or another process trains it. Controller.train
            # recovers first (fails a dead job's batch and releases its groups, waits for a live one), then claims.
            self._last_recover = now
            if readiness["open_batch"] != self._recovering:  # once per batch: another process's job takes a while
                self._recovering = readiness["open_batch"]
                self._event("recovering", batch_id=self._recovering)
            self._training = self._trainer.submit(self._train_and_release)

    def _train_and_release(self) -> dict[str, Any]:
        started = time.monotonic()
        outcome = self.controller.train()
        trained_s = time.monotonic() - started
        self.counters.training_s += trained_s
        if not outcome.get("trained"):
            return {"training": outcome, "train_s": trained_s}
        self.counters.versions_trained += 1
        if self.until_version is not None and outcome["version"] >= self.until_version:
            self._done = True
        self._event("trained", version=outcome["version"], batch_id=outcome["batch_id"], train_s=round(trained_s, 2))
        release = self._release(outcome["version"])
        return {"training": outcome, "release": release, "train_s": trained_s}

    def _release(self, version: int) -> dict[str, Any]:
        """Controller.release, finished after a database outage interrupts it: a version still only `ready` is
        released again, unless the actors already serve it (the swap happened, its status write did not), in
        which case only the statuses are written. A trained version is neither left behind nor swapped twice."""
        from cluster import canary
        from recorder import queries

        interrupted, limit = False, 0.0
        while True:
            try:
                if not interrupted:
                    return self.controller.release(version)
                status = queries.get_version(self.controller.db, version)["status"]
                if status != "ready":
                    return {"version": version, "deployed": status == "deployed", "canary": status == "canary",
                            "reason": f"release interrupted by the database; the version is {status}"}  # fmt: skip
                fleet = self.controller._fleet().health(5.0)
                if {a.get("served_version") for a in fleet.values() if a.get("alive")} == {version}:
                    canary.mark_deployed(self.controller.db, version, 0.0)
                    reason = "swapped before the database went away; statuses written after it came back"
                    return {"version": version, "deployed": True, "canary": False, "reason": reason}
                interrupted = False  # not served yet: release it again
            except DBAPIError as exc:
                if not is_connectivity(exc):
                    raise
                if not interrupted:
                    limit = time.monotonic() + self.config.controller.live_database_outage_s
                    log.warning("version %d: release interrupted by the database, waiting for it: %s", version, exc)
                interrupted = True
                if time.monotonic() > limit:
                    raise
                time.sleep(DATABASE_RETRY_S)

    def _finish_training(self, future: Future) -> None:
        self._training = None
        self._last_readiness = 0.0  # `_waiting` is read from the database again on the next tick
        try:
            result = future.result(timeout=0)
        except Exception as exc:
            self._event("training_failed", error=f"{type(exc).__name__}: {exc}"[:500])
            return
        release = result.get("release")
        if release is None:
            training = result["training"]
            if training.get("error"):
                self._event("training_failed", batch_id=training.get("batch_id"), error=str(training["error"])[:500])
            return
        self.counters.versions_released += 1
        swap = release.get("swap") or {}
        self._event(
            "released", version=release["version"], deployed=release["deployed"], canary=release["canary"],
            reason=release.get("reason"), evaluation=release.get("evaluation"), swap_s=swap.get("swap_s"),
            actors=swap.get("actors"), failed_actors=swap.get("failed"),
        )  # fmt: skip
        self._last_health = 0.0  # what actors serve changed

    def _drive_swaps(self) -> None:
        if self._swapping is not None:
            if not self._swapping.done():
                return
            future, self._swapping = self._swapping, None
            try:
                for settled in future.result(timeout=0) or []:
                    self._event(
                        "canary_settled", **{k: settled.get(k) for k in ("canary_version", "promoted", "reason")}
                    )
            except Exception as exc:
                self._event("swap_failed", error=f"{type(exc).__name__}: {exc}"[:500])
            self._last_health = 0.0
        if self.state == "stopping":  # a stopping loop finishes the swap it runs and starts no other
            return
        now = time.monotonic()
        if now - self._last_swap_check < self.config.controller.poll_interval_s:
            return
        self._last_swap_check = now
        if self.controller.canaries():
            self._swapping = self._swapper.submit(self.controller.settle_canaries, False)
        elif self._restore_due:
            self._restore_due = False
            self._swapping = self._swapper.submit(self._restore)

    def _restore(self) -> list[dict[str, Any]]:
        outcome = self.controller.sync_workers()
        if outcome.get("changed"):
            self._event("restored", actors=outcome.get("actors"), version=outcome.get("version"))
        return []

    def _probe_health(self) -> RolloutFleet:
        """The fleet (found by name again every HEALTH_EVERY_S) and what each actor serves; an actor that serves
        nothing (restarted, or a failed swap) is restored before it takes traffic again."""
        now = time.monotonic()
        if self._fleet is not None and now - self._last_health < HEALTH_EVERY_S:
            return self._fleet
        self._last_health = now
        self._fleet = self.controller._fleet()
        health = self._fleet.health(5.0)
        self._served = {n: a.get("served_version") if a.get("alive") else None for n, a in health.items()}
        if any(a.get("alive") and a.get("served_version") is None for a in health.values()):
            self._restore_due = True
        return self._fleet

    # ---- helpers --------------------------------------------------------------------------------
    def _set(self, state: str) -> None:
        self.state = state
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception as exc:  # persisting the state is best effort: the loop itself goes on
                log.warning("live loop state %s not persisted: %s: %s", state, type(exc).__name__, exc)

    def _first_seed(self) -> int:
        """Training seeds go on past the scenarios already recorded, so a restarted loop plays new ones."""
        from recorder import queries

        return self.config.rollout.train_seed_start + queries.training_scenarios_played(self.controller.db)

    def _take_seed(self) -> int:
        self._next_seed += 1
        return self._next_seed - 1

    def _events_copy(self) -> list[dict[str, Any]]:
        with self._events_lock:
            return list(self.events)

    def _event(self, kind: str, **fields: Any) -> None:
        # the loop, its two background threads and the actor's status calls all touch the events
        with self._events_lock:
            self._event_number += 1
            entry = {"n": self._event_number, "event": kind, "t": round(time.monotonic() - self._started, 2), **fields}
            self.events.append(entry)
        log.info("live: %s %s", kind, {k: v for k, v in fields.items() if v is not None})
