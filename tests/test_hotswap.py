"""Hot-swap under load: 10 swaps while 2 rollout actors generate; no request fails, every flip is complete."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.test_controller import loop_config

pytestmark = pytest.mark.slow


def _bench_module():
    from tests.conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("bench_hotswap", REPO_ROOT / "bench" / "hotswap.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_ten_swaps_under_load_lose_no_request(ray_session, tiny_model_dir, tmp_path):
    from recorder.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'swap.db'}"
    upgrade(url)
    config = loop_config(url, tiny_model_dir, tmp_path, "swap")
    result = _bench_module().measure(config, swaps=10)
    assert result["swaps"] == 10 and result["actors"] == 2
    assert result["failed_requests"] == 0, result["failures"]
    assert result["served_mismatches"] == 0
    assert result["groups_during_swaps"] >= 2  # the actors really were generating throughout
    assert 0 < result["swap_p50_s"] <= result["swap_p99_s"] < config.controller.swap_timeout_s
