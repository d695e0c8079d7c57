"""The per-worker Ray Train loop: read this worker's share of a batch, run GRPO updates, report, checkpoint.

Runs inside `TorchTrainer` workers (DDP over gloo on CPUs, NCCL on GPUs), given a `TrainJobSpec`
(trainer.spec). Rank 0 records every update's metrics on the batch's database row and writes a checkpoint
(the adapter or full weights, plus optimizer state and the update count) after every update, so a run
restarted by `FailureConfig` resumes from the last finished update instead of starting over. Metrics go to
the database only; experiment tracking (W&B) reads them from there, outside the trainer.

The pieces (`worker_layout`, `load_tensors`, `read_checkpoint`, `load_policy`, `prepare_training`,
`run_updates`) are shared by the one-batch job's `train_loop_per_worker` and the persistent trainer service
(cluster.trainer_service), which keeps the model and optimizer between batches.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.memory import peak_memory_gb, runs_jemalloc

STATE_FILE = "trainer_state.pt"


def collective_device() -> torch.device:
    """Where the process group's collectives run: NCCL only moves CUDA tensors, gloo CPU ones."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_named(values: dict[str, float], op: str = "sum") -> dict[str, float]:
    """Sum (or max) named numbers over every worker, matched by name (sorted, so every worker lays them out
    alike); every worker must pass the same names. A no-op in a single process."""
    names = sorted(values)
    if not (dist.is_available() and dist.is_initialized()):
        return {name: float(values[name]) for name in names}
    tensor = torch.tensor([float(values[name]) for name in names], dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return dict(zip(names, tensor.cpu().tolist(), strict=True))


def batch_loss_scale(batch: Any, config: Any, world: int) -> Any:
    """The batch's sizes summed over workers (the longest row: max), as the LossScale every worker uses."""
    from trainer.step import local_sizes, loss_scale

    tokens, sequences, longest = local_sizes(batch)
    summed = all_reduce_named({"tokens": tokens, "sequences": sequences})
    longest = all_reduce_named({"longest": longest}, op="max")["longest"]
    return loss_scale(config, summed["tokens"], summed["sequences"], longest, world)


def gather_by_rank(values: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every worker's copy of `values` (on the CPU), in rank order: what a checkpoint keeps."""
    gathered: list[Any] = [values.cpu()]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, values.cpu())
    return gathered


def pre_batch_logprobs(
    model: Any, batch: Any, config: Any, micro_steps: int, state: dict[str, Any], rank: int, world: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The policy's log-probs before this batch's first update (the ratio's anchor for every update), and all
    workers' copies for the checkpoint. A run resumed after a failure takes them from the checkpoint: the
    restored weights are some updates into the batch and would anchor the ratio in the wrong place."""
    from trainer.step import policy_logprobs

    saved = state.get("old_logprobs")
    if saved is not None:
        if len(saved) != world or tuple(saved[rank].shape) != tuple(batch.loss_mask.shape):
            raise RuntimeError(
                f"the checkpoint's pre-batch log-probs ({len(saved)} workers, rank {rank}: "
                f"{tuple(saved[rank].shape) if rank < len(saved) else None}) do not match this run's "
                f"({world} workers, {tuple(batch.loss_mask.shape)}); resume with the same trainer.num_workers"
            )
        return saved[rank].to(batch.loss_mask.device), saved
    old = policy_logprobs(model, batch, config, steps=micro_steps)
    return old, gather_by_rank(old, world)


def cpu_usage(before: Any, wall_s: float) -> dict[str, float]:
    """This worker process's CPU and page faults since `before` (a getrusage) over `wall_s` seconds: what an
    update's wall time was made of. cpu_utilization = (user + system) / (wall x torch threads) well below 1
    means the update waited (for cores other processes held, or for collectives); system seconds and minor
    faults that grow with no change in work point at the allocator returning and re-faulting memory."""
    now = resource.getrusage(resource.RUSAGE_SELF)
    user, system = now.ru_utime - before.ru_utime, now.ru_stime - before.ru_stime
    return {
        "cpu_user_s": user,
        "cpu_system_s": system,
        "cpu_utilization": (user + system) / (max(wall_s, 1e-9) * torch.get_num_threads()),
        "minor_faults": float(now.ru_minflt - before.ru_minflt),
    }


UPDATE_SUMS = ("loss", "clip_fraction", "approx_kl", "kl_ref", "entropy")
"""An update's metrics that each worker reports as its share of the batch: summed over workers."""


def batch_totals(batch: Any, stats: Any) -> dict[str, float]:
    """The batch's counts summed over every worker (each worker passes its own share)."""
    n = stats.trajectories
    return all_reduce_named(
        {
            "groups_without_signal": stats.groups_without_signal,
            "groups_stale": stats.groups_stale,
            "rows": stats.rows,
            "trajectories": n,
            "reward_sum": stats.reward_mean * n,
            "reward_squares": (stats.reward_std**2 + stats.reward_mean**2) * n,
            "advantage_abs_sum": float(batch.advantages.abs().sum()),
        }
    )


def batch_report(totals: dict[str, float]) -> dict[str, float]:
    """What every update's report says about the batch itself: its sizes and reward statistics."""
    trajectories = max(totals["trajectories"], 1.0)
    reward_mean = totals["reward_sum"] / trajectories
    return {
        "rows": totals["rows"],
        "groups_without_signal": totals["groups_without_signal"],
        "groups_stale": totals["groups_stale"],
        "trajectories": totals["trajectories"],
        "reward_mean": reward_mean,
        "reward_std": max(totals["reward_squares"] / trajectories - reward_mean**2, 0.0) ** 0.5,
        "advantage_abs_mean": totals["advantage_abs_sum"] / max(totals["rows"], 1.0),
    }


BATCH_TENSORS = ("input_ids", "attention_mask", "loss_mask", "behaviour_logprobs", "temperatures", "advantages")


def sampler_mismatch_report(old: torch.Tensor, batch: Any, config: Any) -> dict[str, float]:
    """How far the sampler's recorded log-probs are from the trainer's policy before the batch, over every
    worker's policy tokens: k1 and k3 estimates of KL(sampler || trainer), the share of tokens whose truncated
    importance weight was capped, the mean weight, and the largest |log-prob difference|."""
    from trainer.step import MISMATCH_MAX_KEYS, sampler_mismatch

    local = sampler_mismatch(old, batch, config)
    sums = all_reduce_named({k: v for k, v in local.items() if k not in MISMATCH_MAX_KEYS})
    maxima = all_reduce_named({k: local[k] for k in MISMATCH_MAX_KEYS}, op="max")
    tokens = max(sums["policy_tokens"], 1.0)
    return {
        "mismatch_kl_k1": sums["mismatch_k1_sum"] / tokens,
        "mismatch_kl_k3": sums["mismatch_k3_sum"] / tokens,
        "tis_clip_fraction": sums["tis_clipped_sum"] / tokens,
        "tis_weight_mean": sums["tis_weight_sum"] / tokens,
        "mismatch_abs_logprob_diff_max": maxima["abs_logprob_diff_max"],
    }


def worker_layout(config: Any) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this Ray Train worker, with torch's threads set for it."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    threads = config.threads_per_worker or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")
    return rank, world, device


def load_tensors(engine: Any, spec: Any, rank: int, world: int, device: torch.device) -> tuple[Any, Any]:
    """This worker's share of the batch's groups as training tensors on `device`, and its BatchStats."""
    from recorder.queries import load_batch
    from trainer.data import build_rows, collate, shard_groups

    config = spec.trainer
    groups = load_batch(engine, spec.batch_id, config.reward_source)
    rows, stats = build_rows(shard_groups(groups, rank, world), config.advantage, config.advantage_eps)
    batch = collate(rows, pad_id=spec.pad_token_id, stats=stats)
    for name in BATCH_TENSORS:
        setattr(batch, name, getattr(batch, name).to(device))
    return batch, stats


def read_checkpoint(checkpoint: Any) -> tuple[str | None, dict[str, Any]]:
    """(a local copy of a Ray Train checkpoint's folder, its STATE_FILE), or (None, {}) without one. The copy
    outlives the checkpoint's `as_directory`: the model is loaded from it afterwards."""
    if checkpoint is None:
        return None, {}
    folder = tempfile.mkdtemp(prefix="ziggurat-resume-")
    with checkpoint.as_directory() as source:
        shutil.copytree(source, folder, dirs_exist_ok=True)
    return folder, torch.load(Path(folder) / STATE_FILE, weights_only=False)


def load_policy(spec: Any, device: torch.device, start_from: str | None) -> Any:
    """The policy (not yet wrapped for DDP/FSDP: no collective) from `start_from` (a checkpoint or the parent
    version's folder), else the base model with fresh adapters."""
    from trainer.model import build_policy

    config = spec.trainer
    if config.mode == "lora":
        return build_policy(spec.base_model, config, str(device), adapter=start_from)
    return build_policy(start_from or spec.base_model, config, str(device))


def prepare_training(
    model: Any, config: Any, world: int, optimizer_state: dict[str, Any] | None = None
) -> tuple[Any, torch.optim.Optimizer]:
    """The policy wrapped for DDP/FSDP (a collective) and its AdamW, restored from `optimizer_state` if given."""
    from trainer.parallel import restore_optimizer, wrap

    model = wrap(model, config.strategy, world)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=config.weight_decay
    )
    if optimizer_state:
        restore_optimizer(model, optimizer, optimizer_state, config.strategy)
    return model, optimizer


@dataclass
class BatchOutcome:
    """What `run_updates` leaves: the last update's report, and (rank 0, asked for with keep_final) the folder
    of the last checkpoint it wrote, which the caller publishes and then deletes."""

    report: dict[str, Any] | None
    final_folder: str | None


def run_updates(
    model: Any,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    stats: Any,
    spec: Any,
    state: dict[str, Any],
    rank: int,
    world: int,
    reference: Any,
    *,
    extra_report: dict[str, Any] | None = None,
    extra_state: dict[str, Any] | None = None,
    keep_final: bool = False,
) -> BatchOutcome:
    """The batch's remaining updates (from `state["updates_done"]`, 0 for a fresh batch), every one reported
    to Ray Train and checkpointed by rank 0, which also records it on the batch's row. `extra_report` joins
    every report, `extra_state` every checkpoint's STATE_FILE. Every worker must call it (collectives)."""
    import ray.train

    from recorder.queries import set_batch_progress
    from trainer.model import save_policy
    from trainer.parallel import checkpoint_state
    from trainer.step import forward_is_deterministic, grpo_update, micro_batches, on_policy_update

    config = spec.trainer
    about_batch = batch_report(batch_totals(batch, stats))
    scale = batch_loss_scale(batch, config, world)
    # under DDP/FSDP every forward and backward is a collective, so all workers run the same number of them
    micro_steps = int(all_reduce_named({"steps": len(micro_batches(model, batch, config))}, op="max")["steps"])
    # The policy before this batch's updates anchors every update's ratio. A fresh batch's first update runs
    # from exactly those weights, so its own forwards give them; a resumed one takes them from the checkpoint.
    old: torch.Tensor | None = None
    old_by_rank: list[torch.Tensor] = []
    if state.get("old_logprobs") is not None or not forward_is_deterministic(model):
        old, old_by_rank = pre_batch_logprobs(model, batch, config, micro_steps, state, rank, world)
        about_batch.update(sampler_mismatch_report(old, batch, config))

    resumed_from = state.get("updates_done", 0)
    progress = spec.database.create_engine() if rank == 0 else None  # rank 0 records every update's report
    outcome = BatchOutcome(report=state.get("report"), final_folder=None)
    try:
        last_report_s, last_elapsed = 0.0, 1.0
        for update in range(resumed_from, config.updates_per_batch):
            started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            if old is None:
                metrics, old = on_policy_update(
                    model, optimizer, batch, config, scale, reference=reference, micro_steps=micro_steps
                )
                old_by_rank = gather_by_rank(old, world)
                about_batch.update(sampler_mismatch_report(old, batch, config))
            else:
                metrics = grpo_update(
                    model, optimizer, batch, old, config, scale, reference=reference, micro_steps=micro_steps
                )
            elapsed = time.perf_counter() - started
            cpu = cpu_usage(before, elapsed)  # before the reductions below, which are not the update's work
            report: dict[str, Any] = all_reduce_named({k: metrics[k] for k in UPDATE_SUMS})
            report.update(
                update=update + 1,
                resumed_from_update=resumed_from,
                grad_norm=metrics["grad_norm"],  # of the synchronised gradient: the same on every worker
                tokens=scale.tokens,
                tokens_per_s=scale.tokens / max(elapsed, 1e-9),
                elapsed_s=elapsed,
                **all_reduce_named(peak_memory_gb(), op="max"),  # the most any worker held
                **all_reduce_named(cpu, op="max"),  # the largest on any worker
                jemalloc=runs_jemalloc(),
                **about_batch,
                **(extra_report or {}),
            )
            # Reporting cost, measured (DESIGN: ray.train.report blocks ~2 s unless its health-check interval is
            # lowered): the previous update's report time, against that update's compute time.
            report.update(report_s=last_report_s, report_fraction=last_report_s / max(last_elapsed, 1e-9))
            model_state, optimizer_state = checkpoint_state(model, optimizer, config.strategy)  # FSDP: collective
            reported = time.perf_counter()
            outcome.report = report
            if progress is not None:
                set_batch_progress(
                    progress, spec.batch_id, update + 1, config.updates_per_batch, loss=report["loss"], report=report
                )
                folder = tempfile.mkdtemp(prefix="ziggurat-ckpt-")
                final = keep_final and update + 1 == config.updates_per_batch
                try:
                    save_policy(model, folder, {"kind": config.mode, "update": update + 1}, state_dict=model_state)
                    torch.save(
                        {
                            "updates_done": update + 1,
                            "optimizer": optimizer_state,
                            "old_logprobs": old_by_rank,
                            "report": report,
                            **(extra_state or {}),
                        },
                        os.path.join(folder, STATE_FILE),
                    )
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))
                finally:
                    if final:
                        outcome.final_folder = folder
                    else:
                        shutil.rmtree(folder, ignore_errors=True)
            else:
                ray.train.report(report)
            last_report_s, last_elapsed = time.perf_counter() - reported, elapsed
    finally:
        if progress is not None:
            progress.dispose()
    return outcome


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker's job: `loop_config` is `{"spec": TrainJobSpec}` (trainer.spec). Rank 0 records
    every update's report on the batch's row (`stats["updates"]`, read by the controller and the loop's
    tracking) and writes the checkpoint."""
    import ray.train

    from trainer.spec import spec_from
    from trainer.step import reference_logprobs

    spec = spec_from(loop_config)
    config = spec.trainer
    rank, world, device = worker_layout(config)
    engine = spec.database.create_engine()
    try:
        batch, stats = load_tensors(engine, spec, rank, world, device)
    finally:
        engine.dispose()
    # a restart after a failure continues from the last finished update
    resume_dir, state = read_checkpoint(ray.train.get_checkpoint())
    model = load_policy(spec, device, resume_dir or spec.init_from)  # last checkpoint, else the parent version
    model, optimizer = prepare_training(model, config, world, state.get("optimizer"))
    reference = reference_logprobs(model, config, spec.base_model)
    run_updates(model, optimizer, batch, stats, spec, state, rank, world, reference)
