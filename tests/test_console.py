"""Ziggurat's console: phase lines and bars a person can read, and waiting on a Ray task with a bar."""

from __future__ import annotations

import time

import pytest

from cluster import console


@pytest.fixture(autouse=True)
def bars_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZIGGURAT_QUIET", raising=False)


def test_phase_lines_and_a_bar_are_readable(capsys: pytest.CaptureFixture[str]):
    console.phase("starting 2 rollout actors")
    with console.bar(3, "playing groups", unit="group") as bar:
        bar.update(1)
        console.phase("v1 trained")  # printed above the bar, never inside it
        bar.update(2)
    out = capsys.readouterr().out
    lines = [line.split("\r")[-1].strip() for line in out.splitlines()]
    assert "starting 2 rollout actors" in lines and "v1 trained" in lines
    final = [line for line in lines if line.startswith("playing groups")][-1]
    assert "3/3" in final and "group" in final and "100%" in final


def test_quiet_drops_the_bars_but_not_the_phases(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("ZIGGURAT_QUIET", "1")
    with console.bar(2, "training") as bar:
        bar.update(2)
    console.phase("done")
    assert capsys.readouterr().out == "done\n"


def test_follow_returns_the_value_and_drives_the_bar(ray_session, capsys: pytest.CaptureFixture[str]):
    import ray

    @ray.remote(num_cpus=0)
    def train(value: int) -> int:
        time.sleep(1.5)
        return value * 2

    calls = []

    def progress() -> tuple[float, float] | None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise ConnectionError("database not reachable yet")  # must not end the wait
        if len(calls) == 2:
            return None  # total not known yet
        return min(len(calls) - 2, 4), 4

    result = console.follow(train.remote(21), progress, "training v1", "update", timeout_s=120, poll_s=0.1)
    assert result == 42
    assert len(calls) >= 6  # polled every 0.1 s while the task ran
    lines = [line.split("\r")[-1] for line in capsys.readouterr().out.splitlines()]
    final = [line for line in lines if line.startswith("training v1")][-1]
    assert "4/4" in final and "update" in final


def test_follow_raises_timeout_naming_what_it_waited_for(ray_session):
    import ray

    @ray.remote(num_cpus=0)
    def stuck() -> None:
        time.sleep(60)

    ref = stuck.remote()
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match="evaluating v3"):
            console.follow(ref, lambda: None, "evaluating v3", "episode", timeout_s=0.5, poll_s=0.1)
        assert time.monotonic() - started < 10
    finally:
        ray.cancel(ref, force=True)
