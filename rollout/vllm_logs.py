"""vLLM's log lines that say nothing about a run, kept off the console unless it is verbose.

On a CPU machine every engine start warns, in each of its processes, that Triton, tcmalloc and CUDA graphs
are missing and that eager mode is on: about twenty lines per engine, the same on every run, none of them
something a user can act on. `quiet_vllm_logs` drops exactly those (listed in `EXPECTED`) and nothing else,
in this process and, through the logging config vLLM reads from `VLLM_LOGGING_CONFIG_PATH`, in the engine
and worker processes vLLM spawns. Every other warning and error still shows. ZIGGURAT_VERBOSE=1 (the CLI's
--verbose) keeps them all.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile

# Substrings of the messages vLLM 0.32 logs on every CPU engine start (the platform, not the run).
EXPECTED = (
    "Enforce eager set, disabling torch.compile",
    "Inductor compilation was disabled by user settings",
    "Triton is not installed. triton-cpu is expected",
    "Triton is installed, but doesn't include CPU backend",
    "Reset SSM cache type to float32",
    "Model Runner V2 requires Triton",
    "is not found in LD_PRELOAD",
    "is set; leaving Torch threads at",
    "Passing raw prompts to InputProcessor is deprecated",
    # vllm_setup turns the CPU worker process off; AsyncLLM still keeps the engine core out of this process,
    # and nothing seeds this process's random state, so the warning does not apply.
    "Since VLLM_ENABLE_V1_MULTIPROCESSING is set to False",
    # An in-place reload of a tied checkpoint (no head weights; rotary embeddings have none): the worker
    # extension (rollout.vllm_worker) ties the head to the new embeddings right after.
    "RotaryEmbedding: Failed to load weights",
    "ParallelLMHead: Failed to load weights",
)


class ExpectedOnCpu(logging.Filter):
    """Drops the records whose message is one of `EXPECTED`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(expected in message for expected in EXPECTED)


def _verbose() -> bool:
    return os.environ.get("ZIGGURAT_VERBOSE", "").strip().lower() in ("1", "true", "yes")


def _has_filter(handler: logging.Handler) -> bool:
    return any(isinstance(f, ExpectedOnCpu) for f in handler.filters)


def quiet_vllm_logs() -> None:
    """Install `ExpectedOnCpu` on vLLM's handlers here and in the processes vLLM starts from now on (unless
    verbose, or the user set VLLM_LOGGING_CONFIG_PATH or VLLM_CONFIGURE_LOGGING=0 themselves)."""
    if _verbose():
        return
    from vllm.logger import DEFAULT_LOGGING_CONFIG  # importing vllm creates its handler: filter it after

    # lastResort prints records logged before vLLM's own handler exists (the Triton check at import).
    for handler in (*logging.getLogger("vllm").handlers, logging.lastResort):
        if handler is not None and not _has_filter(handler):
            handler.addFilter(ExpectedOnCpu())
    if "VLLM_LOGGING_CONFIG_PATH" in os.environ or os.environ.get("VLLM_CONFIGURE_LOGGING") == "0":
        return
    config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
    config["filters"] = {"expected_on_cpu": {"()": f"{__name__}.ExpectedOnCpu"}}
    for handler in config["handlers"].values():
        handler["filters"] = ["expected_on_cpu"]
    level = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")
    for section in ("handlers", "loggers"):
        for entry in config[section].values():
            entry["level"] = level
    for formatter in config["formatters"].values():
        formatter["log_level"] = level
    with tempfile.NamedTemporaryFile("w", prefix="ziggurat-vllm-logging-", suffix=".json", delete=False) as file:
        json.dump(config, file)
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = file.name
