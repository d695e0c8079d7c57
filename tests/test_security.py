"""Security defaults: local-only dashboard, secrets redacted from logs, weights only from inside the model
store and only as safetensors, no remote code, SQL only through bound parameters."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.config import RayConfig
from cluster.logs import RedactSecrets, configure_logging, redact
from cluster.ray_runtime import init_kwargs
from rollout.config import EngineConfig
from rollout.engine import engine_args

REPO = Path(__file__).resolve().parent.parent


def test_the_dashboard_listens_on_localhost_unless_configured():
    assert init_kwargs(RayConfig(address="local"))["dashboard_host"] == "127.0.0.1"
    assert init_kwargs(RayConfig(address="local", dashboard_host="0.0.0.0"))["dashboard_host"] == "0.0.0.0"
    assert "dashboard_host" not in init_kwargs(RayConfig(address="auto"))  # joining a cluster: its own settings


def test_secrets_are_redacted_from_every_log_line(monkeypatch, caplog):
    monkeypatch.setenv("ZIGGURAT_DB_PASSWORD", "hunter2-very-secret")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-key-0123456789")
    assert redact("postgresql+psycopg://ziggurat:s3cr3t@db:5432/z") == "postgresql+psycopg://ziggurat:***@db:5432/z"
    configure_logging()  # installs the filter on every root handler (here: pytest's capture handler)
    logger = logging.getLogger("ziggurat.test_security")
    logger.warning("connecting to %s with %s", "postgresql://u:pw-in-url@h/db", "hunter2-very-secret")
    logger.error("wandb says key=%s", "wandb-key-0123456789")
    err = caplog.text
    assert "pw-in-url" not in err and "hunter2-very-secret" not in err and "wandb-key-0123456789" not in err
    assert err.count("***") >= 3
    assert any(isinstance(f, RedactSecrets) for h in logging.getLogger().handlers for f in h.filters)


def test_vllm_runs_no_remote_code_and_loads_only_safetensors(tiny_model_dir):
    args = engine_args(EngineConfig(device="cpu"), tiny_model_dir)
    assert args.trust_remote_code is False and args.load_format == "safetensors"
    assert engine_args(EngineConfig(device="cpu", trust_remote_code=True), tiny_model_dir).trust_remote_code is True


def test_served_weights_must_be_safetensors_inside_the_store(ray_session, tiny_model_dir, tmp_path):
    from cluster.controller import Controller, ControllerError
    from recorder import queries
    from recorder.migrate import upgrade
    from tests.test_controller import loop_config

    url = f"sqlite:///{tmp_path / 's.db'}"
    upgrade(url)
    controller = Controller(loop_config(url, tiny_model_dir, tmp_path, "sec"))
    pickled = tmp_path / "store" / "v1"
    pickled.mkdir(parents=True)
    (pickled / "adapter_config.json").write_text("{}")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    version = queries.register_version(controller.db, base_model=tiny_model_dir, kind="lora", artifact_uri=str(pickled))
    queries.update_version(controller.db, version, status="ready")
    with pytest.raises(ControllerError, match="pickled files"):
        controller.deploy(version)
    traversal = str(tmp_path / "store" / ".." / ".." / "etc")
    version = queries.register_version(controller.db, base_model=tiny_model_dir, kind="full", artifact_uri=traversal)
    queries.update_version(controller.db, version, status="ready")
    with pytest.raises(ControllerError, match="outside the model store"):
        controller.deploy(version)


def test_sql_is_never_built_from_strings():
    """Every statement goes through SQLAlchemy expressions or text() with bound parameters, never f-strings."""
    offenders = []
    pattern = re.compile(r"(text|execute|exec_driver_sql|copy|SQL)\(\s*f[\"']")
    for folder in ("cluster", "recorder", "rollout", "trainer"):
        for path in (REPO / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if pattern.search(line) or re.search(r"(text|execute)\([^)]*[\"']\s*%\s*\(", line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, offenders


@pytest.fixture
def restore_log_levels() -> Iterator[None]:
    from cluster.logs import LIBRARY_LOGGERS, OWN_LOGGERS

    names = ["", *OWN_LOGGERS, *LIBRARY_LOGGERS]
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_logs_are_quiet_unless_verbose(monkeypatch, restore_log_levels, caplog):
    monkeypatch.setenv("ZIGGURAT_VERBOSE", "0")
    configure_logging()
    for name in ("ziggurat.loop", "cluster.ray_runtime", "vllm", "ray", "ray.train", "alembic", "httpx"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        assert logging.getLogger(name).isEnabledFor(logging.WARNING), name
    logging.getLogger("ziggurat.test_security").info("routine")
    logging.getLogger("ziggurat.test_security").warning("worth seeing")
    assert "routine" not in caplog.text and "worth seeing" in caplog.text

    monkeypatch.setenv("ZIGGURAT_VERBOSE", "1")  # what init_ray hands a Ray worker of a --verbose run
    configure_logging()
    assert logging.getLogger("ziggurat.loop").isEnabledFor(logging.INFO)
    assert logging.getLogger("ray.train").isEnabledFor(logging.INFO)
    configure_logging(False)  # an explicit choice is passed on to the workers this process starts
    assert os.environ["ZIGGURAT_VERBOSE"] == "0" and not logging.getLogger("vllm").isEnabledFor(logging.INFO)


def test_ray_workers_get_the_console_settings(monkeypatch):
    from cluster.logs import worker_env

    for name in worker_env(False):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    quiet = init_kwargs(RayConfig(address="local"), verbose=False, runtime_env={"env_vars": {"PYTHONPATH": "/r"}})
    env = quiet["runtime_env"]["env_vars"]
    assert quiet["log_to_driver"] is True and quiet["logging_level"] == logging.WARNING
    assert env["PYTHONPATH"] == "/r" and env["ZIGGURAT_VERBOSE"] == "0"
    assert env["VLLM_LOGGING_LEVEL"] == "WARNING" and env["RAY_LOGGER_LEVEL"] == "warning"
    assert env["TQDM_DISABLE"] == "1" and env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"

    loud = init_kwargs(RayConfig(address="local"), verbose=True)
    env = loud["runtime_env"]["env_vars"]
    assert loud["logging_level"] == logging.INFO and env["ZIGGURAT_VERBOSE"] == "1"
    assert env["VLLM_LOGGING_LEVEL"] == "INFO" and "TQDM_DISABLE" not in env  # tqdm reads any value as "off"

    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")  # the user's choice wins
    assert init_kwargs(RayConfig(address="local"), verbose=False)["runtime_env"]["env_vars"]["VLLM_LOGGING_LEVEL"] == (
        "DEBUG"
    )
    # Inside `ray job submit` the job's env_vars are in the environment already; setting them again is refused.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert "VLLM_LOGGING_LEVEL" not in init_kwargs(RayConfig(address="auto"), verbose=False)["runtime_env"]["env_vars"]
