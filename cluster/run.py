"""The main job on a config: `python -m cluster.run --config configs/local.yaml`.

Today it runs the parts of the loop that exist: resolve (and if needed fetch) the base model, start the
vLLM policy engine, and sample a GRPO-style group of completions for a few chat prompts, reporting
tokens, log-probs and throughput as JSON. Recording, training and hot-swapping plug in here as they land.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from cluster.config import DEFAULT_CONFIG, ZigguratConfig, load_config
from cluster.models import resolve_model

log = logging.getLogger("ziggurat.run")

DEMO_QUESTIONS = [
    "What is the capital of France?",
    "A market asks: will it rain in Paris tomorrow? YES costs 0.30. Should you buy YES? Answer briefly.",
]


def run(config: ZigguratConfig, group_size: int = 4, max_tokens: int = 48) -> dict[str, object]:
    from rollout.engine import EngineThread

    model_path = resolve_model(config.model)
    log.info("base model: %s", model_path)
    started = time.perf_counter()
    with EngineThread(model_path, config.engine) as engine:
        ready = time.perf_counter()
        prompts = [engine.chat_prompt([{"role": "user", "content": q}]) for q in DEMO_QUESTIONS]
        # One greedy answer per question, then a sampled group per question, as GRPO would collect.
        greedy = engine.generate_many(prompts, temperature=0.0, max_tokens=max_tokens)
        sample_start = time.perf_counter()
        groups = engine.generate_many(prompts, n=group_size, temperature=1.0, max_tokens=max_tokens)
        sample_s = time.perf_counter() - sample_start
    sampled_tokens = sum(len(c.token_ids) for g in groups for c in g.completions)
    for question, answer in zip(DEMO_QUESTIONS, greedy, strict=True):
        print(f"Q: {question}\nA: {answer.completions[0].text.strip()}\n")
    return {
        "model": model_path,
        "engine_start_s": round(ready - started, 2),
        "groups": len(groups),
        "group_size": group_size,
        "sampled_tokens": sampled_tokens,
        "sampled_tokens_per_s": round(sampled_tokens / sample_s, 1),
        "mean_logprob": round(
            sum(lp for g in groups for c in g.completions for lp in c.logprobs) / max(1, sampled_tokens), 4
        ),
        "model_version": groups[0].model_version,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.run", description=__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    parser.add_argument("--group-size", type=int, default=4, help="samples per prompt (the GRPO group)")
    parser.add_argument("--max-tokens", type=int, default=48, help="completion length limit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run(load_config(args.config), group_size=args.group_size, max_tokens=args.max_tokens)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
