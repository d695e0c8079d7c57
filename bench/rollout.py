"""Rollout throughput: raw vLLM generation against the full rollout path, on the same prompts, in one run.

    python bench/rollout.py [--model smollm2-135m-instruct|tiny|PATH] [--groups 8] [--group-size 8] [--rounds 3]

(a) raw: the policy engine in this process generates every episode's prompt (one request per episode, all
    at once). (b) pipeline: a rollout actor plays the same episodes (arithmetic task, one turn) in GRPO groups
    and streams every step and call through the recorder actor into SQLite. Both produce exactly `--tokens`
    tokens per episode (min = max), so tokens/s compare like with like. Both engines stay up and the rounds
    alternate (raw, pipeline, raw, ...), so the machine's noise hits both alike; the ratio is the median of
    the rounds' ratios.
    Each pipeline round also counts the CPU seconds of every process on the machine, to show where the time
    outside the engine goes (`cpu_s_outside_engine`: the rollout actor, the recorder, Ray's own processes).
    Prints a summary line, then JSON.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """Every process on the machine: pid -> (its command line, shortened; user + system CPU seconds so far)."""
    import psutil

    seen = {}
    for process in psutil.process_iter(["cmdline", "name"]):
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        name = " ".join(process.info["cmdline"] or [process.info["name"] or "?"])[:80]
        seen[process.pid] = (name, times.user + times.system)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternating raw and pipeline rounds (median)")
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

    # (a) raw engine, same prompts as the environment produces; it stays up (idle) while the pipeline plays
    with EngineThread(model_path, engine_config) as raw_engine:
        prompts = []
        for seed in seeds:
            env = make_env("arithmetic")
            question = env.reset(seed)
            messages = [{"role": "system", "content": env.system_prompt()}, {"role": "user", "content": question}]
            prompts += [raw_engine.chat_prompt(messages)] * args.group_size
        raw_engine.generate_many(prompts[:4], **sampling)  # warm-up

        # (b) the full path: rollout actor + environment + recorder on SQLite
        init_ray(RayConfig(address="local", num_cpus=2, include_dashboard=False))
        url = f"sqlite:///{tempfile.mkdtemp(prefix='bench-rollout-')}/rollout.db"
        upgrade(url)
        settings = RecorderConfig(actor_name="bench-rollout-recorder")
        recorder = start_recorder(DatabaseConfig(url=url), settings)
        worker = start_rollout_worker(model_path, engine_config, settings)
        group = {"group_size": args.group_size, "max_turns": 1, **sampling}
        warm_up = worker.run_group.remote("arithmetic", seed=10_000, **{**group, "group_size": 4})
        ray.get(warm_up, timeout=600)

        raw_rates: list[float] = []
        pipeline_rates: list[float] = []
        outside: list[float] = []
        by_process: dict[str, float] = {}
        recorded, rewards = 0, []
        for _ in range(args.rounds):
            started = time.perf_counter()
            generations = raw_engine.generate_many(prompts, **sampling)
            raw_tokens = sum(len(c.token_ids) for g in generations for c in g.completions)
            raw_rates.append(raw_tokens / (time.perf_counter() - started))
            before = cpu_seconds()
            started = time.perf_counter()
            summaries = ray.get([worker.run_group.remote("arithmetic", seed=s, **group) for s in seeds], timeout=1800)
            pipeline_rates.append(sum(s["completion_tokens"] for s in summaries) / (time.perf_counter() - started))
            used = {pid: (name, cpu - before.get(pid, (name, 0.0))[1]) for pid, (name, cpu) in cpu_seconds().items()}
            # vLLM's own processes are the engines (the raw one idle); everything else is the path around them
            outside.append(sum(cpu for name, cpu in used.values() if not name.startswith("VLLM")))
            for name, cpu in used.values():
                key = name.split()[0] if name.startswith(("ray::", "VLLM")) else name.split()[0].rsplit("/", 1)[-1]
                by_process[key] = by_process.get(key, 0.0) + cpu / args.rounds
            recorded += sum(s["recorded"] for s in summaries)
            rewards += [r for s in summaries for r in s["rewards"]]
        ray.get(worker.close.remote(), timeout=120)
        stop_recorder(recorder)
        ray.shutdown()

    raw_rate, pipeline_rate = statistics.median(raw_rates), statistics.median(pipeline_rates)
    ratios = [p / r for p, r in zip(pipeline_rates, raw_rates, strict=True)]
    busiest = sorted(by_process.items(), key=lambda item: -item[1])[:8]
    result = {
        "model": args.model,
        "episodes": args.groups * args.group_size,
        "tokens_per_episode": args.tokens,
        "rounds": args.rounds,
        "raw_tokens_per_s": round(raw_rate, 1),
        "pipeline_tokens_per_s": round(pipeline_rate, 1),
        "ratio": round(statistics.median(ratios), 3),
        "round_ratios": [round(r, 3) for r in ratios],
        "cpu_s_outside_engine": round(statistics.median(outside), 2),
        "cpu_s_per_round_by_process": {name: round(cpu, 2) for name, cpu in busiest},
        "recorded_records": recorded,
        "mean_reward": round(sum(rewards) / len(rewards), 3),
    }
    print(
        f"rollout on {args.model}: pipeline {result['pipeline_tokens_per_s']} tok/s vs raw vLLM "
        f"{result['raw_tokens_per_s']} tok/s -> ratio {result['ratio']}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
