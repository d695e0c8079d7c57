"""Hot-swap under real load: rollout actors kept saturated while the controller deploys a new version each swap.

    python bench/hotswap.py [--model smollm2-135m-instruct|tiny|PATH] [--kind lora|merged|full] [--actors 2]
                            [--swaps 20] [--concurrency 8] [--group-size 4] [--max-tokens 32]

`--swaps` distinct versions are written to the model store up front (outside the timing), so every swap deploys
a version no engine has loaded before: the timing counts the first load, not only the flip.
  lora    random LoRA adapters served as vLLM adapters (engine.lora_serving: adapter)
  merged  random LoRA adapters merged into the base weights, as the training job writes them (engine.lora_serving:
          merged): served as full weights, replaced in place by vLLM
  full    full checkpoints of the same architecture (kind "full"), served the same way as merged
Every rollout actor keeps `--concurrency` GRPO groups in flight (each `--group-size` episodes, re-submitted as
each ends) from before the first swap until after the last, so the engines are busy when the swaps happen.

Each deploy is timed end to end by the driver (Controller.deploy), next to the controller's own load_s (every
actor loaded it) and swap_s (load + flip). With full weights the actor drains its groups on the old version
first: the actors' health is polled during the swaps to split the flip into drain and reload.
Counts failed requests (groups that raised or came back with failed episodes), checks after every swap that
all actors serve the deployed version, and reports groups, episodes and tokens/s played during the swaps.
Prints a summary line, then JSON as the last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

KINDS = ("lora", "merged", "full")


def random_adapters(base: str, folders: list[Path], seed: int, rank: int = 8) -> None:
    """One LoRA adapter per folder, each with its own random non-zero weights (they visibly change outputs):
    the base model is loaded once, its LoRA weights re-drawn for each folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    for i, folder in enumerate(folders):
        torch.manual_seed(seed + i)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    torch.nn.init.kaiming_uniform_(parameter, a=math.sqrt(5))  # nn.Linear's init, as peft's False
        peft_model.save_pretrained(str(folder))


def make_versions(config: Any, model_path: str, store: Path, kind: str, count: int) -> list[int]:
    """`count` ready versions nobody has loaded, their folders in the model store with a verifiable manifest."""
    import shutil

    from cluster.artifacts import write_manifest
    from recorder import queries
    from trainer.model import MERGED_DIR, merge_adapter

    db = config.database.create_engine()
    try:
        rows = [queries.register_version(db, base_model=model_path, kind="full" if kind == "full" else "lora")
                for _ in range(count)]  # fmt: skip
        adapters = [store / f"v{v}-bench" for v in rows] if kind != "full" else [store / f".adapter-v{v}" for v in rows]
        random_adapters(model_path, adapters, seed=1000)
        for version, adapter in zip(rows, adapters, strict=True):
            if kind == "lora":
                folder = adapter
            elif kind == "merged":  # what the training job writes with engine.lora_serving: merged
                folder = adapter
                merge_adapter(model_path, adapter, adapter / MERGED_DIR)
            else:  # a full checkpoint of the same architecture
                folder = store / f"v{version}-bench"
                merge_adapter(model_path, adapter, folder)
                shutil.rmtree(adapter)
            write_manifest(folder, version=version, kind="full" if kind == "full" else "lora", base_model=model_path)
            queries.update_version(db, version, status="ready", artifact_uri=str(folder))
    finally:
        db.dispose()
    return rows


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Load:
    """Keeps `concurrency` groups in flight on every actor until stopped; records every group that ends."""

    actors: dict[str, Any]
    group_call: dict[str, Any]
    concurrency: int
    timeout_s: float
    stop: threading.Event = field(default_factory=threading.Event)
    groups: list[dict[str, Any]] = field(default_factory=list)  # finished groups: end time, tokens, episodes
    failures: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._keep_busy, args=(name, actor, 100_000 * (i + 1)), daemon=True)
            for i, (name, actor) in enumerate(self.actors.items())
        ]
        for thread in threads:
            thread.start()
        return threads

    def _keep_busy(self, name: str, actor: Any, seed: int) -> None:
        import ray

        in_flight: dict[Any, float] = {}  # ref -> when it was submitted
        while not self.stop.is_set() or in_flight:
            while not self.stop.is_set() and len(in_flight) < self.concurrency:
                in_flight[actor.run_group.remote(**{**self.group_call, "seed": seed})] = time.monotonic()
                seed += 1
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            now = time.monotonic()
            for ref in done:
                submitted = in_flight.pop(ref)
                try:
                    group = ray.get(ref, timeout=10)
                except Exception as exc:  # every failed request is counted, none is retried
                    self._failed(name, submitted, now, f"{type(exc).__name__}: {exc}")
                    continue
                statuses = group["statuses"]
                if group["failed"] or "failed" in statuses:
                    self._failed(name, submitted, now, f"failed episodes: {group['errors'][:2]}")
                with self.lock:
                    self.groups.append({
                        "actor": name, "submitted": submitted, "ended": now, "tokens": group["completion_tokens"],
                        "episodes": len(statuses), "aborted": statuses.count("aborted"),
                        "versions": sorted(set(group["model_versions"])),
                    })  # fmt: skip
            for ref, submitted in list(in_flight.items()):
                if now - submitted > self.timeout_s:  # a group that never answers is a failed request too
                    in_flight.pop(ref)
                    self._failed(name, submitted, now, f"no answer within {self.timeout_s:.0f} s")

    def _failed(self, actor: str, submitted: float, ended: float, error: str) -> None:
        with self.lock:
            self.failures.append({"actor": actor, "submitted": submitted, "ended": ended, "error": error[:300]})

    def finished_between(self, start: float, end: float) -> list[dict[str, Any]]:
        with self.lock:
            return [g for g in self.groups if start <= g["ended"] <= end]


