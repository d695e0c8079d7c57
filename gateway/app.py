"""The agent gateway: an OpenAI-compatible HTTP API on Ray Serve, in front of the rollout actors' engines.

Every replica checks the key, validates the request, builds the prompt tokens (extending the episode's
earlier tokens exactly: gateway.prompts), sends it to the least loaded rollout actor, answers, and hands the
call to the episode ledger (gateway.ledger), which records it. The routes beside the OpenAI ones open and
end episodes, attach environment steps and set rewards, now or hours later.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from gateway.config import GatewayConfig
from gateway.ledger import start_ledger
from gateway.ledger_link import LedgerLink
from gateway.prompts import extend_prompt, render_prompt
from gateway.protocol import (
    ChatRequest,
    CompletionRequest,
    RequestProblem,
    chat_chunk,
    chat_response,
    completion_response,
    offered_tools,
    parse,
    recorded_sampling,
    reply_message,
    sampling_of,
    token_logprobs,
    usage,
)
from gateway.tool_parsers import VllmToolParser, WholeReplyStream, check_tool_parser
from gateway.tools import ToolCallStream, parse_tool_calls, template_takes_tools
from recorder.config import DatabaseConfig

log = logging.getLogger(__name__)

api = FastAPI(title="Ziggurat agent gateway")
_CONTEXTS_KEPT = 10_000  # episodes whose latest call a replica remembers, for exact-token continuation
_ledgers: dict[str, Any] = {}  # ledger name -> handle, for the gateways this process started


def _error(problem: RequestProblem, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse(problem.body(), status_code=problem.status, headers=headers)


# Defined before the deployment class: Serve's ingress wrapper only sees names that exist when it runs.
def _number(data: dict[str, Any], name: str, required: bool) -> float | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or abs(value) == float("inf"):
        raise RequestProblem(f"{name} must be a finite number", name)
    return float(value)


def _fields(method: str, data: dict[str, Any]) -> list[Any]:
    """The ledger arguments of an episode route's JSON body, checked."""
    if method == "end":
        return [_number(data, "reward", required=False)]
    if method == "reward":
        return [_number(data, "reward", required=True)]
    if method == "reward_candidates":
        rewards = data.get("rewards")
        if not isinstance(rewards, list) or not rewards:
            raise RequestProblem("rewards must be a non-empty list of numbers, one per candidate", "rewards")
        return [[_number({"rewards": r}, "rewards", required=True) for r in rewards]]
    if method == "annotate":
        observation, action = data.get("observation"), data.get("action")
        if observation is not None and not isinstance(observation, str):
            raise RequestProblem("observation must be a string", "observation")
        if action is not None and not isinstance(action, dict):
            raise RequestProblem("action must be an object", "action")
        try:  # what the step's JSON column will hold (Python's JSON parser lets NaN and Infinity in)
            json.dumps(action, allow_nan=False)
        except ValueError:
            raise RequestProblem("action must not hold NaN or Infinity; send null or a number", "action") from None
        return [observation, action, _number(data, "reward", required=False) or 0.0, bool(data.get("done", False))]
    return []


_ID = re.compile(r"[A-Za-z0-9._:@/+-]{1,48}")


