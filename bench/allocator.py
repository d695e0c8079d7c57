"""Training-worker memory and speed under each `trainer.allocator`: glibc's malloc against Ray's jemalloc.

    python bench/allocator.py [--model smollm2-135m-instruct|tiny|PATH] [--groups 8] [--steps 3]
                              [--micro-tokens N]

Each allocator runs in a fresh process started with the environment `trainer.allocator` gives a Ray Train
worker (cluster.train_job.allocator_env): the same model, the same LoRA, the same market-shaped rows as
bench/trainer.py (prompts of 415 tokens, two turns, groups of 4) and `--steps` on-policy updates
(trainer.step.on_policy_update), torch on every core. Per update: wall seconds, system seconds, minor page
faults and the process's peak resident memory so far. The first update pays the page faults of a fresh
process; later ones show whether the allocator keeps its memory or hands it back and faults it in again.
`rss_ratio` and `step_ratio` are jemalloc / system (peak RSS, median step after the first). Both sides take
the same first step (`same_loss`). Prints a one-line summary, then JSON as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Run the updates in this process; what each cost."""
    import importlib.util

    import torch
    from transformers import AutoConfig

    from cluster.models import model_for_benchmark
    from trainer.memory import peak_memory_gb, runs_jemalloc

    spec = importlib.util.spec_from_file_location("bench_trainer", ROOT / "bench" / "trainer.py")
    assert spec and spec.loader
    shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shapes)  # bench/trainer.py's rows and Ziggurat side, without TRL
    torch.manual_seed(0)
    base = model_for_benchmark(args.model)
    rows = argparse.Namespace(
        groups=args.groups, group_size=4, prompt_len=415, completion_len=30, observation_len=40, turns=2,
        temperature=0.8, lr=1e-5, micro_tokens=args.micro_tokens,
    )  # fmt: skip
    data = shapes.make_data(rows, AutoConfig.from_pretrained(base).vocab_size)
    side = shapes.ZigguratSide(base, data, rows, "shared_prefix")
    steps, first_loss = [], None
    for _ in range(args.steps):
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        _, metrics = side.step()
        wall, now = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
        first_loss = metrics["loss"] if first_loss is None else first_loss
        steps.append(
            {
                "s": round(wall, 3),
                "system_s": round(now.ru_stime - before.ru_stime, 3),
                "minor_faults": now.ru_minflt - before.ru_minflt,
                "peak_rss_gb": round(peak_memory_gb()["peak_rss_gb"], 3),
            }
        )
    threads = torch.get_num_threads()
    return {"jemalloc": bool(runs_jemalloc()), "threads": threads, "first_loss": first_loss, "steps": steps}


def run_side(allocator: str, argv: list[str]) -> dict[str, Any]:
    from cluster.train_job import allocator_env

    env = {**os.environ, **allocator_env(allocator)}
    done = subprocess.run(
        [sys.executable, __file__, "--child", *argv], env=env, capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {allocator} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-tokens", type=int, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    argv = [a for a in sys.argv[1:] if a != "--child"]
    sides = {allocator: run_side(allocator, argv) for allocator in ("system", "jemalloc")}
    peak = {name: max(s["peak_rss_gb"] for s in side["steps"]) for name, side in sides.items()}
    step = {name: statistics.median(s["s"] for s in side["steps"][1:] or side["steps"]) for name, side in sides.items()}
    losses = [side["first_loss"] for side in sides.values()]
    result = {
        "model": args.model,
        "groups": args.groups,
        "sides": sides,
        "same_loss": abs(losses[0] - losses[1]) <= 1e-6 * max(abs(losses[0]), 1e-12),
        "peak_rss_gb": peak,
        "step_s": step,
        "rss_ratio": round(peak["jemalloc"] / peak["system"], 3),
        "step_ratio": round(step["jemalloc"] / step["system"], 3),
    }
    print(
        f"training-worker allocator: peak RSS {peak['system']:.2f} GB (system) vs {peak['jemalloc']:.2f} GB "
        f"(jemalloc), ratio {result['rss_ratio']:.2f}; step {step['system']:.1f} s vs {step['jemalloc']:.1f} s, "
        f"ratio {result['step_ratio']:.2f}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
