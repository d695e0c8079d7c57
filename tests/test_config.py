from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from cluster.config import ConfigError, ZigguratConfig, load_config, parse_config
from recorder.config import DatabaseConfig

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_local_yaml_is_the_embedded_default():
    config = load_config()  # no path: configs/local.yaml
    assert config.ray.address == "local"
    assert config.database.url.startswith("sqlite:///")
    assert config.engine.device == "cpu"
    assert config.model.name == "smollm2-135m-instruct"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path):
    assert isinstance(load_config(path), ZigguratConfig)


def _all_sections(model: type[BaseModel]) -> list[type[BaseModel]]:
    found = [model]
    for field in model.model_fields.values():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found += _all_sections(field.annotation)
    return found


def test_every_field_has_a_docstring():
    for section in _all_sections(ZigguratConfig):
        for name, field in section.model_fields.items():
            assert field.description, f"{section.__name__}.{name} has no docstring"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named_with_the_allowed_ones(tmp_path: Path):
    path = _write(tmp_path, "engine:\n  kv_cache_gibs: 2\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert "unknown key 'engine.kv_cache_gibs'" in message
    assert "kv_cache_gib" in message.split("allowed here:")[1]


def test_unknown_section_is_named(tmp_path: Path):
    allowed = "allowed here: controller, database, engine, gateway, judge, model, ray, recorder, rollout, trainer"
    with pytest.raises(ConfigError, match=rf"unknown key 'trainr'.*{allowed}"):
        load_config(_write(tmp_path, "trainr:\n  lr: 1\n"))


def test_wrong_type_names_the_key_and_the_value(tmp_path: Path):
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, "engine:\n  max_model_len: lots\n"))
    assert "key 'engine.max_model_len'" in str(caught.value)
    assert "'lots'" in str(caught.value)


def test_bad_choice_says_what_is_allowed(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"key 'engine.device'.*'cpu'.*'cuda'"):
        load_config(_write(tmp_path, "engine:\n  device: tpu\n"))


def test_missing_file_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_is_reported(tmp_path: Path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "engine: [unclosed\n"))


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_config(["a", "list"], "x.yaml")


def test_password_in_a_committed_url_is_refused():
    with pytest.raises(ConfigError, match="key 'database.url'.*password.*ZIGGURAT_DB_PASSWORD"):
        parse_config({"database": {"url": "postgresql+psycopg://u:hunter2@db/z"}})


def test_password_and_url_come_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    config = DatabaseConfig(url="postgresql+psycopg://ziggurat@db:5432/z")
    monkeypatch.setenv("ZIGGURAT_DB_PASSWORD", "s3cret")
    assert config.resolved_url().password == "s3cret"
    monkeypatch.setenv("ZIGGURAT_DB_URL", "sqlite:///other.db")
    assert str(config.resolved_url()) == "sqlite:///other.db"


def test_unsupported_backend_is_refused():
    with pytest.raises(ConfigError, match="backend 'mysql' is not supported"):
        parse_config({"database": {"url": "mysql://u@h/db"}})


def test_a_placement_group_without_anything_to_reserve_is_refused(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  placement_strategy: SPREAD\n")
    with pytest.raises(ConfigError, match="placement_strategy needs .* set rollout.gpus_per_actor or rollout.actor_"):
        load_config(path)


def test_the_llm_judge_needs_the_base_weights_that_merged_serving_replaces(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  lora_serving: merged\njudge:\n  llm: true\n")
    with pytest.raises(ConfigError, match="judge.llm samples the base weights .* use lora_serving: adapter"):
        load_config(path)


def test_a_canary_that_would_cover_every_actor_is_refused():
    """With every actor on the canary there is nothing to compare it with, and every canary would be rolled
    back: refused when the config loads, naming both keys."""
    with pytest.raises(ConfigError, match="controller.canary_fraction .* rollout.actors"):
        parse_config({"controller": {"canary_fraction": 0.5}, "rollout": {"actors": 1}}, source="test.yaml")
    parse_config({"controller": {"canary_fraction": 0.5}, "rollout": {"actors": 2}}, source="test.yaml")


def test_a_gateway_without_keys_must_stay_on_loopback(tmp_path: Path):
    with pytest.raises(ConfigError, match="gateway.auth: none on host '0.0.0.0'"):
        load_config(_write(tmp_path, "gateway:\n  auth: none\n  host: 0.0.0.0\n"))
    assert load_config(_write(tmp_path, "gateway:\n  auth: none\n")).gateway.auth == "none"
