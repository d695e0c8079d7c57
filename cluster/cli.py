"""The `ziggurat` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from cluster.config import DEFAULT_CONFIG, ConfigError, ZigguratConfig, load_config
from cluster.logs import configure_logging

log = logging.getLogger("ziggurat.cli")


def _models_fetch(args: argparse.Namespace) -> int:
    from cluster.models import SMOLLM2_ALIAS, fetch_smollm2, greedy_answer, resolve_model

    config = load_config(args.config)
    if config.model.name == SMOLLM2_ALIAS:
        fetched = fetch_smollm2(config.model)
        path = str(fetched.path)
        print(f"{'converted' if fetched.converted_now else 'already cached'}: {path}")
    else:
        path = resolve_model(config.model)
        print(f"model {config.model.name!r} resolves to {path}")
    if not args.no_check:
        question = "What is the capital of France?"
        print(f"check: {question} -> {greedy_answer(path, question)!r}")
    return 0


def _models_tiny(args: argparse.Namespace) -> int:
    from cluster.models import build_tiny_llama, resolve_model

    tokenizer_source = resolve_model(load_config(args.config).model)
    print(build_tiny_llama(tokenizer_source, args.out))
    return 0


def _config_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False), end="")
    print(f"# {args.config}: valid", file=sys.stderr)
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from recorder.migrate import head_revision, upgrade

    url = load_config(args.config).database.resolved_url()
    upgrade(url)
    print(f"{url.render_as_string(hide_password=True)} is at revision {head_revision()}")
    return 0


def _db_status(args: argparse.Namespace) -> int:
    from recorder.migrate import current_revision, head_revision
    from recorder.store import create_db_engine

    url = load_config(args.config).database.resolved_url()
    engine = create_db_engine(url)
    try:
        current, head = current_revision(engine), head_revision()
    finally:
        engine.dispose()
    print(f"{url.render_as_string(hide_password=True)}: revision {current or 'none'} (code needs {head})")
    return 0 if current == head else 1


def _train(args: argparse.Namespace) -> int:
    from cluster.train_job import main as train_main

    argv = ["--config", str(args.config)] + (["--batch-id", str(args.batch_id)] if args.batch_id is not None else [])
    return train_main(argv)


def _versions(args: argparse.Namespace) -> int:
    from recorder.queries import deployed_version, list_versions, readiness

    config = load_config(args.config)
    engine = config.database.create_engine()
    try:
        for v in list_versions(engine):
            loss = v["metrics"].get("loss")
            shown_loss = "-" if loss is None else f"{loss:.4f}"
            print(
                f"v{v['version']:<4} {v['status']:<11} {v['kind']:<5} batch={v['training_batch_id']} "
                f"parent={v['parent_version']} loss={shown_loss} {v['artifact_uri'] or ''}"
            )
        ready = readiness(
            engine, config.trainer.reward_source, config.trainer.min_group_size,
            parent_version=deployed_version(engine), max_staleness=config.trainer.max_staleness,
        )  # fmt: skip
        print(f"ready to train: {ready.groups_with_variance} groups ({ready.trainable_trajectories} trajectories)")
    finally:
        engine.dispose()
    return 0


def _rollout(args: argparse.Namespace) -> int:
    from cluster.rollout_job import main as rollout_main

    rollout_main(
        [
            "--config",
            str(args.config),
            "--env",
            args.env,
            "--groups",
            str(args.groups),
            "--group-size",
            str(args.group_size),
        ]
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    from cluster.run import main as run_main

    verbose = ["--verbose"] if args.verbose else []
    return run_main(["--config", str(args.config), "--out", str(args.out), *verbose])


class CliError(RuntimeError):
    """A command that cannot run as asked; the message says what to do."""


def _keys(args: argparse.Namespace) -> int:
    """Gateway API keys in the config's database (migrated first, so a new database works)."""
    import sqlalchemy as sa

    from recorder.api_keys import ApiKeyError, create_key, list_keys, revoke_key
    from recorder.migrate import upgrade

    url = load_config(args.config).database.resolved_url()
    upgrade(url)
    engine = sa.create_engine(url)
    try:
        if args.keys_command == "create":
            key = create_key(engine, args.name)
            print(key)
            print(f"# key {args.name!r} created; it is shown only now (the database keeps its hash)", file=sys.stderr)
        elif args.keys_command == "revoke":
            revoke_key(engine, args.name)
            print(f"revoked {args.name!r}")
        else:
            for info in list_keys(engine):
                state = f"revoked {info.revoked_at:%Y-%m-%d %H:%M}" if info.revoked_at else "active"
                print(f"{info.name}\t{info.prefix}…\tcreated {info.created_at:%Y-%m-%d %H:%M}\t{state}")
    except ApiKeyError as exc:
        raise CliError(str(exc)) from None
    finally:
        engine.dispose()
    return 0


