"""The per-worker Ray Train loop: read this worker's share of a batch, run GRPO updates, report, checkpoint.

Runs inside `TorchTrainer` workers (DDP over gloo on CPUs, NCCL on GPUs). Rank 0 writes a checkpoint
(the adapter or full weights, plus optimizer state and the update count) after every update, so a run
restarted by `FailureConfig` resumes from the last finished update instead of starting over.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

STATE_FILE = "trainer_state.pt"


def collective_device() -> torch.device:
    """Where the process group's collectives run: NCCL only moves CUDA tensors, gloo CPU ones."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Sum (or max) numbers over every worker; a no-op in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def batch_loss_scale(batch: Any, config: Any, world: int) -> Any:
    """The batch's sizes summed over workers (the longest row: max), as the LossScale every worker uses."""
    from trainer.step import local_sizes, loss_scale

    tokens, sequences, longest = local_sizes(batch)
    tokens, sequences = all_reduce([tokens, sequences])
    (longest,) = all_reduce([longest], op="max")
    return loss_scale(config, tokens, sequences, longest, world)


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
    old = policy_logprobs(model, batch, config.micro_batch_rows, steps=micro_steps)
    gathered: list[Any] = [old.cpu()]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, old.cpu())
    return old, gathered


def _start_wandb(loop_config: dict[str, Any], config: Any) -> Any:
    """A W&B run on rank 0: online when WANDB_API_KEY is set, offline otherwise (WANDB_MODE overrides)."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return wandb.init(
        project=loop_config.get("wandb_project", "ziggurat"),
        name=f"v{loop_config.get('target_version')}-batch{loop_config['batch_id']}",
        dir=loop_config.get("wandb_dir"),
        mode=mode,
        config={"trainer": loop_config["trainer"], "batch_id": loop_config["batch_id"]},
        reinit="finish_previous",
    )


def _record_progress(loop_config: dict[str, Any], done: int, total: int, report: dict[str, Any]) -> None:
    """Real progress for the controller: updates done / total and the latest loss, on the batch's row."""
    from recorder.config import DatabaseConfig
    from recorder.queries import set_batch_progress

    engine = DatabaseConfig.model_validate(loop_config["database"]).create_engine()
    try:
        set_batch_progress(engine, loop_config["batch_id"], done, total, loss=report["loss"])
    finally:
        engine.dispose()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from recorder.config import DatabaseConfig
    from recorder.queries import load_batch
    from trainer.config import TrainerConfig
    from trainer.data import build_rows, collate, shard_groups
    from trainer.model import build_policy, save_policy
    from trainer.parallel import checkpoint_state, restore_optimizer, wrap
    from trainer.step import grpo_update, reference_logprobs

    config = TrainerConfig.model_validate(loop_config["trainer"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    threads = config.threads_per_worker or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")

    engine = DatabaseConfig.model_validate(loop_config["database"]).create_engine()
    try:
        groups = load_batch(engine, loop_config["batch_id"], loop_config.get("reward_source", "env"))
    finally:
        engine.dispose()
    rows, stats = build_rows(shard_groups(groups, rank, world), config.advantage, config.advantage_eps)
    batch = collate(rows, pad_id=int(loop_config.get("pad_token_id", 0)), stats=stats)
    batch_tensors = ("input_ids", "attention_mask", "loss_mask", "behaviour_logprobs", "temperatures", "advantages")
    for name in batch_tensors:
        setattr(batch, name, getattr(batch, name).to(device))

    resume = ray.train.get_checkpoint()
    resume_dir: str | None = None
    state: dict[str, Any] = {}
    if resume is not None:  # a restart after a failure: continue from the last finished update
        resume_dir = tempfile.mkdtemp(prefix="ziggurat-resume-")
        with resume.as_directory() as folder:
            shutil.copytree(folder, resume_dir, dirs_exist_ok=True)
        state = torch.load(Path(resume_dir) / STATE_FILE, weights_only=False)
    start_from = resume_dir or loop_config.get("init_from")  # last checkpoint, else the parent version
    if config.mode == "lora":
        model = build_policy(loop_config["base_model"], config, str(device), adapter=start_from)
    else:
        model = build_policy(start_from or loop_config["base_model"], config, str(device))
    model = wrap(model, config.strategy, world)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=config.weight_decay
    )
    if state.get("optimizer"):
        restore_optimizer(model, optimizer, state["optimizer"], config.strategy)

    n = stats.trajectories
    totals = all_reduce(
        [
            float(batch.loss_mask.sum()),
            stats.groups_without_signal,
            stats.groups_stale,
            stats.rows,
            n,
            stats.reward_mean * n,
            (stats.reward_std**2 + stats.reward_mean**2) * n,
            float(batch.advantages.abs().sum()),
        ]
    )
    reward_mean = totals[5] / max(totals[4], 1.0)
    reward_std = max(totals[6] / max(totals[4], 1.0) - reward_mean**2, 0.0) ** 0.5
    scale = batch_loss_scale(batch, config, world)
    global_tokens = scale.tokens
    rows_here = batch.input_ids.shape[0]
    (micro_steps,) = all_reduce([-(-rows_here // config.micro_batch_rows)], op="max")
    # the policy before this batch's updates; under FSDP every forward is a collective, so all workers run
    # the same number of them
    old, old_by_rank = pre_batch_logprobs(model, batch, config, int(micro_steps), state, rank, world)

    reference = reference_logprobs(model, config, loop_config["base_model"])
    run = _start_wandb(loop_config, config) if rank == 0 else None
    last_report_s, last_elapsed = 0.0, 1.0
    for update in range(state.get("updates_done", 0), config.updates_per_batch):
        started = time.perf_counter()
        metrics = grpo_update(
            model, optimizer, batch, old, config, scale, reference=reference, micro_steps=int(micro_steps)
        )
        elapsed = time.perf_counter() - started
        summed = all_reduce([metrics[k] for k in ("loss", "clip_fraction", "approx_kl", "kl_ref", "entropy")])
        report = dict(zip(("loss", "clip_fraction", "approx_kl", "kl_ref", "entropy"), summed, strict=True))
        report.update(
            update=update + 1,
            resumed_from_update=state.get("updates_done", 0),
            grad_norm=metrics["grad_norm"],
            tokens=global_tokens,
            tokens_per_s=global_tokens / max(elapsed, 1e-9),
            rows=totals[3],
            groups_without_signal=totals[1],
            groups_stale=totals[2],
            trajectories=totals[4],
            reward_mean=reward_mean,
            reward_std=reward_std,
            advantage_abs_mean=totals[7] / max(totals[3], 1.0),
        )
        if run is not None:
            run.log(report, step=update + 1)
            report["wandb_run_id"] = run.id
        # Reporting cost, measured (DESIGN: ray.train.report blocks ~2 s unless its health-check interval is
        # lowered): the previous update's report time, against that update's compute time.
        report.update(report_s=last_report_s, report_fraction=last_report_s / max(last_elapsed, 1e-9))
        model_state, optimizer_state = checkpoint_state(model, optimizer, config.strategy)  # collective under FSDP
        reported = time.perf_counter()
        if rank == 0:
            _record_progress(loop_config, update + 1, config.updates_per_batch, report)
            with tempfile.TemporaryDirectory(prefix="ziggurat-ckpt-") as folder:
                save_policy(model, folder, {"kind": config.mode, "update": update + 1}, state_dict=model_state)
                torch.save(
                    {"updates_done": update + 1, "optimizer": optimizer_state, "old_logprobs": old_by_rank},
                    os.path.join(folder, STATE_FILE),
                )
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(report)
        last_report_s, last_elapsed = time.perf_counter() - reported, elapsed
    if run is not None:
        run.finish()
