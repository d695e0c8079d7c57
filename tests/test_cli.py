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
