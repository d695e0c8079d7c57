"""Batch groups -> training tensors: masks over policy tokens only, multi-turn rows, dropped groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recorder.queries import CallData, GroupData, TrajectoryData
from trainer.data import build_rows, collate, shard_groups


def _call(prompt: list[int], completion: list[int], step: int = 0) -> CallData:
    logprobs = -np.arange(1, len(completion) + 1, dtype=np.float32) / 10
    return CallData(step, 0, 0, np.array(prompt, np.int32), np.array(completion, np.int32), logprobs)


def _group(name: str, rewards: list[float], calls: list[list[CallData]] | None = None, version: int = 0) -> GroupData:
    calls = calls or [[_call([1, 2, 3], [7, 8])] for _ in rewards]
    trajectories = [
        TrajectoryData(f"{name}-{i}", version, r, c) for i, (r, c) in enumerate(zip(rewards, calls, strict=True))
    ]
    return GroupData(name, f"scenario-{name}", trajectories)


def test_single_turn_rows_mask_only_the_completion():
    rows, stats = build_rows([_group("g", [1.0, 0.0, 0.0, 1.0])])
    batch = collate(rows, pad_id=0, stats=stats)
    assert batch.input_ids[0].tolist() == [1, 2, 3, 7, 8]
    assert batch.loss_mask[0].tolist() == [0, 0, 0, 1, 1]
    assert batch.behaviour_logprobs[0].tolist() == pytest.approx([0, 0, 0, -0.1, -0.2])
    assert batch.advantages.tolist() == pytest.approx([0.866024, -0.866024, -0.866024, 0.866024], abs=1e-5)
    assert (stats.groups, stats.trajectories, stats.rows, stats.policy_tokens) == (1, 4, 4, 8)


def test_multi_turn_calls_that_extend_each_other_become_one_row():
    turn1 = _call([1, 2], [5, 6], step=0)
    turn2 = _call([1, 2, 5, 6, 9, 9], [7], step=1)  # previous tokens + an observation (9, 9) + new prompt
    other = _call([4], [3], step=2)  # does not extend: its own row
    group = _group("g", [1.0, 0.0], [[turn1, turn2, other], [_call([1], [2])]])
    rows, _ = build_rows([group])
    batch = collate(rows, pad_id=0)
    assert batch.input_ids[0].tolist() == [1, 2, 5, 6, 9, 9, 7]
    assert batch.loss_mask[0].tolist() == [0, 0, 1, 1, 0, 0, 1]
    assert batch.behaviour_logprobs[0].tolist() == pytest.approx([0, 0, -0.1, -0.2, 0, 0, -0.1])
    assert batch.input_ids[1].tolist() == [4, 3, 0, 0, 0, 0, 0] and batch.attention_mask[1].sum() == 2
    assert batch.advantages[0] == batch.advantages[1] > 0  # both rows of trajectory 0 carry its advantage


def test_groups_without_signal_are_dropped_and_counted_and_staleness_is_not_judged_again():
    groups = [
        _group("flat", [1.0, 1.0], version=4),
        _group("old", [1.0, 0.0], version=1),
        _group("ok", [1.0, 0.0], version=4),
    ]
    # Staleness was judged once, when the batch was claimed: every claimed group with signal is trained on.
    rows, stats = build_rows(groups)
    assert (stats.groups_without_signal, stats.groups_stale, stats.trajectories) == (1, 0, 4)
    assert {r.group_index for r in rows} == {1, 2}
    assert stats.reward_mean == pytest.approx(0.5)


def test_dr_grpo_and_an_empty_batch():
    rows, _ = build_rows([_group("g", [3.0, 1.0])], advantage="dr_grpo")
    assert [r.advantage for r in rows] == [1.0, -1.0]
    empty = collate([], pad_id=0)
    assert empty.input_ids.shape == (0, 0) and empty.advantages.numel() == 0


def test_sharding_keeps_groups_whole_and_covers_all_once():
    groups = [_group(f"g{i}", [1.0, 0.0], [[_call([1] * (i + 1), [2])] for _ in range(2)]) for i in range(7)]
    shards = [shard_groups(groups, rank, 3) for rank in range(3)]
    names = sorted(g.group_id for shard in shards for g in shard)
    assert names == sorted(g.group_id for g in groups)
    loads = [
        sum(len(c.prompt_token_ids) + 1 for g in shard for t in g.trajectories for c in t.calls) for shard in shards
    ]
    assert max(loads) - min(loads) <= 2 * 8  # balanced to within about one group
    assert torch.equal(torch.tensor([len(s) for s in shards]).sum(), torch.tensor(7))


def test_a_claimed_batch_becomes_tensors(db_url):
    from recorder import queries
    from recorder.store import TrajectoryStore
    from tests.recorder_data import call, finished, step, trajectory

    store = TrajectoryStore(db_url)
    rng = np.random.default_rng(7)
    records = []
    for i, reward in enumerate([1.0, 0.0, 0.5]):
        records += [trajectory(f"t{i}", "g"), step(f"t{i}", 0), call(f"t{i}", 0, rng, 12, 4)]
        records.append(finished(f"t{i}", "g", reward))
    store.write(records)
    batch_id = queries.claim_batch(store.engine, max_groups=4)
    rows, stats = build_rows(queries.load_batch(store.engine, batch_id))
    tensors = collate(rows, pad_id=2, stats=stats)
    store.dispose()
    assert tensors.input_ids.shape == (3, 16) and tensors.loss_mask.sum().item() == 12
    assert torch.all(tensors.behaviour_logprobs[tensors.loss_mask == 1] < 0)
    assert tensors.advantages.tolist() == pytest.approx([1.0, -1.0, 0.0], abs=1e-5)
