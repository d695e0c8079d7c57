"""reward.png's series from a small SQLite database: means, standard errors and wall offsets per version."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from cluster.report import reward_series, standard_error, version_rewards, write_report
from recorder import queries
from recorder.migrate import upgrade
from recorder.records import TrajectoryRecord
from recorder.store import TrajectoryStore, create_db_engine
from tests.recorder_data import finished

START = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def _episode(tid: str, version: int, reward: float, is_eval: bool, start_s: float, end_s: float) -> TrajectoryRecord:
    record = finished(tid, f"g-{version}-{int(is_eval)}", reward, version=version)
    record.is_eval = is_eval
    record.started_at = START + timedelta(seconds=start_s)
    record.finished_at = START + timedelta(seconds=end_s)
    return record


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'report.db'}"
    upgrade(url)
    store = TrajectoryStore(url)
    store.write(
        [
            _episode("e0a", 0, 0.1, True, 0, 10),
            _episode("e0b", 0, 0.3, True, 1, 12),
            _episode("e0c", 0, 0.5, True, 2, 14),
            _episode("t0a", 0, 1.0, False, 20, 30),
            _episode("t0b", 0, 0.0, False, 21, 31),
            _episode("e1a", 1, 0.6, True, 90, 100),
            _episode("e1b", 1, 0.8, True, 91, 105),
            _episode("e2a", 2, 0.9, True, 150, 160),  # one episode: no standard error
        ]
    )
    store.dispose()
    engine = create_db_engine(url)
    queries.ensure_base_version(engine, "base")
    for _ in range(3):  # version 3 has no episodes at all
        queries.register_version(engine, base_model="base", kind="lora")
    yield engine
    engine.dispose()


def test_standard_error_matches_statistics():
    rewards = [0.1, 0.3, 0.5, 0.2]
    mean = statistics.fmean(rewards)
    mean_sq = statistics.fmean(r * r for r in rewards)
    expected = statistics.stdev(rewards) / math.sqrt(len(rewards))
    assert standard_error(mean, mean_sq, len(rewards)) == pytest.approx(expected)
    assert standard_error(0.5, 0.25, 1) is None
    assert standard_error(0.5, 0.25 - 1e-17, 3) == 0.0  # all-equal rewards never give sqrt of a negative


def test_series_carry_means_standard_errors_and_wall_offsets(engine, tmp_path: Path):
    versions = version_rewards(engine)
    by_version = {v["version"]: v for v in versions}
    assert sorted(by_version) == [0, 1, 2, 3]
    assert by_version[0]["eval_episodes"] == 3 and by_version[0]["train_episodes"] == 2
    assert by_version[0]["eval_mean_reward"] == pytest.approx(0.3)
    assert by_version[0]["eval_stderr"] == pytest.approx(statistics.stdev([0.1, 0.3, 0.5]) / math.sqrt(3))
    assert by_version[0]["train_stderr"] == pytest.approx(statistics.stdev([1.0, 0.0]) / math.sqrt(2))
    assert by_version[1]["eval_stderr"] == pytest.approx(statistics.stdev([0.6, 0.8]) / math.sqrt(2))
    assert by_version[2]["eval_stderr"] is None
    # Seconds from the first episode's start to the version's last held-out episode finishing.
    assert [by_version[v]["eval_wall_s"] for v in (0, 1, 2, 3)] == [pytest.approx(14), pytest.approx(105),
                                                                   pytest.approx(160), None]  # fmt: skip

    series = reward_series(versions)
    assert series["version"] == [0, 1, 2]
    assert series["mean"] == pytest.approx([0.3, 0.7, 0.9])
    assert series["stderr"][2] == 0.0  # drawn without an error bar
    assert series["wall_s"] == pytest.approx([14, 105, 160])
    assert reward_series(versions, "train")["version"] == [0]

    files = write_report({"versions": versions}, tmp_path / "out")
    png = tmp_path / "out" / "reward.png"
    assert str(png) in files and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_empty_database_still_writes_a_png(tmp_path: Path):
    write_report({"versions": []}, tmp_path / "empty")
    assert (tmp_path / "empty" / "reward.png").stat().st_size > 0
