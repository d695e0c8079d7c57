"""One offline W&B run per loop, holding evaluations, rollouts, every training update and swaps."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from cluster.config import ZigguratConfig
from cluster.tracking import LoopTracker


def _batch(batch_id: int, losses: list[float]) -> dict:
    updates = [
        {"update": i + 1, "loss": loss, "clip_fraction": 0.1, "approx_kl": 0.01, "kl_ref": 0.02, "entropy": 1.5,
         "grad_norm": 0.7, "tokens": 512, "tokens_per_s": 100.0, "elapsed_s": 0.5}
        for i, loss in enumerate(losses)
    ]  # fmt: skip
    return {"id": batch_id, "status": "completed", "stats": {"updates": updates, "progress": {"done": len(losses)}}}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)  # nothing W&B writes by itself lands in the repository
    return tmp_path / "run"


def _records(path: Path) -> list[object]:
    """The protobuf records of an offline run's transaction log (`run-<id>.wandb`). wandb 0.31 ships no
    Python reader for it (wandb-core writes it), so this reads its LevelDB-log framing: a 7-byte header
    (":W&B", magic, version), then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type
    1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending, found = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            found.append(record)
    return found


def _value(item: object) -> object:
    return item.key or ".".join(item.nested_key), json.loads(item.value_json)


def _history_and_summary(run_folder: Path) -> tuple[list[dict], dict]:
    # wandb-core may still be writing the log when finish() returns (seen on a loaded 2-core CI machine: no
    # history rows yet): read it once it holds the run's exit record, which wandb writes last.
    deadline = time.monotonic() + 60
    while True:
        try:
            records = _records(next(run_folder.glob("run-*.wandb")))
        except Exception:  # a record cut off mid-write
            if time.monotonic() > deadline:
                raise
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    rows, summary = [], {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append(dict(_value(item) for item in record.history.item))
        elif kind == "summary":  # incremental: later updates win
            summary.update(_value(item) for item in record.summary.update)
    return rows, summary


def test_one_offline_run_holds_every_logged_key(offline: Path, capsys: pytest.CaptureFixture[str]):
    tracker = LoopTracker(ZigguratConfig(), offline)
    assert tracker.run_id
    tracker.log_evaluation(0, 0.25, 8)
    tracker.log_training(1, _batch(1, [0.5, 0.4]))
    tracker.log_training(2, _batch(2, [0.3]))
    tracker.log_training(3, {"id": 3, "stats": {}})  # no per-update list: tolerated
    tracker.log_rollouts(1, 1, 0.3, 16, 250.0)
    tracker.log_swap(1, {"load_s": 1.5, "swap_s": 0.2, "version": 1})
    tracker.log_evaluation(1, 0.5, 8)
    tracker.finish()
    tracker.finish()  # idempotent

    runs = list((offline / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    assert runs[0].name.endswith(tracker.run_id)
    rows, summary = _history_and_summary(runs[0])
    assert [row["_step"] for row in rows] == list(range(len(rows)))  # one monotonically increasing step
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert losses == [0.5, 0.4, 0.3]  # every update at its own step
    assert [row["eval/mean_reward"] for row in rows if "eval/mean_reward" in row] == [0.25, 0.5]
    assert all("version" in row and "wall_s" in row for row in rows)
    keys = set().union(*rows)
    expected = {
        "train/clip_fraction",
        "train/approx_kl",
        "train/kl_ref",
        "train/entropy",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/batch_id",
        "rollout/tokens_per_s",
        "swap/load_s",
        "swap/swap_s",
    }
    assert expected <= keys, expected - keys
    assert summary["eval/mean_reward"] == 0.5 and summary["train/loss"] == 0.3 and summary["version"] == 1
    assert "wandb" not in capsys.readouterr().out.lower()  # W&B kept off the console


def test_disabled_tracking_logs_nothing(offline: Path):
    tracker = LoopTracker(ZigguratConfig(), offline, enabled=False)
    assert tracker.run_id is None and not tracker.enabled
    tracker.log_evaluation(0, 0.1, 1)
    tracker.log_training(1, _batch(1, [0.1]))
    tracker.finish()
    assert not (offline / "wandb").exists()
