"""Hot-swap under load: rollout actors generate continuously while the controller swaps versions.

    python bench/hotswap.py [--model smollm2-135m-instruct|tiny|PATH] [--actors 2] [--swaps 10]

Two LoRA versions (random adapters in the model store) are registered; the controller deploys them
alternately `--swaps` times while every actor keeps playing GRPO groups. Counts failed requests, checks
after every flip that all actors serve the deployed version, and times each swap (load everywhere, then
flip). Prints a summary line, then JSON with swap_p50_s, swap_p99_s, failed_requests, actors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def random_adapter(base: str, folder: Path, seed: int, rank: int = 8) -> str:
    """A LoRA adapter with random non-zero weights (it visibly changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(folder))
    from cluster.artifacts import write_manifest

    write_manifest(folder, kind="lora", base_model=base)  # the controller serves only folders it can verify
    return str(folder)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(config: Any, swaps: int, max_tokens: int = 16) -> dict[str, Any]:
    """Run the swaps under load on an already-configured loop (Ray up, database migrated)."""
    import ray

    from cluster.controller import start_controller
    from cluster.fleet import RolloutFleet
    from cluster.loop import serving_config, shutdown
    from cluster.models import resolve_model
    from recorder import queries
    from recorder.actor import start_recorder

    config = serving_config(config)
    model_path = resolve_model(config.model)
    store = Path(config.model.store_dir).expanduser().resolve()
    db = config.database.create_engine()
    versions = []
    for seed in (1, 2):
        version = queries.register_version(db, base_model=model_path, kind="lora")
        artifact = random_adapter(model_path, store / f"v{version}", seed)
        queries.update_version(db, version, status="ready", artifact_uri=artifact)
        versions.append(version)
    db.dispose()

    recorder = start_recorder(config.database, config.recorder)
    actors = RolloutFleet.start(config, model_path)
    controller = start_controller(config)
    rollout = config.rollout
    stop, failures, groups = threading.Event(), [], [0]

    def keep_generating(actor: Any, seed_base: int) -> None:
        seed = seed_base
        while not stop.is_set():
            try:
                ray.get(
                    actor.run_group.remote(
                        rollout.env,
                        seed=seed,
                        group_size=rollout.group_size,
                        max_turns=rollout.max_turns,
                        max_tokens=max_tokens,
                        env_settings=rollout.env_settings,
                    ),  # fmt: skip
                    timeout=config.controller.call_timeout_s,
                )
                groups[0] += 1
            except Exception as exc:  # every failed request is counted, none is retried
                failures.append(f"{type(exc).__name__}: {exc}"[:300])
            seed += 1

    threads = [
        threading.Thread(target=keep_generating, args=(actor, 10_000 * (i + 1)), daemon=True)
        for i, actor in enumerate(actors.values())
    ]
    swap_times, mismatches = [], []
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # let requests be in flight before the first swap
        for i in range(swaps):
            target = versions[i % len(versions)]
            result = ray.get(controller.deploy.remote(target), timeout=config.controller.swap_timeout_s * 2)
            swap_times.append(result["swap_s"])
            served = ray.get(controller.health.remote(), timeout=60)["actors"]
            if any(a.get("served_version") != target for a in served.values()):
                mismatches.append({"swap": i, "target": target, "served": served})
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=config.controller.call_timeout_s)
        del recorder, controller
        shutdown(config)
    return {
        "swap_p50_s": percentile(swap_times, 0.5),
        "swap_p99_s": percentile(swap_times, 0.99),
        "swap_max_s": max(swap_times),
        "swaps": len(swap_times),
        "failed_requests": len(failures),
        "failures": failures[:5],
        "served_mismatches": len(mismatches),
        "groups_during_swaps": groups[0],
        "actors": len(actors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--swaps", type=int, default=10)
    args = parser.parse_args()

    from cluster.config import load_config
    from cluster.models import model_for_benchmark
    from cluster.ray_runtime import init_ray
    from recorder.migrate import upgrade
    from rollout.config import EngineConfig

    work = Path(tempfile.mkdtemp(prefix="bench-hotswap-"))
    base = load_config()
    url = f"sqlite:///{work / 'hotswap.db'}"
    config = base.model_copy(
        update={
            "model": base.model.model_copy(update={"name": model_for_benchmark(args.model), "store_dir": work}),
            "database": base.database.model_copy(update={"url": url}),
            "engine": EngineConfig(device="cpu", max_model_len=1024, kv_cache_gib=1, max_num_seqs=32),
            "rollout": base.rollout.model_copy(
                update={"env": "arithmetic", "env_settings": {}, "actors": args.actors, "group_size": 4, "max_turns": 1}
            ),
            "controller": base.controller.model_copy(update={"name": "bench-hotswap"}),
        }
    )
    init_ray(config.ray)
    upgrade(url)
    result = {"model": config.model.name, **measure(config, args.swaps)}
    print(
        f"hot-swap: {result['swaps']} swaps on {result['actors']} actors under load: p50 {result['swap_p50_s']:.3f} s, "
        f"p99 {result['swap_p99_s']:.3f} s, failed requests {result['failed_requests']}, "
        f"served mismatches {result['served_mismatches']}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
