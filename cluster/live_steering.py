"""The controller's live-mode calls (mixed into `cluster.controller.Controller`): `ziggurat run` starts the
loop and follows `live_status`; `ziggurat pause/resume/stop` steer it from any shell or `ray job submit`.

What the loop was asked to do (run until version N, paused or not) is written to a small JSON file in the
model store (`live-<controller name>.json`, shared storage on a cluster like the versions themselves), so a
controller that Ray restarts after a crash starts the loop again where it was: it recovers the training job
that was running (Controller.recover), restores restarted actors, and carries on towards the same version.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from cluster.live import LiveLoop

log = logging.getLogger("ziggurat.live")

RESUMABLE = ("running", "paused", "starting")


class LiveSteering:
    config: Any
    db: Any
    store: Path
    _live: LiveLoop | None
    recover: Any
    sync_workers: Any

    def _live_state_file(self) -> Path:
        return self.store / f"live-{self.config.controller.name}.json"

    def _persist_live(self, state: str) -> None:
        loop = self._live
        record = {"state": state, "until_version": loop.until_version if loop else None}
        self.store.mkdir(parents=True, exist_ok=True)
        path = self._live_state_file()
        path.with_suffix(".tmp").write_text(json.dumps(record))
        path.with_suffix(".tmp").replace(path)  # one rename: a crash never leaves half a file

    def resume_live_after_restart(self) -> None:
        """Called by a controller Ray restarted: start the loop again if it was running or paused."""
        path = self._live_state_file()
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if record.get("state") not in RESUMABLE or self.config.controller.mode != "live":
            return

        def resume() -> None:
            try:
                self.recover()  # a batch that was training: waited for (it goes on) or failed (its job died)
                self.sync_workers()
                self._start_loop(record.get("until_version"), paused=record["state"] == "paused")
                log.warning("controller restarted: live loop resumed towards version %s", record.get("until_version"))
            except Exception:
                log.exception("the restarted controller could not resume the live loop; `ziggurat run` starts it")

        threading.Thread(target=resume, name="ziggurat-live-resume", daemon=True).start()

    def start_live(self, versions: int | None = None) -> dict[str, Any]:
        """Start the live loop (one per controller; a running one is kept) until `versions` more versions
        (default controller.live_versions; None runs until `stop`) have been trained."""
        from recorder import queries

        if self._live is not None and self._live.state not in ("stopped", "failed"):
            return self._live.status()
        if self.config.controller.mode != "live":
            from cluster.controller import ControllerError

            raise ControllerError(
                "controller.mode is sync: the driver's loop (`ziggurat run`) plays, trains and swaps; set "
                "controller.mode: live in the config to let the controller run the loop itself"
            )
        versions = versions if versions is not None else self.config.controller.live_versions
        newest = max((v["version"] for v in queries.list_versions(self.db)), default=0)
        return self._start_loop(None if versions is None else newest + versions)

    def _start_loop(self, until_version: int | None, paused: bool = False) -> dict[str, Any]:
        loop = LiveLoop(self, until_version)  # type: ignore[arg-type]
        loop.on_state = self._persist_live
        self._live = loop
        loop.start()
        if paused:
            loop.pause()
        return loop.status()

    def _steer(self, action: str) -> dict[str, Any]:
        if self._live is None:
            from cluster.controller import ControllerError

            raise ControllerError("no live loop is running on this controller; start one with `ziggurat run`")
        getattr(self._live, action)()
        return self._live.status()

    def pause(self) -> dict[str, Any]:
        """Admit no new groups and claim no new batch; what is in flight finishes."""
        return self._steer("pause")

    def resume(self) -> dict[str, Any]:
        return self._steer("resume")

    def stop_live(self) -> dict[str, Any]:
        """Stop the live loop once the groups in flight and the training batch end (their results are kept)."""
        return self._steer("stop")

    def live_status(self, since_event: int = 0) -> dict[str, Any] | None:
        """The live loop's state, counters and events after `since_event` (None if none started here)."""
        return None if self._live is None else self._live.status(since_event)
