"""Trainer: GRPO over recorded groups. Pure algorithms (`algorithms.py`) and batch tensors (`data.py`) exist;
the Ray Train loop, checkpoints and the job entrypoint come with the trainer issue."""
