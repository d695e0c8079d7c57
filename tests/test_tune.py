"""Ray Tune sweeps GRPO settings on recorded groups and picks the best by held-out surrogate gain."""

from __future__ import annotations

import pytest

from tests.test_trainer_job import _config, _record_groups

pytestmark = pytest.mark.slow


def test_sweep_runs_trials_with_asha_and_reports_the_best(ray_session, tiny_model_dir, tmp_path):
    from cluster.tune import SEARCH_SPACE, sweep
    from recorder.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'tune.db'}"
    upgrade(url)
    _record_groups(url, groups=4, size=4)
    result = sweep(_config(url, tiny_model_dir, tmp_path), samples=4, updates=2)
    assert result["trials"] == 4 and (result["train_groups"], result["heldout_groups"]) == (3, 1)
    assert set(result["best_params"]) == set(SEARCH_SPACE)
    assert 1e-5 <= result["best_params"]["learning_rate"] <= 1e-3
    assert isinstance(result["best_heldout_gain"], float)


def test_sweep_refuses_too_little_data(ray_session, tiny_model_dir, tmp_path):
    from cluster.tune import sweep
    from recorder.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'tune.db'}"
    upgrade(url)
    _record_groups(url, groups=1, size=4)
    with pytest.raises(SystemExit, match="at least 2 trainable groups"):
        sweep(_config(url, tiny_model_dir, tmp_path), samples=2, updates=1)
