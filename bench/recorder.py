"""Recorder throughput: 4 producer actors stream realistic steps through the recorder actor into the database,
against a raw bulk load of the same rows into the same server, measured in the same run.

    python bench/recorder.py --db postgres   # baseline: psycopg binary COPY into the same PostgreSQL server
    python bench/recorder.py --db sqlite     # baseline: sqlite3 executemany in one transaction

A "step" is one steps row plus its llm_calls row (300 prompt + 100 completion tokens, packed, with log-probs:
about 2 KB). `ratio` = pipeline rows/s / baseline rows/s (target >= 0.8). Prints a one-line summary, then
JSON as the last line.

Where the time goes, measured in the same run: `cpu_s` is the CPU time each part used while the pipeline ran
(database server, recorder actor, producers, the rest), `baseline_db_cpu_s` the server's CPU for the raw
load, `cpu_floor_s` the pipeline's total spread over all cores (no run can be faster), and
`transport_only_s` the same producers sending the same calls to an actor that only acknowledges them (Ray
alone, no database).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import psutil
import ray
import sqlalchemy as sa

from cluster.config import RayConfig
from cluster.ray_runtime import init_ray
from recorder.actor import start_recorder, stop_recorder
from recorder.client import RecorderClient
from recorder.columns import call_row, step_row
from recorder.config import DatabaseConfig, RecorderConfig
from recorder.migrate import upgrade
from recorder.pg_server import ThrowawayPostgres
from recorder.records import LlmCallRecord, Record, StepRecord, TrajectoryRecord
from recorder.store import WriteResult
from recorder.wire import EncodedRows

STEPS_PER_TRAJECTORY = 10


def make_records(producer: int, steps: int) -> list[Record]:
    """Episodes of 10 steps: start, then (step, llm call) pairs, then the finish event."""
    rng = np.random.default_rng(producer)
    records: list[Record] = []
    for t in range(steps // STEPS_PER_TRAJECTORY):
        tid = f"p{producer}-t{t}"
        group = f"p{producer}-g{t // 8}"
        common = {"environment": "market", "scenario_id": f"s-{group}", "group_id": group, "model_version": 0}
        records.append(TrajectoryRecord(tid, **common))
        for s in range(STEPS_PER_TRAJECTORY):
            observation = f"tick {s}: balance 1000.00, positions [], markets: rain YES 0.31 NO 0.69, election YES 0.55"
            records.append(StepRecord(tid, s, observation, {"type": "buy_yes", "market": 1, "amount": 10}, 0.01))
            records.append(
                LlmCallRecord.from_tokens(
                    tid,
                    s,
                    0,
                    0,
                    rng.integers(0, 49152, 300),
                    rng.integers(0, 49152, 100),
                    -rng.random(100) * 4,
                    text='{"type": "buy_yes", "market": 1, "amount": 10}',
                    finish_reason="stop",
                    sampling_params={"temperature": 1.0, "max_tokens": 128},
                    latency_ms=35.0,
                )
            )
        records.append(TrajectoryRecord(tid, **common, status="finished", total_reward=float(t % 3), step_count=10))
    return records


@ray.remote(num_cpus=0)
class NullRecorder:
    """Acknowledges every call without storing anything: what the producers and Ray cost on their own."""

    def __init__(self, wire: str) -> None:
        self.wire = wire  # the payload the real recorder asked for, so producers encode the same way

    async def wire_format(self) -> str:
        return self.wire

    async def write(self, payload: list[Record | EncodedRows], source: str | None = None) -> WriteResult:
        return WriteResult(written=sum(len(item) if isinstance(item, EncodedRows) else 1 for item in payload))


@ray.remote(num_cpus=0)
class Producer:
    def __init__(self, producer: int, steps: int, settings: RecorderConfig) -> None:
        self.records = make_records(producer, steps)
        self.settings = settings

    def run(self, flush_every: int, recorder: Any = None) -> dict[str, Any]:
        client = RecorderClient(self.settings, actor=recorder)
        acknowledged = retries = 0
        for start in range(0, len(self.records), flush_every):
            client.extend(self.records[start : start + flush_every])
            report = client.flush()
            acknowledged += report.acknowledged
            retries += report.retries
        return {"acknowledged": acknowledged, "retries": retries}


def baseline_rows(records: list[Record]) -> dict[str, list[dict[str, Any]]]:
    """The rows the store would write for these records, built with the store's own row functions."""
    from recorder.schema import utcnow

    stamp = utcnow()
    tables: dict[str, list[dict[str, Any]]] = {"trajectories": [], "steps": [], "llm_calls": []}
    finished = {r.id: r for r in records if isinstance(r, TrajectoryRecord) and r.status == "finished"}
    for r in finished.values():
        tables["trajectories"].append(
            {
                "id": r.id, "environment": r.environment, "scenario_id": r.scenario_id, "group_id": r.group_id,
                "agent_id": None, "model_version": 0, "status": r.status, "total_reward": r.total_reward,
                "reward_components": {}, "metrics": {}, "metadata": {}, "step_count": r.step_count,
                "is_eval": False, "started_at": stamp, "finished_at": stamp,
            }
        )  # fmt: skip
    for r in records:
        if isinstance(r, StepRecord):
            tables["steps"].append(step_row(r, stamp))
        elif isinstance(r, LlmCallRecord):
            tables["llm_calls"].append(call_row(r, stamp))
    return tables


