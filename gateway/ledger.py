"""The episode ledger: one Ray actor that keeps every open gateway episode and records its calls.

An episode is a trajectory. Its first call records the start (on the version that served it, which later
calls are pinned to); every call is a step with its LLM call as tokens; the step's record waits in the ledger
until the next call or the episode's end, so the agent can still attach what the environment said
(`annotate`). The end records the trajectory as finished with its reward, or, without a reward yet, leaves
it running, so its group cannot be trained on, until the reward arrives or `gateway.episode_ttl_s` passes
since its last activity (then it is recorded as aborted and never trained on).

A call with `n` > 1 is a decision point: its candidates become a group of their own, one single-call
trajectory each, rewarded together (`reward_candidates`), e.g. when a market resolves and scores every
candidate order.

Replicas of the gateway share the ledger, so an episode's calls may arrive through any of them. The ledger
writes its records to the database itself (gateway.ledger_store: the recorder's store, without the recorder
actor's round trip), before it answers with `gateway.store_before_reply`, else every
`gateway.flush_interval_s`; their keys make a record written twice count once. A ledger restarted after a crash
reads its open episodes and candidate groups back from the database (gateway.recovery) before it answers
anything, so an agent's episode carries on where its last stored call left it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import ray

from gateway.config import GatewayConfig
from gateway.ledger_link import LinkServer, serve_link
from gateway.ledger_store import LedgerStore
from gateway.recovery import LedgerState, read_ledger_state
from recorder.config import DatabaseConfig
from recorder.records import LlmCallRecord, StepRecord, TrajectoryRecord

log = logging.getLogger(__name__)

ENVIRONMENT = "gateway"
LINK_METHODS = frozenset(
    {"open", "record_call", "annotate", "end", "reward", "reward_candidates", "context", "describe", "stats"}
)
"""What a replica may call over the ledger's socket (gateway.ledger_link)."""
_CLOSED_REMEMBERED = 100_000  # closed episodes remembered, so a late reward gets "closed", not "unknown"


