from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ZIGGURAT = [sys.executable, "-m", "cluster.cli"]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ZIGGURAT, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_subcommands():
    result = _run("--help")
    assert result.returncode == 0
    for command in ("models", "config", "db", "train", "versions", "rollout", "run"):
        assert command in result.stdout
    models = _run("models", "--help")
    assert "fetch" in models.stdout and "tiny" in models.stdout


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "ziggurat"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "models" in result.stdout


def test_config_check_prints_defaults_filled_in():
    result = _run("config", "check", "configs/local.yaml")
    assert result.returncode == 0, result.stderr
    assert "kv_cache_gib: 1" in result.stdout
    assert "password_env: ZIGGURAT_DB_PASSWORD" in result.stdout


def test_config_check_rejects_a_bad_file_naming_the_key(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ray:\n  adress: local\n")
    result = _run("config", "check", str(bad))
    assert result.returncode == 2
    assert "unknown key 'ray.adress'" in result.stderr
    assert "Traceback" not in result.stderr


def test_install_script_is_idempotent_and_fast():
    def install() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "scripts/install.sh"], cwd=REPO, capture_output=True, text=True, timeout=900)

    first = install()  # usually a no-op already (scripts/test.sh ran it); installs if pyproject changed
    assert first.returncode == 0, first.stdout + first.stderr
    started = time.perf_counter()
    result = install()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nothing to do" in result.stdout
    assert time.perf_counter() - started < 15


def test_verbose_reaches_the_run_command_either_way():
    from cluster.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["-v", "run"]).verbose is True
    assert parser.parse_args(["run", "--verbose"]).verbose is True
    assert parser.parse_args(["run"]).verbose is False
    assert parser.parse_args(["status", "--json"]).json is True


_CONTROLLER_STATUS = {
    "deployed_version": 2,
    "readiness": {
        "ready": False,
        "unmet": ["trainable groups: 1 of 4 needed (3 judged groups, 2 too small or with equal rewards)"],
        "groups_with_variance": 1,
        "trainable_trajectories": 4,
    },
    "health": {
        "actors": {
            "zc-rollout-0": {"alive": True, "served_version": 2, "episodes_in_flight": 3, "swapping": False},
            "zc-rollout-1": {"alive": False, "error": "not running"},
        },
        "database": {"reachable": True},
        "recorder": {"alive": True},
        "training": [{"batch_id": 3, "status": "running", "job": "actor:x", "done": 2, "total": 8, "fraction": 0.25}],
    },
    "versions": [
        {"version": 0, "status": "retired", "kind": "base", "training_batch_id": None, "metrics": {}},
        {"version": 1, "status": "retired", "kind": "lora", "training_batch_id": 1, "metrics": {}},
        {
            "version": 2,
            "status": "deployed",
            "kind": "lora",
            "training_batch_id": 2,
            "metrics": {"eval_mean_reward": 0.5, "eval_episodes": 8},
        },
    ],  # fmt: skip
}


def test_status_reads_as_a_table():
    from cluster.config import ZigguratConfig
    from cluster.status_view import format_status

    rewards = {0: {"eval_mean_reward": 0.25, "eval_stderr": 0.05, "eval_episodes": 8}}
    text = format_status(_CONTROLLER_STATUS, ZigguratConfig(), rewards)
    lines = text.splitlines()
    assert "deployed     v2" in lines
    alive = next(line for line in lines if "zc-rollout-0" in line).split()
    assert alive[:4] == ["zc-rollout-0", "yes", "v2", "3"]
    dead = next(line for line in lines if "zc-rollout-1" in line).split()
    assert dead[:3] == ["zc-rollout-1", "NO", "-"] and "not running" in " ".join(dead)
    assert "training     batch 3 running, 2/8 updates (25%)" in lines
    assert any(line.startswith("readiness    not ready (1 trainable groups") for line in lines)
    assert any("trainable groups: 1 of 4 needed" in line and line.strip().startswith("-") for line in lines)
    by_version = {line.split()[0]: line for line in lines if line.strip().startswith("v") and line[2] == "v"}
    assert "0.250 ± 0.050 (8 ep)" in by_version["v0"]
    assert "deployed" in by_version["v2"] and "0.500 (8 ep)" in by_version["v2"]  # from the version's metrics
    assert by_version["v1"].rstrip().endswith("-")
    assert "{" not in text  # no JSON for people


def test_status_without_a_controller_reads_the_database_rows():
    from cluster.config import ZigguratConfig
    from cluster.status_view import format_status

    status = {
        "controller": "not running",
        "readiness": {"ready": False, "groups_with_variance": 0, "trainable_trajectories": 0},
        "versions": [
            {
                "version": 0,
                "status": "deployed",
                "kind": "base",
                "training_batch_id": None,
                "eval_mean_reward": 0.1,
                "eval_stderr": None,
                "eval_episodes": 2,
            }
        ],  # fmt: skip
        "training": [{"id": 4, "status": "pending", "stats": {}}],
    }
    text = format_status(status, ZigguratConfig(), {0: status["versions"][0]})
    assert "not running" in text.splitlines()[0]
    assert "deployed     v0" in text and "training     batch 4 pending" in text
    assert "trainable groups: 0 of" in text and "0.100 (2 ep)" in text