@dataclass
class HealthPoller:
    """Polls every actor's health: episodes in flight (is the engine busy?) and, during a full-weights swap,
    whether the actor is still draining groups on the old version or already reloading."""

    actors: dict[str, Any]
    interval_s: float
    stop: threading.Event = field(default_factory=threading.Event)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._poll, daemon=True)
        thread.start()
        return thread

    def _poll(self) -> None:
        import ray

        while not self.stop.is_set():
            refs = {name: actor.health.remote() for name, actor in self.actors.items()}
            for name, ref in refs.items():
                try:
                    health = ray.get(ref, timeout=10)
                except Exception:  # a slow probe is a gap in the samples, not a failed request
                    continue
                self.samples.append({
                    "actor": name, "at": time.monotonic(), "in_flight": health["episodes_in_flight"],
                    "swapping": health["swapping"], "by_version": dict(health["episodes_by_version"]),
                })  # fmt: skip
            self.stop.wait(self.interval_s)

    def between(self, start: float, end: float) -> list[dict[str, Any]]:
        return [s for s in list(self.samples) if start <= s["at"] <= end]

    def drain_split(self, start: float, end: float, target: int) -> dict[str, float | None]:
        """Seconds an actor was seen draining (swapping, old-version episodes in flight) and reloading
        (swapping, none left) within [start, end]; the most of any actor, to the poll interval."""
        drain, reload = 0.0, 0.0
        for name in self.actors:
            seen = [s for s in self.between(start, end) if s["actor"] == name and s["swapping"]]
            if not seen:
                continue
            draining = [s["at"] for s in seen if any(int(v) != target for v in s["by_version"])]
            first, last = seen[0]["at"], seen[-1]["at"]
            drain_end = max(draining) + self.interval_s if draining else first
            drain = max(drain, drain_end - first)
            reload = max(reload, last - drain_end + self.interval_s)
        return {"drain_s": round(drain, 3), "reload_s": round(reload, 3)}


def tokens_per_s(groups: list[dict[str, Any]], start: float, end: float) -> float:
    """Completion tokens generated in [start, end] per second: each group's tokens pro rata of the part of its
    run (submitted to ended) inside the window, so groups still running at either edge count for their share."""
    tokens = 0.0
    for g in groups:
        overlap = min(end, g["ended"]) - max(start, g["submitted"])
        if overlap > 0:
            tokens += g["tokens"] * overlap / max(g["ended"] - g["submitted"], 1e-9)
    return tokens / max(end - start, 1e-9)


