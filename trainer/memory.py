"""A training worker's resident memory: what it holds now, its peak over a span of work, and giving back
to the OS what the allocator keeps after freeing it.

Linux only where it says so (procfs); elsewhere the functions answer what they can and change nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import resource
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_ALL_ARENAS = 4096  # jemalloc's MALLCTL_ARENAS_ALL: "arena.<i>.purge" for every arena at once


@functools.cache  # a process's allocator is fixed when it starts: read once, not every update
def runs_jemalloc() -> int:
    """1 if this process runs jemalloc (trainer.allocator), else 0: read from the libraries mapped into the
    process, so a report says what really ran, not what was asked for."""
    try:
        return int("libjemalloc" in Path("/proc/self/maps").read_text())
    except OSError:  # no procfs: not Linux, where the allocator setting does nothing either
        return 0


def _status_gb(field: str) -> float | None:
    """A memory line of /proc/self/status (kilobytes there), in GB; None without procfs."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return None


def resident_gb() -> float | None:
    """This process's resident memory now (VmRSS), in GB; None without procfs."""
    return _status_gb("VmRSS")


def reset_peak() -> bool:
    """Start a new span for `peak_memory_gb`: the kernel's resident high-water mark is set back to what the
    process holds now (/proc/self/clear_refs, "5"). False where it cannot be (then the peak stays the
    process's whole life). A persistent worker resets it per batch, so a batch's peak is its own, not an
    earlier batch's or an earlier publish's."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_gb() -> dict[str, float]:
    """This process's peak resident memory (and, on a GPU, peak allocated GPU memory) since the last
    `reset_peak` (or its start), in GB.

    The kernel's high-water mark (VmHWM), not getrusage's ru_maxrss: that one also keeps the peak of the
    process image before exec (a worker forked from a large parent reports the parent's size) and of exited
    threads, and `reset_peak` cannot lower it."""
    hwm = _status_gb("VmHWM")
    rss = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes
    peak = {"peak_rss_gb": rss}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return peak


def release_freed_memory() -> float:
    """Hand the OS back the pages the allocator keeps after they were freed; the GB it gave back.

    The workers' jemalloc is told never to return freed pages by itself (trainer.allocator), so an update
    reuses them instead of faulting them in again. Between batches that cache only grows: the next batch's
    tensors have other shapes, and what the last one left does not fit them all (measured on the market job:
    about 0.4 GB more resident after every batch, allocated memory flat at 0.3 GB). Purged between batches,
    every batch starts from what is really allocated. Under the system allocator this is glibc's
    malloc_trim."""
    before = resident_gb()
    try:
        libc = ctypes.CDLL(None)
        if runs_jemalloc():
            status = libc.mallctl(f"arena.{_ALL_ARENAS}.purge".encode(), None, None, None, ctypes.c_size_t(0))
            if status != 0:
                log.warning("jemalloc refused to purge its arenas (mallctl returned %d)", status)
        elif hasattr(libc, "malloc_trim"):
            libc.malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError) as exc:  # not glibc/jemalloc: nothing to hand back
        log.debug("cannot release freed memory: %s", exc)
    after = resident_gb()
    return max(0.0, before - after) if before is not None and after is not None else 0.0
