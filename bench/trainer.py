"""GRPO training-step time: Ziggurat's update against TRL's GRPOTrainer training phase, identical data.

    python bench/trainer.py [--model smollm2-135m-instruct|tiny|PATH] [--groups 4] [--group-size 4]
                            [--prompt-len 415] [--completion-len 30] [--observation-len 40] [--turns 2]
                            [--steps 2] [--compare-padded]

TRL is not a dependency of Ziggurat: install it with `.venv/bin/pip install -e '.[bench]'`.

The rows are shaped like the market loop's: GRPO groups whose samples share one prompt, each sample a
two-turn episode (completion, environment observation, completion; only completions are trained on). Both
sides get the same base model with the same LoRA weights (Ziggurat's initial adapters are copied into TRL's
model), the same rows and advantages, clip range (0.2 / 0.28), token-mean ("dapo") aggregation, sampling
temperature, no KL, AdamW, grad clipping 1.0, float32, and no gradient checkpointing. TRL sees each episode as
a prompt and one completion whose observation tokens its `tool_mask` leaves out of the loss. One step = every
micro-batch's forward and backward, then the optimizer step, on-policy on both sides (the ratio's old
log-probs are the step's own forward, as TRL does with one iteration per generation and Ziggurat does on a
batch's first update): Ziggurat's `on_policy_update` against TRL's `compute_loss` (what
`GRPOTrainer.training_step` runs after generation), so generation is excluded on both sides.

Before timing, the first step's loss and gradient norm of the two sides must agree (rtol 1e-4): the JSON's
`same_loss` says whether they did, so the ratio compares equal work. Steps alternate between the sides (after
that first step each) so machine noise hits both alike. Prints a summary line, then JSON with
ziggurat_step_s, trl_step_s and ratio (ziggurat / trl).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INSTALL_HINT = "bench/trainer.py compares against TRL, which is not installed: .venv/bin/pip install -e '.[bench]'"


def make_data(args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """Market-shaped episodes: per group one prompt; per sample `turns` completions of 1/2 to all of
    `completion_len` tokens (replies that stop early, as market replies do) with an observation between
    consecutive ones. `completion_ids` is everything after the prompt, right-padded; `completion_mask` marks
    its real tokens and `policy_mask` the sampled ones among them."""
    import torch

    generator = torch.Generator().manual_seed(0)
    rows = args.groups * args.group_size
    prompts = torch.randint(100, vocab, (args.groups, args.prompt_len), generator=generator)
    episodes, policy = [], []
    for _ in range(rows):
        pieces, mask = [], []
        for turn in range(args.turns):
            if turn:
                pieces.append(torch.randint(100, vocab, (args.observation_len,), generator=generator))
                mask.append(torch.zeros(args.observation_len))
            length = int(
                torch.randint(max(1, args.completion_len // 2), args.completion_len + 1, (1,), generator=generator)
            )
            pieces.append(torch.randint(100, vocab, (length,), generator=generator))
            mask.append(torch.ones(length))
        episodes.append(torch.cat(pieces))
        policy.append(torch.cat(mask))
    width = max(len(e) for e in episodes)
    completion_ids = torch.zeros((rows, width), dtype=torch.long)
    completion_mask = torch.zeros((rows, width), dtype=torch.long)
    policy_mask = torch.zeros((rows, width))
    for i, (episode, sampled) in enumerate(zip(episodes, policy, strict=True)):
        completion_ids[i, : len(episode)], completion_mask[i, : len(episode)] = episode, 1
        policy_mask[i, : len(episode)] = sampled
    rewards = torch.rand(args.groups, args.group_size, generator=generator)
    advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)
    return {
        "prompt_ids": prompts.repeat_interleave(args.group_size, dim=0),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "policy_mask": policy_mask,
        "advantages": advantages.reshape(-1),
    }


class ZigguratSide:
    def __init__(self, base: str, data: dict[str, Any], args: argparse.Namespace, packing: str) -> None:
        import torch

        from trainer.config import LoraConfig, TrainerConfig
        from trainer.data import TrainingTensors
        from trainer.model import build_policy
        from trainer.step import single_worker_scale

        self.config = TrainerConfig(
            mode="lora", lora=LoraConfig(rank=8, alpha=16.0, target_modules=TARGETS), learning_rate=args.lr,
            packing=packing, micro_batch_tokens=args.micro_tokens or TrainerConfig().micro_batch_tokens,
            clip_eps_low=0.2, clip_eps_high=0.28,
            kl_beta=0.0, grad_clip=1.0, aggregation="token_mean", tis_cap=None,
        )  # fmt: skip
        self.model = build_policy(base, self.config)
        input_ids = torch.cat([data["prompt_ids"], data["completion_ids"]], dim=1)
        loss_mask = torch.zeros_like(input_ids, dtype=torch.float32)
        loss_mask[:, data["prompt_ids"].shape[1] :] = data["policy_mask"]
        self.batch = TrainingTensors(
            input_ids=input_ids,
            attention_mask=torch.cat([torch.ones_like(data["prompt_ids"]), data["completion_mask"]], dim=1),
            loss_mask=loss_mask,
            behaviour_logprobs=torch.zeros_like(loss_mask),  # unused: no truncated importance weight (tis_cap None)
            temperatures=torch.where(loss_mask > 0, args.temperature, 1.0),
            advantages=data["advantages"].float(),
            model_versions=torch.zeros(input_ids.shape[0], dtype=torch.long),
            group_index=torch.arange(input_ids.shape[0]) // args.group_size,
        )
        self.scale = single_worker_scale(self.batch, self.config)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=args.lr)

    def step(self) -> tuple[float, dict[str, float]]:
        from trainer.step import on_policy_update

        started = time.perf_counter()
        metrics, _ = on_policy_update(self.model, self.optimizer, self.batch, self.config, self.scale)
        return time.perf_counter() - started, metrics


class TrlSide:
    def __init__(self, base: str, data: dict[str, Any], args: argparse.Namespace, adapters: dict[str, Any]) -> None:
        import torch
        from datasets import Dataset
        from peft import LoraConfig
        from trl import GRPOConfig, GRPOTrainer

        rows, micro = data["prompt_ids"].shape[0], args.group_size  # one group per forward
        config = GRPOConfig(
            output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=micro,
            gradient_accumulation_steps=rows // micro, num_generations=args.group_size,
            max_completion_length=data["completion_ids"].shape[1], learning_rate=args.lr, beta=0.0, epsilon=0.2,
            epsilon_high=0.28, loss_type="dapo", max_grad_norm=1.0, use_cpu=True, bf16=False, report_to="none",
            logging_steps=1000, save_strategy="no", gradient_checkpointing=False, temperature=args.temperature,
            model_init_kwargs={"dtype": torch.float32},
        )  # fmt: skip
        self.trainer = GRPOTrainer(
            model=base,
            reward_funcs=lambda completions, **_: [0.0] * len(completions),
            args=config,
            train_dataset=Dataset.from_dict({"prompt": ["hello"] * rows}),
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"),
        )
        self.trainer.create_optimizer()
        # set by HF Trainer's training loop, which this bench bypasses to keep generation out of the timing
        self.trainer.current_gradient_accumulation_steps = rows // micro
        self.model = self.trainer.model
        mine = dict(self.model.named_parameters())
        missing = sorted(set(adapters) - set(mine))
        if missing:
            raise RuntimeError(f"TRL's model lacks Ziggurat's adapter weights {missing[:3]}: the sides would differ")
        with torch.no_grad():
            for name, weight in adapters.items():
                mine[name].copy_(weight)
        self.model.train()
        completion_mask = data["completion_mask"]
        total = data["policy_mask"].sum()
        self.micro_batches = [
            {
                "prompt_ids": data["prompt_ids"][i : i + micro],
                "prompt_mask": torch.ones_like(data["prompt_ids"][i : i + micro]),
                "completion_ids": data["completion_ids"][i : i + micro],
                "completion_mask": completion_mask[i : i + micro],
                "tool_mask": data["policy_mask"][i : i + micro],  # observations: context, not trained on
                "advantages": data["advantages"][i : i + micro].float(),
                "num_items_in_batch": total,
            }
            for i in range(0, rows, micro)
        ]

    def step(self) -> tuple[float, dict[str, float]]:
        import torch

        trainer = self.trainer
        started = time.perf_counter()
        loss_total = 0.0
        for inputs in self.micro_batches:
            loss = trainer.compute_loss(self.model, inputs)
            trainer.accelerator.backward(loss)
            loss_total += float(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started, {"loss": loss_total, "grad_norm": float(norm)}


def agree(a: float, b: float, rtol: float = 1e-4) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=415)
    parser.add_argument("--completion-len", type=int, default=30)
    parser.add_argument("--observation-len", type=int, default=40)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument(
        "--micro-tokens", type=int, default=None, help="Ziggurat's trainer.micro_batch_tokens (default: its default)"
    )
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side (after the first, checked one)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--compare-padded", action="store_true", help="also time Ziggurat's plain padded path")
    args = parser.parse_args()
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        print(INSTALL_HINT)
        sys.exit(2)

    import torch
    from transformers import AutoConfig

    from cluster.models import model_for_benchmark

    torch.manual_seed(0)
    base = model_for_benchmark(args.model)
    data = make_data(args, AutoConfig.from_pretrained(base).vocab_size)
    sides: dict[str, Any] = {"ziggurat": ZigguratSide(base, data, args, "shared_prefix")}
    adapters = {n: p.detach().clone() for n, p in sides["ziggurat"].model.named_parameters() if p.requires_grad}
    if args.compare_padded:
        sides["ziggurat_padded"] = ZigguratSide(base, data, args, "padded")
    sides["trl"] = TrlSide(base, data, args, adapters)
    first = {name: side.step() for name, side in sides.items()}  # also the warm-up
    loss = {name: metrics["loss"] for name, (_, metrics) in first.items()}
    grad_norm = {name: metrics["grad_norm"] for name, (_, metrics) in first.items()}
    same_loss = all(agree(loss[n], loss["trl"]) and agree(grad_norm[n], grad_norm["trl"]) for n in sides)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.steps):
        for name, side in sides.items():
            times[name].append(side.step()[0])
    median = {name: statistics.median(values) for name, values in times.items()}
    z, t = median["ziggurat"], median["trl"]
    result = {
        "model": base,
        "rows": data["prompt_ids"].shape[0],
        "groups": args.groups,
        "group_size": args.group_size,
        "prompt_len": args.prompt_len,
        "completion_len": args.completion_len,
        "observation_len": args.observation_len,
        "turns": args.turns,
        "threads": torch.get_num_threads(),
        "micro_batch_tokens": sides["ziggurat"].config.micro_batch_tokens,
        "same_loss": same_loss,
        "first_step_loss": loss,
        "first_step_grad_norm": grad_norm,
        "ziggurat_step_s": round(z, 4),
        "trl_step_s": round(t, 4),
        "ratio": round(z / t, 3),
        "steps_s": {name: [round(x, 4) for x in values] for name, values in times.items()},
    }
    if args.compare_padded:
        result["ziggurat_padded_step_s"] = round(median["ziggurat_padded"], 4)
        result["padded_ratio"] = round(median["ziggurat_padded"] / t, 3)
    print(
        f"GRPO step: ziggurat {z:.3f} s vs TRL {t:.3f} s -> ratio {z / t:.2f} ({result['rows']} rows, "
        f"same loss: {same_loss})"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
