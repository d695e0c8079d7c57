"""The agent gateway's cost: the same requests through the gateway (HTTP, OpenAI SDK) and directly to the engine.

    python bench/gateway.py [--model smollm2-135m-instruct|tiny|PATH] [--requests 128] [--concurrency 64]
                            [--tokens 32] [--rounds 3] [--probes 40] [--probe-gap-s 0.25] [--no-store-before-reply]

One rollout actor (vLLM) serves both paths; the gateway's ledger records into SQLite. (a) direct: `--concurrency`
clients in this process call the rollout actor's `complete` with the prompt tokens, as Ziggurat's own
environments do. (b) gateway: as many `openai.AsyncOpenAI` clients send the same chat requests through the
gateway, each call its own episode, recorded. Every request samples exactly `--tokens` tokens (min_tokens =
max_tokens), so tokens/s compare like with like; rounds alternate (direct, gateway, ...) and the ratio is the
median of the rounds' ratios; the added latency at that load (`loaded_added_latency_*`) is each gateway request's
time at its client less the replica's wait for the rollout actor (Server-Timing `generate`), the very call the
direct path makes. Then `--probes` one-token requests per path, one at a time, each `--probe-gap-s` after the
last, the paths in rotating order: the gateway's added latency is the difference of their latencies (p50, p99),
as plain HTTP (`added_latency_*`) and through the SDK (`added_latency_with_sdk_*`). A one-token generation's own
time varies by more than the gateway adds (`direct_probe_ms_iqr`), so the plain-HTTP probes also measure it
within each request: the same way (`added_latency_in_request_*`). `replica_own_ms_p50` is what the replica itself
spent around the generation (its Server-Timing header), of it `record_ms_p50` the ledger's answer (with the store
wait unless `--no-store-before-reply`).
Last, the ledger is flushed and the database must hold every gateway call exactly once. Prints a summary
line, then JSON (last).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def _direct(worker: Any, prompts: list[list[int]], sampling: dict[str, Any], concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    failed = 0

    async def one(prompt: list[int]) -> int:
        nonlocal failed
        async with gate:
            started = time.perf_counter()
            try:
                result = await worker.complete.remote(prompt, sampling)
            except Exception:
                failed += 1
                return 0
            latencies.append(time.perf_counter() - started)
            return sum(len(c["token_ids"]) for c in result["completions"])

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
    return {"tokens_per_s": tokens / (time.perf_counter() - started), "latencies": latencies, "failed": failed}


async def _gateway(
    client: Any, model: str, conversations: list[list[dict[str, str]]], tokens: int, concurrency: int, tag: str
) -> dict:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    added: list[float] = []  # ms: the request's time at the client less the replica's wait for the rollout actor
    own: list[float] = []  # ms: of it, the replica's own work before and after that wait
    failed = 0

    async def one(index: int, messages: list[dict[str, str]]) -> int:
        nonlocal failed
        async with gate:
            started = time.perf_counter()
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model=model, messages=messages, max_tokens=tokens, extra_body={"min_tokens": tokens},
                    extra_headers={"X-Ziggurat-Episode": f"{tag}-{index}"},
                )  # fmt: skip
                reply = raw.parse()
                timing = _server_timing(raw.headers)
            except Exception as exc:
                print(f"gateway request failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                failed += 1
                return 0
            latencies.append(time.perf_counter() - started)
            added.append(latencies[-1] * 1000 - timing["generate"])
            own.append(timing["prepare"] + timing["record"])
            return reply.usage.completion_tokens

    started = time.perf_counter()
    done = sum(await asyncio.gather(*(one(i, m) for i, m in enumerate(conversations))))
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": done / elapsed, "latencies": latencies, "added_ms": added, "own_ms": own, "failed": failed}


def _server_timing(headers: Any) -> dict[str, float]:
    """The replica's Server-Timing header: ms per part (prepare, generate, record)."""
    return {
        name: float(ms) for name, ms in (part.strip().split(";dur=") for part in headers["server-timing"].split(","))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--probes", type=int, default=40, help="one-token requests per path for added latency")
    parser.add_argument("--probe-gap-s", type=float, default=0.25, help="pause before each probe request")
    parser.add_argument(
        "--no-store-before-reply", dest="store_before_reply", action="store_false",
        help="answer calls before their records are stored (gateway.store_before_reply: false)",
    )  # fmt: skip
    parser.add_argument(
        "--ledger-transport", choices=["socket", "ray"], default="socket",
        help="how replicas reach the ledger (gateway.ledger_transport)",
    )  # fmt: skip
    args = parser.parse_args()

    import httpx
    import ray
    import sqlalchemy as sa
    from openai import AsyncOpenAI
    from transformers import AutoTokenizer

    from cluster.config import RayConfig
    from cluster.models import model_for_benchmark
    from cluster.ray_runtime import init_ray
    from gateway.app import start_gateway, stop_gateway
    from gateway.config import GatewayConfig
    from gateway.prompts import render_prompt
    from recorder.actor import start_recorder, stop_recorder
    from recorder.config import DatabaseConfig, RecorderConfig
    from recorder.migrate import upgrade
    from recorder.schema import LlmCall
    from rollout.actor import start_rollout_worker
    from rollout.config import EngineConfig

    model_path = model_for_benchmark(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    engine_config = EngineConfig(device="cpu", max_model_len=1024, max_num_seqs=256)
    init_ray(RayConfig(address="local", num_cpus=2, include_dashboard=False))
    url = f"sqlite:///{tempfile.mkdtemp(prefix='bench-gateway-')}/gateway.db"
    upgrade(url)
    recorder_settings = RecorderConfig(actor_name="bench-gateway-recorder")
    recorder = start_recorder(DatabaseConfig(url=url), recorder_settings)
    worker = start_rollout_worker(model_path, engine_config, recorder_settings, name="bench-gateway-rollout")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = GatewayConfig(
        enabled=True, port=port, auth="none", max_in_flight=4 * args.concurrency,
        max_concurrency_per_key=4 * args.concurrency, app_name="bench-gateway", ledger_name="bench-gateway-ledger",
        store_before_reply=args.store_before_reply, ledger_transport=args.ledger_transport,
    )  # fmt: skip
    base = start_gateway(
        settings, DatabaseConfig(url=url), model_name="bench", model_path=model_path,
        worker_names=["bench-gateway-rollout"], max_model_len=engine_config.max_model_len,
    )  # fmt: skip

    conversations = [
        [{"role": "system", "content": "You trade on a prediction market."},
         {"role": "user", "content": f"Market {i}: will it rain tomorrow? The price is 0.{10 + i % 80}. Your order?"}]
        for i in range(args.requests)
    ]  # fmt: skip
    prompts = [render_prompt(tokenizer, messages) for messages in conversations]
    sampling = {"max_tokens": args.tokens, "min_tokens": args.tokens, "temperature": 1.0}
    client = AsyncOpenAI(
        base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600,
        http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=args.concurrency), timeout=600),
    )  # fmt: skip

    async def run() -> dict[str, Any]:
        await _gateway(client, "bench", conversations[:4], 4, 4, "warm")  # warm-up, both paths
        await _direct(worker, prompts[:4], {**sampling, "max_tokens": 4, "min_tokens": 4}, 4)
        direct, through = [], []
        for round_index in range(args.rounds):
            direct.append(await _direct(worker, prompts, sampling, args.concurrency))
            through.append(
                await _gateway(client, "bench", conversations, args.tokens, args.concurrency, f"r{round_index}")
            )
        probe_direct, probe_gateway, probe_http, replica, recording, generating = [], [], [], [], [], []
        one_token = {"max_tokens": 1, "min_tokens": 1, "temperature": 1.0}
        async with httpx.AsyncClient(timeout=600) as http:

            async def direct_probe(at: int, index: int) -> None:
                probe_direct.extend((await _direct(worker, prompts[at : at + 1], one_token, 1))["latencies"])

            async def sdk_probe(at: int, index: int) -> None:
                reply = await _gateway(client, "bench", conversations[at:][:1], 1, 1, f"p{index}")
                probe_gateway.extend(reply["latencies"])

            async def http_probe(at: int, index: int) -> None:
                # The same request as plain HTTP, without the SDK's own work around it.
                started = time.perf_counter()
                answer = await http.post(
                    f"{base}/v1/chat/completions",
                    json={"model": "bench", "messages": conversations[at], "max_tokens": 1},
                    headers={"X-Ziggurat-Episode": f"h{index}"},
                )
                probe_http.append(time.perf_counter() - started)
                timing = _server_timing(answer.headers)
                replica.append(timing["prepare"] + timing["record"])
                recording.append(timing["record"])
                generating.append(timing["generate"])

            # One request at a time, in an order that rotates, each after the previous one's background work
            # (the ledger's recording, the engine's step) has settled: otherwise whichever probe follows a
            # gateway call pays for that call's recording, and the order decides the result.
            probes = [direct_probe, sdk_probe, http_probe]
            for index in range(args.probes):
                at = index % len(prompts)
                for probe in probes[index % 3 :] + probes[: index % 3]:
                    await asyncio.sleep(args.probe_gap_s)
                    await probe(at, index)
        return {
            "direct": direct, "gateway": through, "probe_direct": probe_direct, "probe_gateway": probe_gateway,
            "probe_http": probe_http, "replica_ms": replica, "record_ms": recording, "generate_ms": generating,
        }  # fmt: skip

    measured = asyncio.run(run())
    ledger = ray.get_actor(settings.ledger_name)
    ray.get(ledger.flush.remote(), timeout=120)
    link_calls = ray.get(ledger.stats.remote(), timeout=120)["link_calls"]
    sent = args.rounds * args.requests + 2 * args.probes + 4
    failed = sum(r["failed"] for r in measured["gateway"])
    db = sa.create_engine(url)
    C = LlmCall.__table__
    with db.connect() as conn:
        stored = conn.execute(sa.select(sa.func.count()).select_from(C)).scalar_one()
        distinct = conn.execute(
            sa.select(sa.func.count()).select_from(sa.select(C.c.trajectory_id, C.c.step_index).distinct().subquery())
        ).scalar_one()
    db.dispose()
    stop_gateway(settings)
    ray.get(worker.close.remote(), timeout=120)
    stop_recorder(recorder)
    ray.shutdown()

    ratios = [
        g["tokens_per_s"] / d["tokens_per_s"] for g, d in zip(measured["gateway"], measured["direct"], strict=True)
    ]
    all_direct = [x for r in measured["direct"] for x in r["latencies"]]
    all_gateway = [x for r in measured["gateway"] for x in r["latencies"]]
    loaded_added = [x for r in measured["gateway"] for x in r["added_ms"]]
    loaded_own = [x for r in measured["gateway"] for x in r["own_ms"]]
    added = [(g - d) * 1000 for g, d in zip(measured["probe_http"], measured["probe_direct"], strict=True)]
    added_sdk = [(g - d) * 1000 for g, d in zip(measured["probe_gateway"], measured["probe_direct"], strict=True)]
    # The same request's total time at the client less the replica's wait for the rollout actor (the very call
    # the direct path makes): what the gateway adds, without the spread of two generations' times.
    in_request = [t * 1000 - g for t, g in zip(measured["probe_http"], measured["generate_ms"], strict=True)]
    result = {
        "model": args.model,
        "requests_per_round": args.requests,
        "concurrency": args.concurrency,
        "tokens_per_request": args.tokens,
        "rounds": args.rounds,
        "direct_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in measured["direct"]), 1),
        "gateway_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in measured["gateway"]), 1),
        "ratio": round(statistics.median(ratios), 3),
        "round_ratios": [round(r, 3) for r in ratios],
        "loaded_latency_p50_ms": {"direct": round(_percentile(all_direct, 0.5) * 1000, 1),
                                  "gateway": round(_percentile(all_gateway, 0.5) * 1000, 1)},
        "loaded_latency_p99_ms": {"direct": round(_percentile(all_direct, 0.99) * 1000, 1),
                                  "gateway": round(_percentile(all_gateway, 0.99) * 1000, 1)},
        "loaded_added_latency_p50_ms": round(statistics.median(loaded_added), 2),
        "loaded_added_latency_p99_ms": round(_percentile(loaded_added, 0.99), 2),
        "loaded_replica_own_ms_p50": round(statistics.median(loaded_own), 2),
        "added_latency_p50_ms": round(statistics.median(added), 2),
        "added_latency_p99_ms": round(_percentile(added, 0.99), 2),
        "added_latency_in_request_p50_ms": round(statistics.median(in_request), 2),
        "added_latency_in_request_p99_ms": round(_percentile(in_request, 0.99), 2),
        "direct_probe_ms_p50": round(statistics.median(measured["probe_direct"]) * 1000, 2),
        "direct_probe_ms_iqr": round(
            (_percentile(measured["probe_direct"], 0.75) - _percentile(measured["probe_direct"], 0.25)) * 1000, 2
        ),
        "added_latency_with_sdk_p50_ms": round(statistics.median(added_sdk), 2),
        "added_latency_with_sdk_p99_ms": round(_percentile(added_sdk, 0.99), 2),
        "replica_own_ms_p50": round(statistics.median(measured["replica_ms"]), 2),
        "record_ms_p50": round(statistics.median(measured["record_ms"]), 2),
        "store_before_reply": args.store_before_reply,
        "ledger_transport": args.ledger_transport,
        "ledger_link_calls": link_calls,
        "failed_requests": failed,
        "gateway_calls_sent": sent,
        "calls_recorded": stored,
        "recorded_exactly_once": stored == sent == distinct,
    }  # fmt: skip
    print(
        f"gateway on {args.model}: {result['gateway_tokens_per_s']} tok/s vs direct {result['direct_tokens_per_s']} "
        f"tok/s -> ratio {result['ratio']}; added latency at {args.concurrency} clients p50 "
        f"{result['loaded_added_latency_p50_ms']} ms, p99 {result['loaded_added_latency_p99_ms']} ms; one request "
        f"at a time, after idle gaps: p50 {result['added_latency_p50_ms']} ms, p99 "
        f"{result['added_latency_p99_ms']} ms (within the request: p50 {result['added_latency_in_request_p50_ms']} "
        f"ms, p99 {result['added_latency_in_request_p99_ms']} ms); failed {failed}; recorded once: "
        f"{result['recorded_exactly_once']}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
