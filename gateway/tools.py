"""Tool calls: offered to the model through its chat template, parsed back from what it wrote.

Models whose templates take `tools` (Qwen, Hermes, Llama 3.1 and others) are trained to answer a call as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; that is the format parsed here. A template that
ignores `tools` would let the model never see them, so such a request is refused rather than served blind.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)
_PROBE = [{"role": "user", "content": "u"}]
_PROBE_TOOL = [{"type": "function", "function": {"name": "probe", "description": "d", "parameters": {}}}]


def template_takes_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders a tool list at all (SmolLM2's, for one, does not)."""
    plain = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True)
    with_tools = tokenizer.apply_chat_template(_PROBE, tools=_PROBE_TOOL, tokenize=False, add_generation_prompt=True)
    return plain != with_tools


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(the text outside the tool-call blocks or None, OpenAI `tool_calls`) of a completion. A block that is
    not a JSON object with a string `name` stays in the text: the model's output is never silently dropped."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    position = 0
    for match in _CALL.finditer(text):
        try:
            payload = json.loads(match.group(1))
        except ValueError:
            continue
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            continue
        arguments = payload.get("arguments", payload.get("parameters", {}))
        calls.append({
            "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": payload["name"], "arguments": json.dumps(arguments)},
        })  # fmt: skip
        kept.append(text[position : match.start()])
        position = match.end()
    kept.append(text[position:])
    rest = "".join(kept).strip() if calls else text
    return (rest or None) if calls else text, calls
