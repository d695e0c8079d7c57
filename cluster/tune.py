"""Ray Tune sweep of GRPO settings on short runs: `python -m cluster.tune --config configs/local.yaml`.

Every trial trains a fresh LoRA (or full) policy for a few updates on the same recorded groups and is
scored on groups it never trained on: the held-out surrogate gain, the advantage-weighted change of the
held-out completions' log-probs, sum(A * (logp_new - logp_old)) / tokens. Positive means the update made
better-than-average completions of unseen scenarios more likely, which is what a GRPO step is for. ASHA
stops trials that fall behind early. The data comes from `--batch-id` or from the newest trainable groups
(read only: nothing is claimed). Prints the best settings and their score, then JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from cluster.config import DEFAULT_CONFIG, ZigguratConfig, load_config
from cluster.logs import configure_logging

log = logging.getLogger("ziggurat.tune")

SEARCH_SPACE = {
    "learning_rate": ("loguniform", 1e-5, 1e-3),
    "clip_eps_high": ("choice", [0.2, 0.28, 0.4]),
    "kl_beta": ("choice", [0.0, 0.01, 0.1]),
}


def heldout_gain(model: Any, batch: Any, old: torch.Tensor, config: Any) -> float:
    """sum(A * (logp_new - logp_old)) over held-out completion tokens, per token."""
    from trainer.step import policy_logprobs

    new = policy_logprobs(model, batch, config)
    weighted = (batch.advantages[:, None] * (new - old) * batch.loss_mask).sum()
    return float(weighted / batch.loss_mask.sum().clamp(min=1.0))


def split_groups(groups: list[Any], heldout_every: int = 4) -> tuple[list[Any], list[Any]]:
    """Every `heldout_every`-th group (in scenario order) is held out: deterministic, never trained on."""
    ordered = sorted(groups, key=lambda g: (g.scenario_id, g.group_id))
    heldout = ordered[::heldout_every]
    return [g for g in ordered if g not in heldout], heldout


def trial(params: dict[str, Any], data: dict[str, Any]) -> None:
    """One Tune trial: a few GRPO updates with `params`, reporting the held-out gain after each."""
    from ray import tune

    from trainer.config import TrainerConfig
    from trainer.data import build_rows, collate
    from trainer.model import build_policy
    from trainer.step import grpo_update, policy_logprobs, reference_logprobs, single_worker_scale

    torch.set_num_threads(data["threads"])
    config = TrainerConfig.model_validate({**data["trainer"], **params})
    tensors = []
    for groups in (data["train"], data["heldout"]):
        rows, stats = build_rows(groups, config.advantage, config.advantage_eps)
        tensors.append(collate(rows, pad_id=data["pad_token_id"], stats=stats))
    train, heldout = tensors
    model = build_policy(data["base_model"], config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    old_train = policy_logprobs(model, train, config)
    old_heldout = policy_logprobs(model, heldout, config)
    reference = reference_logprobs(model, config, data["base_model"])
    scale = single_worker_scale(train, config)
    for update in range(1, data["updates"] + 1):
        metrics = grpo_update(model, optimizer, train, old_train, config, scale, reference=reference)
        gain = heldout_gain(model, heldout, old_heldout, config)
        tune.report({"heldout_gain": gain, "update": update, "loss": metrics["loss"], "kl_ref": metrics["kl_ref"]})


def _space(samples: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for name, (kind, *args) in samples.items():
        space[name] = tune.loguniform(*args) if kind == "loguniform" else tune.choice(args[0])
    return space


def sweep(
    config: ZigguratConfig, batch_id: int | None = None, samples: int = 8, updates: int = 4, seed: int = 0
) -> dict[str, Any]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from transformers import AutoConfig

    from cluster.models import resolve_model
    from cluster.ray_runtime import init_ray
    from recorder import queries

    settings = config.trainer
    init_ray(config.ray)
    db = config.database.create_engine()
    try:
        groups = (
            queries.load_batch(db, batch_id, settings.reward_source)
            if batch_id is not None
            else queries.load_trainable_groups(
                db, settings.reward_source, settings.min_group_size, settings.batch_max_groups
            )
        )
    finally:
        db.dispose()
    train, heldout = split_groups(groups)
    if not train or not heldout:
        raise SystemExit(
            f"cluster.tune needs at least 2 trainable groups (found {len(groups)}); record more rollouts first"
        )
    base = resolve_model(config.model)
    model_config = AutoConfig.from_pretrained(base)
    pad = model_config.pad_token_id if model_config.pad_token_id is not None else model_config.eos_token_id
    data = {
        "train": train, "heldout": heldout, "trainer": settings.model_dump(), "base_model": base,
        "pad_token_id": pad or 0, "updates": updates, "threads": 1,
    }  # fmt: skip
    store = Path(config.model.store_dir).expanduser().resolve()
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial, data=data), {"cpu": 1}),
        param_space=_space(SEARCH_SPACE),
        tune_config=tune.TuneConfig(
            metric="heldout_gain",
            mode="max",
            num_samples=samples,
            scheduler=ASHAScheduler(time_attr="update", max_t=updates, grace_period=1, reduction_factor=2),
            search_alg=BasicVariantGenerator(random_state=seed),
        ),
        run_config=tune.RunConfig(name="grpo-sweep", storage_path=str(store / "tune"), verbose=0),
    )
    results = tuner.fit()
    best = results.get_best_result()
    finished = [r for r in results if r.metrics and "heldout_gain" in r.metrics]
    return {
        "best_params": best.config,
        "best_heldout_gain": best.metrics["heldout_gain"],
        "best_updates": best.metrics["update"],
        "trials": len(finished),
        "stopped_early": sum(r.metrics["update"] < updates for r in finished),
        "train_groups": len(train),
        "heldout_groups": len(heldout),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.tune", description=__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--batch-id", type=int, default=None, help="tune on this batch (default: unused groups)")
    parser.add_argument("--samples", type=int, default=8, help="trials")
    parser.add_argument("--updates", type=int, default=4, help="GRPO updates per trial (ASHA's budget)")
    args = parser.parse_args(argv)
    configure_logging()
    result = sweep(load_config(args.config), args.batch_id, args.samples, args.updates)
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result["best_params"].items())
    print(f"best of {result['trials']} trials: {params} (held-out gain {result['best_heldout_gain']:.4g})")
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
