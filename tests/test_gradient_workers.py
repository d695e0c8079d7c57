"""The gradient of one batch does not depend on how many Ray Train workers split it (DDP averages gradients,
so every normaliser must count the whole batch): 1 worker vs 2 workers, every aggregation mode, float64.

The 1-worker reference runs the plain padded path in the test's own process, and the 2 Ray Train workers the
packed shared-prefix path, under DDP and under FSDP2, so the comparison also checks packing (each group's
prompt computed once) against an independent computation."""

from __future__ import annotations

import pytest
import torch

from tests.worker_gradients import AGGREGATIONS, batch_gradients, gradients_per_worker

pytestmark = pytest.mark.slow


def _gradients(
    workers: int, model: str, out: str, storage: str, packing: str, strategy: str = "ddp"
) -> dict[str, torch.Tensor]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        gradients_per_worker,
        train_loop_config={"model": model, "out": out, "packing": packing, "strategy": strategy},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
        run_config=RunConfig(name=f"gradients-{workers}-{strategy}", storage_path=storage),
    )
    trainer.fit()
    return torch.load(out)


def test_one_and_two_workers_give_the_same_gradient_in_every_aggregation_mode(ray_session, tiny_model_dir, tmp_path):
    one = batch_gradients(tiny_model_dir, "padded", "ddp", rank=0, world=1)  # in this process, no collective
    two = _gradients(2, tiny_model_dir, str(tmp_path / "two.pt"), str(tmp_path / "runs"), "shared_prefix")
    sharded = _gradients(2, tiny_model_dir, str(tmp_path / "fsdp.pt"), str(tmp_path / "runs"), "shared_prefix", "fsdp")
    for mode, (reference, split) in [(m, (one[m], two[m])) for m in AGGREGATIONS] + [
        (f"fsdp {m}", (one[m], sharded[m])) for m in AGGREGATIONS
    ]:
        assert reference.abs().max() > 0, f"{mode}: no gradient at all"
        scale = reference.abs().max()
        # atol 1e-7, not 1e-12: Llama's RMSNorm computes in float32 even in a float64 model, and a shared prefix
        # sums its rows' gradients before that norm's backward where the padded path sums after it. A normaliser
        # that counted one worker's share instead of the batch would be off by tens of percent.
        assert torch.allclose(split, reference, rtol=1e-5, atol=1e-7 * scale), (
            f"{mode}: 2-worker gradient / 1-worker gradient = {float(split.norm() / reference.norm()):.6f}, "
            f"largest difference {float((split - reference).abs().max() / scale):.2e} of the largest entry"
        )