def measure(
    config: Any,
    kind: str = "lora",
    swaps: int = 10,
    concurrency: int = 4,
    warmup_s: float = 5.0,
    gap_s: float = 0.5,
    max_tokens: int = 16,
) -> dict[str, Any]:
    """Run the swaps under load on an already-configured loop (Ray up, database migrated)."""
    import ray

    from cluster.controller import start_controller
    from cluster.fleet import RolloutFleet
    from cluster.loop import serving_config, shutdown
    from cluster.models import resolve_model
    from recorder.actor import start_recorder

    config = serving_config(config)
    model_path = resolve_model(config.model)
    store = Path(config.model.store_dir).expanduser().resolve()
    started = time.perf_counter()
    idle_version, *versions = make_versions(config, model_path, store, kind, swaps + 1)
    prepare_s = time.perf_counter() - started

    recorder = start_recorder(config.database, config.recorder)
    actors = RolloutFleet.start(config, model_path)
    controller = start_controller(config)
    settings, rollout = config.controller, config.rollout
    group_call = {**rollout.group_call(0), "max_tokens": max_tokens}
    load = Load(dict(actors), group_call, concurrency, settings.call_timeout_s)
    poller = HealthPoller(dict(actors), interval_s=0.1 if kind != "lora" else 0.5)
    deploy_timeout = settings.swap_timeout_s + settings.drain_timeout_s + config.engine.swap_timeout_s + 60
    rows, mismatches, deploy_errors = [], [], []
    threads: list[threading.Thread] = []
    try:
        begun = time.monotonic()  # a baseline: one swap (a first load too) while the engines are idle
        idle = ray.get(controller.deploy.remote(idle_version), timeout=deploy_timeout)
        idle_row = {"deploy_s": round(time.monotonic() - begun, 4), "load_s": idle["load_s"], "swap_s": idle["swap_s"]}
        threads = [*load.start(), poller.start()]
        warm_start = time.monotonic()
        time.sleep(warmup_s)  # the first groups end and are re-submitted: every engine is busy before swap 1
        warm_end = swaps_start = time.monotonic()
        for i, target in enumerate(versions):
            begun = time.monotonic()
            try:
                result = ray.get(controller.deploy.remote(target), timeout=deploy_timeout)
            except Exception as exc:
                deploy_errors.append(f"swap {i}: {type(exc).__name__}: {exc}"[:300])
                continue
            ended = time.monotonic()
            row = {
                "version": target, "deploy_s": round(ended - begun, 4), "load_s": result["load_s"],
                "swap_s": result["swap_s"], "begun": begun, "ended": ended,
            }  # fmt: skip
            if kind != "lora":
                row.update(poller.drain_split(begun, ended + poller.interval_s, target))
            before = poller.between(begun - 1.0, begun)  # what the engines were busy with when the swap began
            row["in_flight_at_start"] = sum(s["in_flight"] for s in before[-len(actors) :])
            row["versions_in_flight_at_start"] = max((len(s["by_version"]) for s in before), default=None)
            rows.append(row)
            served = ray.get(controller.health.remote(), timeout=60)["actors"]
            if any(a.get("served_version") != target for a in served.values()):
                mismatches.append({"swap": i, "target": target, "served": served})
            time.sleep(gap_s)
        swaps_end = time.monotonic()
    finally:
        load.stop.set()
        poller.stop.set()
        for thread in threads:
            thread.join(timeout=settings.call_timeout_s)
        del recorder, controller
        shutdown(config)

    during = load.finished_between(swaps_start, swaps_end)
    everything = load.finished_between(0.0, math.inf)
    overlapping = [g for g in everything if g["submitted"] <= swaps_end and g["ended"] >= swaps_start]
    group_s = [g["ended"] - g["submitted"] for g in everything]
    busy = poller.between(swaps_start, swaps_end)
    deploy_s = [r["deploy_s"] for r in rows] or [math.nan]
    out: dict[str, Any] = {
        "kind": kind,
        "swap_p50_s": percentile(deploy_s, 0.5),
        "swap_p99_s": percentile(deploy_s, 0.99),
        "swap_max_s": max(deploy_s),
        "first_load_included": True,
        "controller_load_s_p50": percentile([r["load_s"] for r in rows], 0.5) if rows else None,
        "controller_load_s_max": max(r["load_s"] for r in rows) if rows else None,
        "controller_swap_s_p50": percentile([r["swap_s"] for r in rows], 0.5) if rows else None,
        "controller_swap_s_max": max(r["swap_s"] for r in rows) if rows else None,
        "driver_overhead_s_max": max(r["deploy_s"] - r["swap_s"] for r in rows) if rows else None,
        "swaps": len(rows),
        "deploy_errors": deploy_errors,
        "failed_requests": len(load.failures),
        "failed_requests_during_swaps": sum(swaps_start <= f["ended"] <= swaps_end for f in load.failures),
        "failures": [f["error"] for f in load.failures[:5]],
        "served_mismatches": len(mismatches),
        "groups_during_swaps": len(during),
        "episodes_during_swaps": sum(g["episodes"] for g in during),
        "aborted_episodes_during_swaps": sum(g["aborted"] for g in during),
        "swap_window_s": round(swaps_end - swaps_start, 2),
        "groups_overlapping_swaps": len(overlapping),
        "tokens_per_s_during_swaps": round(tokens_per_s(everything, swaps_start, swaps_end), 2),
        "tokens_per_s_before_swaps": round(tokens_per_s(everything, warm_start + warmup_s / 2, warm_end), 2),
        "group_s_p50": round(percentile(group_s, 0.5), 2) if group_s else None,
        "group_s_max": round(max(group_s), 2) if group_s else None,
        "versions_in_flight_per_actor_max": max((len(s["by_version"]) for s in busy), default=None),
        "idle_swap": idle_row,
        "max_loras": config.engine.max_loras,
        "episodes_in_flight_per_actor_mean": round(sum(s["in_flight"] for s in busy) / max(len(busy), 1), 2),
        "episodes_in_flight_per_actor_min": min((s["in_flight"] for s in busy), default=None),
        "concurrency_groups_per_actor": concurrency,
        "group_size": rollout.group_size,
        "max_tokens": max_tokens,
        "max_num_seqs": config.engine.max_num_seqs,
        "actors": len(actors),
        "versions_prepare_s": round(prepare_s, 1),
        "per_swap": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k not in ("begun", "ended")}
            for r in rows
        ],
    }
    if kind != "lora" and rows:
        out["drain_s_p50"] = percentile([r["drain_s"] for r in rows], 0.5)
        out["drain_s_max"] = max(r["drain_s"] for r in rows)
        out["reload_s_p50"] = percentile([r["reload_s"] for r in rows], 0.5)
        out["reload_s_max"] = max(r["reload_s"] for r in rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--kind", choices=KINDS, default="lora")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8, help="groups kept in flight per actor")
    parser.add_argument("--group-size", type=int, default=4, help="episodes per group")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-loras", type=int, default=2, help="engine.max_loras (adapters in one batch)")
    parser.add_argument("--warmup-s", type=float, default=20.0, help="load before the first swap")
    parser.add_argument("--gap-s", type=float, default=0.5, help="pause between swaps")
    args = parser.parse_args()

    from cluster.config import load_config
    from cluster.models import model_for_benchmark
    from cluster.ray_runtime import init_ray
    from recorder.migrate import upgrade
    from rollout.config import EngineConfig

    work = Path(tempfile.mkdtemp(prefix="bench-hotswap-"))
    base = load_config()
    url = f"sqlite:///{work / 'hotswap.db'}"
    serving = "adapter" if args.kind == "lora" else "merged"
    config = base.model_copy(
        update={
            "model": base.model.model_copy(update={"name": model_for_benchmark(args.model), "store_dir": work}),
            "database": base.database.model_copy(update={"url": url}),
            "engine": EngineConfig(
                device="cpu",
                max_model_len=1024,
                kv_cache_gib=1,
                max_num_seqs=args.max_num_seqs,
                lora_serving=serving,
                max_loras=args.max_loras,
            ),
            "rollout": base.rollout.model_copy(
                update={
                    "env": "arithmetic",
                    "env_settings": {},
                    "actors": args.actors,
                    "group_size": args.group_size,
                    "max_turns": 1,
                }
            ),
            "controller": base.controller.model_copy(update={"name": "bench-hotswap"}),
            "trainer": base.trainer.model_copy(update={"mode": "lora"}),
        }
    )
    init_ray(config.ray)
    upgrade(url)
    try:
        result = {"model": config.model.name, **measure(
            config, args.kind, args.swaps, args.concurrency, args.warmup_s, args.gap_s, args.max_tokens
        )}  # fmt: skip
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)  # merged versions are 0.5 GB each
    drain = (
        f", drain p50 {result['drain_s_p50']:.2f} s max {result['drain_s_max']:.2f} s, reload p50 "
        f"{result['reload_s_p50']:.2f} s max {result['reload_s_max']:.2f} s"
        if "drain_s_p50" in result
        else ""
    )
    print(
        f"hot-swap ({result['kind']}, first load included): {result['swaps']} swaps on {result['actors']} actors "
        f"under load: p50 {result['swap_p50_s']:.3f} s, p99 {result['swap_p99_s']:.3f} s, max "
        f"{result['swap_max_s']:.3f} s{drain}; failed requests {result['failed_requests']}, served mismatches "
        f"{result['served_mismatches']}; {result['groups_during_swaps']} groups / {result['episodes_during_swaps']} "
        f"episodes during {result['swap_window_s']} s of swaps at {result['tokens_per_s_during_swaps']} tok/s "
        f"({result['tokens_per_s_before_swaps']} tok/s before), "
        f"{result['episodes_in_flight_per_actor_mean']} episodes in flight per actor; idle swap "
        f"{result['idle_swap']['deploy_s']:.3f} s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
