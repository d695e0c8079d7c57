"""The rollout actor: one vLLM engine, many concurrent episodes, every step streamed to the recorder.

`run_group` plays `group_size` episodes from the same start state (the GRPO group: same environment and
seed), concurrently, so vLLM batches their calls; playing one episode is rollout.episode's. A group is
pinned to the version served when it starts: every turn of every episode samples that version, and a swap
that replaces the engine's weights (a full or merged version) first lets the groups pinned to other
versions finish, while new groups wait for the swap. Episodes past their deadline are recorded as aborted;
an episode that raises is recorded as failed and its group is not judged (the loop plays it again).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from recorder.client import FlushReport, RecorderClient, RecorderUnreachable
from recorder.config import RecorderConfig
from rollout.config import EngineConfig, JudgeConfig
from rollout.engine import EngineError, PolicyEngine
from rollout.episode import EpisodeCounters, EpisodeResult, EpisodeSpec, run_episode
from rollout.judges import JudgedTrajectory, JudgeOutputError, judge_group

if TYPE_CHECKING:
    from rollout.simulated import SimulatedEngine

    Engine = PolicyEngine | SimulatedEngine  # `engine.backend` picks one; both have PolicyEngine's interface

log = logging.getLogger(__name__)


class _RolloutMetrics:
    """Episodes and their rewards on Ray's metrics endpoint (exported with a `ray_` prefix)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge

        self.episodes = Counter("ziggurat_episodes", "Episodes played", tag_keys=("version", "status"))
        self.reward = Gauge("ziggurat_group_mean_reward", "Mean reward of the latest group", tag_keys=("version",))
        self.tokens_per_s = Gauge("ziggurat_rollout_tokens_per_s", "Completion tokens/s of the latest group")


class RolloutRestarted(RuntimeError):
    """A restarted rollout actor that has not been told which version to serve yet."""


