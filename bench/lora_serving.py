"""Serving a LoRA version: as an adapter, or merged into the base weights? Measured on one engine.

    python bench/lora_serving.py [--model smollm2-135m-instruct|tiny|PATH] [--prompts 16] [--tokens 64]

The same random rank-8 adapter (all attention and MLP projections) is served (a) as a vLLM LoRA adapter and
(b) merged into the base weights with peft and swapped in as full weights; (c) the base model is the
reference. Every request decodes exactly `--tokens` tokens. Prints a summary line, then JSON with tokens/s
of each and the time to make each version servable (adapter load vs merge + in-place weight reload).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per variant, alternating")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cluster.models import model_for_benchmark
    from rollout.config import EngineConfig
    from rollout.engine import EngineThread

    base = model_for_benchmark(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    torch.manual_seed(0)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False),
    )
    peft_model.save_pretrained(work / "adapter")
    merge_started = time.perf_counter()
    peft_model.merge_and_unload().save_pretrained(work / "merged")
    merge_s = time.perf_counter() - merge_started

    engine_config = EngineConfig(device="cpu", max_model_len=1024, enable_lora=True, max_lora_rank=8, max_num_seqs=64)
    sampling = {"max_tokens": args.tokens, "min_tokens": args.tokens, "temperature": 1.0}
    with EngineThread(base, engine_config) as engine:
        prompts = [
            engine.chat_prompt([{"role": "user", "content": f"Market {i}: will it rain on Saturday? Buy YES or NO?"}])
            for i in range(args.prompts)
        ]

        def tokens_per_s() -> float:
            started = time.perf_counter()
            generations = engine.generate_many(prompts, **sampling)
            return sum(len(g.completions[0].token_ids) for g in generations) / (time.perf_counter() - started)

        started = time.perf_counter()
        engine.load_adapter(1, str(work / "adapter"))
        adapter_load_s = time.perf_counter() - started
        engine.generate_many(prompts[:2], **sampling)  # warm-up
        rates: dict[str, list[float]] = {"base": [], "adapter": [], "merged": []}
        swap_s = []
        for _ in range(args.rounds):
            engine.activate(0)
            rates["base"].append(tokens_per_s())
            engine.activate(1)
            rates["adapter"].append(tokens_per_s())
            started = time.perf_counter()
            engine.load_weights(2, str(work / "merged"))
            swap_s.append(time.perf_counter() - started)
            rates["merged"].append(tokens_per_s())
            engine.load_weights(0, base)
            engine.load_adapter(1, str(work / "adapter"))  # dropped with the old weights; reload for the next round
    best = {name: max(values) for name, values in rates.items()}
    result = {
        "model": base,
        "prompts": args.prompts,
        "tokens": args.tokens,
        "base_tokens_per_s": round(best["base"], 1),
        "adapter_tokens_per_s": round(best["adapter"], 1),
        "merged_tokens_per_s": round(best["merged"], 1),
        "adapter_vs_base": round(best["adapter"] / best["base"], 3),
        "merged_vs_adapter": round(best["merged"] / best["adapter"], 3),
        "adapter_load_s": round(adapter_load_s, 3),
        "merge_s": round(merge_s, 3),
        "merged_swap_s": round(min(swap_s), 3),
        "faster": "merged" if best["merged"] > best["adapter"] else "adapter",
    }
    print(
        f"LoRA serving: adapter {best['adapter']:.0f} tok/s, merged {best['merged']:.0f} tok/s "
        f"(base {best['base']:.0f}); adapter load {adapter_load_s:.3f} s vs merge {merge_s:.2f} s + swap "
        f"{min(swap_s):.2f} s -> {result['faster']} decodes faster"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
