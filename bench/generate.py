"""Generation throughput: Ziggurat's vLLM wrapper against transformers' `generate` on the same prompts.

    python bench/generate.py [--model smollm2-135m-instruct|tiny|PATH] [--prompts 16] [--tokens 64]

Both sides produce exactly `--tokens` tokens per sample (min = max), sampled at temperature 1, for n=1
and n=8 samples per prompt, in the same run. Prints a one-line summary, then JSON as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _prompts(tokenizer: object, count: int) -> list[list[int]]:
    questions = [f"Market {i}: will candidate {i % 5} win? YES costs 0.{10 + i}. What do you do?" for i in range(count)]
    prompts = []
    for question in questions:
        messages = [{"role": "user", "content": question}]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        prompts.append(list(encoded["input_ids"]))
    return prompts


def bench_hf(model_path: str, prompts: list[list[int]], n: int, tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    pad = model.config.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
            max_new_tokens=tokens, min_new_tokens=tokens, num_return_sequences=n, pad_token_id=pad,
        )  # fmt: skip
    elapsed = time.perf_counter() - started
    return (out.shape[0] * (out.shape[1] - width)) / elapsed


def bench_vllm(engine: object, prompts: list[list[int]], n: int, tokens: int) -> float:
    started = time.perf_counter()
    groups = engine.generate_many(prompts, n=n, max_tokens=tokens, min_tokens=tokens, temperature=1.0)
    elapsed = time.perf_counter() - started
    return sum(len(c.token_ids) for g in groups for c in g.completions) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from cluster.models import model_for_benchmark
    from rollout.config import EngineConfig
    from rollout.engine import EngineThread

    model_path = model_for_benchmark(args.model)
    prompts = _prompts(AutoTokenizer.from_pretrained(model_path), args.prompts)

    results: dict[str, object] = {"model": args.model, "prompts": args.prompts, "tokens": args.tokens}
    with EngineThread(model_path, EngineConfig(device="cpu", max_num_seqs=256)) as engine:
        bench_vllm(engine, prompts[:2], 1, 8)  # warm-up
        for n in (1, 8):
            results[f"vllm_tok_per_s_n{n}"] = round(bench_vllm(engine, prompts, n, args.tokens), 1)
    for n in (1, 8):
        results[f"hf_tok_per_s_n{n}"] = round(bench_hf(model_path, prompts, n, args.tokens), 1)
    for n in (1, 8):
        results[f"ratio_n{n}"] = round(results[f"vllm_tok_per_s_n{n}"] / results[f"hf_tok_per_s_n{n}"], 2)
    print(
        f"vLLM vs HF generate on {args.model}: n=1 {results['ratio_n1']}x "
        f"({results['vllm_tok_per_s_n1']} vs {results['hf_tok_per_s_n1']} tok/s), n=8 {results['ratio_n8']}x"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
