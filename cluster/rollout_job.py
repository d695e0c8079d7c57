"""Run N GRPO groups of rollouts on a config and print a summary: `python -m cluster.rollout_job --env market`.

Starts (or joins) Ray and the recorder, starts one rollout actor on the config's model, plays the groups
(one per seed, concurrently), records everything, and prints rewards and tokens/s.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean, pstdev

import ray

from cluster.config import DEFAULT_CONFIG, ZigguratConfig, load_config
from cluster.logs import configure_logging


def run_rollouts(
    config: ZigguratConfig, env: str, groups: int, group_size: int, max_turns: int, max_tokens: int, first_seed: int = 0
) -> dict[str, object]:
    from cluster.models import resolve_model
    from cluster.ray_runtime import init_ray
    from recorder.actor import start_recorder, stop_recorder
    from recorder.migrate import upgrade
    from rollout.actor import start_rollout_worker

    init_ray(config.ray)
    if config.database.auto_upgrade:
        upgrade(config.database.resolved_url())
    recorder = start_recorder(config.database, config.recorder)
    worker = start_rollout_worker(resolve_model(config.model), config.engine, config.recorder)
    try:
        settings = {"group_size": group_size, "max_turns": max_turns, "max_tokens": max_tokens}
        refs = [worker.run_group.remote(env, seed=first_seed + g, **settings) for g in range(groups)]
        summaries = ray.get(refs, timeout=config.engine.start_timeout_s + 600 * groups)
    finally:
        ray.get(worker.close.remote(), timeout=120)
        ray.kill(worker)
        stop_recorder(recorder)
    rewards = [r for s in summaries for r in s["rewards"]]
    return {
        "env": env,
        "groups": groups,
        "group_size": group_size,
        "reward_mean": round(mean(rewards), 4),
        "reward_std": round(pstdev(rewards), 4),
        "groups_with_signal": sum(len(set(s["rewards"])) > 1 for s in summaries),
        "tokens_per_s_per_group": round(mean(s["tokens_per_s"] for s in summaries), 1),
        "completion_tokens": sum(s["completion_tokens"] for s in summaries),
        "recorded": sum(s["recorded"] for s in summaries),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.rollout_job", description=__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--env", default="market", help="a registered environment (arithmetic, market)")
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--first-seed", type=int, default=0)
    args = parser.parse_args(argv)
    configure_logging()
    summary = run_rollouts(
        load_config(args.config),
        args.env,
        args.groups,
        args.group_size,
        args.max_turns,
        args.max_tokens,
        args.first_seed,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
