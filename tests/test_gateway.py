"""The agent gateway through the official `openai` SDK: a real Ray Serve app in front of a real rollout actor (vLLM
on the tiny model), recording into a real recorder actor and SQLite; every call checked against what the
database holds and against an independent scoring of the recorded tokens by transformers."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from recorder.config import DatabaseConfig
from tests.rollout_harness import rows
from tests.test_gateway_prompts import HERMES, ORDER, WAIT

pytestmark = pytest.mark.slow
MODEL = "ziggurat"  # the alias every gateway answers to, beside its model's own name


@pytest.fixture(scope="module")
def gateway(ray_session, tiny_model_dir, tmp_path_factory, gateway_port):
    """(base URL, API key, database URL, settings, database engine, recorder settings, controller, loop config)
    of the gateway the loop starts (`cluster.loop.start`: recorder, one rollout actor, controller, gateway)."""
    from cluster.loop import serving_config, shutdown, start
    from gateway.config import GatewayConfig
    from recorder.api_keys import create_key
    from recorder.migrate import upgrade
    from tests.test_controller import loop_config

    folder = tmp_path_factory.mktemp("gateway")
    url = f"sqlite:///{folder / 'recorded.db'}"
    upgrade(url)
    db = sa.create_engine(url)
    key = create_key(db, "tests")
    settings = GatewayConfig(
        enabled=True, port=gateway_port, key_refresh_s=0.5, max_body_bytes=20_000, max_tokens_cap=160,
        default_max_tokens=32, flush_interval_s=0.2, ledger_name="zg-ledger", app_name="zg-gateway",
        max_concurrency_per_key=4, replicas=2, chat_template=HERMES,
        stream_keepalive_s=0.001,  # every held-back delta sends a comment: the SDK tests read streams with them
    )  # fmt: skip
    config = serving_config(loop_config(url, tiny_model_dir, folder, "zg", min_groups=1))
    config = config.model_copy(
        update={
            "gateway": settings,
            "rollout": config.rollout.model_copy(update={"actors": 1, "eval_seeds": []}),
            "trainer": config.trainer.model_copy(update={"num_workers": 1, "reward_source": "env"}),
        }
    )
    try:
        _, controller, _ = start(config)
        yield f"http://127.0.0.1:{gateway_port}", key, url, settings, db, config.recorder, controller, config
    finally:
        shutdown(config)
        db.dispose()


def _exported(metric: str, recorder: str, at_least: float, wait_s: float = 60.0) -> float:
    """A counter's value on this Ray node's metrics endpoint, for the series tagged with `recorder`, once it reaches
    `at_least` (Ray exports every few seconds), or as it is after `wait_s`."""
    import time

    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + wait_s
    while True:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in body.splitlines()
            if line.split("{", 1)[0] == metric and f'recorder="{recorder}"' in line
        ]
        if sum(values) >= at_least or time.monotonic() > deadline:
            return sum(values)
        time.sleep(1)


@contextmanager
def _database(folder: Path) -> Iterator[str]:
    """A migrated SQLite database in `folder` for a ledger of its own (the ledger writes to it itself): its URL."""
    from recorder.migrate import upgrade

    url = f"sqlite:///{folder / 'recorded.db'}"
    upgrade(url)
    yield url


def _client(gateway: Any, **headers: str) -> Any:
    from openai import OpenAI

    base, key = gateway[0], gateway[1]
    return OpenAI(base_url=f"{base}/v1", api_key=key, default_headers=headers, max_retries=0, timeout=120)


def _post(
    gateway: Any, path: str, body: Any, key: str | None = "default", raw: bytes | None = None, seen: Any = None
) -> tuple[int, Any]:
    """POST JSON; (status, parsed body). `seen`, a dict, gets the response's headers."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {gateway[1] if key == 'default' else key}"
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(gateway[0] + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, text, headers = response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        status, text, headers = exc.code, exc.read(), exc.headers
    if seen is not None:
        seen.update({name.lower(): value for name, value in headers.items()})
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text.decode(errors="replace")


def _flush(gateway: Any) -> None:
    import ray

    ledger = ray.get_actor(gateway[3].ledger_name)
    ray.get(ledger.flush.remote(), timeout=60)


def _calls(gateway: Any, trajectory_id: str) -> list[Any]:
    from recorder.schema import LlmCall

    C = LlmCall.__table__
    query = sa.select(C).where(C.c.trajectory_id == trajectory_id).order_by(C.c.step_index, C.c.call_index)
    return rows(gateway[2], query)


def _trajectory(gateway: Any, trajectory_id: str) -> Any:
    from recorder.schema import Trajectory

    T = Trajectory.__table__
    found = rows(gateway[2], sa.select(T).where(T.c.id == trajectory_id))
    return found[0] if found else None


def _score(model_dir: str, prompt: np.ndarray, completion: np.ndarray) -> np.ndarray:
    """Log-probs of `completion` after `prompt` under the tiny model in transformers (temperature 1)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokens = torch.tensor(np.concatenate([prompt, completion]), dtype=torch.long)[None]
    with torch.no_grad():
        logits = model(tokens).logits[0, len(prompt) - 1 : -1]
    picked = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion, dtype=torch.long)[:, None])
    return picked[:, 0].numpy()


def test_a_two_turn_chat_is_served_and_recorded_as_sampled(gateway, tiny_model_dir):
    from transformers import AutoTokenizer

    from recorder.records import unpack_logprobs, unpack_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    client = _client(gateway, **{"X-Ziggurat-Episode": "chat-1", "X-Ziggurat-Group": "g-chat"})
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, logprobs=True, seed=1)
    reply = first.choices[0].message.content
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And another?"}]
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0.7)
    status, ended = _post(gateway, "/v1/episodes/chat-1/end", {"reward": 0.5})
    assert status == 200 and ended["status"] == "finished"
    _flush(gateway)

    calls = _calls(gateway, "chat-1")
    assert [c.step_index for c in calls] == [0, 1]
    prompt0, completion0 = unpack_tokens(calls[0].prompt_token_ids), unpack_tokens(calls[0].completion_token_ids)
    prompt1 = unpack_tokens(calls[1].prompt_token_ids)
    # The second prompt extends the first call's exact tokens; the reply is never re-tokenized.
    assert np.array_equal(prompt1[: len(prompt0) + len(completion0)], np.concatenate([prompt0, completion0]))
    assert calls[1].sampling_params["segment"] == "continued" and calls[0].sampling_params["segment"] == "new"
    assert calls[1].sampling_params["temperature"] == 0.7
    # What the client received is what was recorded: text, and the log-probs of the sampled tokens.
    assert tokenizer.decode(completion0, skip_special_tokens=True) == reply
    received = [t.logprob for t in first.choices[0].logprobs.content]
    np.testing.assert_allclose(received, unpack_logprobs(calls[0].completion_logprobs), rtol=1e-6)
    # An independent scoring of the recorded tokens: vLLM sampled them with these log-probs.
    np.testing.assert_allclose(
        _score(tiny_model_dir, prompt0, completion0), unpack_logprobs(calls[0].completion_logprobs), atol=2e-3
    )
    assert second.usage.prompt_tokens == len(prompt1)
    trajectory = _trajectory(gateway, "chat-1")
    assert (trajectory.status, trajectory.total_reward, trajectory.step_count) == ("finished", 0.5, 2)
    assert trajectory.group_id == "g-chat"


def test_a_forced_tool_call_through_the_sdk_is_parsed_back_recorded_as_sampled_and_continued(gateway, tiny_model_dir):
    """The gateway's template (gateway.chat_template, Hermes-style) offers the tools; `tool_choice` forces a
    call, which the engine samples under the call's pattern, so even the tiny random model answers one."""
    from transformers import AutoTokenizer

    from recorder.records import unpack_logprobs, unpack_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    client = _client(gateway, **{"X-Ziggurat-Episode": "tools-1"})
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Will it rain tomorrow? Place an order."}]
    named = {"type": "function", "function": {"name": "order"}}
    first = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[ORDER, WAIT], tool_choice=named, max_tokens=160
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert [call.function.name for call in choice.message.tool_calls] == ["order"]
    arguments = json.loads(choice.message.tool_calls[0].function.arguments)
    assert arguments["market"] in ("RAIN", "SNOW") and isinstance(arguments["urgent"], bool)
    # "required" with two candidates: each is a call to one of the tools
    both = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[ORDER, WAIT], tool_choice="required", max_tokens=160, n=2,
        extra_headers={"X-Ziggurat-Episode": "tools-candidates"},
    )  # fmt: skip
    for candidate in both.choices:  # a random model spells the call in tokens of any length: 160 leaves room
        assert candidate.finish_reason == "tool_calls", (candidate, both.usage)
        assert candidate.message.tool_calls[0].function.name in ("order", "wait"), candidate
    # the tool's answer goes back in the next turn, which continues the call's exact tokens
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "filled at 0.42"},
    ]
    client.chat.completions.create(model=MODEL, messages=messages, tools=[ORDER, WAIT], max_tokens=8)
    _flush(gateway)

    calls = _calls(gateway, "tools-1")
    assert [c.step_index for c in calls] == [0, 1]
    prompt0, completion0 = unpack_tokens(calls[0].prompt_token_ids), unpack_tokens(calls[0].completion_token_ids)
    assert '"name": "order"' in tokenizer.decode(prompt0)  # the template showed the model its tools
    assert tokenizer.decode(completion0, skip_special_tokens=True).startswith('<tool_call>\n{"name": "order"')
    assert calls[0].sampling_params["constrained"] == "tool_call" and "regex" not in calls[0].sampling_params
    prompt1 = unpack_tokens(calls[1].prompt_token_ids)
    assert np.array_equal(prompt1[: len(prompt0) + len(completion0)], np.concatenate([prompt0, completion0]))
    assert calls[1].sampling_params["segment"] == "continued" and "constrained" not in calls[1].sampling_params
    # The recorded log-probs are the masked distribution's that sampled (what the trainer's importance weights
    # need), checked against an independent scoring of the same tokens by the unconstrained model: the mask
    # only takes probability away from other tokens, so no token is less likely than unconstrained, and the
    # forced call as a whole is far more likely than the model alone would make it.
    recorded, unconstrained = (
        unpack_logprobs(calls[0].completion_logprobs),
        _score(tiny_model_dir, prompt0, completion0),
    )
    assert np.all(recorded >= unconstrained - 2e-3), (recorded - unconstrained).min()
    assert recorded.sum() - unconstrained.sum() > 10.0, (recorded.sum(), unconstrained.sum())


