from __future__ import annotations

import os

import ray


@ray.remote
class Counter:
    def __init__(self) -> None:
        self.value = 0

    def add(self, amount: int) -> int:
        self.value += amount
        return self.value


def test_local_ray_runs_named_actors_in_the_ziggurat_namespace(ray_session):
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
    assert ray.get_runtime_context().namespace == "ziggurat"
    counter = Counter.options(name="test-counter", lifetime="detached").remote()
    try:
        assert ray.get(counter.add.remote(2), timeout=60) == 2
        same = ray.get_actor("test-counter")  # found by name, as the dashboard shows it
        assert ray.get(same.add.remote(3), timeout=60) == 5
    finally:
        ray.kill(counter)


def test_local_ray_is_private_to_the_session(ray_session):
    # address="local" starts a new cluster in our own temp dir instead of joining one on this machine.
    session_dir = ray._private.worker.global_worker.node.get_session_dir_path()
    assert session_dir.startswith("/tmp/zr-")
    assert ray.cluster_resources()["CPU"] == 2
