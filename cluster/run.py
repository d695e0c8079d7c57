"""The main job on a config: `python -m cluster.run --config configs/local.yaml`.

Today it runs the parts of the loop that exist: start (or join) Ray, bring up the recorder on the
configured database, serve the base model with the vLLM policy engine, sample a GRPO group of answers
for a few verifiable questions, record every call as tokens with its reward, and report what the store
says is ready for training. Environments, training and hot-swapping plug in here as they land.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import uuid
from pathlib import Path

from cluster.config import DEFAULT_CONFIG, ZigguratConfig, load_config
from cluster.logs import configure_logging
from cluster.models import resolve_model
from rollout.engine import EngineThread

log = logging.getLogger("ziggurat.run")

# (question, substring a correct answer contains): an exact, verifiable reward.
DEMO_TASKS = [
    ("What is the capital of France?", "Paris"),
    ("What is 7 + 5? Answer with the number.", "12"),
    ("Which planet is known as the Red Planet?", "Mars"),
]


def run(
    config: ZigguratConfig, group_size: int = 4, max_tokens: int = 48, engine: EngineThread | None = None
) -> dict[str, object]:
    """Run the demo loop; pass `engine` to reuse a running policy engine instead of starting one."""
    from cluster.ray_runtime import init_ray
    from recorder.actor import start_recorder, stop_recorder
    from recorder.client import RecorderClient
    from recorder.migrate import upgrade
    from recorder.queries import readiness
    from recorder.records import LlmCallRecord, StepRecord, TrajectoryRecord
    from recorder.store import create_db_engine

    init_ray(config.ray)
    if config.database.auto_upgrade:
        upgrade(config.database.resolved_url())
    recorder = start_recorder(config.database, config.recorder)
    client = RecorderClient(config.recorder)
    started = time.perf_counter()
    owns_engine = engine is None
    if engine is None:
        model_path = resolve_model(config.model)
        log.info("base model: %s", model_path)
        engine = EngineThread(model_path, config.engine)
    ready = time.perf_counter()
    try:
        prompts = [engine.chat_prompt([{"role": "user", "content": q}]) for q, _ in DEMO_TASKS]
        sample_start = time.perf_counter()
        groups = engine.generate_many(prompts, n=group_size, temperature=1.0, max_tokens=max_tokens)
        sample_s = time.perf_counter() - sample_start
    finally:
        if owns_engine:
            engine.shutdown()

    rewards: list[float] = []
    for (question, answer), generation in zip(DEMO_TASKS, groups, strict=True):
        group_id = uuid.uuid4().hex
        for completion in generation.completions:
            tid = uuid.uuid4().hex
            reward = float(answer in completion.text)
            rewards.append(reward)
            common = {"environment": "demo-qa", "scenario_id": question, "group_id": group_id}
            client.add(
                TrajectoryRecord(tid, **common, model_version=generation.model_version),
                StepRecord(tid, 0, question, {"text": completion.text}, env_reward=reward, done=True),
                LlmCallRecord.from_tokens(
                    tid, 0, 0, generation.model_version, generation.prompt_token_ids, completion.token_ids,
                    completion.logprobs, text=completion.text, finish_reason=completion.finish_reason,
                    messages=[{"role": "user", "content": question}],
                    sampling_params={"temperature": 1.0, "max_tokens": max_tokens},
                ),
                TrajectoryRecord(
                    tid, **common, model_version=generation.model_version, status="finished",
                    total_reward=reward, step_count=1,
                ),
            )  # fmt: skip
        print(f"Q: {question}\n   {sum(answer in c.text for c in generation.completions)}/{group_size} correct; "
              f"e.g. {generation.completions[0].text.strip()[:80]!r}")  # fmt: skip
    report = client.flush()
    stop_recorder(recorder)

    engine_db = create_db_engine(config.database.resolved_url())
    ready_now = readiness(engine_db)
    engine_db.dispose()
    sampled_tokens = sum(len(c.token_ids) for g in groups for c in g.completions)
    return {
        "model": engine.engine.model_path,
        "engine_start_s": round(ready - started, 2),
        "groups": len(groups),
        "group_size": group_size,
        "sampled_tokens_per_s": round(sampled_tokens / sample_s, 1),
        "mean_reward": round(sum(rewards) / len(rewards), 3),
        "recorded": report.acknowledged,
        "database": config.database.resolved_url().render_as_string(hide_password=True),
        "trainable_groups_in_store": ready_now.groups_with_variance,
        "finished_trajectories_in_store": ready_now.finished,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.run", description=__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    parser.add_argument("--group-size", type=int, default=4, help="samples per prompt (the GRPO group)")
    parser.add_argument("--max-tokens", type=int, default=48, help="completion length limit")
    args = parser.parse_args(argv)
    configure_logging()
    summary = run(load_config(args.config), group_size=args.group_size, max_tokens=args.max_tokens)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