def copy_postgres(url: str, tables: dict[str, list[dict[str, Any]]]) -> tuple[float, float]:
    """Seconds the raw COPY took, and the CPU seconds its server process used meanwhile."""
    import psycopg
    from psycopg.types.json import Jsonb

    parsed = sa.make_url(url)
    with psycopg.connect(host=parsed.host, port=parsed.port, user=parsed.username, dbname=parsed.database) as conn:
        oids = {}
        for table, rows in tables.items():  # binary COPY needs the column types: the fastest raw load
            described = conn.execute(f"SELECT {', '.join(rows[0])} FROM {table} LIMIT 0").description
            oids[table] = [column.type_code for column in described]
        server = psutil.Process(conn.info.backend_pid)
        cpu_before = sum(server.cpu_times()[:2])
        started = time.perf_counter()
        with conn.cursor() as cursor:
            for table, rows in tables.items():
                columns = list(rows[0])
                with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(oids[table])
                    for row in rows:
                        copy.write_row([Jsonb(v) if isinstance(v, dict | list) else v for v in row.values()])
        conn.commit()
        return time.perf_counter() - started, sum(server.cpu_times()[:2]) - cpu_before


def insert_sqlite(path: str, tables: dict[str, list[dict[str, Any]]]) -> tuple[float, float]:
    """Seconds the raw insert took, and the CPU seconds it used (SQLite runs in this process)."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    cpu_before = time.process_time()
    started = time.perf_counter()
    with conn:
        for table, rows in tables.items():
            columns = list(rows[0])
            marks = ", ".join("?" for _ in columns)
            conn.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                [[json.dumps(v) if isinstance(v, dict | list) else v for v in row.values()] for row in rows],
            )
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_before
    conn.close()
    return elapsed, cpu


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds used so far by every process on this machine, with its command line."""
    seen = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        seen[process.pid] = (" ".join(process.info["cmdline"] or []), times.user + times.system)
    return seen


