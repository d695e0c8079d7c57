"""GRPO training-step time: Ziggurat's update against TRL's GRPOTrainer training phase, identical data.

    python bench/trainer.py [--model smollm2-135m-instruct|tiny|PATH] [--groups 4] [--group-size 8]
                            [--prompt-len 256] [--completion-len 64] [--micro 8] [--steps 4]

Both sides get the same base model with the same LoRA (rank 8, alpha 16, all attention and MLP
projections), the same rows (prompt + completion token ids), the same advantages, the same micro-batch
size, clip range (0.2 / 0.28), token-mean ("dapo") aggregation, no KL, AdamW, grad clipping 1.0, float32,
and no gradient checkpointing (TRL turns it on by default; that would only slow TRL down here). One
step = every micro-batch forward + backward, then the optimizer step. TRL's step is its own `compute_loss`
(what `GRPOTrainer.training_step` runs after generation), so generation is excluded on both sides. Steps
alternate between the two (after a warm-up step each) so machine noise hits both alike. Prints a summary
line, then JSON with ziggurat_step_s, trl_step_s, ratio (ziggurat / trl).
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


def make_data(args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    rows = args.groups * args.group_size
    prompts = torch.randint(100, vocab, (args.groups, args.prompt_len), generator=generator)
    rewards = torch.rand(args.groups, args.group_size, generator=generator)
    advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)
    return {
        "prompt_ids": prompts.repeat_interleave(args.group_size, dim=0),
        "completion_ids": torch.randint(100, vocab, (rows, args.completion_len), generator=generator),
        "advantages": advantages.reshape(-1),
    }


class ZigguratSide:
    def __init__(self, base: str, data: dict[str, Any], micro: int, lr: float) -> None:
        import torch

        from trainer.config import LoraConfig, TrainerConfig
        from trainer.data import TrainingTensors
        from trainer.model import build_policy
        from trainer.step import policy_logprobs, single_worker_scale

        self.config = TrainerConfig(
            mode="lora", lora=LoraConfig(rank=8, alpha=16.0, target_modules=TARGETS), learning_rate=lr,
            micro_batch_rows=micro, clip_eps_low=0.2, clip_eps_high=0.28, kl_beta=0.0, grad_clip=1.0,
            aggregation="token_mean",
        )  # fmt: skip
        self.model = build_policy(base, self.config)
        self.model.train()
        input_ids = torch.cat([data["prompt_ids"], data["completion_ids"]], dim=1)
        loss_mask = torch.zeros_like(input_ids, dtype=torch.float32)
        loss_mask[:, data["prompt_ids"].shape[1] :] = 1.0
        self.batch = TrainingTensors(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            loss_mask=loss_mask,
            behaviour_logprobs=torch.zeros_like(loss_mask),
            temperatures=torch.ones_like(loss_mask),  # TRL's side samples and scores at temperature 1
            advantages=data["advantages"].float(),
            model_versions=torch.zeros(input_ids.shape[0], dtype=torch.long),
            group_index=torch.zeros(input_ids.shape[0], dtype=torch.long),  # not used by the update
        )
        self.old = policy_logprobs(self.model, self.batch, micro)  # on-policy: old = behaviour = current policy
        self.batch.behaviour_logprobs = self.old.clone()
        self.scale = single_worker_scale(self.batch, self.config)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)

    def step(self) -> float:
        from trainer.step import grpo_update

        started = time.perf_counter()
        grpo_update(self.model, self.optimizer, self.batch, self.old, self.config, self.scale)
        return time.perf_counter() - started


class TrlSide:
    def __init__(self, base: str, data: dict[str, Any], micro: int, lr: float, group_size: int) -> None:
        import torch
        from datasets import Dataset
        from peft import LoraConfig
        from trl import GRPOConfig, GRPOTrainer

        rows = data["prompt_ids"].shape[0]
        args = GRPOConfig(
            output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=micro,
            gradient_accumulation_steps=rows // micro, num_generations=group_size,
            max_completion_length=data["completion_ids"].shape[1], learning_rate=lr, beta=0.0, epsilon=0.2,
            epsilon_high=0.28, loss_type="dapo", max_grad_norm=1.0, use_cpu=True, bf16=False, report_to="none",
            logging_steps=1000, save_strategy="no", gradient_checkpointing=False,
        )  # fmt: skip
        self.trainer = GRPOTrainer(
            model=base,
            reward_funcs=lambda completions, **_: [0.0] * len(completions),
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["hello"] * rows}),
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"),
        )
        self.trainer.create_optimizer()
        # set by HF Trainer's training loop, which this bench bypasses to keep generation out of the timing
        self.trainer.current_gradient_accumulation_steps = rows // micro
        self.model = self.trainer.model
        self.model.train()
        completion_mask = torch.ones_like(data["completion_ids"])
        total = completion_mask.sum()
        self.micro_batches = [
            {
                "prompt_ids": data["prompt_ids"][i : i + micro],
                "prompt_mask": torch.ones_like(data["prompt_ids"][i : i + micro]),
                "completion_ids": data["completion_ids"][i : i + micro],
                "completion_mask": completion_mask[i : i + micro],
                "advantages": data["advantages"][i : i + micro].float(),
                "num_items_in_batch": total,
            }
            for i in range(0, rows, micro)
        ]

    def step(self) -> float:
        import torch

        trainer = self.trainer
        started = time.perf_counter()
        for inputs in self.micro_batches:
            loss = trainer.compute_loss(self.model, inputs)
            trainer.accelerator.backward(loss)
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument("--micro", type=int, default=8, help="rows per forward/backward")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side (after one warm-up each)")
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig

    from cluster.models import model_for_benchmark

    torch.manual_seed(0)
    base = model_for_benchmark(args.model)
    data = make_data(args, AutoConfig.from_pretrained(base).vocab_size)
    ziggurat = ZigguratSide(base, data, args.micro, args.lr)
    trl = TrlSide(base, data, args.micro, args.lr, args.group_size)
    ziggurat.step(), trl.step()  # warm-up
    times: dict[str, list[float]] = {"ziggurat": [], "trl": []}
    for _ in range(args.steps):
        times["ziggurat"].append(ziggurat.step())
        times["trl"].append(trl.step())
    z, t = statistics.median(times["ziggurat"]), statistics.median(times["trl"])
    result = {
        "model": base,
        "rows": data["prompt_ids"].shape[0],
        "prompt_len": args.prompt_len,
        "completion_len": args.completion_len,
        "micro_batch_rows": args.micro,
        "threads": torch.get_num_threads(),
        "ziggurat_step_s": round(z, 4),
        "trl_step_s": round(t, 4),
        "ratio": round(z / t, 3),
        "ziggurat_steps_s": [round(x, 4) for x in times["ziggurat"]],
        "trl_steps_s": [round(x, 4) for x in times["trl"]],
    }
    print(f"GRPO step: ziggurat {z:.3f} s vs TRL {t:.3f} s -> ratio {z / t:.2f} ({result['rows']} rows)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
