"""The main job: `ziggurat run --config configs/local.yaml` (or `python -m cluster.run`, e.g. inside
`ray job submit --working-dir . -- python -m cluster.run --config configs/cluster.yaml`).

Runs the closed loop of cluster.loop on the config (agents play, groups are judged, the controller trains
a new version when the data is ready, evaluates it on held-out scenarios and hot-swaps it into every
rollout actor), then writes report.json and reward.png and prints the report's summary as JSON, the last line
on stdout. Progress shows as short lines and bars (cluster.console); log records show only warnings and errors
unless --verbose (or ZIGGURAT_VERBOSE=1).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from cluster.config import DEFAULT_CONFIG, ZigguratConfig, load_config
from cluster.logs import configure_logging

log = logging.getLogger("ziggurat.run")


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a loop report."""
    return {
        "model": report["model"],
        "environment": report["environment"],
        "seed": report["seed"],
        "base_eval_mean_reward": report["base_eval_mean_reward"],
        "final_version": report["final_version"],
        "final_eval_mean_reward": report["final_eval_mean_reward"],
        "versions": {v["version"]: v["eval_mean_reward"] for v in report["versions"]},
        "wall_s": report["wall_s"],
        "report_files": report["report_files"],
    }


def run(config: ZigguratConfig, out_dir: Path) -> dict[str, Any]:
    import ray

    from cluster.loop import run_loop, shutdown

    connected_here = not ray.is_initialized()
    try:
        return run_loop(config, out_dir)
    finally:
        shutdown(config)
        if connected_here:
            # Disconnecting stops Ray's log forwarding, so no late worker line lands after the summary JSON;
            # a Ray this process did not start (the test suite's) stays up.
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.run", description=__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("ziggurat-report"), help="where report.json and reward.png go")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log INFO from Ziggurat, Ray, vLLM and Ray Train (default: warnings)",
    )
    args = parser.parse_args(argv)
    configure_logging(True if args.verbose else None)  # None: ZIGGURAT_VERBOSE decides
    report = run(load_config(args.config), args.out)
    sys.stderr.flush()
    # The summary is the last line on stdout: scripts read it with `tail -n 1`.
    print(json.dumps(summary(report)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