def problem(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """A refusal the gateway turns into an OpenAI-style error (`status` is the HTTP status)."""
    return {"status": status, "error": {"message": message, "param": param, "code": code}}


@dataclass
class Episode:
    id: str
    group_id: str
    agent_id: str | None
    metadata: dict[str, Any]
    deadline: float
    """`time.monotonic()` past which the episode is closed as aborted."""
    version: int | None = None
    """The version its first call was served by (later calls are pinned to it while it is loaded)."""
    steps: int = 0
    """Single-completion calls recorded so far: the episode's own steps (the next one's index)."""
    calls: int = 0
    """All calls recorded, decision points (`n` > 1) included: a decision point's index is this count."""
    pending_step: StepRecord | None = None
    """The latest call's step, held for `annotate` until the next call, the end, or its annotation."""
    annotated: tuple[int, Any] | None = None
    """(step index, what it said) of the latest call once `annotate` recorded its step: a repeat of it is a retry
    and answered alike, a different one refused (what it said is None when a restarted ledger found the step)."""
    latest_was_decision: bool = False
    """The latest call was a decision point (`n` > 1): it has candidates to reward, no step to annotate."""
    ended: bool = False
    """The agent ended it; it waits for its reward."""
    step_rewards: float = 0.0
    context: dict[str, Any] | None = None
    """The latest single-completion chat call's messages (with the reply as returned) and tokens, pinned version:
    what a replica that did not serve it continues the episode's tokens from (gateway.replicas > 1)."""


class EpisodeLedger:
    """Create with `start_ledger`; every method answers plain data (an `error` key on a bad request)."""

    def __init__(self, settings: GatewayConfig, database: DatabaseConfig, url: str | None = None) -> None:
        """`database`: where records go and open episodes are read back from; `url`: its URL as resolved where the
        settings were read (with the password from that environment), `database.resolved_url()` if None."""
        self._settings = settings
        self._database = database
        self._url = url or database.resolved_url().render_as_string(hide_password=False)
        self._recovered: dict[str, int] | None = None
        self._recovering = asyncio.Lock()
        self._records = LedgerStore(self._url, database, settings.ledger_name)
        self._open: dict[str, Episode] = {}
        self._closed: OrderedDict[str, str] = OrderedDict()  # id -> final status
        self._candidates: dict[str, list[str]] = {}  # candidate group -> trajectory ids awaiting rewards
        self._candidate_meta: dict[str, dict[str, Any]] = {}  # candidate group -> agent, version, deadline
        self._added = 0  # records handed to the client, ever: a position in the order they were added
        self._stored = 0  # every record before this position is stored
        self._flush_task: asyncio.Task | None = None
        self._flushes = 0  # database writes
        self._tasks: list[asyncio.Task] = []
        self._recorded_calls = 0
        self._link: LinkServer | None = None
        self._linking = asyncio.Lock()

    def _background(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._flush_loop()), asyncio.create_task(self._expire_loop())]

    async def _ready(self) -> dict[str, Any] | None:
        """None once the open episodes are read back from the database (once per ledger life), else a 503."""
        self._background()
        if self._recovered is not None:
            return None
        async with self._recovering:
            if self._recovered is None:
                try:
                    state = await asyncio.wait_for(asyncio.to_thread(self._read_state), self._settings.ledger_timeout_s)
                except Exception as exc:
                    why = f"{type(exc).__name__}: {str(exc)[:300]}"
                    log.error("the episode ledger could not read its open episodes back: %s", why)
                    return problem(
                        503,
                        f"the episode ledger could not read its open episodes from the database ({why}); nothing "
                        "was recorded, retry once the database answers",
                    )
                self._recovered = self._restore(state)
                if any(self._recovered.values()):
                    log.info("episode ledger restarted: read back %s", self._recovered)
        return None

    def _read_state(self) -> LedgerState:
        from recorder.store import create_db_engine

        database = self._database
        engine = create_db_engine(self._url, database.connect_timeout_s, 1, database.statement_timeout_s)
        try:
            return read_ledger_state(engine, _CLOSED_REMEMBERED)
        finally:
            engine.dispose()

    def _restore(self, state: LedgerState) -> dict[str, int]:
        """Take back what the database says was open; a call's step the old ledger still held is recorded now
        with the reply as its action (the latest call's is held again, for `annotate`)."""
        now, ttl = time.monotonic(), self._settings.episode_ttl_s
        for key, status in state.closed.items():
            self._remember(key, status)
        for found in state.episodes:
            episode = Episode(
                found.id, found.group_id, found.agent_id, found.metadata, now + max(0.0, ttl - found.idle_s),
                version=found.version, steps=found.steps, calls=found.steps + found.decision_points,
                step_rewards=found.step_rewards,
            )  # fmt: skip
            for index, text in found.unstepped.items():
                step = StepRecord(found.id, index, "", action={"reply": text[:2000]})
                if index == found.steps - 1:
                    episode.pending_step = step
                else:
                    self._add(step)
            if found.steps and found.steps - 1 not in found.unstepped:  # an open episode's latest step: annotated
                episode.annotated = (found.steps - 1, None)
            self._open[found.id] = episode
        for group in state.candidates:
            self._candidates[group.group] = list(group.members)
            self._candidate_meta[group.group] = {
                "agent_id": group.agent_id, "version": group.version, "metadata": group.metadata,
                "deadline": now + max(0.0, ttl - group.idle_s),
            }  # fmt: skip
        return {"episodes": len(state.episodes), "candidate_groups": len(state.candidates)}

    # --- episodes -----------------------------------------------------------------------------------------

    async def open(
        self,
        episode_id: str,
        group_id: str | None = None,
        agent_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Open an episode (again: nothing changes); `group_id` None makes it a group of its own."""
        if (refused := await self._ready()) is not None:
            return refused
        if episode_id in self._closed:
            return problem(409, f"episode {episode_id!r} is already {self._closed[episode_id]}", "episode")
        episode = self._open.get(episode_id)
        if episode is None:
            deadline = time.monotonic() + self._settings.episode_ttl_s
            episode = Episode(episode_id, group_id or episode_id, agent_id, dict(metadata or {}), deadline)
            self._open[episode_id] = episode
        elif group_id is not None and group_id != episode.group_id:
            return problem(409, f"episode {episode_id!r} is in group {episode.group_id!r}, not {group_id!r}", "group")
        return self._describe(episode)

    async def record_call(
        self,
        episode_id: str,
        call: dict[str, Any],
        group_id: str | None = None,
        agent_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record one served call, opening its episode if it is new: `prompt_token_ids`, `model_version`,
        `sampling`, `latency_ms`, `segment` (new or continued), `observation`, and `completions` (each with
        `token_ids`, `logprobs`, `text`, `finish_reason`). Answers the step, the group and the version the episode
        is pinned to."""
        opened = await self.open(episode_id, group_id, agent_id, metadata)
        if "error" in opened:
            return opened
        episode = self._open[episode_id]
        if episode.ended:
            return problem(409, f"episode {episode_id!r} has ended and waits for its reward; open a new one", "episode")
        version = int(call["model_version"])
        if episode.version is None:
            episode.version = version
        completions = call["completions"]
        episode.context = None
        if call.get("context") is not None and len(completions) == 1:
            episode.context = {**call["context"], "version": episode.version}
        episode.latest_was_decision = len(completions) > 1
        if len(completions) > 1:  # a decision point: its candidates are a group of their own
            step = episode.calls
            self._record_candidates(episode, step, call)
        else:
            step = episode.steps
            if step == 0:  # the episode's trajectory starts with its first step of its own
                self._add(self._trajectory(episode, "running"))
            self._close_step(episode)
            completion = completions[0]
            # The reply is the step's action until the agent attaches its own (`annotate`): the data-quality
            # gate trains only on steps whose action was parsed or carries an error.
            action = {"reply": completion["text"][:2000]}
            episode.pending_step = StepRecord(episode.id, step, call.get("observation", ""), action=action)
            self._add(self._llm_call(episode.id, step, version, call, completion))
            episode.steps += 1
        episode.calls += 1
        episode.deadline = time.monotonic() + self._settings.episode_ttl_s
        self._recorded_calls += 1
        stored = await self._store()
        answer = {"episode": episode.id, "step": step, "group": episode.group_id, "version": episode.version}
        return {**answer, "stored": stored}

    async def annotate(
        self,
        episode_id: str,
        observation: str | None = None,
        action: dict[str, Any] | None = None,
        reward: float = 0.0,
        done: bool = False,
    ) -> dict[str, Any]:
        """What the environment said about the episode's latest call: its action, a step reward, done. The step
        is recorded now (stored before the answer with `gateway.store_before_reply`), so each call takes one."""
        if (refused := await self._ready()) is not None:
            return refused
        episode = self._open.get(episode_id)
        if episode is None:
            return self._missing(episode_id)
        step = episode.pending_step
        said = (observation, action, float(reward), done)
        if episode.latest_was_decision:  # the step held (if any) is an earlier call's, not the latest's
            return problem(
                409, f"the latest call of episode {episode_id!r} was a decision point (n > 1): its candidates "
                "take rewards (/v1/episodes/{id}/candidates/{step}/rewards), not an annotation", "episode",
            )  # fmt: skip
        if step is None:
            if episode.annotated is not None and episode.annotated[0] == episode.steps - 1:
                index, given = episode.annotated
                if given == said:  # a retry whose first answer was lost: the step is recorded as asked
                    return {**self._describe(episode), "stored": await self._store()}
                return problem(
                    409, f"step {index} of episode {episode_id!r} is already annotated and recorded; annotate each "
                    "call once, after it", "episode", code="already_annotated",
                )  # fmt: skip
            return problem(409, f"episode {episode_id!r} has no call to attach a step to yet", "episode")
        if observation is not None:
            step.observation = observation
        if action is not None:
            step.action = action
        step.env_reward, step.done = float(reward), done
        episode.step_rewards += float(reward)
        episode.annotated = (step.step_index, said)
        self._close_step(episode)
        return {**self._describe(episode), "stored": await self._store()}

    async def end(self, episode_id: str, reward: float | None = None) -> dict[str, Any]:
        """End an episode: with a reward it is finished now; without, it waits for `reward` (or the TTL)."""
        if (refused := await self._ready()) is not None:
            return refused
        episode = self._open.get(episode_id)
        if episode is None:
            return self._missing(episode_id)
        self._close_step(episode)
        episode.ended = True
        episode.deadline = time.monotonic() + self._settings.episode_ttl_s
        if reward is not None:
            self._finish(episode, "finished", reward)
            return {"episode": episode_id, "status": "finished", "reward": reward, "stored": await self._store()}
        return {**self._describe(episode), "stored": await self._store()}

    async def reward(self, episode_id: str, reward: float) -> dict[str, Any]:
        """Set an episode's reward: it ends (if it had not) and is finished, ready for training with its group."""
        if (refused := await self._ready()) is not None:
            return refused
        episode = self._open.get(episode_id)
        if episode is None:
            return self._missing(episode_id)
        self._close_step(episode)
        self._finish(episode, "finished", reward)
        return {"episode": episode_id, "status": "finished", "reward": reward, "stored": await self._store()}

    async def reward_candidates(self, episode_id: str, step: int, rewards: list[float]) -> dict[str, Any]:
        """Rewards for the `n` candidates of an episode's call at `step`, in the order they were returned."""
        if (refused := await self._ready()) is not None:
            return refused
        group = _candidate_group(episode_id, step)
        members = self._candidates.get(group)
        if members is None:
            status = self._closed.get(group)
            if status is not None:
                return problem(409, f"the candidates of episode {episode_id!r} step {step} are already {status}")
            return problem(404, f"episode {episode_id!r} has no candidates awaiting rewards at step {step}", "step")
        if len(rewards) != len(members):
            return problem(400, f"{len(members)} candidates need {len(members)} rewards, got {len(rewards)}", "rewards")
        meta = self._candidate_meta.pop(group)
        for member, value in zip(members, rewards, strict=True):
            self._add(self._candidate_trajectory(member, group, meta, "finished", float(value)))
        del self._candidates[group]
        self._remember(group, "finished")
        return {"group": group, "status": "finished", "rewards": rewards, "stored": await self._store()}

    async def context(self, episode_id: str) -> dict[str, Any]:
        """The open episode's latest chat call, for a replica that did not serve it (`context`: None if none)."""
        if (refused := await self._ready()) is not None:
            return refused
        episode = self._open.get(episode_id)
        return {"context": None if episode is None or episode.ended else episode.context}

    async def describe(self, episode_id: str) -> dict[str, Any]:
        if (refused := await self._ready()) is not None:
            return refused
        episode = self._open.get(episode_id)
        if episode is None:
            if episode_id in self._closed:
                return {"episode": episode_id, "status": self._closed[episode_id]}
            return self._missing(episode_id)
        return self._describe(episode)

    # --- recording ----------------------------------------------------------------------------------------

    def _describe(self, episode: Episode) -> dict[str, Any]:
        status = "awaiting_reward" if episode.ended else "open"
        return {
            "episode": episode.id, "group": episode.group_id, "agent": episode.agent_id, "status": status,
            "steps": episode.steps, "calls": episode.calls, "version": episode.version,
            "expires_in_s": round(max(0.0, episode.deadline - time.monotonic()), 3),
        }  # fmt: skip

    def _missing(self, episode_id: str) -> dict[str, Any]:
        if episode_id in self._closed:
            return problem(409, f"episode {episode_id!r} is already {self._closed[episode_id]}", "episode")
        return problem(404, f"no open episode {episode_id!r}: open it first (POST /v1/episodes)", "episode")

    def _trajectory(self, episode: Episode, status: str, reward: float | None = None) -> TrajectoryRecord:
        metadata = {**episode.metadata, "source": "gateway"}
        return TrajectoryRecord(
            episode.id, ENVIRONMENT, f"{ENVIRONMENT}:{episode.group_id}", episode.group_id, episode.version or 0,
            status=status, agent_id=episode.agent_id, total_reward=reward, step_count=episode.steps,
            metrics={"step_rewards": episode.step_rewards} if status != "running" else {}, metadata=metadata,
        )  # fmt: skip

    @staticmethod
    def _llm_call(
        trajectory_id: str, step: int, version: int, call: dict[str, Any], completion: dict[str, Any]
    ) -> LlmCallRecord:
        return LlmCallRecord.from_tokens(
            trajectory_id, step, 0, version, call["prompt_token_ids"], completion["token_ids"],
            completion["logprobs"], text=completion["text"], finish_reason=completion["finish_reason"],
            sampling_params={**call["sampling"], "segment": call.get("segment", "new")},
            latency_ms=call.get("latency_ms"),
        )  # fmt: skip

    def _close_step(self, episode: Episode) -> None:
        if episode.pending_step is not None:
            self._add(episode.pending_step)
            episode.pending_step = None

    def _finish(self, episode: Episode, status: str, reward: float | None) -> None:
        """Record the episode's end (nothing if it has no step of its own) and forget it."""
        if episode.steps:
            self._add(self._trajectory(episode, status, reward))
        del self._open[episode.id]
        self._remember(episode.id, status)

    def _remember(self, key: str, status: str) -> None:
        self._closed[key] = status
        if len(self._closed) > _CLOSED_REMEMBERED:
            self._closed.popitem(last=False)

    def _record_candidates(self, episode: Episode, step: int, call: dict[str, Any]) -> None:
        group = _candidate_group(episode.id, step)
        version = int(call["model_version"])
        meta = {
            "agent_id": episode.agent_id, "version": version, "metadata": {**episode.metadata, "episode": episode.id},
            "deadline": time.monotonic() + self._settings.episode_ttl_s,
        }  # fmt: skip
        self._candidate_meta[group] = meta
        members = []
        for index, completion in enumerate(call["completions"]):
            member = f"{group}.{index}"
            members.append(member)
            self._add(
                self._candidate_trajectory(member, group, meta, "running", None),
                StepRecord(member, 0, call.get("observation", ""), action={"candidate": index}),
                self._llm_call(member, 0, version, call, completion),
            )
        self._candidates[group] = members

    @staticmethod
    def _candidate_trajectory(
        member: str, group: str, meta: dict[str, Any], status: str, reward: float | None
    ) -> TrajectoryRecord:
        return TrajectoryRecord(
            member, ENVIRONMENT, f"{ENVIRONMENT}:{group}", group, meta["version"], status=status,
            agent_id=meta["agent_id"], total_reward=reward, step_count=1,
            metadata={**meta["metadata"], "source": "gateway", "candidate": True},
        )  # fmt: skip

    def _add(self, *records: Any) -> None:
        self._records.add(*records)
        self._added += len(records)

    async def flush(self) -> dict[str, Any]:
        """Store every held record now, retrying while the database does not answer, at most
        `gateway.ledger_timeout_s`; returns how many were written and refused. Raises past it (they stay held)."""
        covered = self._added
        report = await self._records.flush(self._settings.ledger_timeout_s)  # also what is added meanwhile
        self._flushes += report.writes
        self._stored = max(self._stored, covered)
        return {"written": report.written, "rejected": report.rejected, "retries": report.retries}

    async def _store(self) -> bool | None:
        """Wait until every record added so far is stored (gateway.store_before_reply), at most
        gateway.store_timeout_s: True once it is, None where the settings do not wait. A group commit: every
        caller waiting meanwhile is covered by the same flush, so a burst of calls costs one database write,
        not one each. On False the records stay held and go with a later flush."""
        if not self._settings.store_before_reply:
            return None
        wanted = self._added
        deadline = time.monotonic() + self._settings.store_timeout_s
        while self._stored < wanted:
            if self._flush_task is None or self._flush_task.done():
                self._flush_task = asyncio.create_task(self.flush())
            try:  # shielded: a waiter that gives up does not cancel the flush the others wait on
                await asyncio.wait_for(asyncio.shield(self._flush_task), max(0.0, deadline - time.monotonic()))
            except Exception as exc:
                why = f"{type(exc).__name__}: {str(exc)[:300]}"
                log.warning("gateway records not stored yet (%s); held for the next flush", why)
                return False
        return True

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.flush_interval_s)
            if not self._records.held:
                continue
            try:
                await self.flush()
            except Exception as exc:  # records stay held and go with the next flush
                log.warning("gateway records not stored yet (%s: %s); retrying", type(exc).__name__, str(exc)[:300])

    async def expire(self) -> int:
        """Close every episode and candidate group past its TTL as aborted; returns how many."""
        now = time.monotonic()
        expired = [e for e in self._open.values() if e.deadline < now]
        for episode in expired:
            self._close_step(episode)
            self._finish(episode, "aborted", None)
            log.info("episode %s passed gateway.episode_ttl_s without a reward: recorded as aborted", episode.id)
        stale = [group for group, meta in self._candidate_meta.items() if meta["deadline"] < now]
        for group in stale:
            for member in self._candidates.pop(group, []):
                self._add(self._candidate_trajectory(member, group, self._candidate_meta[group], "aborted", None))
            self._candidate_meta.pop(group)
            self._remember(group, "aborted")
        return len(expired) + len(stale)

    async def _expire_loop(self) -> None:
        interval = min(5.0, max(0.2, self._settings.episode_ttl_s / 4))
        while True:
            await asyncio.sleep(interval)
            await self.expire()

    async def link(self) -> dict[str, Any]:
        """Where this ledger's socket listens and its token (gateway.ledger_link), opened on first asking."""
        async with self._linking:
            if self._link is not None and not self._link.server.is_serving():
                raise RuntimeError("the episode ledger is closed")
            if self._link is None:
                answer = lambda method, args: getattr(self, method)(*args)  # noqa: E731
                self._link = await serve_link(
                    answer, LINK_METHODS, ray.util.get_node_ip_address(), self._settings.ledger_timeout_s
                )
        return self._link.address

    async def stats(self) -> dict[str, Any]:
        """Counts of what the ledger holds; the first call after a start reads the open episodes back."""
        if (refused := await self._ready()) is not None:
            return refused
        return {
            "open": sum(not e.ended for e in self._open.values()),
            "awaiting_reward": sum(e.ended for e in self._open.values()),
            "candidate_groups_awaiting_rewards": len(self._candidates),
            "calls_recorded": self._recorded_calls,
            "held_records": len(self._records.held),
            "flushes": self._flushes,
            "link_calls": self._link.calls if self._link is not None else 0,
            "recovered": dict(self._recovered or {}),
        }

    async def close(self) -> dict[str, Any]:
        """Store what is held (open episodes stay open: their records so far are stored); the ledger takes nothing
        after it."""
        for task in self._tasks:
            task.cancel()
        if self._link is not None:
            self._link.close()
        for episode in self._open.values():
            self._close_step(episode)
        try:
            stored = await self.flush()
        except Exception as exc:  # the ledger ends with its process: say what it could not store
            log.error(
                "the episode ledger stops with %d records it could not store (%s: %s)",
                len(self._records.held), type(exc).__name__, str(exc)[:300],
            )  # fmt: skip
            raise
        self._records.close()
        return stored


def _candidate_group(episode_id: str, step: int) -> str:
    return f"{episode_id}.s{step}"


def start_ledger(settings: GatewayConfig, database: DatabaseConfig, url: str | None = None) -> Any:
    """The named ledger actor (an existing one is reused), restarted by Ray if it crashes (it then reads its open
    episodes back from the database). `url`: as for EpisodeLedger."""
    actor = (
        ray.remote(EpisodeLedger)
        .options(name=settings.ledger_name, get_if_exists=True, max_restarts=3, max_concurrency=1000, num_cpus=0)
        .remote(settings, database, url)
    )
    ray.get(actor.stats.remote(), timeout=settings.ledger_timeout_s)
    return actor
