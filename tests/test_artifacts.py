"""Version folders are unique, written once and verified before they are served (issue 13, item 10); an
adapter reloaded in place is never served with prompt caches its old weights computed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cluster.artifacts import ArtifactError, file_checksums, publish, staging_folder, write_manifest
from tests.test_engine import _random_adapter


def _registered(controller, folder: Path, base: str) -> int:
    from recorder import queries

    version = queries.register_version(controller.db, base_model=base, kind="lora", artifact_uri=str(folder))
    queries.update_version(controller.db, version, status="ready")
    return version


@pytest.mark.slow
def test_a_tampered_or_unlisted_file_is_refused_naming_it(ray_session, tiny_model_dir, tmp_path):
    from cluster.controller import Controller, ControllerError
    from recorder.migrate import upgrade
    from tests.test_controller import loop_config

    url = f"sqlite:///{tmp_path / 'a.db'}"
    upgrade(url)
    controller = Controller(loop_config(url, tiny_model_dir, tmp_path, "artifacts"))
    folder = Path(_random_adapter(tiny_model_dir, tmp_path / "store" / "v1-b1-0a1b2c3d", seed=21))
    write_manifest(folder, kind="lora")
    version = _registered(controller, folder, tiny_model_dir)
    # Verified, the deploy gets as far as looking for rollout actors (there are none in this test).
    with pytest.raises(ControllerError, match="no rollout actors are running"):
        controller.deploy(version)

    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ControllerError, match=r"adapter_model\.safetensors has sha256 [0-9a-f]{64}, but the manifest"):
        controller.deploy(version)
    with pytest.raises(ControllerError, match="adapter_model.safetensors has sha256"):
        controller.evaluate(version)

    write_manifest(folder, kind="lora")  # (re-signed, as a new training job would)
    (folder / "extra.safetensors").write_bytes(b"not listed anywhere")
    with pytest.raises(ControllerError, match=r"extra\.safetensors is not in the manifest"):
        controller.deploy(version)

    bare = Path(_random_adapter(tiny_model_dir, tmp_path / "store" / "v2-hand-made", seed=22))
    with pytest.raises(ControllerError, match="has no ziggurat_version.json"):
        controller.deploy(_registered(controller, bare, tiny_model_dir))


def test_a_version_folder_is_written_once(tmp_path):
    store = tmp_path / "store"
    staging = staging_folder(store, "v1-b1-aaaa0000")
    staging.mkdir(parents=True)
    (staging / "weights.safetensors").write_bytes(b"first")
    write_manifest(staging, version=1)
    final = publish(staging, store / "v1-b1-aaaa0000")
    assert not staging.exists() and file_checksums(final).keys() == {"weights.safetensors"}
    again = staging_folder(store, "v1-b1-aaaa0000")
    again.mkdir()
    with pytest.raises(ArtifactError, match="exists already; a version folder is written once"):
        publish(again, final)
    final.rename(tmp_path / "moved")
    final.mkdir()  # an empty folder of that name: os.rename alone would replace it
    with pytest.raises(ArtifactError, match="exists already"):
        publish(again, final)


@pytest.mark.slow
def test_two_databases_version_one_never_share_a_folder(ray_session, postgres, tiny_model_dir, tmp_path):
    """Version numbers restart with a fresh database while the store stays: each v1 gets its own folder, the
    first one's files are untouched by the second job, and the manifest covers every file."""
    import uuid

    from cluster.train_job import run_training
    from recorder import queries
    from recorder.store import create_db_engine
    from tests.test_trainer_job import _config, _record_groups
    from trainer.model import MANIFEST

    artifacts = []
    for _ in range(2):
        url = postgres.create_database(f"artifacts_{uuid.uuid4().hex[:8]}")
        from recorder.migrate import upgrade

        upgrade(url)
        _record_groups(url)
        assert run_training(_config(url, tiny_model_dir, tmp_path, num_workers=1, updates_per_batch=1)) == 1
        db = create_db_engine(url)
        artifacts.append(Path(queries.get_version(db, 1)["artifact_uri"]))
        db.dispose()
        if len(artifacts) == 1:
            first_files = file_checksums(artifacts[0])
    assert artifacts[0] != artifacts[1] and artifacts[0].parent == artifacts[1].parent == (tmp_path / "store")
    assert all(a.name.startswith("v1-b") for a in artifacts)
    assert file_checksums(artifacts[0]) == first_files  # the second job wrote nothing into the first's folder
    import json

    for artifact in artifacts:
        listed = json.loads((artifact / MANIFEST).read_text())["checksums"]
        assert listed == file_checksums(artifact) and "adapter_config.json" in listed
    assert not list((tmp_path / "store").glob(".staging-*"))


@pytest.mark.slow
def test_an_adapter_reloaded_in_place_never_reuses_cached_prompts(tiny_engine, tiny_model_dir, tmp_path):
    """vLLM keys cached KV blocks by the adapter's name, which an in-place reload keeps: the reload must drop
    the cache, or prompts it has seen are served with keys and values from the old weights."""
    words = " ".join(f"market{i} price{i % 7}" for i in range(150))
    prompt = tiny_engine.chat_prompt([{"role": "user", "content": words}])  # several full KV blocks
    old = _random_adapter(tiny_model_dir, tmp_path / "old", seed=31)
    new = _random_adapter(tiny_model_dir, tmp_path / "new", seed=32)

    def greedy(version: int) -> list[float]:
        return tiny_engine.generate(prompt, max_tokens=6, temperature=0.0, version=version).completions[0].logprobs

    try:
        tiny_engine.load_adapter(71, new)
        expected = greedy(71)  # the new weights, computed from scratch
        tiny_engine.unload_adapter(71)
        tiny_engine.load_adapter(72, old)
        stale = greedy(72)  # caches the prompt's blocks under the name "v72"
        shutil.copytree(new, old, dirs_exist_ok=True)  # a re-train writes the new weights where the old were
        tiny_engine.load_adapter(72, old, reload=True)
        reloaded = greedy(72)
    finally:
        tiny_engine.unload_adapter(72)
    assert max(abs(a - b) for a, b in zip(stale, expected, strict=True)) > 1e-2  # the adapters do differ
    assert reloaded == pytest.approx(expected, abs=1e-4)