class RolloutWorker:
    """Create with `start_rollout_worker`; call `run_group` as often as you like, concurrently.

    With `restore_on_restart`, an incarnation that Ray restarted after a crash serves nothing until the
    controller restores the deployed version (`Controller.sync_workers` -> `prepare` + `activate`): it comes up
    on the base weights, and serving those would change the served version behind the controller's back."""

    def __init__(
        self,
        model_path: str,
        engine: EngineConfig,
        recorder: RecorderConfig,
        judge: JudgeConfig | None = None,
        restore_on_restart: bool = True,
        engine_instance: Engine | None = None,
    ) -> None:
        """`engine_instance`: an engine already started on this event loop, served instead of starting one
        (tests share one engine; outside a Ray actor, pass restore_on_restart=False)."""
        self._awaiting_restore = restore_on_restart and ray.get_runtime_context().was_current_actor_reconstructed
        if self._awaiting_restore:
            log.warning("rollout actor restarted: it serves no version until the controller restores one")
        self._model_path, self._engine_config = model_path, engine
        self._judge = judge
        self._client = RecorderClient(recorder)
        self._engine: Engine | None = engine_instance
        self._starting: asyncio.Lock | None = None
        self._flushing: asyncio.Lock | None = None
        self._held_flush: asyncio.Task | None = None  # retries records held through an outage (live mode)
        self._counters = EpisodeCounters()  # episodes in flight, LLM calls, when the last one finished
        self._full_weights: dict[int, str] = {}  # prepared full-weight versions: version -> folder
        self._adapters: dict[int, str] = {}  # prepared adapters: version -> folder (reloaded after a weights swap)
        self._pinned: Counter[int] = Counter()  # version -> episodes in flight that sample it
        self._groups_open = asyncio.Event()  # cleared while a weights swap waits for pinned groups to finish
        self._groups_open.set()
        self._swapping = asyncio.Lock()
        self._metrics: _RolloutMetrics | None = None

    async def _policy(self) -> Engine:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._engine is None:
                if self._engine_config.backend == "simulated":  # tests and benchmarks only: no model runs
                    from rollout.simulated import SimulatedEngine

                    self._engine = await SimulatedEngine.start(self._model_path, self._engine_config)
                else:
                    self._engine = await PolicyEngine.start(self._model_path, self._engine_config)
        return self._engine

    async def ready(self) -> int:
        """Start the engine (once); returns the version it serves."""
        return (await self._policy()).version

    async def set_adapter(self, version: int, adapter_dir: str | None) -> None:
        await (await self._policy()).set_adapter(version, adapter_dir)

    async def prepare(self, version: int, artifact: str | None, kind: str = "lora") -> int:
        """Hot-swap phase 1: make `version` ready to serve without serving it. A LoRA adapter is loaded into
        the engine; full weights are checked now and swapped in by `activate` (vLLM replaces them in place)."""
        engine = await self._policy()
        if kind == "full":
            if artifact is None or not any(Path(artifact).glob("*.safetensors")):
                raise EngineError(f"version {version}: {artifact} holds no .safetensors weights")
            self._full_weights[version] = artifact
        elif artifact is not None:
            await engine.load_adapter(version, artifact)
            self._adapters[version] = artifact
        return version

    async def activate(self, version: int, drain_timeout_s: float = 300.0) -> int:
        """Hot-swap phase 2: serve a prepared version from the next group on; returns the previous one.

        Flipping between adapters on the base weights keeps every loaded version servable, so groups in flight
        simply go on. Replacing the weights (a full version, or leaving one) makes the old version unservable:
        new groups wait, the groups pinned to other versions get up to `drain_timeout_s` to finish, then the
        weights are swapped. Groups still running past that deadline fail on their next turn (recorded as
        failed, replayed by the loop) rather than finish on weights they did not start with."""
        engine = await self._policy()
        async with self._swapping:
            previous = engine.version
            full = version in self._full_weights
            if (full and engine.weights_version == version) or (not full and engine.weights_version == 0):
                engine.activate(version)
                self._awaiting_restore = False
                return previous
            self._groups_open.clear()
            try:
                await self._drain({version} if full else {0, version}, drain_timeout_s)
                timeout = self._engine_config.swap_timeout_s
                if full:
                    await engine.load_weights(version, self._full_weights[version], swap_timeout_s=timeout)
                else:  # an adapter (or the base) after full weights: the base weights first, then the adapter
                    await engine.load_weights(0, self._model_path, swap_timeout_s=timeout)
                    if version in self._adapters:  # load_weights dropped the adapters loaded on the old weights
                        await engine.load_adapter(version, self._adapters[version])
                    engine.activate(version)
            except EngineError:
                if engine.unusable is not None:
                    # Weights in an unknown state: crash, so Ray restarts this actor on the base weights and the
                    # controller restores the deployed version (sync_workers), rather than fail every request.
                    log.error("rollout actor exits for a restart: %s", engine.unusable)
                    asyncio.get_running_loop().call_later(1.0, os._exit, 1)
                raise
            finally:
                self._groups_open.set()
            self._awaiting_restore = False
            return previous

    async def _drain(self, servable: set[int], timeout_s: float) -> None:
        """Wait until no episode in flight samples a version outside `servable` (or the deadline passes)."""
        deadline = time.monotonic() + timeout_s
        while any(v not in servable for v in self._pinned):
            if time.monotonic() > deadline:
                left = {v: n for v, n in self._pinned.items() if v not in servable}
                log.warning(
                    "episodes still running on versions %s after %.0f s; swapping anyway: they fail on their next "
                    "turn and their groups are played again",
                    left, timeout_s,
                )  # fmt: skip
                return
            await asyncio.sleep(0.02)

    async def unload(self, version: int) -> None:
        engine = await self._policy()
        if version != engine.version:
            await engine.unload_adapter(version)
            self._adapters.pop(version, None)
            self._full_weights.pop(version, None)

    async def health(self) -> dict[str, Any]:
        """Served version, loaded adapters, episodes in flight and when the last LLM call finished."""
        engine = await self._policy()
        last_call = self._counters.last_call
        return {
            "served_version": None if self._awaiting_restore else engine.version,
            "awaiting_restore": self._awaiting_restore,
            "loaded_versions": engine.loaded_versions,
            "weights_version": engine.weights_version,
            "episodes_in_flight": self._counters.in_flight,
            "episodes_by_version": dict(self._pinned),
            "swapping": not self._groups_open.is_set(),
            "unusable": engine.unusable,
            "llm_calls": self._counters.calls,
            "last_call_s_ago": None if last_call is None else time.monotonic() - last_call,
            "held_records": len(self._client.unacked) if self._holding() else 0,
        }

    async def complete(
        self, prompt_token_ids: list[int], sampling: dict[str, Any], version: int | None = None
    ) -> dict[str, Any]:
        """One call from the agent gateway: `n` completions of a prompt on `version` (None: the served one), as
        plain data (`model_version` and `completions`, each a `Completion`'s fields)."""
        engine = await self._serving(version)
        generation = await engine.generate(prompt_token_ids, version=version, **sampling)
        self._counters.calls, self._counters.last_call = self._counters.calls + 1, time.monotonic()
        completions = [dataclasses.asdict(completion) for completion in generation.completions]
        return {"model_version": generation.model_version, "completions": completions}

    async def complete_stream(
        self, prompt_token_ids: list[int], sampling: dict[str, Any], version: int | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """`complete`, streamed: each sample's new tokens as they come (a `Delta`'s fields). Call it with
        `.options(num_returns="streaming")`."""
        engine = await self._serving(version)
        if not isinstance(engine, PolicyEngine):
            raise EngineError("streaming needs a vLLM engine (engine.backend: vllm)")
        async for delta in engine.stream(prompt_token_ids, version=version, **sampling):
            yield dataclasses.asdict(delta)
        self._counters.calls, self._counters.last_call = self._counters.calls + 1, time.monotonic()

    async def _serving(self, version: int | None) -> Engine:
        """The engine, once a draining weights swap is done (new work starts on the new version); refuses while a
        restarted actor waits for the controller to restore the deployed version (unless `version` is named)."""
        engine = await self._policy()
        await self._groups_open.wait()
        if self._awaiting_restore and version is None:
            raise RolloutRestarted(
                "this rollout actor was restarted after a crash and serves no version yet: the controller restores "
                "the deployed one (Controller.sync_workers, called by the loop and `ziggurat deploy`)"
            )
        return engine

    async def run_group(
        self,
        env_name: str,
        seed: int,
        group_size: int,
        env_settings: dict[str, Any] | None = None,
        max_turns: int = 8,
        max_tokens: int = 64,
        temperature: float = 1.0,
        episode_timeout_s: float = 300.0,
        min_tokens: int = 0,
        is_eval: bool = False,
        version: int | None = None,
        wait_stored: bool = True,
    ) -> dict[str, Any]:
        """Play one GRPO group; `is_eval` marks its trajectories as evaluation (never trained on), and
        `version` plays a loaded version other than the served one (evaluation before a deploy). With
        `wait_stored` False (live mode) a group whose records cannot be stored within recorder.hold_after_s
        is returned anyway, its records held here and retried in the background (`held_records` > 0)."""
        engine = await self._serving(version)
        # One version for the whole group, pinned before anything awaits, so a swap can never split a group.
        pinned = engine.version if version is None else version
        spec = EpisodeSpec(
            env_name, env_settings or {}, seed, uuid.uuid4().hex, max_turns, max_tokens, temperature, episode_timeout_s,
            min_tokens, is_eval, pinned,
        )  # fmt: skip
        started = time.perf_counter()
        self._pinned[pinned] += group_size
        try:
            limit = self._engine_config.max_model_len
            episodes = await asyncio.gather(
                *(run_episode(engine, spec, self._client, limit, self._counters) for _ in range(group_size))
            )
        finally:
            self._pinned[pinned] -= group_size
            if self._pinned[pinned] <= 0:
                del self._pinned[pinned]
        finished = [e for e in episodes if e.status == "finished"]
        failed = [e for e in episodes if e.status == "failed"]
        judged = 0
        # A group with a failed episode is played again whole; judging the rest would make a partial group
        # trainable.
        if self._judge is not None and finished and not failed:
            judgments = await self._judge_group(engine, finished)
            self._client.extend(judgments)
            judged = len(finished)
        report = await self._flush_group(wait_stored)
        elapsed = time.perf_counter() - started
        tokens = sum(e.completion_tokens for e in episodes)
        self._record_metrics(episodes, tokens / max(elapsed, 1e-9))
        return {
            "group_id": spec.group_id,
            "scenario_id": f"{env_name}:{seed}",
            "rewards": [e.reward for e in episodes],
            "statuses": [e.status for e in episodes],
            "trajectory_ids": [e.trajectory_id for e in episodes],
            "completion_tokens": tokens,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "recorded": report.acknowledged,
            "rejected": len(report.rejected),
            "held_records": len(self._client.unacked) if self._holding() else 0,
            "judged": judged,
            "model_versions": [e.version for e in episodes],
            "is_eval": is_eval,
            "failed": bool(failed),
            "errors": [e.error for e in failed],
        }

    def _record_metrics(self, episodes: list[EpisodeResult], tokens_per_s: float) -> None:
        if self._metrics is None:
            self._metrics = _RolloutMetrics()
        for episode in episodes:
            self._metrics.episodes.inc(1, tags={"version": str(episode.version), "status": episode.status})
        by_version: dict[int, list[float]] = {}
        for episode in episodes:
            by_version.setdefault(episode.version, []).append(episode.reward)
        for version, rewards in by_version.items():
            self._metrics.reward.set(sum(rewards) / len(rewards), tags={"version": str(version)})
        self._metrics.tokens_per_s.set(tokens_per_s)

    async def _judge_group(self, engine: Engine, finished: list[EpisodeResult]) -> list[Any]:
        assert self._judge is not None
        settings = self._judge
        # The judge samples whatever weights the engine holds, named as they are: the base model's, or (only
        # outside the loop, whose config refuses it) a full version's. A swap meanwhile fails the call.
        weights = engine.weights_version
        judge_model = self._model_path if weights == 0 else self._full_weights.get(weights, f"v{weights}")

        async def generate(prompt: str) -> str:
            tokens = engine.chat_prompt([{"role": "user", "content": prompt}])
            if len(tokens) + settings.max_tokens > self._engine_config.max_model_len:
                raise JudgeOutputError(f"judge prompt of {len(tokens)} tokens does not fit engine.max_model_len")
            try:
                generation = await asyncio.wait_for(
                    engine.generate(
                        tokens, max_tokens=settings.max_tokens, temperature=settings.temperature, version=weights
                    ),
                    settings.timeout_s,
                )
            except TimeoutError:
                raise JudgeOutputError(
                    f"judge generation passed judge.timeout_s ({settings.timeout_s} s); raise it or lower "
                    "judge.max_tokens"
                ) from None
            except EngineError as exc:
                raise JudgeOutputError(f"judge engine failed: {exc}") from exc
            return generation.completions[0].text

        group = [JudgedTrajectory(e.trajectory_id, e.transcript, e.reward) for e in finished]
        version = "base" if weights == 0 else f"v{weights}"
        return await judge_group(group, settings, generate, judge_model=judge_model, judge_version=version)

    def _holding(self) -> bool:
        return self._held_flush is not None and not self._held_flush.done()

    async def _flush_group(self, wait_stored: bool) -> FlushReport:
        """A finished group's flush. Waiting for it is the rule; in live mode an outage is played through: the
        records stay in the client (acknowledged to nobody), a background task stores them once it can, and
        past recorder.max_held_records a group waits until the held records fall under it again."""
        settings = self._client.settings
        if wait_stored or settings.max_held_records == 0:
            return await self._flush()
        if not self._holding():
            try:
                return await self._flush(settings.hold_after_s)
            except RecorderUnreachable as exc:
                if not self._holding():  # groups that queued on the same flush find the task started
                    log.warning("records held while the recorder is unreachable; playing on: %s", str(exc)[:300])
                    self._held_flush = asyncio.create_task(self._store_held())
        while self._holding() and len(self._client.unacked) > settings.max_held_records:
            await asyncio.sleep(0.5)  # backpressure: bounded by the caller's deadline on this group
        return FlushReport()

    async def _store_held(self) -> None:
        """Flush again and again (each try with its own deadline) until everything held is stored."""
        backoff = 1.0
        while self._client.unacked:
            try:
                await self._flush()
                backoff = 1.0
            except Exception as exc:  # nothing may end this task while records are held: log, wait, try again
                log.warning("held records still not stored, trying again: %s: %s", type(exc).__name__, str(exc)[:300])
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, 30.0)
        log.warning("held records stored: the recorder is reachable again")

    async def _flush(self, deadline_s: float | None = None) -> FlushReport:
        """One flush at a time: concurrent groups share the client, whose flush is not re-entrant."""
        if self._flushing is None:
            self._flushing = asyncio.Lock()
        async with self._flushing:
            return await self._client.flush_async(deadline_s)

    async def close(self) -> None:
        await self._flush()
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None


def start_rollout_worker(
    model_path: str,
    engine: EngineConfig,
    recorder: RecorderConfig,
    name: str | None = None,
    judge: JudgeConfig | None = None,
) -> Any:
    """A rollout actor (named if `name`), restarted by Ray if it crashes; returns its handle once serving."""
    options: dict[str, Any] = {"max_restarts": 3, "max_concurrency": 256, "num_cpus": 0}
    if name:
        options["name"] = name
    # Without a controller there is nobody to restore a version: a restarted worker serves the base model,
    # which is all a standalone worker ever serves.
    worker = ray.remote(RolloutWorker).options(**options).remote(model_path, engine, recorder, judge, False)
    ray.get(worker.ready.remote(), timeout=engine.start_timeout_s)
    return worker
