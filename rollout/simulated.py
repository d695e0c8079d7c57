"""A simulated policy engine for tests and benchmarks (`engine.backend: simulated`, never a default).

`SimulatedEngine` has PolicyEngine's interface (rollout.engine) and its version rules, admission and
drain semantics, but runs no model: completions are random ordinary tokens of the model's real tokenizer
that arrive at the rates in `engine.simulated`, so the live-mode orchestration (rollout actors, recorder,
controller, swaps) can be measured at scale without a vLLM engine competing with training for the CPUs.

Timing: a request first waits its prefill (prompt tokens / prefill_tokens_per_s), then its `n` sequences
join the engine's running set at the next decode-step boundary (at most `engine.max_num_seqs` sequences
run at once; later requests queue in arrival order). Every step gives every running sequence one token
and lasts max(1 / tokens_per_s, running sequences / batch_tokens_per_s) seconds. The decode task is
event-driven: between two events (a request joins, finishes or is cancelled) the running set and the step
time are constant, so it sleeps until the next finish in one go and wakes early only for an arrival. Its
cost per engine is a few wake-ups per request, never per token, so dozens of engines share two cores.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rollout.config import EngineConfig
from rollout.engine import Completion, EngineError, Generation

log = logging.getLogger(__name__)

__all__ = ["SimulatedEngine"]

_MAX_LAG_S = 0.25  # how far the decode clock may trail the wall clock before it gives the time up
# Requests arriving within this fraction of a step after it began join it: vLLM schedules whatever is queued
# when a step starts, and requests submitted together reach the engine some microseconds apart.
_JOIN_GRACE = 0.1


@functools.lru_cache(maxsize=8)
def _tokenizer(model_path: str) -> Any:
    """One tokenizer per model folder and process: 64 engines in one process share it (decode is read-only).

    A folder with tokenizer.json loads as PreTrainedTokenizerFast, the class AutoTokenizer gives it too, without
    AutoTokenizer's import of torch: a simulated rollout actor then takes ~140 MB instead of ~530 MB."""
    if Path(model_path, "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(model_path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@functools.lru_cache(maxsize=8)
def _ordinary_ids(model_path: str) -> np.ndarray:
    """Token ids that are neither special nor added tokens: what a simulated completion is made of."""
    tokenizer = _tokenizer(model_path)
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    ids = np.array([i for i in range(len(tokenizer)) if i not in excluded], dtype=np.int64)
    if ids.size < 2:
        raise EngineError(f"the tokenizer in {model_path} has fewer than 2 ordinary tokens to sample from")
    return ids


class _Distribution:
    """A fixed next-token distribution over the ordinary ids (seeded logits), the same at every position."""

    def __init__(self, ids: np.ndarray, seed: int) -> None:
        self.ids = ids
        self._logits = np.random.default_rng(seed).standard_normal(ids.size)
        self._by_temperature: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    def at(self, temperature: float) -> tuple[np.ndarray, np.ndarray]:
        """(cumulative probabilities, log-probabilities) of softmax(logits / temperature)."""
        cached = self._by_temperature.get(temperature)
        if cached is None:
            scaled = self._logits / temperature
            logp = scaled - scaled.max()
            logp -= np.log(np.exp(logp).sum())
            cdf = np.cumsum(np.exp(logp))
            cdf /= cdf[-1]
            cached = self._by_temperature[temperature] = (cdf, logp)
        return cached


@dataclass(eq=False)
class _Request:
    """`n` sequences of the same length decoding together; done when the engine's step count reaches `end`."""

    n: int
    length: int
    done: asyncio.Future[None]
    end: int = field(default=0)


class SimulatedEngine:
    """A PolicyEngine stand-in whose tokens arrive at configured rates. Create it with
    `await SimulatedEngine.start(...)` on the event loop that will use it."""

    def __init__(self, tokenizer: Any, model_path: str, config: EngineConfig, version: int = 0) -> None:
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.version = version
        self.weights_version = 0  # whose full weights the engine "holds" (0: the base model's)
        self._config, self._sim = config, config.simulated
        self._rng = np.random.default_rng(self._sim.seed)
        self._distribution = _Distribution(_ordinary_ids(model_path), self._sim.seed)
        self._loaded: dict[int, str] = {}  # version -> adapter folder
        self._admitting = asyncio.Event()  # cleared while full weights are swapped
        self._admitting.set()
        self._running_requests = 0  # generate calls inside the engine now (prefill or decode)
        self._unusable: str | None = None
        # Decode state: the step counter, requests decoding, requests waiting for a slot, the decode task.
        self._steps = 0
        self._decoding: list[_Request] = []
        self._queued: list[_Request] = []
        self._wake: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def start(cls, model_path: str, config: EngineConfig, version: int = 0) -> SimulatedEngine:
        try:
            tokenizer, _ = _tokenizer(model_path), _ordinary_ids(model_path)
        except (OSError, ValueError) as exc:
            raise EngineError(
                f"the simulated engine needs the model's tokenizer and could not load one from {model_path!r} "
                f"({type(exc).__name__}: {exc}); pass a model folder holding tokenizer.json"
            ) from exc
        engine = cls(tokenizer, model_path, config, version)
        log.info(
            "simulated engine ready on %s (version %d): %.0f tok/s per sequence, %.0f tok/s per engine",
            model_path, version, engine._sim.tokens_per_s, engine._sim.batch_tokens_per_s,
        )  # fmt: skip
        return engine

    # -- versions: the same rules as PolicyEngine --------------------------------------------------------------

    @staticmethod
    def _existing_folder(path: str, what: str) -> None:
        if not Path(path).is_dir():
            raise EngineError(
                f"{what}: {path} does not exist or is not a folder (the simulated engine loads any folder that exists)"
            )

    async def load_adapter(self, version: int, adapter_dir: str, reload: bool = False) -> None:
        """Load an adapter for `version` without serving it (takes `load_s`); any existing folder is accepted."""
        if version <= 0:
            raise EngineError(f"adapter versions start at 1 (version 0 is the base weights), got {version}")
        self._existing_folder(adapter_dir, f"adapter for version {version}")
        if self._loaded.get(version) == str(adapter_dir) and not reload:
            return
        await asyncio.sleep(self._sim.load_s)
        self._loaded[version] = str(adapter_dir)

    async def load_weights(
        self, version: int, weights_dir: str, drain_timeout_s: float = 300.0, swap_timeout_s: float = 300.0
    ) -> None:
        """Serve full weights from `weights_dir` as `version`: stop admitting, wait up to `drain_timeout_s` for
        running requests to finish on the old weights, "swap" (`load_s`, past `swap_timeout_s` the engine is
        unusable, as PolicyEngine's), drop the adapters, admit again."""
        if self._unusable is not None:
            raise EngineError(self._unusable)
        self._existing_folder(weights_dir, f"weights for version {version}")
        self._admitting.clear()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + drain_timeout_s
            while self._running_requests:
                if loop.time() > deadline:
                    raise EngineError(
                        f"{self._running_requests} requests still running after {drain_timeout_s} s; weights unchanged"
                    )
                await asyncio.sleep(0.01)
            if self._sim.load_s > swap_timeout_s:
                await asyncio.sleep(swap_timeout_s)
                self._unusable = (
                    f"the simulated swap to {weights_dir} (version {version}) takes engine.simulated.load_s "
                    f"({self._sim.load_s} s), past engine.swap_timeout_s ({swap_timeout_s} s); the engine serves "
                    "nothing: restart this rollout actor"
                )
                raise EngineError(self._unusable)
            await asyncio.sleep(self._sim.load_s)
            self._loaded.clear()
            self.version, self.weights_version = version, version
        finally:
            self._admitting.set()

    def activate(self, version: int) -> None:
        """Serve `version` from the next request on: 0 is the base weights, others must be loaded first."""
        if version == self.weights_version and version not in self._loaded:
            self.version = version
            return
        if self.weights_version != 0:
            raise EngineError(
                f"the engine holds version {self.weights_version}'s full weights; load the base weights "
                f"(load_weights(0, base folder)) before serving version {version}"
            )
        if version == 0:
            self.version = 0
        elif version in self._loaded:
            self.version = version
        else:
            raise EngineError(f"version {version} is not loaded in this engine; call load_adapter first")

    async def unload_adapter(self, version: int) -> None:
        """Free an adapter that is not being served."""
        if version == self.version and version != 0:
            raise EngineError(f"version {version} is being served; activate another version before unloading it")
        self._loaded.pop(version, None)

    @property
    def unusable(self) -> str | None:
        """Why the engine refuses every request, or None."""
        return self._unusable

    @property
    def loaded_versions(self) -> list[int]:
        return sorted(self._loaded)

    async def set_adapter(self, version: int, adapter_dir: str | None) -> None:
        """Load (if needed) and serve `version`; `adapter_dir=None` serves the weights the engine holds."""
        if adapter_dir is not None:
            await self.load_adapter(version, adapter_dir)
        self.activate(version)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat conversation with the generation prompt appended (the model's real template)."""
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return list(encoded["input_ids"])

    # -- generation -----------------------------------------------------------------------------------------------

    async def generate(
        self,
        prompt_token_ids: list[int],
        *,
        n: int = 1,
        max_tokens: int = 64,
        min_tokens: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop_token_ids: list[int] | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
        top_logprobs: int = 0,
        base_weights: bool = False,
        version: int | None = None,
        regex: str | None = None,
        skip_special_tokens: bool = True,  # its tokens are all ordinary: nothing to skip or keep
    ) -> Generation:
        """`n` completions of a tokenized prompt after the simulated prefill and decode time.

        Tokens are drawn from a fixed distribution over ordinary tokens at `temperature` (0 samples at 1: there
        is no model to be greedy about), so no completion contains a stop token and every one ends with
        finish_reason `length`; `top_p` and `stop_token_ids` are accepted and have nothing to act on."""
        if stop or seed is not None or top_logprobs or regex is not None:
            raise EngineError(
                "the simulated engine has no text, seeds, top log-probs or constrained outputs; "
                "use engine.backend: vllm"
            )
        if not prompt_token_ids:
            raise EngineError("prompt_token_ids is empty; pass at least one token id")
        if n < 1 or max_tokens < 1 or not 0 <= min_tokens <= max_tokens:
            raise EngineError(
                f"need n >= 1, max_tokens >= 1 and 0 <= min_tokens <= max_tokens; got n={n}, "
                f"max_tokens={max_tokens}, min_tokens={min_tokens}"
            )
        if len(prompt_token_ids) + max_tokens > self._config.max_model_len:
            raise EngineError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({max_tokens}) exceeds engine.max_model_len "
                f"({self._config.max_model_len})"
            )
        await self._admitting.wait()  # a full-weights swap in progress: this request goes to the new weights
        if self._unusable is not None:
            raise EngineError(self._unusable)
        if self._closed:
            raise EngineError("the simulated engine was shut down")
        if base_weights:
            version = self.weights_version
        if version is None:
            version = self.version
        elif version != self.weights_version and version not in self._loaded:
            raise EngineError(f"version {version} is not loaded in this engine; load it before sampling from it")
        wanted = self._sim.completion_tokens
        length = max_tokens if wanted is None else max(min_tokens, min(wanted, max_tokens))
        self._running_requests += 1
        try:
            await asyncio.sleep(len(prompt_token_ids) / self._sim.prefill_tokens_per_s)
            request = self._join(n, length)
            # Sampled while the request decodes, so the CPU this takes is not added to its simulated time.
            completions = self._sample(n, length, temperature)
            await self._finished(request)
        finally:
            self._running_requests -= 1
        return Generation(list(prompt_token_ids), completions, version)

    def _sample(self, n: int, length: int, temperature: float) -> list[Completion]:
        cdf, logp = self._distribution.at(temperature if temperature > 0 else 1.0)
        drawn = np.searchsorted(cdf, self._rng.random((n, length)), side="right").clip(max=cdf.size - 1)
        ids = self._distribution.ids[drawn]
        return [
            Completion(row, positions, self.tokenizer.decode(row, skip_special_tokens=True), "length")
            for row, positions in zip(ids.tolist(), logp[drawn].tolist(), strict=True)
        ]

    def _join(self, n: int, length: int) -> _Request:
        """Queue `n` sequences of `length` tokens for the decode task (started here on first use)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = None  # a future of an earlier loop (asyncio.run called twice) is never woken here
            self._task = loop.create_task(self._decode_loop(), name="simulated-decode")
        request = _Request(n, length, loop.create_future())
        self._queued.append(request)
        self._wake_up()
        return request

    async def _finished(self, request: _Request) -> None:
        """Wait until the request's sequences are decoded; a cancelled wait takes them out of the batch."""
        try:
            await request.done
        finally:
            # Cancelled (an episode's deadline cancels the future too): free its slots now.
            if request in self._queued:
                self._queued.remove(request)
                self._wake_up()
            elif request in self._decoding:
                self._decoding.remove(request)
                self._wake_up()

    def _wake_up(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _admit(self) -> None:
        limit = self._config.max_num_seqs
        running = sum(r.n for r in self._decoding)
        while self._queued and (not self._decoding or running + self._queued[0].n <= limit):
            request = self._queued.pop(0)
            request.end = self._steps + request.length
            self._decoding.append(request)
            running += request.n

    async def _decode_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            boundary = loop.time()  # when the last decode step ended
            while True:
                if not self._decoding:
                    self._admit()
                if not self._decoding:
                    self._wake = loop.create_future()
                    await self._wake
                    boundary = loop.time()  # idle time is no decode time
                    continue
                running = sum(r.n for r in self._decoding)
                step_s = max(1.0 / self._sim.tokens_per_s, running / self._sim.batch_tokens_per_s)
                until_finish = min(r.end for r in self._decoding) - self._steps
                self._wake = loop.create_future()
                timer = loop.call_at(boundary + until_finish * step_s, self._wake_up)
                await self._wake
                timer.cancel()
                # Woken early by an arrival or a cancellation: the step in progress completes first, unless it
                # began less than _JOIN_GRACE of a step ago, in which case the arrival joins it.
                whole, into_step = divmod(loop.time() - boundary, step_s)
                steps = min(until_finish, int(whole) + (into_step > _JOIN_GRACE * step_s))
                if (left := boundary + steps * step_s - loop.time()) > 0:
                    await asyncio.sleep(left)
                # A loop that fell behind (a busy CPU) catches up on at most _MAX_LAG_S, not in one burst.
                boundary = max(boundary + steps * step_s, loop.time() - _MAX_LAG_S)
                self._steps += steps
                finished = [r for r in self._decoding if r.end <= self._steps]
                if finished:
                    self._decoding = [r for r in self._decoding if r.end > self._steps]
                    for request in finished:
                        if not request.done.done():
                            request.done.set_result(None)
                self._admit()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never leave a request waiting on a dead decode task
            log.exception("simulated decode loop failed")
            for request in self._decoding + self._queued:
                if not request.done.done():
                    request.done.set_exception(EngineError(f"simulated decode loop failed: {exc!r}"))
            self._decoding, self._queued = [], []

    def shutdown(self) -> None:
        """Stop the decode task; requests still waiting fail with EngineError."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for request in self._decoding + self._queued:
            if not request.done.done():
                request.done.set_exception(EngineError("the simulated engine was shut down"))
        self._decoding, self._queued = [], []
