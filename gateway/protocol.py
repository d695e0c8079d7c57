"""The OpenAI API's request and response shapes, as much of them as the policy can serve.

Requests are validated here, so a request the policy cannot serve as asked is refused with the field named
(`RequestProblem`) before anything is generated or recorded. Unknown fields are ignored, as OpenAI's own
server ignores what it does not use; fields that would change what is sampled and are not supported are refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.config import GatewayConfig
from gateway.tools import assistant_message, forced_call_pattern


class RequestProblem(ValueError):
    """A request the gateway refuses: HTTP `status`, the field at fault (`param`) and OpenAI's `code`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict[str, Any]:
        kinds = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}
        kinds |= {429: "rate_limit_error", 503: "service_unavailable"}
        kind = kinds.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class Sampling(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)
    """vLLM's extension (pass it in the SDK's `extra_body`): sample at least this many tokens."""
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(Sampling):
    prompt: str | list[int]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body, or raise RequestProblem naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestProblem("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise RequestProblem(f"{param}: {first['msg']}", param) from None


def sampling_of(
    request: ChatRequest | CompletionRequest, settings: GatewayConfig, room: int, forced_calls: bool = True
) -> dict[str, Any]:
    """The engine's sampling arguments for a validated request; `room` is what the prompt leaves of the
    engine's context; `forced_calls`: whether the gateway's tool parser reads the format forced calls are
    sampled in (gateway.tool_parsers)."""
    if request.top_p != 1.0:
        raise RequestProblem(
            "top_p < 1 is not served: the trainer scores tokens under the temperature-scaled distribution that "
            "sampled them, and a nucleus cut would make those scores wrong; leave top_p at 1",
            "top_p",
        )
    if request.n > settings.max_n:
        raise RequestProblem(f"n is at most {settings.max_n} here (gateway.max_n)", "n")
    regex = None
    if isinstance(request, ChatRequest) and request.tools:
        try:  # a forced call: sampled under its pattern (gateway.tools)
            regex = forced_call_pattern(request.tools, request.tool_choice)
        except ValueError as exc:
            raise RequestProblem(str(exc), "tools" if str(exc).startswith("tools") else "tool_choice") from None
        if regex is not None and not forced_calls:
            raise RequestProblem(
                f"tool_choice {request.tool_choice!r} forces a call, which is sampled in the `<tool_call>` format, "
                f"and gateway.tool_parser {settings.tool_parser!r} does not read it; ask with tool_choice auto",
                "tool_choice",
            )
    elif isinstance(request, ChatRequest) and request.tool_choice not in (None, "auto", "none"):
        raise RequestProblem("tool_choice forces a call but the request offers no tools", "tool_choice")
    limit = getattr(request, "max_completion_tokens", None) or request.max_tokens
    param = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
    if limit is not None and limit > settings.max_tokens_cap:
        raise RequestProblem(f"{param} is at most {settings.max_tokens_cap} here (gateway.max_tokens_cap)", param)
    if room < 1:
        raise RequestProblem("the prompt fills the model's whole context; shorten the conversation", "messages")
    if limit is not None and limit > room:
        raise RequestProblem(f"{param} ({limit}) exceeds what the prompt leaves of the context ({room})", param)
    if request.min_tokens > (limit or room):
        raise RequestProblem(f"min_tokens ({request.min_tokens}) exceeds max_tokens ({limit or room})", "min_tokens")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > 4:
        raise RequestProblem("at most 4 stop sequences", "stop")
    if isinstance(request, ChatRequest):
        top = request.top_logprobs or 0
        if top and not request.logprobs:
            raise RequestProblem("top_logprobs needs logprobs: true", "top_logprobs")
    else:
        top = request.logprobs or 0
    max_tokens = limit or min(settings.default_max_tokens, room)
    return {
        "n": request.n, "temperature": request.temperature, "max_tokens": max_tokens, "min_tokens": request.min_tokens,
        "stop": stop or None, "seed": request.seed, "top_logprobs": top, "regex": regex,
    }  # fmt: skip


def offered_tools(request: ChatRequest, takes_tools: bool, model_name: str) -> list[dict[str, Any]] | None:
    """The tools the chat template renders for `request` (None: no tools, or `tool_choice: none`); refused when
    the template ignores tools, since the model would never see them."""
    if not request.tools or request.tool_choice == "none":
        return None
    if not takes_tools:
        raise RequestProblem(
            f"the chat template of {model_name!r} does not take tools, so the model would never see them; serve a "
            "model whose template does (Qwen, Hermes), give the gateway one (gateway.chat_template), or leave "
            "tools out",
            "tools",
        )
    return request.tools


def recorded_sampling(sampling: dict[str, Any]) -> dict[str, Any]:
    """What a call's row keeps of its sampling arguments: a forced tool call's pattern (kilobytes of regular
    expression) is kept as the fact that the call was constrained, which its log-probs reflect."""
    kept = {k: v for k, v in sampling.items() if v is not None and k not in ("n", "regex")}
    if sampling.get("regex") is not None:
        kept["constrained"] = "tool_call"
    return kept


def token_logprobs(tokenizer: Any, completion: dict[str, Any]) -> list[dict[str, Any]]:
    """OpenAI's `logprobs.content` for one completion."""
    out = []
    tops = completion.get("top_logprobs") or [None] * len(completion["token_ids"])
    for token, logprob, top in zip(completion["token_ids"], completion["logprobs"], tops, strict=True):
        text = tokenizer.decode([token])
        entry = {"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": []}
        if top:
            entry["top_logprobs"] = [
                {"token": tokenizer.decode([t]), "logprob": p, "bytes": list(tokenizer.decode([t]).encode())}
                for t, p in sorted(top.items(), key=lambda item: -item[1])
            ]
        out.append(entry)
    return out


def usage(prompt_tokens: int, completions: list[dict[str, Any]]) -> dict[str, int]:
    completion_tokens = sum(len(c["token_ids"]) for c in completions)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def reply_message(
    completion: dict[str, Any], parse: Callable[[str], tuple[str | None, list[dict[str, Any]]]] | None
) -> dict[str, Any]:
    """The assistant message a completion answers with; with tools offered (`parse`: the gateway's tool-call
    parser, gateway.tools.parse_tool_calls or a vLLM one), its tool calls parsed out."""
    if parse is None:
        return assistant_message(completion["text"], [])
    return assistant_message(*parse(completion["text"]))


def chat_response(
    call_id: str,
    model: str,
    prompt_tokens: int,
    completions: list[dict[str, Any]],
    logprobs: bool,
    tokenizer: Any,
    replies: list[dict[str, Any]],
) -> dict[str, Any]:
    choices = []
    for index, (completion, reply) in enumerate(zip(completions, replies, strict=True)):
        finish = "tool_calls" if reply.get("tool_calls") else completion["finish_reason"] or "stop"
        choice: dict[str, Any] = {
            "index": index,
            "message": reply,
            "finish_reason": finish,
            "logprobs": {"content": token_logprobs(tokenizer, completion)} if logprobs else None,
        }
        choices.append(choice)
    return {
        "id": call_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": choices, "usage": usage(prompt_tokens, completions),
    }  # fmt: skip


def completion_response(
    call_id: str, model: str, prompt_tokens: int, completions: list[dict[str, Any]], logprobs: int, tokenizer: Any
) -> dict[str, Any]:
    choices = []
    for index, completion in enumerate(completions):
        block = None
        if logprobs:
            entries = token_logprobs(tokenizer, completion)
            block = {
                "tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": [],
            }  # fmt: skip
        choices.append(
            {"index": index, "text": completion["text"], "finish_reason": completion["finish_reason"] or "stop",
             "logprobs": block}
        )  # fmt: skip
    return {
        "id": call_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": choices, "usage": usage(prompt_tokens, completions),
    }  # fmt: skip


def chat_chunk(
    call_id: str, model: str, delta: dict[str, Any], finish: str | None, logprobs: Any = None, index: int = 0
) -> dict:
    """One SSE chunk of a streamed chat completion: choice `index`'s new text (a request with `n` > 1 streams
    its choices interleaved, each chunk naming its own)."""
    return {
        "id": call_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}],
    }  # fmt: skip
