"""How a vLLM engine is set up from an EngineConfig: the environment variables vLLM reads at start, and its
AsyncEngineArgs (CPU defaults: float32, eager; safetensors only; processed log-probs). No engine runs here:
rollout.engine starts one with these.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rollout.config import EngineConfig
from rollout.vllm_logs import quiet_vllm_logs


def resolve_device(config: EngineConfig) -> str:
    """`cpu` or `cuda`: engine.device, or (auto) whichever torch finds."""
    if config.device != "auto":
        return config.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_core_list() -> str:
    cores = sorted(os.sched_getaffinity(0))
    return ",".join(str(core) for core in cores)


def _core_count(bind: str) -> int:
    """Cores in a VLLM_CPU_OMP_THREADS_BIND list such as `0-3,6` (one engine's share; `auto`: all of them)."""
    if bind in ("auto", "nobind", ""):
        return len(os.sched_getaffinity(0))
    count = 0
    for part in bind.split("|")[0].split(","):
        low, _, high = part.partition("-")
        count += int(high) - int(low) + 1 if high else 1
    return count


def configure_vllm_environment(config: EngineConfig, model_path: str) -> None:
    """Export the settings vLLM reads from the environment; call before the engine starts.

    Values the user already exported win, so a cluster can override them per node; except OMP_NUM_THREADS on
    CPU, which Ray sets to 1 in every worker (indistinguishable from a user's 1): the engine's threads follow
    VLLM_CPU_OMP_THREADS_BIND, which is the setting to override.
    """
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    quiet_vllm_logs()
    if Path(model_path).exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if resolve_device(config) == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gib))
        bind = _cpu_core_list() if config.cpu_threads_bind == "all" else config.cpu_threads_bind
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)
        # AsyncLLM always runs the engine core in a process of its own; on CPU vLLM then adds a worker process
        # under it by default (the mp executor), a third interpreter that imports torch and vLLM again. With
        # this off the core process runs the model itself: SmolLM2's engine starts in 31 s instead of 40 s on
        # a 2-core machine, and generates just as fast (measured with the same 16 x 48-token batch).
        if os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0") == "0":
            # The core process inherits this one's OMP_NUM_THREADS, which Ray sets to 1 in its workers (the mp
            # worker got one thread per bound core from vLLM): without this, generation in a rollout actor took
            # 1.8x as long.
            os.environ["OMP_NUM_THREADS"] = str(_core_count(os.environ["VLLM_CPU_OMP_THREADS_BIND"]))


def engine_args(config: EngineConfig, model_path: str) -> Any:
    """vLLM AsyncEngineArgs for this config (CPU defaults: float32, eager)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    on_cpu = resolve_device(config) == "cpu"
    dtype = config.dtype if config.dtype != "auto" else ("float32" if on_cpu else "auto")
    eager = config.enforce_eager if config.enforce_eager is not None else on_cpu
    kwargs: dict[str, Any] = {
        "model": model_path,
        "dtype": dtype,
        "enforce_eager": eager,
        "max_model_len": config.max_model_len,
        "max_num_seqs": config.max_num_seqs,
        "seed": config.seed,
        "disable_log_stats": True,
        "enable_lora": config.enable_lora,
        "trust_remote_code": config.trust_remote_code,
        "load_format": "safetensors",  # never unpickle weights (.bin/.pt) from a folder
        # Log-probs of the distribution that sampled (after temperature), not vLLM's default raw ones: the
        # trainer divides its logits by each call's temperature and must meet the same numbers.
        "logprobs_mode": "processed_logprobs",
        # The weight-loading bars pass `disable` explicitly, so TQDM_DISABLE cannot hide them; only --verbose.
        "use_tqdm_on_load": os.environ.get("ZIGGURAT_VERBOSE", "").strip().lower() in ("1", "true", "yes"),
        # reload_weights_keeping_ties: in-place weight swaps that keep a tied LM head on the new embeddings
        "worker_extension_cls": "rollout.vllm_worker.WeightsReload",
    }
    if config.enable_lora:
        kwargs.update(max_lora_rank=config.max_lora_rank, max_loras=config.max_loras)
    if not on_cpu:
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
    return AsyncEngineArgs(**kwargs)