def _gateway(args: argparse.Namespace) -> int:
    """Serve the deployed version through the gateway, recording every call, until interrupted."""
    import time

    from cluster.loop import shutdown, start

    config = load_config(args.config)
    config = config.model_copy(update={"gateway": config.gateway.model_copy(update={"enabled": True})})
    _, controller, _ = start(config)
    try:
        controller.call("sync_workers")
        print(f"serving on http://{config.gateway.host}:{config.gateway.port}/v1 (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        shutdown(config)


def _controller(config: ZigguratConfig) -> Any:
    """The running controller: joins the Ray cluster of a running `ziggurat run` (or the config's address)."""
    import ray

    from cluster.ray_runtime import init_ray

    address = "auto" if config.ray.address == "local" else config.ray.address
    try:
        init_ray(config.ray.model_copy(update={"address": address}), log_to_driver=False)
    except ConnectionError as exc:
        raise CliError(f"no running Ray cluster at {address!r} ({exc}); start the loop with `ziggurat run`") from None
    try:
        return ray.get_actor(config.controller.name, namespace=config.ray.namespace)
    except ValueError:
        raise CliError(
            f"no controller named {config.controller.name!r} in namespace {config.ray.namespace!r}; "
            "start the loop with `ziggurat run` (or check controller.name in the config)"
        ) from None


def _status(args: argparse.Namespace) -> int:
    import ray

    config = load_config(args.config)
    try:
        status = ray.get(_controller(config).status.remote(), timeout=config.ray.call_timeout_s)
    except CliError as exc:
        if args.require_controller:
            raise
        print(f"# {exc}\n# showing what the database says", file=sys.stderr)
        status = _database_status(config)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
    else:
        from cluster.status_view import format_status, rewards_by_version

        print(format_status(status, config, rewards_by_version(config, status)))
    return 0


def _database_status(config: ZigguratConfig) -> dict[str, Any]:
    from cluster.report import version_rewards
    from recorder.queries import deployed_version, list_batches, readiness

    engine = config.database.create_engine()
    try:
        ready = readiness(
            engine, config.trainer.reward_source, config.trainer.min_group_size,
            parent_version=deployed_version(engine), max_staleness=config.trainer.max_staleness,
        )  # fmt: skip
        return {
            "controller": "not running",
            "readiness": {"ready": ready.groups_with_variance >= config.controller.min_groups, **ready.__dict__},
            "versions": version_rewards(engine),
            "training": list_batches(engine, statuses=("pending", "running")),
        }
    finally:
        engine.dispose()


def _deploy(args: argparse.Namespace) -> int:
    import ray

    config = load_config(args.config)
    controller, settings = _controller(config), config.controller
    if args.force:  # straight to the swap: no evaluation, no deploy_only_if_better
        result = ray.get(controller.deploy.remote(args.version, args.canary), timeout=settings.swap_timeout_s * 3)
    else:  # the loop's rules (Controller.release): evaluated, refused if worse, deployed
        timeout = 2 * settings.call_timeout_s + 3 * settings.swap_timeout_s
        result = ray.get(controller.release.remote(args.version, args.canary), timeout=timeout)
    print(json.dumps(result, default=str))
    return 0 if args.force or result["deployed"] or result["canary"] else 1


def _rollback(args: argparse.Namespace) -> int:
    import ray

    config = load_config(args.config)
    result = ray.get(_controller(config).rollback.remote(args.version), timeout=config.controller.swap_timeout_s * 3)
    print(json.dumps(result, default=str))
    return 0


def _steer(args: argparse.Namespace) -> int:
    """`ziggurat pause|resume|stop`: the live loop running inside the controller (controller.mode: live)."""
    import ray

    config = load_config(args.config)
    method = {"pause": "pause", "resume": "resume", "stop": "stop_live"}[args.action]
    try:
        status = ray.get(getattr(_controller(config), method).remote(), timeout=config.ray.call_timeout_s)
    except ray.exceptions.RayTaskError as exc:
        raise CliError(str(exc.cause if exc.cause is not None else exc)) from None
    print(json.dumps({k: v for k, v in status.items() if k != "events"}, default=str))
    return 0


def _report(args: argparse.Namespace) -> int:
    from cluster.report import version_rewards, write_report

    config = load_config(args.config)
    engine = config.database.create_engine()
    try:
        versions = version_rewards(engine)
    finally:
        engine.dispose()
    files = write_report({"versions": versions}, args.out)
    for v in versions:
        print(
            f"v{v['version']:<4} {v['status']:<11} eval={_fmt(v['eval_mean_reward'])} ({v['eval_episodes']} episodes) "
            f"train={_fmt(v['train_mean_reward'])} ({v['train_episodes']} episodes)"
        )
    print("wrote " + ", ".join(files))
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ziggurat", description="Serve, record and train LLM agents on Ray.")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log INFO from Ziggurat, Ray, vLLM and the trainer (default: warnings)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
        return sub

    models = commands.add_parser("models", help="fetch and build base models").add_subparsers(
        dest="models_command", required=True, metavar="ACTION"
    )
    fetch = with_config(models.add_parser("fetch", help="fetch the config's base model (offline SmolLM2 by default)"))
    fetch.add_argument("--no-check", action="store_true", help="skip the quick generation check")
    fetch.set_defaults(handler=_models_fetch)
    tiny = with_config(models.add_parser("tiny", help="write a tiny random Llama with the base model's tokenizer"))
    tiny.add_argument("out", type=Path, help="output folder")
    tiny.set_defaults(handler=_models_tiny)

    config = commands.add_parser("config", help="inspect config files").add_subparsers(
        dest="config_command", required=True, metavar="ACTION"
    )
    check = config.add_parser("check", help="validate a config file and print it with defaults filled in")
    check.add_argument("config", type=Path, nargs="?", default=DEFAULT_CONFIG)
    check.set_defaults(handler=_config_check)

    db = commands.add_parser("db", help="the trajectory database").add_subparsers(
        dest="db_command", required=True, metavar="ACTION"
    )
    with_config(db.add_parser("upgrade", help="apply schema migrations (creates the tables)")).set_defaults(
        handler=_db_upgrade
    )
    with_config(db.add_parser("status", help="show the schema revision; exit 1 if out of date")).set_defaults(
        handler=_db_status
    )

    train = with_config(
        commands.add_parser("train", help="train one batch into a new version (python -m cluster.train_job)")
    )
    train.add_argument("--batch-id", type=int, default=None, help="train this batch instead of claiming one")
    train.set_defaults(handler=_train)
    with_config(commands.add_parser("versions", help="list model versions and what is ready to train")).set_defaults(
        handler=_versions
    )

    rollout = with_config(commands.add_parser("rollout", help="play GRPO groups of episodes and record them"))
    rollout.add_argument("--env", default="market", help="a registered environment (arithmetic, market)")
    rollout.add_argument("--groups", type=int, default=2)
    rollout.add_argument("--group-size", type=int, default=4)
    rollout.set_defaults(handler=_rollout)

    run = with_config(commands.add_parser("run", help="run the closed loop on a config (python -m cluster.run)"))
    run.add_argument("--out", type=Path, default=Path("ziggurat-report"), help="where report.json and reward.png go")
    # SUPPRESS: without the flag here, `ziggurat -v run` keeps the top-level value instead of resetting it.
    run.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log INFO everywhere")
    run.set_defaults(handler=_run)
    status = with_config(commands.add_parser("status", help="readiness, versions, health of the running loop"))
    status.add_argument("--require-controller", action="store_true", help="fail instead of reading the database")
    status.add_argument("--json", action="store_true", help="print the full status as JSON (for scripts)")
    status.set_defaults(handler=_status)
    deploy = with_config(
        commands.add_parser(
            "deploy",
            help="hot-swap a version into the rollout actors, by the loop's rules",
            description="Deploy a version as the loop does (Controller.release): evaluated on the held-out "
            "scenarios first where it can be (an unmerged adapter), refused if worse than the deployed version "
            "with controller.deploy_only_if_better, deployed fully or as a canary (controller.canary_fraction), "
            "and evaluated once served otherwise. Exit status 1 if it was not deployed.",
        )
    )
    deploy.add_argument("version", type=int)
    deploy.add_argument("--canary", type=float, default=None, help="fraction of actors to deploy to first")
    deploy.add_argument(
        "--force", action="store_true", help="deploy without the rules: no evaluation, no deploy_only_if_better"
    )
    deploy.set_defaults(handler=_deploy)
    rollback = with_config(commands.add_parser("rollback", help="serve an earlier version (default: the previous)"))
    rollback.add_argument("version", type=int, nargs="?", default=None)
    rollback.set_defaults(handler=_rollback)
    for action, about in (
        ("pause", "live mode: admit no new groups or batches; what is in flight finishes"),
        ("resume", "live mode: carry on after `pause`"),
        ("stop", "live mode: end the controller's loop once groups in flight and the training batch end"),
    ):
        with_config(commands.add_parser(action, help=about)).set_defaults(handler=_steer, action=action)
    keys = commands.add_parser("keys", help="API keys of the agent gateway").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    create = with_config(keys.add_parser("create", help="create a key for a client and print it (only now)"))
    create.add_argument("name", help="the client's name (unique)")
    create.set_defaults(handler=_keys)
    revoke = with_config(keys.add_parser("revoke", help="revoke a client's key"))
    revoke.add_argument("name")
    revoke.set_defaults(handler=_keys)
    with_config(keys.add_parser("list", help="list keys (names and prefixes, never the keys)")).set_defaults(
        handler=_keys
    )
    with_config(
        commands.add_parser("gateway", help="serve the deployed version to external agents (OpenAI API), recording")
    ).set_defaults(handler=_gateway)
    report = with_config(commands.add_parser("report", help="mean reward per version as JSON and a PNG"))
    report.add_argument("--out", type=Path, default=Path("ziggurat-report"))
    report.set_defaults(handler=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(True if args.verbose else None)  # None: ZIGGURAT_VERBOSE decides
    try:
        return args.handler(args)
    except (ConfigError, CliError) as exc:
        print(f"ziggurat: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
