"""Rollout throughput: raw vLLM generation against the full rollout path, on the same prompts, in one run.

    python bench/rollout.py [--model smollm2-135m-instruct|tiny|PATH] [--groups 8] [--group-size 8]

(a) raw: the policy engine in this process generates every episode's prompt (one request per episode, all
    at once). (b) pipeline: a rollout actor plays the same episodes (arithmetic task, one turn) in GRPO groups
    and streams every step and call through the recorder actor into SQLite. Both produce exactly `--tokens`
    tokens per episode (min = max), so tokens/s compare like with like. Prints a summary line, then JSON.
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
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()

    import ray

    from cluster.config import RayConfig
    from cluster.models import model_for_benchmark
    from cluster.ray_runtime import init_ray
    from recorder.actor import start_recorder, stop_recorder
    from recorder.config import DatabaseConfig, RecorderConfig
    from recorder.migrate import upgrade
    from rollout.actor import start_rollout_worker
    from rollout.config import EngineConfig
    from rollout.engine import EngineThread
    from rollout.envs import make_env

    model_path = model_for_benchmark(args.model)
    engine_config = EngineConfig(device="cpu", max_model_len=1024, max_num_seqs=256)
    seeds = list(range(args.groups))
    sampling = {"max_tokens": args.tokens, "min_tokens": args.tokens, "temperature": 1.0}

    # (a) raw engine, same prompts as the environment produces
    with EngineThread(model_path, engine_config) as engine:
        prompts = []
        for seed in seeds:
            env = make_env("arithmetic")
            question = env.reset(seed)
            messages = [{"role": "system", "content": env.system_prompt()}, {"role": "user", "content": question}]
            prompts += [engine.chat_prompt(messages)] * args.group_size
        engine.generate_many(prompts[:4], **sampling)  # warm-up
        started = time.perf_counter()
        generations = engine.generate_many(prompts, **sampling)
        raw_s = time.perf_counter() - started
    raw_tokens = sum(len(c.token_ids) for g in generations for c in g.completions)

    # (b) the full path: rollout actor + environment + recorder on SQLite
    init_ray(RayConfig(address="local", num_cpus=2, include_dashboard=False))
    url = f"sqlite:///{tempfile.mkdtemp(prefix='bench-rollout-')}/rollout.db"
    upgrade(url)
    settings = RecorderConfig(actor_name="bench-rollout-recorder")
    recorder = start_recorder(DatabaseConfig(url=url), settings)
    worker = start_rollout_worker(model_path, engine_config, settings)
    group = {"group_size": args.group_size, "max_turns": 1, **sampling}
    ray.get(worker.run_group.remote("arithmetic", seed=10_000, **{**group, "group_size": 4}), timeout=600)  # warm-up
    started = time.perf_counter()
    summaries = ray.get([worker.run_group.remote("arithmetic", seed=s, **group) for s in seeds], timeout=1800)
    pipeline_s = time.perf_counter() - started
    pipeline_tokens = sum(s["completion_tokens"] for s in summaries)
    recorded = sum(s["recorded"] for s in summaries)
    ray.get(worker.close.remote(), timeout=120)
    stop_recorder(recorder)
    ray.shutdown()

    result = {
        "model": args.model,
        "episodes": args.groups * args.group_size,
        "tokens_per_episode": args.tokens,
        "raw_tokens_per_s": round(raw_tokens / raw_s, 1),
        "pipeline_tokens_per_s": round(pipeline_tokens / pipeline_s, 1),
        "ratio": round((pipeline_tokens / pipeline_s) / (raw_tokens / raw_s), 3),
        "recorded_records": recorded,
        "mean_reward": round(sum(r for s in summaries for r in s["rewards"]) / (args.groups * args.group_size), 3),
    }
    print(
        f"rollout on {args.model}: pipeline {result['pipeline_tokens_per_s']} tok/s vs raw vLLM "
        f"{result['raw_tokens_per_s']} tok/s -> ratio {result['ratio']}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
