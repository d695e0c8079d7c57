"""Ziggurat's own progress on the console (stdout), written for a person watching the loop.

Log records are for diagnosis and stay quiet by default (cluster.logs); this module prints the few lines
that say what the loop is doing now (`phase`) and progress bars for the long waits (`bar`, `follow`).
Set ZIGGURAT_QUIET=1 to drop the bars (e.g. in CI logs); phase lines still print.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

log = logging.getLogger("ziggurat.console")

# A bar redrawn twice a second is fine on a terminal but floods a file or CI log with carriage returns.
_TTY_REFRESH_S = 0.5
_FILE_REFRESH_S = 30.0


def quiet() -> bool:
    return os.environ.get("ZIGGURAT_QUIET", "").strip().lower() in ("1", "true", "yes")


def phase(message: str) -> None:
    """One line on stdout; through tqdm.write so a bar that is being drawn is cleared and redrawn below it."""
    tqdm.write(message, file=sys.stdout)


def bar(total: int | None, desc: str, unit: str = "it") -> tqdm:
    """A progress bar on stdout (use it as a context manager); drawn as nothing when ZIGGURAT_QUIET=1.

    `disable` is passed explicitly so that TQDM_DISABLE, which Ray workers get to hide third-party bars,
    never hides this one if it leaks into the driver's environment.
    """
    stream = sys.stdout
    interactive = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=stream,
        disable=quiet(),
        dynamic_ncols=interactive,
        mininterval=_TTY_REFRESH_S if interactive else _FILE_REFRESH_S,
        leave=True,
    )


def _advance(progress_bar: tqdm, progress: Callable[[], tuple[float, float] | None]) -> None:
    try:
        point = progress()
    except Exception:  # progress is cosmetic: a failed probe must not end the wait it decorates
        log.debug("progress probe for %r failed", progress_bar.desc, exc_info=True)
        return
    if point is None or progress_bar.disable:
        return
    done, total = point
    if progress_bar.total != total:
        progress_bar.total = total
        progress_bar.refresh()
    if done != progress_bar.n:  # update() redraws at most every mininterval: a log file gets few lines
        progress_bar.update(done - progress_bar.n)


def follow(
    ref: Any,
    progress: Callable[[], tuple[float, float] | None],
    desc: str,
    unit: str,
    timeout_s: float,
    poll_s: float = 1.0,
) -> Any:
    """Wait for a Ray ObjectRef while a bar shows `progress()` -> (done, total), or None while unknown.

    Returns `ray.get(ref)` (a task's error is raised as Ray raises it); raises TimeoutError naming `desc`
    once `timeout_s` has passed without a result. The ref is left running on timeout: the caller decides
    whether to cancel it.
    """
    import ray

    deadline = time.monotonic() + timeout_s
    with bar(None, desc, unit) as progress_bar:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{desc}: no result after {timeout_s:.0f} s")
            ready, _ = ray.wait([ref], timeout=min(poll_s, remaining))
            _advance(progress_bar, progress)  # the caller's probe carries its own short deadline
            if ready:
                return ray.get(ref)
