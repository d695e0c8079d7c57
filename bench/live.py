"""Live vs sync on the simulated engine and trainer: how much of training's time the fleet plays through.

    python bench/live.py [--actors 4] [--versions 6] [--group-s 8.5] [--update-s 3] [--max-staleness 2]
                          [--scale-actors 64]

Both modes run the same config but `controller.mode`, in one run, on a fresh SQLite database each: rollout
actors on `engine.backend: simulated` (tokens at a fixed rate, the real recorder path), the trainer on
`trainer.backend: simulated` (each update sleeps, the real batch/version ledger and artifacts), the
lowercase task, no held-out evaluation. A batch's generation (one group per lane, `--group-s` seconds) is
about its training time (job start + 2 x `--update-s`), the case where overlap can at most double throughput.

Measured from the database, not from the loop's counters:
- samples trained per second: trajectories in completed batches / time, steady state (first to last batch
  completed) and whole run (loop start to last batch completed); `ratio` = live / sync (target >= 1.8)
- version lag of trained trajectories (parent version - sampling version): p50, p99, max (<= max_staleness)
- idle fraction of the rollout lanes while a batch trains (live mode's own accounting; target < 5 %)
Then, with `--scale-actors` simulated actors in live mode: groups per second against the lanes' ideal, and
rolling swaps across every replica one at a time, 1/8 at a time and all at once (seconds, steps).
Prints a one-line summary, then JSON as the last line.
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
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "disabled")

import ray
import sqlalchemy as sa

from cluster.config import ZigguratConfig, load_config
from cluster.loop import run_loop, shutdown
from rollout.config import EngineConfig, SimulatedEngineConfig

TOKENS = 32  # completion tokens per episode (one turn)


def bench_config(args: argparse.Namespace, mode: str, actors: int, folder: Path, name: str) -> ZigguratConfig:
    base = load_config()
    lanes = actors * args.lanes
    return base.model_copy(
        update={
            "model": base.model.model_copy(update={"store_dir": folder / "store"}),
            "database": base.database.model_copy(update={"url": f"sqlite:///{folder / 'bench.db'}"}),
            "recorder": base.recorder.model_copy(update={"actor_name": f"{name}-recorder"}),
            "engine": EngineConfig(
                backend="simulated",
                max_model_len=2048,
                simulated=SimulatedEngineConfig(tokens_per_s=TOKENS / args.group_s, batch_tokens_per_s=1e6),
            ),
            "rollout": base.rollout.model_copy(
                update={
                    "env": "lowercase",
                    "env_settings": {},
                    "actors": actors,
                    "group_size": 4,
                    "groups_per_iteration": lanes,
                    "max_turns": 1,
                    "max_tokens": TOKENS,
                    "eval_seeds": [],
                }  # fmt: skip
            ),
            "controller": base.controller.model_copy(
                update={
                    "name": name,
                    "mode": mode,
                    "iterations": args.versions,
                    "live_versions": args.versions,
                    "live_groups_per_actor": args.lanes,
                    "min_groups": lanes,
                    "poll_interval_s": 0.2,
                    "wandb": False,
                    "evaluate_before_deploy": False,
                }  # fmt: skip
            ),
            "trainer": base.trainer.model_copy(
                update={
                    "backend": "simulated",
                    "simulated_update_s": args.update_s,
                    "updates_per_batch": 2,
                    "batch_max_groups": lanes,
                    "max_staleness": args.max_staleness,
                    "reward_source": "env",
                }  # fmt: skip
            ),
        }
    )


def measured(url: str, started_wall: float) -> dict[str, Any]:
    """Throughput and version lag of what was trained, from the database."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            batches = conn.execute(
                sa.text(
                    "SELECT b.id, b.finished_at, count(m.trajectory_id), b.created_at FROM training_batches b "
                    "JOIN training_batch_trajectories m ON m.batch_id = b.id WHERE b.status = 'completed' "
                    "GROUP BY b.id, b.finished_at, b.created_at ORDER BY b.finished_at"
                )
            ).all()
            episodes = conn.execute(
                sa.text("SELECT started_at, finished_at FROM trajectories WHERE status = 'finished' AND NOT is_eval")
            ).all()
            lags = [
                int(r[0])
                for r in conn.execute(
                    sa.text(
                        "SELECT b.parent_version - t.model_version FROM training_batches b "
                        "JOIN training_batch_trajectories m ON m.batch_id = b.id "
                        "JOIN trajectories t ON t.id = m.trajectory_id WHERE b.status = 'completed'"
                    )
                )
            ]
    finally:
        engine.dispose()
    finished = [_epoch(r[1]) for r in batches]
    samples = [int(r[2]) for r in batches]
    steady = (sum(samples[1:]) / (finished[-1] - finished[0])) if len(finished) > 1 else None
    whole = sum(samples) / (finished[-1] - started_wall) if finished else None
    lags.sort()
    # what "generation time ~ training time per batch" is in this run: a batch from its claim to its version,
    # and one episode (a lane plays one group's episodes side by side) from its start to its last step
    train_s = [_epoch(r[1]) - _epoch(r[3]) for r in batches]
    episode_s = [_epoch(e[1]) - _epoch(e[0]) for e in episodes if e[1] is not None]
    return {
        "training_s_per_batch": round(statistics.mean(train_s), 2) if train_s else None,
        "generation_s_per_group": round(statistics.mean(episode_s), 2) if episode_s else None,
        "batches": len(batches),
        "samples_trained": sum(samples),
        "samples_per_s_steady": steady,
        "samples_per_s_whole": whole,
        "version_lag_p50": lags[len(lags) // 2] if lags else None,
        "version_lag_p99": lags[min(len(lags) - 1, int(0.99 * len(lags)))] if lags else None,
        "version_lag_max": lags[-1] if lags else None,
    }


def _epoch(value: Any) -> float:
    from datetime import UTC, datetime

    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def run_mode(args: argparse.Namespace, mode: str, actors: int, tag: str) -> dict[str, Any]:
    from recorder.migrate import upgrade

    folder = Path(tempfile.mkdtemp(prefix=f"ziggurat-bench-live-{tag}-"))
    config = bench_config(args, mode, actors, folder, f"bench-{tag}")
    upgrade(config.database.url)
    started = time.time()
    try:
        report = run_loop(config, folder / "out")
    finally:
        shutdown(config)
    result = {"mode": mode, "actors": actors, "wall_s": round(time.time() - started, 1)}
    result.update(measured(config.database.url, started))
    live = report.get("live") or {}
    result["idle_fraction_while_training"] = live.get("idle_fraction_while_training")
    result["idle_fraction"] = live.get("idle_fraction")
    return result


def scale(args: argparse.Namespace) -> dict[str, Any]:
    """Live mode on `--scale-actors` actors for a few versions, then rolling swaps across all of them."""
    from cluster.controller import start_controller
    from cluster.fleet import RolloutFleet
    from cluster.models import resolve_model
    from recorder.actor import start_recorder
    from recorder.migrate import upgrade

    actors = args.scale_actors
    folder = Path(tempfile.mkdtemp(prefix="ziggurat-bench-live-scale-"))
    config = bench_config(args, "live", actors, folder, "bench-scale")
    config = config.model_copy(update={"controller": config.controller.model_copy(update={"live_versions": 2})})
    upgrade(config.database.url)
    recorder = start_recorder(config.database, config.recorder)  # the actor lives while a handle does
    out: dict[str, Any] = {"actors": actors}
    try:
        started = time.perf_counter()
        RolloutFleet.start(config, resolve_model(config.model))
        out["fleet_start_s"] = round(time.perf_counter() - started, 1)
        controller = start_controller(config)
        ray.get(controller.start_live.remote(), timeout=60)
        started = time.perf_counter()
        while (status := ray.get(controller.live_status.remote(), timeout=60))["state"] not in ("stopped", "failed"):
            time.sleep(1.0)
        elapsed = time.perf_counter() - started
        ideal = actors * args.lanes / args.group_s
        out.update(
            live_state=status["state"], live_error=status["error"], groups_played=status["groups_played"],
            groups_per_s=status["groups_played"] / elapsed, groups_per_s_ideal_while_admitted=ideal,
            idle_fraction=status["idle_fraction"], admission_refusals=status["admission_refusals"],
            live_s=round(elapsed, 1),
        )  # fmt: skip
        swaps = []
        for fraction in (1 / actors, 1 / 8, 1.0):
            for _ in range(2):
                version = stand_in_version(config)  # never loaded before: every swap counts its first load
                t0 = time.perf_counter()
                swap = ray.get(controller.deploy.remote(version, 1.0, fraction), timeout=600)
                swaps.append(
                    {"rolling_fraction": round(fraction, 4), "version": version, "steps": swap.get("steps", 1),
                     "swap_s": round(time.perf_counter() - t0, 3), "failed": len(swap.get("failed") or {})}
                )  # fmt: skip
        out["rolling_swaps"] = swaps
    finally:
        shutdown(config)  # the recorder too
        del recorder
    return out


def stand_in_version(config: ZigguratConfig) -> int:
    """A new `ready` version with a stand-in adapter in the model store (what the simulated trainer writes)."""
    from cluster import artifacts
    from cluster.models import resolve_model
    from cluster.simulated_training import write_stand_in_adapter
    from recorder import queries

    engine = config.database.create_engine()
    try:
        store = Path(config.model.store_dir).expanduser().resolve()
        folder = store / artifacts.version_folder_name(0, None)
        write_stand_in_adapter(folder, 0)
        artifacts.write_manifest(folder, base_model=resolve_model(config.model), simulated=True)
        return queries.register_version(
            engine, base_model=resolve_model(config.model), kind="lora", artifact_uri=str(folder), status="ready"
        )
    finally:
        engine.dispose()


def real_mode(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """configs/local.yaml (SmolLM2 in the market, vLLM on this CPU, the real trainer) in `mode` for
    `--real-versions` versions: held-out reward of every version against the wall time its evaluation ended."""
    from recorder.migrate import upgrade

    folder = Path(tempfile.mkdtemp(prefix=f"ziggurat-bench-real-{mode}-"))
    base = load_config()
    config = base.model_copy(
        update={
            "database": base.database.model_copy(update={"url": f"sqlite:///{folder / 'real.db'}"}),
            "recorder": base.recorder.model_copy(update={"actor_name": f"real-{mode}-recorder"}),
            "model": base.model.model_copy(update={"store_dir": folder / "store"}),
            "controller": base.controller.model_copy(
                update={
                    "name": f"real-{mode}",
                    "mode": mode,
                    "iterations": args.real_versions,
                    "live_versions": args.real_versions,
                    "wandb": False,
                    "min_groups": 8,
                    "live_groups_per_actor": base.rollout.groups_per_iteration,
                }  # fmt: skip
            ),
            "trainer": base.trainer.model_copy(update={"batch_max_groups": 8}),
        }
    )
    upgrade(config.database.url)
    started = time.time()
    try:
        report = run_loop(config, folder / "out")
    finally:
        shutdown(config)
    engine = sa.create_engine(config.database.url)
    try:
        with engine.connect() as conn:
            ended = dict(
                conn.execute(
                    sa.text(
                        "SELECT model_version, max(finished_at) FROM trajectories WHERE is_eval GROUP BY model_version"
                    )
                ).all()
            )
    finally:
        engine.dispose()
    curve = [
        {"version": v["version"], "eval_mean_reward": v["eval_mean_reward"],
         "at_s": round(_epoch(ended[v["version"]]) - started, 1) if v["version"] in ended else None}
        for v in report["versions"]
    ]  # fmt: skip
    return {
        "mode": mode,
        "wall_s": round(time.time() - started, 1),
        "curve": curve,
        **measured(config.database.url, started),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actors", type=int, default=4)
    parser.add_argument("--lanes", type=int, default=2, help="groups each actor plays at once")
    parser.add_argument("--versions", type=int, default=6)
    # a simulated batch trains in about 8.5 s here (a training actor starts, 2 updates of 3 s): generation ~ training
    parser.add_argument("--group-s", type=float, default=8.5, help="seconds one group takes to generate")
    parser.add_argument("--update-s", type=float, default=3.0, help="seconds one simulated update takes")
    parser.add_argument("--scale-actors", type=int, default=64, help="0 skips the scale run")
    parser.add_argument("--max-staleness", type=int, default=2, help="trainer.max_staleness in both modes")
    parser.add_argument(
        "--real-versions", type=int, default=0, help="instead: configs/local.yaml (real vLLM and trainer), N versions"
    )
    parser.add_argument("--scale-only", action="store_true", help="only the --scale-actors run")
    args = parser.parse_args()

    from cluster.ray_runtime import init_ray

    init_ray(load_config().ray)
    if args.real_versions:
        real = {"live": real_mode(args, "live"), "sync": real_mode(args, "sync")}  # live first: the newer path
        print(
            "real: " + "; ".join(f"{m}: " + ", ".join(f"v{c['version']} {c['eval_mean_reward']:.3f} at {c['at_s']} s"
            for c in r["curve"] if c["eval_mean_reward"] is not None) for m, r in real.items())
        )  # fmt: skip
        print(json.dumps(real, default=str))
        return
    if args.scale_only:
        scaled = scale(args)
        print(
            f"{scaled['actors']} simulated actors: started in {scaled['fleet_start_s']} s, "
            f"{scaled['groups_per_s']:.2f} groups/s (lanes' ideal {scaled['groups_per_s_ideal_while_admitted']:.2f})"
        )
        print(json.dumps({"scale": scaled, "settings": vars(args)}, default=str))
        return
    sync = run_mode(args, "sync", args.actors, "sync")
    live = run_mode(args, "live", args.actors, "live")
    result: dict[str, Any] = {"sync": sync, "live": live, "settings": vars(args)}
    for key in ("samples_per_s_steady", "samples_per_s_whole"):
        if sync[key] and live[key]:
            result[f"ratio_{key.removeprefix('samples_per_s_')}"] = live[key] / sync[key]
    if args.scale_actors:
        # the comparison first, so a long scale run (64 actors start slowly on 2 cores) cannot lose it
        print(json.dumps({k: v for k, v in result.items() if k.startswith("ratio")}), flush=True)
        result["scale"] = scale(args)
        swaps = result["scale"]["rolling_swaps"]
        result["scale"]["rolling_swap_s_by_fraction"] = {
            str(f): statistics.mean(s["swap_s"] for s in swaps if s["rolling_fraction"] == f)
            for f in sorted({s["rolling_fraction"] for s in swaps})
        }
    ratio = result.get("ratio_steady")
    print(
        f"live/sync samples trained per second: {ratio:.2f} steady ({result.get('ratio_whole', 0):.2f} whole run); "
        f"idle while training {live['idle_fraction_while_training']:.3f}; version lag p99 {live['version_lag_p99']}, "
        f"max {live['version_lag_max']}"
        if ratio
        else "live/sync: not enough batches to compare"
    )
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
