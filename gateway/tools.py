"""Tool calls: offered to the model through its chat template, parsed back from what it wrote.

Models whose templates take `tools` (Qwen, Hermes and others) are trained to answer a call as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; that is the format parsed here. A template that
ignores `tools` would let the model never see them, so such a request is refused rather than served blind
(`gateway.chat_template` can give such a model a template that takes them).

`tool_choice: "required"` or a named function forces a call: the engine samples under a regular expression
of that format with the function's argument schema inside (vLLM's structured outputs), so the reply always
parses. The engine's processed log-probs are those of the masked distribution that really sampled, which is
what the trainer's importance weights need to correct toward the unconstrained policy.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

# A block's JSON never runs across another `<tool_call>` or `</tool_call>`: a malformed block stays text on its
# own, and the calls after it still parse (whole or streamed alike). A `</tool_call>` inside an argument's
# string ends the block there too, so such a call stays text.
_CALL = re.compile(r"<tool_call>\s*(\{(?:(?!</?tool_call>).)*?\})\s*</tool_call>", re.DOTALL)
_PROBE = [{"role": "user", "content": "u"}]
_PROBE_TOOL = [{"type": "function", "function": {"name": "probe", "description": "d", "parameters": {}}}]


def forced_call_pattern(tools: list[dict[str, Any]], choice: str | dict[str, Any] | None) -> str | None:
    """The regular expression a reply must match when `choice` forces a tool call, or None when it does not
    (`auto`, `none`, unset). Raises ValueError naming what is wrong with `choice` or a tool's schema."""
    if choice in (None, "auto", "none"):
        return None
    by_name = {}
    for position, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"tools[{position}] needs a function with a name")
        by_name[function["name"]] = (position, function.get("parameters") or _NO_PARAMETERS)
    if choice == "required":
        names = list(by_name)
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in by_name:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools ({', '.join(by_name)})")
        names = [name]
    else:
        raise ValueError(
            'tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}'
        )
    return "|".join(_call_pattern(name, *by_name[name]) for name in names)


_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
"""What a function without `parameters` takes (OpenAI: none). An open `{"type": "object"}` would let a forced
call fill its arguments with anything until max_tokens cut it off unparsed."""


def _call_pattern(name: str, position: int, parameters: dict[str, Any]) -> str:
    from outlines_core.json_schema import build_regex_from_schema

    try:
        arguments = build_regex_from_schema(json.dumps(parameters))
    except Exception as exc:  # outlines raises its own types for schemas it cannot express
        raise ValueError(f"tools[{position}].function.parameters cannot be enforced as a JSON schema: {exc}") from None
    head = _literal('{"name": ' + json.dumps(name) + ', "arguments": ')
    return f"(<tool_call>\\n{head}{arguments}\\}}\\n</tool_call>)"


def _literal(text: str) -> str:
    """`text` as a regular expression matching only itself; unlike re.escape, spaces stay unescaped, which
    the engine's regex dialects (Rust's, xgrammar's) may not accept escaped."""
    return "".join("\\" + char if char in _META else char for char in text)


_META = set("\\.^$*+?{}[]|()")


def template_takes_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders a tool list at all (SmolLM2's, for one, does not)."""
    plain = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True)
    with_tools = tokenizer.apply_chat_template(_PROBE, tools=_PROBE_TOOL, tokenize=False, add_generation_prompt=True)
    return plain != with_tools


def _call_of(block: str) -> dict[str, Any] | None:
    """The OpenAI tool call a `<tool_call>` block's JSON stands for, or None when it is not one."""
    try:
        payload = json.loads(block)
    except ValueError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return None
    arguments = payload.get("arguments", payload.get("parameters", {}))
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
        "function": {"name": payload["name"], "arguments": json.dumps(arguments)},
    }  # fmt: skip


def assistant_message(content: str | None, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant message a reply answers with: its content, and its tool calls when it made any."""
    return {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(the text outside the tool-call blocks or None, OpenAI `tool_calls`) of a completion. A block that is
    not a JSON object with a string `name` stays in the text: the model's output is never silently dropped."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    position = 0
    for match in _CALL.finditer(text):
        call = _call_of(match.group(1))
        if call is None:
            continue
        calls.append(call)
        kept.append(text[position : match.start()])
        position = match.end()
    kept.append(text[position:])
    rest = "".join(kept).strip() if calls else text
    return (rest or None) if calls else text, calls


_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


class ToolCallStream:
    """One streamed reply split into content and tool calls as its text arrives.

    Text goes out as content at once, except what may be the start of a `<tool_call>` block: that is held
    until the block closes, and then goes out as a tool call, or as content when it does not parse (the
    model's output is never dropped). The reply the client assembles from the deltas is `message()`, which
    the episode's next turn is matched against; unlike a whole reply's, its content is not stripped, since
    the client has already received every character of it.
    """

    def __init__(self) -> None:
        self.held = ""
        self.content = ""
        self.calls: list[dict[str, Any]] = []

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """(content to send now, tool calls completed now) after `text`."""
        self.held += text
        out: list[str] = []
        calls: list[dict[str, Any]] = []
        while self.held:
            start = self.held.find(_OPEN)
            if start < 0:
                keep = _open_prefix(self.held)
                out.append(self.held[: len(self.held) - keep])
                self.held = self.held[len(self.held) - keep :]
                break
            out.append(self.held[:start])
            self.held = self.held[start:]
            end = self.held.find(_CLOSE)
            if end < 0:
                break  # inside a block: wait for its end
            inner = self.held.rfind(_OPEN, 0, end)  # "<tool_call> <tool_call>{...}</tool_call>": the last opens it
            out.append(self.held[:inner])
            block, self.held = self.held[inner : end + len(_CLOSE)], self.held[end + len(_CLOSE) :]
            match = _CALL.fullmatch(block)
            call = _call_of(match.group(1)) if match else None
            if call is None:
                out.append(block)
            else:
                calls.append(call)
        sent = "".join(out)
        self.content += sent
        self.calls += calls
        return sent, calls

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """What is still held when the reply ends (an unclosed block, or text that began like one): content.
        (No call completes at the end that had not closed before; the pair matches WholeReplyStream's.)"""
        rest, self.held = self.held, ""
        self.content += rest
        return rest, []

    def message(self) -> dict[str, Any]:
        return assistant_message(self.content or None, self.calls)


def _open_prefix(text: str) -> int:
    """The length of the longest end of `text` that begins `<tool_call>` (and so may be a block starting)."""
    for length in range(min(len(text), len(_OPEN) - 1), 0, -1):
        if _OPEN.startswith(text[-length:]):
            return length
    return 0
