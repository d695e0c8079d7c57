"""Trainer: GRPO over recorded groups. Pure algorithms (`algorithms.py`), batch tensors (`data.py`), one update
(`step.py`) and the Ray Train worker loop (`loop.py`, given a `spec.TrainJobSpec`); the job that claims a batch
and starts the workers is `cluster.train_job`, above this package (it imports nothing from cluster)."""