def cpu_by_part(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    parts = {"database": 0.0, "recorder": 0.0, "producers": 0.0, "other": 0.0}
    for pid, (command, seconds) in after.items():
        used = seconds - before.get(pid, (command, 0.0))[1]
        if command.startswith("postgres"):
            parts["database"] += used
        elif command.startswith("ray::Recorder"):
            parts["recorder"] += used
        elif command.startswith("ray::Producer"):
            parts["producers"] += used
        else:
            parts["other"] += used
    return {part: round(seconds, 2) for part, seconds in parts.items()}


def stored_keys(url: str) -> tuple[int, int, int]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        steps = conn.execute(sa.text("SELECT count(*), count(DISTINCT trajectory_id || ':' || step_index) FROM steps"))
        total, distinct = steps.one()
        calls = conn.execute(sa.text("SELECT count(*) FROM llm_calls")).scalar_one()
    engine.dispose()
    return total, distinct, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--steps", type=int, default=20_000, help="total steps, split over the producers")
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--flush-every", type=int, default=2000, help="records a producer hands over per flush")
    parser.add_argument("--max-call-bytes", type=int, default=RecorderConfig().max_call_bytes)
    parser.add_argument("--writers", type=int, default=RecorderConfig().writer_connections, help="writer connections")
    args = parser.parse_args()

    server = None
    workdir = tempfile.mkdtemp(prefix="bench-recorder-")
    if args.db == "postgres":
        server = ThrowawayPostgres()
        server.start()

    def fresh_db(tag: str) -> str:
        if server is not None:
            url = server.create_database(f"{tag}_{uuid.uuid4().hex[:6]}")
        else:
            url = f"sqlite:///{workdir}/{tag}_{uuid.uuid4().hex[:6]}.db"
        upgrade(url)
        return url

    try:
        # whole episodes of STEPS_PER_TRAJECTORY steps per producer: what make_records builds and the count expects
        per_producer = args.steps // args.producers // STEPS_PER_TRAJECTORY * STEPS_PER_TRAJECTORY
        all_records = [r for p in range(args.producers) for r in make_records(p, per_producer)]
        rows = baseline_rows(all_records)
        total_rows = sum(len(v) for v in rows.values())
        call_bytes = sum(len(r["prompt_token_ids"]) + len(r["completion_token_ids"]) * 2 for r in rows["llm_calls"])
        bytes_per_step = (call_bytes
            + sum(len(r["observation"]) + 60 for r in rows["steps"])) / len(rows["steps"])  # fmt: skip

        baseline_db_cpu: list[float] = []

        def baseline() -> float:
            url = fresh_db("baseline")
            seconds, cpu = copy_postgres(url, rows) if server else insert_sqlite(url.removeprefix("sqlite:///"), rows)
            baseline_db_cpu.append(cpu)
            return total_rows / seconds

        baseline_before = baseline()

        init_ray(RayConfig(address="local", num_cpus=2, include_dashboard=False))
        url = fresh_db("pipeline")
        settings = RecorderConfig(
            actor_name="bench-recorder", max_call_bytes=args.max_call_bytes, writer_connections=args.writers
        )
        recorder = start_recorder(DatabaseConfig(url=url), settings)
        producers = [Producer.remote(p, per_producer, settings) for p in range(args.producers)]
        ray.get([p.__ray_ready__.remote() for p in producers], timeout=300)
        cpu_before = cpu_seconds()
        started = time.perf_counter()
        results = ray.get([p.run.remote(args.flush_every) for p in producers], timeout=1800)
        elapsed = time.perf_counter() - started
        cpu = cpu_by_part(cpu_before, cpu_seconds())
        stats = stop_recorder(recorder)

        null = NullRecorder.options(max_concurrency=1000).remote("pg-binary" if server else "records")
        ray.get(null.wire_format.remote(), timeout=300)  # started, like the recorder above
        started = time.perf_counter()
        ray.get([p.run.remote(args.flush_every, null) for p in producers], timeout=1800)
        transport_only_s = time.perf_counter() - started
        ray.shutdown()

        baseline_after = baseline()
        copy_rows_per_s = (baseline_before + baseline_after) / 2
        total, distinct, calls = stored_keys(url)
        expected_steps = args.producers * per_producer
        summary = {
            "db": args.db,
            "max_call_bytes": args.max_call_bytes,
            "steps": expected_steps,
            "bytes_per_step": round(bytes_per_step),
            "steps_per_s": round(expected_steps / elapsed, 1),
            "rows_per_s": round(total_rows / elapsed, 1),
            "copy_rows_per_s": round(copy_rows_per_s, 1),
            "copy_rows_per_s_runs": [round(baseline_before, 1), round(baseline_after, 1)],
            "ratio": round(total_rows / elapsed / copy_rows_per_s, 3),
            "lost": expected_steps - distinct + (expected_steps - calls),
            "duplicated": total - distinct,
            "acknowledged_records": sum(r["acknowledged"] for r in results),
            "retries": sum(r["retries"] for r in results),
            "writer_connections": stats["writer_connections"],
            "transactions": stats["transactions"],
            "elapsed_s": round(elapsed, 2),
            "db_write_s": stats["write_s"],
            "cpu_s": cpu,
            "baseline_db_cpu_s": round(sum(baseline_db_cpu) / len(baseline_db_cpu), 2),
            "cpu_floor_s": round(sum(cpu.values()) / (os.cpu_count() or 1), 2),
            "transport_only_s": round(transport_only_s, 2),
        }
    finally:
        if server is not None:
            server.destroy()
    baseline_name = "COPY" if args.db == "postgres" else "executemany"
    print(
        f"recorder on {args.db}: {summary['steps_per_s']} steps/s ({summary['rows_per_s']} rows/s) vs raw "
        f"{baseline_name} {summary['copy_rows_per_s']} rows/s -> ratio {summary['ratio']}; "
        f"lost {summary['lost']}, duplicated {summary['duplicated']}"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