def test_a_streamed_tool_call_reaches_the_sdk_as_a_call_and_the_next_turn_continues_its_tokens(gateway, tiny_model_dir):
    """Streamed with tools: the reply's `<tool_call>` block goes out as a `tool_calls` delta, which the SDK's
    own accumulator assembles into the same call a whole reply would parse to from the recorded tokens."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from transformers import AutoTokenizer

    from gateway.tools import parse_tool_calls
    from recorder.records import unpack_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    client = _client(gateway, **{"X-Ziggurat-Episode": "tools-streamed"})
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Snow or rain? Place an order."}]
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[ORDER, WAIT], tool_choice="required", max_tokens=160, stream=True
    )
    state, contents = ChatCompletionStreamState(), []
    for chunk in stream:
        state.handle_chunk(chunk)
        contents += [c.delta.content for c in chunk.choices if c.delta.content]
    choice = state.get_final_completion().choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert not contents  # a forced reply is nothing but the call: no text of it leaked as content
    streamed = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    messages += [
        {"role": "assistant", "tool_calls": [c.model_dump(exclude_none=True) for c in choice.message.tool_calls]},
        {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "filled"},
    ]
    for _ in client.chat.completions.create(
        model=MODEL, messages=messages, tools=[ORDER, WAIT], max_tokens=8, stream=True
    ):
        pass
    _flush(gateway)

    calls = _calls(gateway, "tools-streamed")
    assert [c.step_index for c in calls] == [0, 1]
    completion = unpack_tokens(calls[0].completion_token_ids)
    _, parsed = parse_tool_calls(tokenizer.decode(completion, skip_special_tokens=True))
    assert streamed == [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed]
    prompt0, prompt1 = unpack_tokens(calls[0].prompt_token_ids), unpack_tokens(calls[1].prompt_token_ids)
    assert np.array_equal(prompt1[: len(prompt0) + len(completion)], np.concatenate([prompt0, completion]))
    assert calls[1].sampling_params["segment"] == "continued"


def test_a_stream_holding_back_a_tool_call_sends_sse_comments_meanwhile(gateway):
    """While a forced call's block is open its text is held: the stream carries SSE comments meanwhile (clients
    skip them), and each `data:` line is still one whole chunk. The SDK's reading of such a stream is the test
    above, on the same gateway."""
    import httpx

    body = {
        "model": MODEL, "messages": [{"role": "user", "content": "Snow or rain? Place an order."}],
        "tools": [ORDER, WAIT], "tool_choice": "required", "max_tokens": 160, "stream": True,
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {gateway[1]}", "X-Ziggurat-Episode": "tools-keepalive"}
    with httpx.stream("POST", f"{gateway[0]}/v1/chat/completions", json=body, headers=headers, timeout=120) as reply:
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line]
    comments = [line for line in lines if line.startswith(":")]
    data = [line.removeprefix("data: ") for line in lines if not line.startswith(":")]
    assert comments and all(line == ": held" for line in comments), lines[:5]
    assert data[-1] == "[DONE]" and all(line.startswith("data: ") for line in lines if not line.startswith(":"))
    chunks = [json.loads(line) for line in data[:-1]]
    deltas = [choice["delta"] for chunk in chunks for choice in chunk["choices"]]
    assert not any(delta.get("content") for delta in deltas)  # the held text never leaked as content
    assert [c["finish_reason"] for c in chunks[-1]["choices"]] == ["tool_calls"]
    # a comment goes out only while text is held: a stream without tools holds nothing and sends none
    plain = {"model": MODEL, "messages": body["messages"], "max_tokens": 24, "stream": True}
    with httpx.stream("POST", f"{gateway[0]}/v1/chat/completions", json=plain, headers=headers, timeout=120) as reply:
        plain_lines = [line for line in reply.iter_lines() if line]
    assert plain_lines[-1] == "data: [DONE]" and not any(line.startswith(":") for line in plain_lines)


def test_streamed_and_concurrent_async_calls_record_exactly_what_the_client_received(gateway, tiny_model_dir):
    from openai import AsyncOpenAI
    from transformers import AutoTokenizer

    from recorder.records import unpack_logprobs, unpack_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base, key = gateway[0], gateway[1]

    async def one(index: int) -> tuple[str, str, list[float]]:
        episode = f"stream-{index}"
        client = AsyncOpenAI(
            base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120,
            default_headers={"X-Ziggurat-Episode": episode, "X-Ziggurat-Group": "g-stream"},
        )  # fmt: skip
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {index + 3}."}], max_tokens=16,
            stream=True, logprobs=True, stream_options={"include_usage": True},
        )  # fmt: skip
        text, logprobs = "", []
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                if chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
                    logprobs += [t.logprob for t in chunk.choices[0].logprobs.content]
        await client.close()
        return episode, text, logprobs

    async def all_of() -> list[tuple[str, str, list[float]]]:
        return list(await asyncio.gather(*(one(i) for i in range(4))))

    async def candidates() -> tuple[int, list[str]]:
        """n = 2, streamed: the choices arrive interleaved, each chunk naming its index."""
        client = AsyncOpenAI(
            base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120,
            default_headers={"X-Ziggurat-Episode": "stream-n"},
        )  # fmt: skip
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Two guesses?"}], max_tokens=12, n=2, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        texts, finished, counted = ["", ""], [None, None], 0
        async for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
                finished[choice.index] = choice.finish_reason or finished[choice.index]
            counted = chunk.usage.completion_tokens if chunk.usage else counted
        await client.close()
        assert None not in finished
        return counted, texts

    results = asyncio.run(all_of())
    counted, texts = asyncio.run(candidates())
    _flush(gateway)  # the candidates are recorded (awaiting their rewards, which this test leaves out)
    sampled = [unpack_tokens(_calls(gateway, f"stream-n.s0.{i}")[0].completion_token_ids) for i in range(2)]
    assert [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in sampled] == texts
    assert counted == sum(len(tokens) for tokens in sampled)
    for episode, _, _ in results:
        assert _post(gateway, f"/v1/episodes/{episode}/end", {})[1]["status"] == "awaiting_reward"
    _flush(gateway)
    for episode, text, logprobs in results:
        [call] = _calls(gateway, episode)
        completion = unpack_tokens(call.completion_token_ids)
        assert tokenizer.decode(completion, skip_special_tokens=True) == text
        np.testing.assert_allclose(logprobs, unpack_logprobs(call.completion_logprobs), rtol=1e-6)
        assert len(logprobs) == len(completion)


def test_candidates_and_cohorts_become_groups_only_once_every_reward_is_in(gateway):
    from recorder.batches import readiness

    client = _client(gateway, **{"X-Ziggurat-Episode": "market-1"})
    decision = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Buy or sell?"}], n=3, max_tokens=8
    )
    step = int(decision.headers["x-ziggurat-step"])
    assert len(decision.parse().choices) == 3
    # A cohort: two episodes of one group, ended now, rewarded later.
    for name in ("cohort-a", "cohort-b"):
        cohort = _client(gateway, **{"X-Ziggurat-Episode": name, "X-Ziggurat-Group": "g-cohort"})
        cohort.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Trade."}], max_tokens=8)
        _post(gateway, f"/v1/episodes/{name}/end", {})
    _flush(gateway)
    db = gateway[4]
    before = readiness(db, min_group_size=2)
    assert before.groups_with_variance == 0  # every member still waits for its reward

    assert _post(gateway, f"/v1/episodes/market-1/candidates/{step}/rewards", {"rewards": [1.0, 0.0, 0.5]})[0] == 200
    assert _trajectory(gateway, "market-1") is None  # a decision point only: no trajectory of its own
    assert _post(gateway, "/v1/episodes/cohort-a/reward", {"reward": 1.0})[0] == 200
    _flush(gateway)
    assert readiness(db, min_group_size=2).groups_with_variance == 1  # the candidates; the cohort waits for b
    assert _post(gateway, "/v1/episodes/cohort-b/reward", {"reward": -1.0})[0] == 200
    _flush(gateway)
    after = readiness(db, min_group_size=2)
    assert after.groups_with_variance == 2 and after.trainable_trajectories == 5
    # Late rewards for closed episodes are refused, not applied twice.
    status, body = _post(gateway, "/v1/episodes/cohort-b/reward", {"reward": 3.0})
    assert status == 409 and "already finished" in body["error"]["message"]
    assert _trajectory(gateway, "cohort-b").total_reward == -1.0


def test_bad_requests_get_clear_openai_errors_and_record_nothing(gateway):
    from recorder.schema import LlmCall

    count = sa.select(sa.func.count()).select_from(LlmCall.__table__)
    _flush(gateway)
    calls_before = rows(gateway[2], count)[0][0]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        ("/v1/chat/completions", chat, None, None, 401, None),
        ("/v1/chat/completions", chat, "zk-wrong", None, 401, None),
        ("/v1/chat/completions", None, "default", b"{not json", 400, None),
        ("/v1/chat/completions", {**chat, "model": "gpt-4"}, "default", None, 404, "model"),
        ("/v1/chat/completions", {**chat, "max_tokens": -1}, "default", None, 400, "max_tokens"),
        ("/v1/chat/completions", {**chat, "max_tokens": 10_000}, "default", None, 400, "max_tokens"),
        ("/v1/chat/completions", {**chat, "top_p": 0.5}, "default", None, 400, "top_p"),
        ("/v1/chat/completions", {**chat, "messages": []}, "default", None, 400, "messages"),
        ("/v1/chat/completions", None, "default", b"{" + b" " * 30_000 + b"}", 413, None),
        (
            "/v1/chat/completions",
            {**chat, "tools": [ORDER], "tool_choice": {"type": "function", "function": {"name": "sell"}}},
            "default",
            None,
            400,
            "tool_choice",
        ),
        ("/v1/chat/completions", {**chat, "n": 17, "stream": True}, "default", None, 400, "n"),
        ("/v1/chat/completions", {**chat, "metadata": {"episode": "has spaces"}}, "default", None, 400, "episode"),
        ("/v1/episodes", {"episode": "e" * 60}, "default", None, 400, "episode"),
        ("/v1/episodes/nobody/reward", {"reward": 1.0}, "default", None, 404, "episode"),
        ("/v1/episodes/chat-1/reward", {"reward": 1.0}, "default", None, 409, "episode"),
        ("/v1/episodes/nobody/reward", {"reward": "high"}, "default", None, 400, "reward"),
        # JSON as Python writes it may hold NaN, which no database column takes: refused here, not dropped later
        ("/v1/episodes/nobody/steps", None, "default", b'{"action": {"price": NaN}}', 400, "action"),
    ]
    for path, body, key, raw, status, param in cases:
        got, answer = _post(gateway, path, body, key=key, raw=raw)
        assert got == status, (path, body if raw is None else raw[:20], answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
        assert answer["error"]["param"] == param, answer
    _flush(gateway)
    assert rows(gateway[2], count)[0][0] == calls_before


def test_a_revoked_key_stops_working(gateway, tmp_path):
    import time

    from recorder.api_keys import create_key, list_keys, revoke_key

    key = create_key(gateway[4], "short-lived")
    assert [k.name for k in list_keys(gateway[4]) if k.revoked_at is None] == ["tests", "short-lived"]
    time.sleep(gateway[3].key_refresh_s + 0.1)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert _post(gateway, "/v1/chat/completions", chat, key=key)[0] == 200
    revoke_key(gateway[4], "short-lived")
    time.sleep(gateway[3].key_refresh_s + 0.1)
    assert _post(gateway, "/v1/chat/completions", chat, key=key)[0] == 401


def test_an_episode_past_its_ttl_is_aborted_and_never_trained(ray_session, tmp_path):
    """The ledger itself (in this process), with a TTL short enough to pass."""
    import time

    from gateway.config import GatewayConfig
    from gateway.ledger import EpisodeLedger
    from recorder.schema import Trajectory

    with _database(tmp_path) as url:

        async def scenario() -> dict[str, Any]:
            ledger = EpisodeLedger(GatewayConfig(episode_ttl_s=0.3), DatabaseConfig(url=url))
            await ledger.open("slow", "g-ttl")
            call = {
                "prompt_token_ids": [1, 2, 3], "model_version": 0, "sampling": {"temperature": 1.0},
                "completions": [
                    {"token_ids": [4, 5], "logprobs": [-0.5, -0.25], "text": "ab", "finish_reason": "stop"}
                ],
            }  # fmt: skip
            await ledger.record_call("slow", call)
            await ledger.end("slow")
            time.sleep(0.4)
            assert await ledger.expire() == 1
            late = await ledger.reward("slow", 1.0)
            await ledger.close()
            return late

        late = asyncio.run(scenario())
        assert late["status"] == 409 and "aborted" in late["error"]["message"]
        T = Trajectory.__table__
        [row] = rows(url, sa.select(T.c.status, T.c.total_reward, T.c.step_count).where(T.c.id == "slow"))
        assert tuple(row) == ("aborted", None, 1)


def _served(*texts: str) -> dict[str, Any]:
    """A served call as a replica hands it to the ledger, one completion per text."""
    completions = [
        {"token_ids": [4 + i, 5], "logprobs": [-0.5, -0.25], "text": text, "finish_reason": "stop"}
        for i, text in enumerate(texts)
    ]
    return {
        "prompt_token_ids": [1, 2, 3],
        "model_version": 0,
        "sampling": {"temperature": 1.0},
        "completions": completions,
    }


def test_a_call_is_answered_only_once_stored_so_a_dead_ledger_loses_nothing_it_answered(ray_session, tmp_path):
    """The ledger in this process, never flushed on its own (flush_interval_s: an hour): whatever the database
    holds when an answer comes back was stored before it. Dropping the ledger object is its crash: all it held is
    gone. With store_before_reply off, the same crash loses the answered calls."""
    from gateway.config import GatewayConfig
    from gateway.ledger import EpisodeLedger
    from recorder.schema import LlmCall, Step, Trajectory

    T, C, S = Trajectory.__table__, LlmCall.__table__, Step.__table__
    for store in (True, False):
        (tmp_path / str(store)).mkdir()
        with _database(tmp_path / str(store)) as url:

            async def scenario(store: bool = store) -> tuple[list[dict[str, Any]], dict[str, Any]]:
                settings = GatewayConfig(flush_interval_s=3600, store_before_reply=store)
                ledger = EpisodeLedger(settings, DatabaseConfig(url=url))
                answers = await asyncio.gather(*(ledger.record_call(f"a{i}", _served("buy")) for i in range(20)))
                answers.append(await ledger.end("a0", 1.0))
                # the environment's word on a call is a step of its own, stored before its answer too
                answers.append(await ledger.annotate("a1", "price 0.4", {"order": "buy"}, 0.25, False))
                # a retry of it (its answer lost) is answered alike; a different second word on the call is not
                answers.append(await ledger.annotate("a1", "price 0.4", {"order": "buy"}, 0.25, False))
                again = await ledger.annotate("a1", None, {"order": "sell"}, 0.0, False)
                assert again["status"] == 409 and again["error"]["code"] == "already_annotated", again
                await ledger.record_call("a2", _served("x", "y"))  # a decision point has candidates, not a step
                refused = await ledger.annotate("a2", None, {"order": "buy"}, 0.0, False)
                assert refused["status"] == 409 and "decision point" in refused["error"]["message"], refused
                return answers, await ledger.stats()  # and the ledger dies here, holding what it holds

            answers, stats = asyncio.run(scenario())
            calls = rows(url, sa.select(C.c.trajectory_id))
            finished = rows(url, sa.select(T.c.id).where(T.c.status == "finished"))
            steps = [s for s in rows(url, sa.select(S.c.trajectory_id, S.c.action, S.c.env_reward)) if "." not in s[0]]
            if store:
                assert all(a["stored"] is True for a in answers), answers
                assert sorted(c.trajectory_id for c in calls if "." not in c.trajectory_id) == sorted(
                    f"a{i}" for i in range(20)
                )
                assert [r.id for r in finished] == ["a0"]
                assert sorted(tuple(r) for r in steps) == [
                    ("a0", {"reply": "buy"}, 0.0),
                    ("a1", {"order": "buy"}, 0.25),
                ]
                # a group commit: 23 answers waited on a few recorder writes, not one each
                assert 1 <= stats["flushes"] <= 6, stats
            else:
                assert all(a["stored"] is None for a in answers) and not calls and not finished and not steps
                assert stats["flushes"] == 0 and stats["held_records"] > 40, stats


def test_the_ledger_holds_its_calls_through_a_database_outage_and_a_poisoned_call_stops_nothing(postgres, caplog):
    """The ledger writes to PostgreSQL itself. With the server stopped, a call is answered `stored: false` at
    gateway.store_timeout_s and kept; once the server is back, the next call is stored with everything held (its
    connection died with the server: the write is retried, not answered `held`), each call exactly once. A
    call the database can never take (a NaN log-prob from a broken engine) is refused by name and dropped, and the
    calls around it are stored."""
    import math
    import time

    from gateway.config import GatewayConfig
    from gateway.ledger import EpisodeLedger
    from recorder.migrate import upgrade
    from recorder.schema import LlmCall

    url = postgres.create_database("ledger_outage")
    upgrade(url)
    C = LlmCall.__table__
    poisoned = _served("buy")
    poisoned["completions"][0]["logprobs"] = [-0.5, math.nan]

    async def scenario() -> dict[str, Any]:
        settings = GatewayConfig(flush_interval_s=3600, store_before_reply=True, store_timeout_s=2.0)
        # The URL as start_gateway resolves it: with the password from the environment (the test server's trust
        # authentication ignores it); a restarted ledger reads its episodes back through it too.
        with_password = sa.make_url(url).set(password="from-the-environment").render_as_string(hide_password=False)
        ledger = EpisodeLedger(settings, DatabaseConfig(url=url, connect_timeout_s=1), with_password)
        before = [await ledger.record_call(f"o{i}", _served("buy")) for i in range(3)]
        assert all(answer["stored"] is True for answer in before), before
        postgres.stop()  # a clean stop: the test server acknowledges commits before they are on disk
        try:
            started = time.monotonic()
            during = [await ledger.record_call(f"o{i}", _served("hold")) for i in range(3, 6)]
            waited = time.monotonic() - started
            held = (await ledger.stats())["held_records"]
        finally:
            postgres.start()
        assert all(answer["stored"] is False for answer in during), during
        assert waited < 3 * (settings.store_timeout_s + 2.0), waited  # each answered near its deadline
        assert held >= 6, held  # 3 trajectory starts and 3 calls, none lost
        after = [await ledger.record_call("poisoned", poisoned), await ledger.record_call("o6", _served("sell"))]
        # a restart while the ledger is idle: its kept connection is dead, which only its next write finds out
        postgres.stop()
        postgres.start()
        after.append(await ledger.record_call("o7", _served("buy")))
        assert all(answer["stored"] is True for answer in after), after
        stats = await ledger.stats()
        await ledger.close()
        return stats

    stats = asyncio.run(scenario())
    assert stats["held_records"] == 0, stats
    stored = rows(url, sa.select(C.c.trajectory_id, C.c.step_index))
    assert sorted(r.trajectory_id for r in stored) == [f"o{i}" for i in range(8)]  # once each, the poisoned one not
    refused = [r.getMessage() for r in caplog.records if "refused gateway record" in r.getMessage()]
    assert refused and all("'poisoned'" in message for message in refused), refused


def test_a_restarted_ledger_carries_on_with_the_episodes_it_had_open(ray_session, tmp_path):
    """kill -9 of the ledger actor mid-episode: Ray restarts it and it reads back from the database what was open,
    so the agent's next call continues its trajectory at the next step, the step the dead ledger still held is
    recorded, pending candidates and delayed rewards are still taken, and a reward for an episode finished before
    the crash is refused as finished, not unknown."""
    import os
    import signal
    import time

    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError

    from gateway.config import GatewayConfig
    from gateway.ledger import start_ledger
    from recorder.schema import LlmCall, Step, Trajectory

    def call(method: str, *args: Any) -> dict[str, Any]:
        return ray.get(getattr(ledger, method).remote(*args), timeout=60)

    settings = GatewayConfig(ledger_name="zg-restart-ledger", flush_interval_s=0.1)
    with _database(tmp_path) as url:
        ledger = start_ledger(settings, DatabaseConfig(url=url))
        try:
            assert call("record_call", "trader", _served("buy"), "market-7")["step"] == 0
            call("annotate", "trader", "price 0.4", {"order": "buy"}, 0.25)
            assert call("record_call", "trader", _served("hold"))["step"] == 1  # held by the ledger when it dies
            assert call("record_call", "trader", _served("a", "b"))["step"] == 2  # a decision point, 2 candidates
            call("record_call", "waiting", _served("sell"))
            call("end", "waiting")  # ended, its reward comes later
            call("record_call", "done", _served("x"))
            call("reward", "done", 1.0)
            written = call("flush")["written"]
            # the rows it writes show on Ray's metrics as the recorder's do, under the ledger's name
            least = max(written, 1)
            assert _exported("ray_ziggurat_recorder_rows_written_total", settings.ledger_name, least) >= least

            before = ray.get(ledger.__ray_call__.remote(lambda _: os.getpid()), timeout=60)
            os.kill(before, signal.SIGKILL)
            deadline = time.monotonic() + 120
            while True:  # Ray restarts the actor in a new process
                try:
                    if ray.get(ledger.__ray_call__.remote(lambda _: os.getpid()), timeout=60) != before:
                        break
                except (RayActorError, ActorUnavailableError):
                    pass
                assert time.monotonic() < deadline, "the ledger did not come back"
                time.sleep(0.2)
            assert call("stats")["recovered"] == {"episodes": 2, "candidate_groups": 1}

            after = call("record_call", "trader", _served("sell"))
            assert (after["step"], after["group"], after["version"]) == (2, "market-7", 0)
            assert call("record_call", "trader", _served("c", "d"))["step"] == 4  # no clash with step 2's group
            assert call("reward_candidates", "trader", 2, [1.0, 0.0])["status"] == "finished"
            assert call("reward_candidates", "trader", 4, [0.0, 1.0])["status"] == "finished"
            assert call("reward", "trader", 2.0)["status"] == "finished"
            assert call("reward", "waiting", 0.5)["status"] == "finished"
            late = call("reward", "done", 3.0)
            assert late["status"] == 409 and "finished" in late["error"]["message"]
            call("flush")
        finally:
            ray.kill(ledger, no_restart=True)

        T, C, S = Trajectory.__table__, LlmCall.__table__, Step.__table__
        found = {r.id: r for r in rows(url, sa.select(T.c.id, T.c.status, T.c.total_reward, T.c.step_count))}
        assert {k: (r.status, r.total_reward) for k, r in found.items()} == {
            "trader": ("finished", 2.0), "waiting": ("finished", 0.5), "done": ("finished", 1.0),
            "trader.s2.0": ("finished", 1.0), "trader.s2.1": ("finished", 0.0),
            "trader.s4.0": ("finished", 0.0), "trader.s4.1": ("finished", 1.0),
        }  # fmt: skip
        assert found["trader"].step_count == 3
        calls = rows(
            url, sa.select(C.c.step_index, C.c.text).where(C.c.trajectory_id == "trader").order_by("step_index")
        )
        assert [tuple(r) for r in calls] == [(0, "buy"), (1, "hold"), (2, "sell")]
        steps = rows(
            url,
            sa.select(S.c.step_index, S.c.action, S.c.env_reward)
            .where(S.c.trajectory_id == "trader")
            .order_by("step_index"),
        )
        assert [tuple(r) for r in steps] == [
            (0, {"order": "buy"}, 0.25),
            (1, {"reply": "hold"}, 0.0),
            (2, {"reply": "sell"}, 0.0),
        ]


def test_keys_from_the_command_line_are_stored_hashed(tmp_path, capsys):
    from cluster.cli import main

    config = tmp_path / "keys.yaml"
    config.write_text(f"database:\n  url: sqlite:///{tmp_path / 'keys.db'}\n")
    assert main(["keys", "create", "alice", "--config", str(config)]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("zk-") and len(key) > 40
    assert main(["keys", "create", "alice", "--config", str(config)]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["keys", "list", "--config", str(config)]) == 0
    listed = capsys.readouterr().out
    assert "alice" in listed and "active" in listed and key not in listed
    stored = rows(f"sqlite:///{tmp_path / 'keys.db'}", sa.text("SELECT * FROM api_keys"))
    assert key not in repr(stored)
    assert main(["keys", "revoke", "alice", "--config", str(config)]) == 0
    assert main(["keys", "revoke", "alice", "--config", str(config)]) == 2
    assert "no active key" in capsys.readouterr().err


def _node_agent(gateway: Any, run: str, *args: str) -> list[dict[str, Any]]:
    import shutil
    import subprocess
    from pathlib import Path

    folder = Path(__file__).parent / "agents"
    node = shutil.which("node")
    assert node, "Node.js is missing: scripts/test.sh installs it (apt nodejs npm)"
    assert (folder / "node_modules" / "openai").is_dir(), "run `npm install` in tests/agents (scripts/test.sh does)"
    done = subprocess.run(
        [node, str(folder / "market_agent.mjs"), gateway[0], gateway[1], run, *args],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_an_external_node_agent_is_recorded_trained_on_by_the_loop_and_served_the_new_version(
    gateway, tiny_model_dir, tmp_path
):
    from transformers import AutoTokenizer

    from cluster import loop
    from cluster.tracking import LoopTracker
    from recorder import queries
    from recorder.records import unpack_tokens
    from recorder.schema import Trajectory

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lines = _node_agent(gateway, "js", "2", "3", "300")
    calls, summary = lines[:-1], lines[-1]
    assert summary["done"] == 6 and len(calls) == 12 and {c["version"] for c in calls} == {0}
    _flush(gateway)
    for call in calls:  # the recorded tokens decode to exactly what the Node client received
        recorded = _calls(gateway, call["episode"])[call["step"]]
        assert tokenizer.decode(unpack_tokens(recorded.completion_token_ids), skip_special_tokens=True) == call["text"]
    T = Trajectory.__table__
    finished = rows(gateway[2], sa.select(T.c.id, T.c.total_reward).where(T.c.group_id.like("js-market-%")))
    assert sorted(r.total_reward for r in finished) == sorted(summary["rewards"])

    # The loop's own training and release steps (what `run_loop` does after a rollout round): the controller
    # finds the agent's cohorts ready, trains them on the persistent trainer and swaps the version in.
    controller, config = gateway[6], gateway[7]
    tracker = LoopTracker(config, tmp_path / "out", enabled=False)
    trained = loop.train(controller, tracker, config, 1)
    assert trained["trained"], trained
    batch = queries.get_batch(gateway[4], trained["batch_id"])
    assert {r.id for r in finished} <= set(batch["trajectory_ids"])  # the agent's episodes were trained on
    released, evaluation = loop.release(controller, tracker, trained["version"])
    loop.finish_evaluation(controller, tracker, evaluation)  # the loop waits for one before the next phase
    assert released["deployed"] and released["swap"]["actors"] == ["zg-rollout-0"], released

    again = _node_agent(gateway, "js-after", "1", "1", "0")
    assert {c["version"] for c in again[:-1]} == {trained["version"]}  # served back through the gateway
    _flush(gateway)
    assert {c.model_version for c in _calls(gateway, again[0]["episode"])} == {trained["version"]}


def test_a_key_over_its_concurrency_gets_429_with_retry_after_and_nothing_recorded(gateway):
    from concurrent.futures import ThreadPoolExecutor

    from recorder.schema import LlmCall

    count = sa.select(sa.func.count()).select_from(LlmCall.__table__)
    _flush(gateway)
    before = rows(gateway[2], count)[0][0]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go."}], "max_tokens": 64, "min_tokens": 64}

    def one(_: int) -> tuple[int, Any, dict[str, str]]:
        headers: dict[str, str] = {}
        status, answer = _post(gateway, "/v1/chat/completions", body, seen=headers)
        return status, answer, headers

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    statuses = [status for status, _, _ in answers]
    refused = [(answer, headers) for status, answer, headers in answers if status == 429]
    assert refused and statuses.count(200) >= gateway[3].max_concurrency_per_key, statuses
    for answer, headers in refused:
        assert "max_concurrency_per_key" in answer["error"]["message"] and headers["retry-after"] == "1"
    _flush(gateway)
    assert rows(gateway[2], count)[0][0] == before + statuses.count(200)


def test_a_gateway_on_another_port_than_the_clusters_serve_is_refused(gateway, tiny_model_dir):
    from gateway.app import start_gateway

    other = gateway[3].model_copy(update={"port": gateway[3].port + 1, "app_name": "zg-other", "ledger_name": "zg-o"})
    with pytest.raises(RuntimeError, match=rf"already runs in this Ray cluster on 127.0.0.1:{gateway[3].port}"):
        start_gateway(
            other, DatabaseConfig(url=gateway[2]), model_name="tiny", model_path=tiny_model_dir,
            worker_names=["zg-rollout-0"], max_model_len=1024,
        )  # fmt: skip


def test_with_two_replicas_an_episode_continues_its_tokens_on_whichever_replica_serves_it(gateway):
    """The module's gateway runs 2 replicas. An episode's second turn that reaches the replica which did not serve
    its first still continues the first call's exact tokens (from the ledger). Both replicas reach the ledger over
    its socket (gateway.ledger_transport), the ledger's answers the same as through its actor."""
    import ray

    from recorder.records import unpack_tokens

    ledger = ray.get_actor(gateway[3].ledger_name)
    over_socket = ray.get(ledger.stats.remote(), timeout=60)["link_calls"]
    hops = 0
    for index in range(12):
        client = _client(gateway, **{"X-Ziggurat-Episode": f"hop-{index}"})
        messages = [{"role": "user", "content": f"Say {index}."}]
        first = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=6)
        messages += [{"role": "assistant", "content": first.parse().choices[0].message.content}]
        messages += [{"role": "user", "content": "Again."}]
        second = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=6)
        hops += first.headers["x-ziggurat-replica"] != second.headers["x-ziggurat-replica"]
    assert hops > 0, "every second turn reached the replica of its first: nothing crossed replicas"
    # 24 record_call answers, and a context lookup per crossed second turn, each over the socket once a replica has
    # it up (a replica that had not served before this test sends its first call through the actor)
    assert ray.get(ledger.stats.remote(), timeout=60)["link_calls"] - over_socket >= 24 - 2
    _flush(gateway)
    for index in range(12):
        first, second = _calls(gateway, f"hop-{index}")
        served = np.concatenate([unpack_tokens(first.prompt_token_ids), unpack_tokens(first.completion_token_ids)])
        assert np.array_equal(unpack_tokens(second.prompt_token_ids)[: len(served)], served)
        assert second.sampling_params["segment"] == "continued"
