"""vLLM's platform notices are kept off the console; its other warnings are not."""

from __future__ import annotations

import json
import logging
import logging.config
import os

from rollout.vllm_logs import EXPECTED, ExpectedOnCpu, quiet_vllm_logs


def _record(message: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("vllm.platforms.cpu", level, __file__, 1, message, None, None)


def test_the_expected_cpu_notices_are_dropped_and_nothing_else():
    drop = ExpectedOnCpu()
    for expected in EXPECTED:
        assert not drop.filter(_record(f"WARNING something {expected} something"))
    assert drop.filter(_record("KV cache is full: 3 requests preempted"))
    assert drop.filter(_record("Engine core failed", logging.ERROR))


def test_engine_processes_get_a_logging_config_with_the_filter(monkeypatch):
    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)
    monkeypatch.setenv("ZIGGURAT_VERBOSE", "0")
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "WARNING")
    quiet_vllm_logs()

    path = os.environ["VLLM_LOGGING_CONFIG_PATH"]
    config = json.loads(open(path).read())
    assert config["filters"]["expected_on_cpu"]["()"] == "rollout.vllm_logs.ExpectedOnCpu"
    assert all(h["filters"] == ["expected_on_cpu"] for h in config["handlers"].values())
    assert config["loggers"]["vllm"]["level"] == "WARNING"
    logging.config.dictConfig(config)  # what vLLM does with it in each engine process
    handler = logging.getLogger("vllm").handlers[0]
    assert any(isinstance(f, ExpectedOnCpu) for f in handler.filters)


def test_verbose_keeps_every_line(monkeypatch):
    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)
    monkeypatch.setenv("ZIGGURAT_VERBOSE", "1")
    quiet_vllm_logs()

    assert "VLLM_LOGGING_CONFIG_PATH" not in os.environ


def test_the_engine_core_gets_one_openmp_thread_per_core_it_is_bound_to():
    """With the CPU worker process off, the engine core runs the model with the OMP_NUM_THREADS it inherits:
    one per bound core, whatever Ray set in the rollout actor (1)."""
    from rollout.vllm_setup import _core_count

    assert _core_count("0,1") == 2
    assert _core_count("0-3,6") == 5
    assert _core_count("0-1|2-3") == 2  # one engine's share of a per-rank list
    assert _core_count("auto") == len(os.sched_getaffinity(0))
