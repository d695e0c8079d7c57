"""The main job through the command line on a YAML config: SQLite, one rollout actor, the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cluster.cli import main

pytestmark = pytest.mark.slow


def test_ziggurat_run_then_status_report_and_deploy_without_a_controller(ray_session, tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": tiny_model_dir, "store_dir": str(tmp_path / "store")},
                "database": {"url": f"sqlite:///{tmp_path / 'z.db'}", "auto_upgrade": True},
                "recorder": {"actor_name": "main-job-recorder"},
                # LoRA versions merged into the base weights: trained, merged, swapped in, then evaluated
                "engine": {"device": "cpu", "max_model_len": 1024, "kv_cache_gib": 1, "lora_serving": "merged"},
                "rollout": {
                    "env": "lowercase",
                    "actors": 1,
                    "group_size": 4,
                    "groups_per_iteration": 3,
                    "max_turns": 1,
                    "max_tokens": 8,
                    "eval_seeds": [0],
                    "eval_group_size": 2,
                },  # fmt: skip
                "controller": {"name": "main-job", "min_groups": 2, "iterations": 1, "poll_interval_s": 0.2},
                "trainer": {"num_workers": 1, "reward_source": "combined"},
            }
        )
    )
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["final_version"] == 1 and set(summary["versions"]) == {"0", "1"}
    assert summary["base_eval_mean_reward"] is not None and summary["final_eval_mean_reward"] is not None
    assert Path(summary["report_files"][1]).stat().st_size > 1000
    report = json.loads(Path(summary["report_files"][0]).read_text())
    assert "wandb_run_id" in report  # the loop's one W&B run (offline under the tests)

    # The loop has ended: status reads the database, deploy says there is nothing to deploy to.
    assert main(["status", "--config", str(config), "--json"]) == 0
    out = capsys.readouterr().out
    status = json.loads(out[out.index("{") :])
    assert status["controller"] == "not running"
    assert [(v["version"], v["status"]) for v in status["versions"]] == [(0, "retired"), (1, "deployed")]
    assert main(["deploy", "1", "--config", str(config)]) == 2
    assert "no controller named 'main-job'" in capsys.readouterr().err

    assert main(["report", "--config", str(config), "--out", str(tmp_path / "report")]) == 0
    # Ray forwards the stopped actors' last log lines to this stdout too; the report's lines start with "v<N>"
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("v")]
    assert lines[0].startswith("v0") and "(2 episodes)" in lines[0] and "(12 episodes)" in lines[0]
    assert (tmp_path / "report" / "reward.png").is_file()
