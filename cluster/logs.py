"""One logging setup for every entrypoint (CLI, main job, training job)."""

from __future__ import annotations

import logging


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Alembic announces each of its plugins at INFO whenever it is imported; that is noise here.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
