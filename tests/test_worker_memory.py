"""trainer.memory: a worker's peak per span of work, and the cache handed back between batches, checked in
fresh processes run the way the training workers run (jemalloc preloaded and told to keep freed pages)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import ray

from cluster.train_job import JEMALLOC_CONF

JEMALLOC = Path(ray.__file__).parent / "core" / "libjemalloc.so"

PROGRAM = textwrap.dedent(
    """
    import json, torch
    from trainer.memory import peak_memory_gb, release_freed_memory, reset_peak, resident_gb, runs_jemalloc

    start = resident_gb()
    blocks = [torch.ones(1024, 1024 + i) for i in range(256)]  # about 1.1 GB in blocks of different sizes
    del blocks
    freed = resident_gb()
    peak_before = peak_memory_gb()["peak_rss_gb"]
    released = release_freed_memory()
    end = resident_gb()
    reset = reset_peak()
    peak_after_reset = peak_memory_gb()["peak_rss_gb"]
    print(json.dumps({
        "jemalloc": runs_jemalloc(), "start": start, "freed": freed, "released": released, "end": end,
        "reset": reset, "peak_before": peak_before, "peak_after_reset": peak_after_reset,
    }))
    """
)


def run(env_extra: dict[str, str]) -> dict[str, float]:
    env = {**os.environ, **env_extra, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not JEMALLOC.exists(), reason="this Ray has no libjemalloc.so")
def test_jemalloc_keeps_freed_pages_until_they_are_handed_back() -> None:
    got = run({"LD_PRELOAD": str(JEMALLOC), "MALLOC_CONF": JEMALLOC_CONF})
    assert got["jemalloc"] == 1
    # what the workers' jemalloc keeps after a free: the whole gigabyte stays resident ...
    assert got["freed"] - got["start"] > 0.9, got
    # ... until it is purged: then resident memory is back near where it started, and the call says how much
    assert got["released"] > 0.9, got
    assert got["end"] - got["start"] < 0.15, got
    assert got["reset"] and got["peak_before"] - got["peak_after_reset"] > 0.9, got


def test_the_peak_restarts_and_the_system_allocator_trims() -> None:
    got = run({"LD_PRELOAD": ""})
    assert got["jemalloc"] == 0
    assert got["reset"] and got["peak_before"] - got["peak_after_reset"] > 0.9, got
    # glibc returns large blocks at free already (mmap); whatever it kept, the trim leaves little behind
    assert got["end"] - got["start"] < 0.15, got