def _checked_id(value: Any, name: str) -> str | None:
    """An episode or group key as given, or None; RequestProblem if it cannot be a trajectory or group id (the
    ledger derives candidate ids from it, and the database keeps 64 characters)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise RequestProblem(f"{name} must be 1 to 48 characters of letters, digits and ._:@/+-", name)
    return value


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


@serve.deployment
@serve.ingress(api)
class Gateway:
    """One gateway replica (a Ray actor); see the module docstring."""

    def __init__(
        self,
        settings: GatewayConfig,
        model_name: str,
        model_path: str,
        worker_names: list[str],
        database_url: str,
        max_model_len: int,
        namespace: str,
    ) -> None:
        """`namespace`: the Ray namespace of the ledger and rollout actors (replicas run in Serve's own)."""
        from transformers import AutoTokenizer

        self.settings, self.model_name, self.max_model_len = settings, model_name, max_model_len
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if settings.chat_template is not None:
            self.tokenizer.chat_template = settings.chat_template
        self.takes_tools = template_takes_tools(self.tokenizer)
        # None: the gateway's own `<tool_call>` parser (gateway.tools); else vLLM's (gateway.tool_parsers)
        self.tool_parser = VllmToolParser(settings.tool_parser, self.tokenizer) if settings.tool_parser else None
        self.namespace = namespace
        self.ledger = ray.get_actor(settings.ledger_name, namespace=namespace)
        self.ledger_link = LedgerLink(self.ledger, settings.ledger_timeout_s, settings.ledger_transport == "socket")
        self.worker_names = list(worker_names)
        self._workers: dict[str, Any] = {}
        self._load: Counter[str] = Counter()  # requests this replica has in flight on each rollout actor
        self._by_key: Counter[str] = Counter()
        self._in_flight = 0
        self._contexts: OrderedDict[str, dict[str, Any]] = OrderedDict()  # episode -> its latest call here
        self.replica = serve.get_replica_context().replica_id.unique_id  # in X-Ziggurat-Replica
        self._keys: dict[str, str] = {}
        self._keys_read = 0.0
        self._db: Any = None
        if settings.auth == "keys":
            import sqlalchemy as sa

            self._db = sa.create_engine(database_url, pool_pre_ping=True)

    # --- admission ------------------------------------------------------------------------------------------

    def _client_of(self, request: Request) -> str:
        """The key's client name (`anonymous` without auth), or RequestProblem 401."""
        if self.settings.auth == "none":
            return "anonymous"
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            raise RequestProblem(
                "missing API key: send `Authorization: Bearer <key>` (create one with `ziggurat keys create`)",
                status=401, code="invalid_api_key",
            )  # fmt: skip
        from recorder.api_keys import active_keys, hash_key

        if time.monotonic() - self._keys_read > self.settings.key_refresh_s:
            self._keys_read = time.monotonic()
            try:
                self._keys = active_keys(self._db)
            except Exception as exc:  # the keys read last stay valid through a database outage
                log.warning("could not re-read the API keys (%s: %s); using the last ones", type(exc).__name__, exc)
        name = self._keys.get(hash_key(header[7:].strip()))
        if name is None:
            raise RequestProblem("invalid or revoked API key", status=401, code="invalid_api_key")
        return name

    def _admit(self, request: Request) -> str:
        client = self._client_of(request)
        if self._in_flight >= self.settings.max_in_flight:
            raise RequestProblem("the gateway is at capacity; retry after the Retry-After seconds", status=429)
        if self._by_key[client] >= self.settings.max_concurrency_per_key:
            raise RequestProblem(
                f"key {client!r} has {self._by_key[client]} requests in flight (gateway.max_concurrency_per_key); "
                "retry after the Retry-After seconds",
                status=429, code="rate_limit_exceeded",
            )  # fmt: skip
        self._in_flight += 1
        self._by_key[client] += 1
        return client

    def _release(self, client: str) -> None:
        self._in_flight -= 1
        self._by_key[client] -= 1

    async def _body(self, request: Request) -> Any:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.settings.max_body_bytes:
            raise RequestProblem(f"request body over {self.settings.max_body_bytes} bytes", status=413)
        raw = await request.body()
        if len(raw) > self.settings.max_body_bytes:
            raise RequestProblem(f"request body over {self.settings.max_body_bytes} bytes", status=413)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise RequestProblem(f"the body is not valid JSON ({exc})") from None

    def _check_model(self, model: str) -> None:
        if model not in (self.model_name, "ziggurat"):
            raise RequestProblem(
                f"unknown model {model!r}: this gateway serves {self.model_name!r} (GET /v1/models)",
                "model", 404, "model_not_found",
            )  # fmt: skip

    async def _ledger(self, method: str, *args: Any) -> dict[str, Any]:
        try:
            answer = await self.ledger_link.call(method, *args)
        except (TimeoutError, GetTimeoutError, RayActorError, OSError) as exc:
            raise RequestProblem(
                f"the episode ledger did not answer ({type(exc).__name__}), so whether it recorded this is unknown; "
                "retry (a repeated annotation is answered as the first)",
                status=503,
            ) from None
        if "error" in answer:
            error = answer["error"]
            raise RequestProblem(error["message"], error["param"], answer["status"], error["code"])
        return answer

    def _episode_of(
        self, request: Request, metadata: dict[str, str] | None, call_id: str
    ) -> tuple[str, str | None, str | None]:
        """(episode, group, agent) from the headers or the request's metadata. Without an episode the call is an
        episode of its own, named by the call's id; without a group, an open episode keeps its own and a new
        one is a group of its own."""
        meta = metadata or {}
        episode = _checked_id(request.headers.get("x-ziggurat-episode") or meta.get("episode"), "episode") or call_id
        group = _checked_id(request.headers.get("x-ziggurat-group") or meta.get("group"), "group")
        agent = request.headers.get("x-ziggurat-agent") or meta.get("agent")
        if agent is not None and len(agent) > 200:
            raise RequestProblem("agent is at most 200 characters", "agent")
        return episode, group, agent

    # --- generation -----------------------------------------------------------------------------------------

    def _worker(self, name: str) -> Any:
        if name not in self._workers:
            self._workers[name] = ray.get_actor(name, namespace=self.namespace)
        return self._workers[name]

    def _by_load(self) -> list[str]:
        return sorted(self.worker_names, key=lambda name: self._load[name])

    async def _generate(self, prompt: list[int], sampling: dict[str, Any], version: int | None) -> dict[str, Any]:
        """Completions from the least loaded rollout actor that can serve them (the next one if it is down)."""
        failures = []
        for name in self._by_load():
            self._load[name] += 1
            try:
                ref = self._worker(name).complete.remote(prompt, sampling, version)
                return await asyncio.wait_for(ref, self.settings.call_timeout_s)
            except RayTaskError as exc:
                if version is not None and "is not loaded" in str(exc.cause):
                    return await self._generate(prompt, sampling, None)  # the pinned version was retired
                failures.append(f"{name}: {type(exc.cause).__name__}: {str(exc.cause)[:200]}")
            except (RayActorError, ValueError, TimeoutError) as exc:
                self._workers.pop(name, None)
                failures.append(f"{name}: {type(exc).__name__}")
            finally:
                self._load[name] -= 1
        raise RequestProblem(f"no rollout actor could serve the call ({'; '.join(failures)})", status=503)

    async def _stream(
        self, prompt: list[int], sampling: dict[str, Any], version: int | None
    ) -> AsyncIterator[dict[str, Any]]:
        name = self._by_load()[0]
        self._load[name] += 1
        try:
            deltas = (
                self._worker(name).complete_stream.options(num_returns="streaming").remote(prompt, sampling, version)
            )
            async with asyncio.timeout(self.settings.call_timeout_s):
                async for ref in deltas:
                    yield await ref
        finally:
            self._load[name] -= 1

    # --- OpenAI routes ---------------------------------------------------------------------------------------

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            self._client_of(request)
        except RequestProblem as problem:
            return _error(problem)
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "ziggurat"}
        return JSONResponse({"object": "list", "data": [card, {**card, "id": "ziggurat"}]})

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._serve(request, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._serve(request, chat=False)

    async def _serve(self, request: Request, chat: bool) -> Any:
        arrived = time.perf_counter()
        try:
            client = self._admit(request)
        except RequestProblem as problem:
            return _error(problem, self.settings.retry_after_s if problem.status == 429 else None)
        streaming = False
        try:
            body = await self._body(request)
            call = await self._prepare(request, body, chat, client)
            call["arrived"] = arrived
            if call["request"].stream:
                streaming = True
                return StreamingResponse(
                    self._stream_chat(call, client), media_type="text/event-stream", headers=call["headers"]
                )
            return await self._complete(call)
        except RequestProblem as problem:
            return _error(problem)
        finally:
            if not streaming:
                self._release(client)

    async def _prepare(self, request: Request, body: Any, chat: bool, client: str) -> dict[str, Any]:
        """Validate, open the episode, build the prompt tokens and the sampling arguments."""
        parsed = parse(ChatRequest if chat else CompletionRequest, body)
        self._check_model(parsed.model)
        if not chat and parsed.echo:
            raise RequestProblem("echo is not supported", "echo")
        if not chat and parsed.stream:
            raise RequestProblem("streaming is served on /v1/chat/completions", "stream")
        call_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        episode, group, agent = self._episode_of(request, parsed.metadata, call_id)
        # The episode's previous call, if this replica served it; with several replicas, the ledger's copy when
        # this one's is missing or stale (another replica served the episode since).
        context = self._contexts.get(episode) or {"messages": None, "tokens": [], "version": None}
        messages: list[dict[str, Any]] = []
        segment = "new"
        tools = None
        if chat:
            messages = [m.model_dump(exclude_none=True) for m in parsed.messages]
            tools = offered_tools(parsed, self.takes_tools, self.model_name)
            prompt = extend_prompt(self.tokenizer, context["messages"], context["tokens"], messages, tools)
            if prompt is None and self.settings.replicas > 1 and episode != call_id:
                shared = (await self._ledger("context", episode))["context"]
                if shared is not None and shared["tokens"] != context["tokens"]:
                    context = shared
                    prompt = extend_prompt(self.tokenizer, context["messages"], context["tokens"], messages, tools)
            if prompt is None:
                prompt = render_prompt(self.tokenizer, messages, tools)
            else:
                segment = "continued"
            observation = str(messages[-1].get("content") or "")
        elif isinstance(parsed.prompt, str):
            prompt = self.tokenizer.encode(parsed.prompt)
            observation = parsed.prompt
        else:
            prompt, observation = list(parsed.prompt), ""
        if not prompt:
            raise RequestProblem("the prompt is empty", "prompt")
        forced_calls = self.tool_parser is None or self.tool_parser.reads_tool_call_blocks
        sampling = sampling_of(parsed, self.settings, self.max_model_len - len(prompt), forced_calls)
        tool_request = None
        if tools and self.tool_parser is not None:  # vLLM's request, checked before anything is generated
            try:
                tool_request = self.tool_parser.request_for(tools)
            except ValueError as exc:
                raise RequestProblem(str(exc), "tools") from None
            if not tool_request.skip_special_tokens:  # the parser's markers are special tokens: keep them
                sampling["skip_special_tokens"] = False
        headers = {"X-Ziggurat-Episode": episode}
        return {
            "id": call_id, "request": parsed, "chat": chat, "episode": episode, "group": group, "agent": agent,
            "client": client, "prompt": prompt, "segment": segment, "tools": tools, "tool_request": tool_request,
            "messages": messages, "observation": observation[-2000:], "sampling": sampling,
            "version": context["version"], "headers": headers, "started": time.perf_counter(),
        }  # fmt: skip

    async def _record(
        self, call: dict[str, Any], version: int, completions: list[dict[str, Any]], replies: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Hand the served call to the ledger (which opens a new episode), and remember the conversation and its
        tokens, the reply as the client received it, for the episode's next call."""
        episode = call["episode"]
        record = {
            "prompt_token_ids": call["prompt"], "model_version": version, "completions": completions,
            "sampling": recorded_sampling(call["sampling"]),
            "segment": call["segment"], "observation": call["observation"],
            "latency_ms": (time.perf_counter() - call["started"]) * 1000,
        }  # fmt: skip
        self._contexts.pop(episode, None)
        context = None
        if call["chat"] and len(completions) == 1:
            context = {"messages": call["messages"] + replies, "tokens": call["prompt"] + completions[0]["token_ids"]}
            if self.settings.replicas > 1:  # the episode's next call may reach another replica
                record["context"] = context
        answer = await self._ledger(
            "record_call", episode, record, call["group"], call["agent"], {"client": call["client"]}
        )
        if context is not None:
            self._contexts[episode] = {**context, "version": answer["version"]}
            while len(self._contexts) > _CONTEXTS_KEPT:
                self._contexts.popitem(last=False)
        return answer

    async def _complete(self, call: dict[str, Any]) -> JSONResponse:
        generating = time.perf_counter()
        result = await self._generate(call["prompt"], call["sampling"], call["version"])
        generated = time.perf_counter()
        completions = result["completions"]
        # Parsed once: the tool-call ids the client receives are the ones the next turn is matched against.
        parse = self._tool_call_parse(call)
        replies = [reply_message(completion, parse) for completion in completions] if call["chat"] else []
        recording = asyncio.ensure_future(self._record(call, result["model_version"], completions, replies[:1]))
        await asyncio.sleep(0)  # the ledger gets the call now, and the reply is built while it stores it
        request = call["request"]
        try:
            if call["chat"]:
                body = chat_response(
                    call["id"], request.model, len(call["prompt"]), completions, request.logprobs, self.tokenizer,
                    replies,
                )  # fmt: skip
            else:
                body = completion_response(
                    call["id"], request.model, len(call["prompt"]), completions, request.logprobs or 0, self.tokenizer
                )
            response = JSONResponse(body)
        finally:
            recorded = await recording
        headers = {**call["headers"], "X-Ziggurat-Step": str(recorded["step"]), "X-Ziggurat-Group": recorded["group"]}
        headers["X-Ziggurat-Version"] = str(result["model_version"])
        if recorded.get("stored") is not None:  # gateway.store_before_reply: stored, or held past its deadline
            headers["X-Ziggurat-Recorded"] = "stored" if recorded["stored"] else "held"
        headers["X-Ziggurat-Replica"] = self.replica
        # What the replica spent before and after the rollout actor's generation, and the generation itself.
        before, after = generating - call["arrived"], time.perf_counter() - generated
        timing = f"prepare;dur={before * 1000:.2f}, generate;dur={(generated - generating) * 1000:.2f}"
        headers["Server-Timing"] = f"{timing}, record;dur={after * 1000:.2f}"
        response.headers.update(headers)
        return response

    async def _stream_chat(self, call: dict[str, Any], client: str) -> AsyncIterator[str]:
        request, model, n = call["request"], call["request"].model, call["request"].n
        samples = [
            {"token_ids": [], "logprobs": [], "text": "", "finish_reason": None, "top_logprobs": []} for _ in range(n)
        ]
        # With tools offered, each choice's text is split as it arrives: a `<tool_call>` block goes out as a
        # tool call once it closes (gateway.tools.ToolCallStream), the rest as content.
        splitters = [self._splitter(call) for _ in range(n)] if call["tools"] else None
        version = None
        try:
            for index in range(n):
                yield _sse(chat_chunk(call["id"], model, {"role": "assistant", "content": ""}, None, index=index))
            last_sent = time.monotonic()
            async for delta in self._stream(call["prompt"], call["sampling"], call["version"]):
                index = delta["index"]
                sample = samples[index]
                sample["token_ids"] += delta["token_ids"]
                sample["logprobs"] += delta["logprobs"]
                sample["top_logprobs"] += delta["top_logprobs"] or []
                sample["text"] += delta["text"]
                sample["finish_reason"], version = delta["finish_reason"], delta["model_version"]
                block = None
                if request.logprobs:
                    block = {"content": token_logprobs(self.tokenizer, delta)}
                text, calls = splitters[index].feed(delta["text"]) if splitters else (delta["text"], [])
                chunks = self._tool_call_chunks(call, calls, splitters, index)
                if text or block:
                    chunks.insert(0, _sse(chat_chunk(call["id"], model, {"content": text}, None, block, index)))
                holding = splitters is not None and any(splitter.held for splitter in splitters)
                if not chunks and holding and time.monotonic() - last_sent >= self.settings.stream_keepalive_s:
                    chunks = [": held\n\n"]  # an SSE comment, which clients skip, keeps idle-timeout proxies off
                for chunk in chunks:
                    yield chunk
                if chunks:
                    last_sent = time.monotonic()
            completions = [{**sample, "top_logprobs": sample["top_logprobs"] or None} for sample in samples]
            assert version is not None, "vLLM streamed no output"
            if splitters:
                for index, splitter in enumerate(splitters):
                    rest, calls = splitter.finish()
                    if rest:
                        yield _sse(chat_chunk(call["id"], model, {"content": rest}, None, index=index))
                    for chunk in self._tool_call_chunks(call, calls, splitters, index):
                        yield chunk
                replies = [splitters[0].message()]
            else:
                replies = [reply_message(completions[0], None)]
            await self._record(call, version, completions, replies)
            for index, completion in enumerate(completions):
                finish = "tool_calls" if splitters and splitters[index].calls else completion["finish_reason"]
                yield _sse(chat_chunk(call["id"], model, {}, finish or "stop", index=index))
            if (request.stream_options or {}).get("include_usage"):
                chunk = chat_chunk(call["id"], model, {}, None)
                chunk["choices"], chunk["usage"] = [], usage(len(call["prompt"]), completions)
                yield _sse(chunk)
            yield "data: [DONE]\n\n"
        except RequestProblem as problem:
            yield _sse(problem.body())
        except Exception as exc:  # the stream has started: the error can only go in the stream
            log.warning("streamed call %s failed: %s: %s", call["id"], type(exc).__name__, str(exc)[:300])
            yield _sse(RequestProblem(f"generation failed: {type(exc).__name__}", status=500).body())
        finally:
            self._release(client)

    def _tool_call_parse(self, call: dict[str, Any]) -> Any:
        """The parser of a call's replies: None without tools, else the gateway's own or vLLM's."""
        if not call["tools"]:
            return None
        if self.tool_parser is None:
            return parse_tool_calls
        parser, request = self.tool_parser, call["tool_request"]
        return lambda text: parser.parse(text, request)

    def _splitter(self, call: dict[str, Any]) -> ToolCallStream | WholeReplyStream:
        """How a streamed choice's text becomes content and calls (gateway.tools, gateway.tool_parsers)."""
        if self.tool_parser is None:
            return ToolCallStream()
        return WholeReplyStream(self.tool_parser, call["tool_request"])

    def _tool_call_chunks(
        self,
        call: dict[str, Any],
        calls: list[dict[str, Any]],
        splitters: list[ToolCallStream | WholeReplyStream] | None,
        index: int,
    ) -> list[str]:
        """SSE chunks for tool calls that just closed in choice `index`, each whole in one delta (OpenAI's
        clients accumulate a call's fields by its `index` among the choice's calls)."""
        if not calls or splitters is None:
            return []
        first = len(splitters[index].calls) - len(calls)
        return [
            _sse(chat_chunk(call["id"], call["request"].model, {"tool_calls": [{"index": first + k, **c}]}, None,
                            index=index))
            for k, c in enumerate(calls)
        ]  # fmt: skip

    # --- episode routes --------------------------------------------------------------------------------------

    async def _episode_route(self, request: Request, method: str, *args: Any, body: bool = True) -> JSONResponse:
        try:
            self._client_of(request)
            data = await self._body(request) if body else {}
            if not isinstance(data, dict):
                raise RequestProblem("the request body must be a JSON object")
            return JSONResponse(await self._ledger(method, *args, *_fields(method, data)))
        except RequestProblem as problem:
            return _error(problem)

    @api.post("/v1/episodes")
    async def open_episode(self, request: Request) -> JSONResponse:
        try:
            self._client_of(request)
            data = await self._body(request) if await request.body() else {}
            if not isinstance(data, dict):
                raise RequestProblem("the request body must be a JSON object")
            episode = _checked_id(data.get("episode"), "episode") or f"ep-{uuid.uuid4().hex}"
            group, agent = _checked_id(data.get("group"), "group"), data.get("agent")
            if agent is not None and (not isinstance(agent, str) or len(agent) > 200):
                raise RequestProblem("agent must be a string of at most 200 characters", "agent")
            metadata = data.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise RequestProblem("metadata must be an object", "metadata")
            answer = await self._ledger("open", episode, group, agent, metadata)
            return JSONResponse(answer, status_code=201)
        except RequestProblem as problem:
            return _error(problem)

    @api.get("/v1/episodes/{episode}")
    async def describe_episode(self, episode: str, request: Request) -> JSONResponse:
        return await self._episode_route(request, "describe", episode, body=False)

    @api.post("/v1/episodes/{episode}/steps")
    async def annotate_episode(self, episode: str, request: Request) -> JSONResponse:
        return await self._episode_route(request, "annotate", episode)

    @api.post("/v1/episodes/{episode}/end")
    async def end_episode(self, episode: str, request: Request) -> JSONResponse:
        return await self._episode_route(request, "end", episode)

    @api.post("/v1/episodes/{episode}/reward")
    async def reward_episode(self, episode: str, request: Request) -> JSONResponse:
        return await self._episode_route(request, "reward", episode)

    @api.post("/v1/episodes/{episode}/candidates/{step}/rewards")
    async def reward_candidates(self, episode: str, step: int, request: Request) -> JSONResponse:
        return await self._episode_route(request, "reward_candidates", episode, step)

    @api.get("/v1/gateway/stats")
    async def stats(self, request: Request) -> JSONResponse:
        try:
            self._client_of(request)
            ledger = await self._ledger("stats")
        except RequestProblem as problem:
            return _error(problem)
        return JSONResponse({"ledger": ledger, "replica_in_flight": self._in_flight, "load": dict(self._load)})


def start_gateway(
    settings: GatewayConfig,
    database: DatabaseConfig,
    *,
    model_name: str,
    model_path: str,
    worker_names: list[str],
    max_model_len: int,
) -> str:
    """Start the episode ledger and the Serve application (replacing one of the same name); returns its URL.
    `database`: where the ledger stores the calls and the replicas read API keys."""
    namespace = ray.get_runtime_context().namespace
    # Resolved here, where the settings were read: the password comes from this process's environment.
    database_url = database.resolved_url().render_as_string(hide_password=False)
    if settings.tool_parser is not None:  # a parser that cannot serve this model fails here, not in the replicas
        check_tool_parser(settings.tool_parser, model_path, settings.chat_template)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    _check_serve(settings)
    # A named actor still dies with its last handle: this process holds the ledger while the gateway is up.
    ledger = start_ledger(settings, database, database_url)
    held = _ledgers.get(settings.ledger_name)
    if held is None or held._actor_id != ledger._actor_id:  # the first handle owns it: dropping that one kills it
        _ledgers[settings.ledger_name] = ledger
    app = Gateway.options(
        num_replicas=settings.replicas,
        max_ongoing_requests=settings.max_in_flight + 8,  # the replica answers 429 itself past max_in_flight
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=settings.shutdown_timeout_s,
    ).bind(settings, model_name, model_path, worker_names, database_url, max_model_len, namespace)
    serve.run(app, name=settings.app_name, route_prefix="/", blocking=False)
    return f"http://{settings.host}:{settings.port}"


def _check_serve(settings: GatewayConfig, wait_s: float = 120.0) -> None:
    """Ray Serve runs once per cluster, on one address: refuse to pretend it listens on another, and wait for
    applications being deleted (an earlier gateway's) to give up their route."""
    from ray.serve.context import _get_global_client

    running = _get_global_client().http_config
    if (running.host, running.port) != (settings.host, settings.port):
        raise RuntimeError(
            f"Ray Serve already runs in this Ray cluster on {running.host}:{running.port}, so the gateway cannot "
            f"listen on {settings.host}:{settings.port}; set gateway.host and gateway.port to those, or stop Serve "
            "first (`serve shutdown`)"
        )
    deadline = time.monotonic() + wait_s
    while True:  # an earlier gateway, stopped without waiting, may still hold the route "/"
        apps = serve.status().applications
        deleting = [n for n, a in apps.items() if n != settings.app_name and str(a.status).endswith("DELETING")]
        if not deleting:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"Serve application(s) {deleting} still being deleted after {wait_s:.0f} s")
        time.sleep(0.5)


def stop_gateway(settings: GatewayConfig, timeout_s: float = 60.0) -> dict[str, Any]:
    """Delete the Serve application this process started, then store every record its ledger holds."""
    ledger = _ledgers.pop(settings.ledger_name, None)
    if ledger is None:
        return {}
    serve.delete(settings.app_name, _blocking=False)  # blocking waits ~30 s for HAProxy to drain its connections
    return ray.get(ledger.close.remote(), timeout=timeout_s)
