"""Typed settings for GRPO training (the `trainer:` section of a config file)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class LoraConfig(BaseModel):
    """Low-rank adapters trained instead of the full weights."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    rank: int = Field(8, ge=1)
    """Adapter rank r."""

    alpha: float = Field(16.0, gt=0)
    """Scaling numerator: updates are scaled by alpha / rank."""

    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter input."""

    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Names of the linear layers that get adapters (Llama/Qwen naming)."""


class TrainerConfig(BaseModel):
    """GRPO hyper-parameters and how the Ray Train job runs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    mode: Literal["lora", "full"] = "lora"
    """Train LoRA adapters (peft) or all weights."""

    lora: LoraConfig = LoraConfig()
    """Adapter settings when mode is lora."""

    advantage: str = "grpo"
    """Advantage estimator from trainer.algorithms.ADVANTAGES: grpo (std-normalised) or dr_grpo."""

    policy_loss: str = "clipped"
    """Policy loss from trainer.algorithms.POLICY_LOSSES, looked up by this name on every micro-batch:
    `clipped` (the PPO/GRPO clipped surrogate, with clip-higher, dual-clip and the truncated importance weight
    below). A loss registered elsewhere (`@register_loss`) must be imported before the config is read, and on
    the training workers."""

    advantage_eps: float = Field(1e-6, gt=0)
    """Added to the group's std before dividing (verl uses 1e-6, TRL 1e-4)."""

    clip_eps_low: float = Field(0.2, gt=0, lt=1)
    """Lower clip of the importance ratio: 1 - clip_eps_low."""

    clip_eps_high: float = Field(0.28, gt=0)
    """Upper clip: 1 + clip_eps_high (DAPO clip-higher)."""

    dual_clip: float | None = Field(None, gt=1)
    """Cap on the loss of negative-advantage tokens as a multiple of -A (3 is usual); None disables it."""

    tis_cap: float | None = Field(2.0, gt=0)
    """Truncation of the importance weight against the sampler's recorded log-probs (at `tis_level`); None
    disables the correction."""

    tis_level: Literal["token", "sequence"] = "token"
    """Where the truncated importance weight is taken, against the sampler's policy mu (possibly versions
    behind, up to `max_staleness`). `token`: each token's weight min(pi_old/mu, cap). `sequence`: one weight
    per row, the product over its policy tokens min(prod pi_old/mu, cap), i.e. exp of the masked sum of
    log-ratios, clamped in log space before exp so it cannot overflow. Both are detached (the gradient is the
    weight times the surrogate's). A trajectory whose calls do not extend each other is several rows, each
    weighted on its own."""

    aggregation: Literal["token_mean", "sequence_mean", "constant"] = "token_mean"
    """How per-token losses become one number: `token_mean` (every policy token of the batch weighs the same,
    DAPO/verl), `sequence_mean` (every sequence weighs the same, original GRPO) or `constant` (Dr. GRPO: the
    token sum over sequences x `constant_tokens`). Counted over all workers, so the gradient does not depend on
    the worker count."""

    constant_tokens: int | None = Field(None, ge=1)
    """Completion-token budget per sequence in Dr. GRPO's constant normaliser (aggregation: constant), e.g. the
    rollout's max_tokens x max_turns. `None` uses the longest sequence's policy tokens in the batch."""

    kl_beta: float = Field(0.0, ge=0)
    """Weight of the k3 KL penalty to the reference model (0: off, as in verl and TRL defaults)."""

    kl_reference: str | None = None
    """Model folder or hub id the KL penalty is measured against. `None` means the base model (never the
    version a batch trains from, which would let the policy drift one version at a time)."""

    learning_rate: float = Field(1e-5, gt=0)
    """AdamW learning rate (1e-5 is typical for LoRA, 1e-6 for full weights)."""

    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""

    grad_clip: float = Field(1.0, gt=0)
    """Clip the global gradient norm to this value."""

    updates_per_batch: int = Field(1, ge=1)
    """Optimizer steps taken on one claimed batch (more than one makes the clip matter)."""

    packing: Literal["shared_prefix", "rows", "padded"] = "shared_prefix"
    """How a micro-batch's rows go through the model. `shared_prefix`: packed into one sequence without padding,
    and every prefix rows share (a group's prompt, a common system prompt) computed once, every row attending to
    it and sending its gradient through it (trainer.packing). `rows`: packed without padding, nothing shared.
    `padded`: the plain path, right-padded rows; equal log-probs and gradients, kept for comparison."""

    micro_batch_tokens: int = Field(1536, ge=1)
    """Most tokens per forward/backward pass, counted as the forward computes them (with `shared_prefix`, each
    shared prefix once; with `padded`, rows x the longest row): the memory cap. Within it, a worker's rows are
    cut into the micro-batches of least estimated compute (`attention_cost_tokens`); gradients accumulate over
    them. A row longer than this is a micro-batch of its own. Best when a whole GRPO group fits, so its prompt
    is computed once: a market group (4 x ~540 tokens sharing ~314) packs into ~1240, and 4 groups trained
    in 0.73x the time of a 1024 budget (SmolLM2-135M LoRA on 2 cores; peak RSS 5.7 GB against 4.4). Lower it
    if a training worker runs out of memory; GPUs take larger budgets (configs/gpu.yaml)."""

    attention_cost_tokens: int = Field(2048, ge=1)
    """For planning micro-batches: the query-key pairs of attention that cost as much as one token's pass through
    the weights. A forward's attention pairs are, with tree attention (trainer.tree_attention), each segment's
    queries against its ancestors and itself; with a dense mask (eager attention), the packed length squared.
    So the planner weighs one long pass against two short ones that each recompute a shared prompt. About 2000
    for SmolLM2-135M on CPU (forward and backward of a 1024-token row took 7.6 s, of 2048 tokens 21.3 s);
    larger models, whose weights dominate for longer, have larger values."""

    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (transformers'
    gradient checkpointing, non-reentrant): less memory for models or micro-batches that need it, about one
    more forward's time. It puts the model in training mode, so dropout (lora.dropout, the model's own)
    becomes active if configured; then the pre-batch log-probs take a separate pass again."""

    micro_batch_rows: int | None = Field(None, ge=1)
    """At most this many rows per forward/backward pass as well (`None`: only micro_batch_tokens decides)."""

    threads_per_worker: int | None = Field(None, ge=1)
    """CPU workers: torch threads per worker. `None` splits this machine's cores evenly between the workers
    (Ray starts each worker with OMP_NUM_THREADS=1, which leaves cores idle)."""

    allocator: Literal["jemalloc", "system"] = "jemalloc"
    """The C allocator of the training workers' processes. `system`: the process's own malloc (glibc).
    `jemalloc`: the libjemalloc that Ray ships
    (ray/core/libjemalloc.so), preloaded (LD_PRELOAD) and told to keep freed pages for reuse instead of returning
    them (MALLOC_CONF dirty_decay_ms:-1,muzzy_decay_ms:-1). glibc's malloc held 6.6 GB at the peak of a
    SmolLM2-135M LoRA update on 32 market-shaped rows that jemalloc ran in 3.7 GB, at the same speed (2 cores;
    bench/allocator.py). Falls back to `system` with a warning where Ray's library is missing. Each update
    reports `jemalloc`: 1 where its worker really runs it, else 0."""

    max_staleness: int | None = Field(4, ge=0)
    """Claim only groups sampled by a version at most this many versions behind the one the batch trains from
    (its parent, the deployed version); judged once, when the batch is claimed. `None`: no bound."""

    backend: Literal["torch", "simulated"] = "torch"
    """`torch` trains the model. `simulated` is for tests and benchmarks of the orchestration only: no model
    is trained, every update sleeps `simulated_update_s` and the version it publishes holds only a manifest.
    Never a default."""

    simulated_update_s: float = Field(1.0, gt=0)
    """Seconds one simulated update takes (backend: simulated)."""

    num_workers: int = Field(2, ge=1)
    """Ray Train workers (processes)."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How workers share the model: `ddp` (a full copy each) or `fsdp` (FSDP2 `fully_shard` per decoder
    layer: parameters, gradients and optimizer state sharded; for full fine-tunes, on GPUs or CPUs)."""

    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Ray resources per training worker beyond the default CPU/GPU, e.g. `{GPU: 1, train_gpu: 1}`: a custom
    resource that only the training node type has keeps Ray Train's placement group off the rollout GPUs."""

    use_gpu: bool = False
    """One GPU per worker (NCCL) instead of CPU workers (gloo)."""

    seed: int = 0
    """Seed for adapter initialisation and any sampling in training."""

    batch_max_groups: int = Field(64, ge=1)
    """Most GRPO groups the job claims into one training batch."""

    min_group_size: int = Field(2, ge=2)
    """Smallest group worth training on (advantages need at least two samples)."""

    reward_source: str = "env"
    """Reward to train on: `env` (the environment's total reward) or the name of a judge."""

    health_check_interval_s: float = Field(0.1, gt=0)
    """How often Ray Train's controller polls the workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S). Its 2 s
    default makes every `ray.train.report` wait up to 2 s, far longer than a small GRPO step."""

    collective_timeout_s: float = Field(600.0, ge=10)
    """Deadline of every collective (all-reduce, all-gather, DDP gradient sync) between training workers: a
    worker whose peer died fails the attempt (and Ray Train restarts it from the last checkpoint) instead of
    waiting forever."""

    max_failures: int = Field(2, ge=0)
    """Worker failures Ray Train recovers from (resuming from the last checkpoint) before giving up."""

    worker_start_timeout_s: float = Field(300.0, ge=10)
    """Deadline for the training workers to be placed and started (each start, the first and every restart
    after a failure); a start that misses it is retried once in the run's life, then the run fails with Ray
    Train's "worker group startup timed out ... waiting for N workers". Ray Train alone waits forever for
    resources the cluster may never have (a placement group of another run still holding the CPUs)."""

    @field_validator("advantage", "policy_loss")
    @classmethod
    def _registered(cls, value: str, info: ValidationInfo) -> str:
        """A name the registry knows (checked when a config sets it: the registries import torch)."""
        from trainer import algorithms

        table = {"advantage": algorithms.ADVANTAGES, "policy_loss": algorithms.POLICY_LOSSES}[info.field_name]
        if value not in table:
            raise ValueError(
                f"trainer.{info.field_name} {value!r} is not registered; choose one of: {', '.join(sorted(table))}"
            )
        return value

    @model_validator(mode="after")
    def _fsdp_is_for_full_weights(self) -> TrainerConfig:
        if self.strategy == "fsdp" and self.mode != "full":
            raise ValueError("trainer.strategy fsdp shards full fine-tunes; use mode: full, or strategy: ddp for LoRA")
        if self.strategy == "fsdp" and self.kl_beta > 0:
            raise ValueError(
                "trainer.kl_beta > 0 needs a reference copy, not supported with strategy fsdp yet; use ddp"
            )
        return self
