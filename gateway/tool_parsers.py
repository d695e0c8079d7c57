"""Tool calls in the formats vLLM's own parsers read (`gateway.tool_parser`): Llama's JSON, pythonic calls,
Mistral's, and the rest of `vllm.tool_parsers`.

The gateway's built-in parser (gateway.tools) reads the `<tool_call>` JSON blocks of Hermes and Qwen, and
streams them as they close. A model trained on another format is served with the parser vLLM ships for it:
the same code `vllm serve --tool-call-parser NAME` runs, so a reply parses here as it would there. Such a
parser reads whole replies; streamed, a reply with tools offered is held and goes out, content and calls,
when it ends. Forced calls (`tool_choice: required` or a named function) are sampled in the `<tool_call>`
format (gateway.tools.forced_call_pattern), so they are served only when the parser reads that format.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

_FORCED_SAMPLE = '<tool_call>\n{"name": "probe", "arguments": {"x": 1}}\n</tool_call>'
_SAMPLE_TOOLS = [{"type": "function", "function": {"name": "probe", "parameters": {"type": "object"}}}]


def known_parsers() -> list[str]:
    """The names `gateway.tool_parser` takes (vLLM's registry; importing it costs a few seconds)."""
    from vllm.tool_parsers import ToolParserManager

    return ToolParserManager.list_registered()


class VllmToolParser:
    """One of vLLM's tool parsers, for one model's tokenizer. Raises ValueError, naming the setting, when the
    parser cannot work with this tokenizer (Llama's needs its `<|python_tag|>` token, for one)."""

    def __init__(self, name: str, tokenizer: Any) -> None:
        from vllm.tool_parsers import ToolParserManager

        self.name = name
        self._tokenizer = tokenizer
        if name not in (names := known_parsers()):
            raise ValueError(f"gateway.tool_parser {name!r} is not one of vLLM's tool parsers: {', '.join(names)}")
        try:  # a parser that needs its model's special tokens, or a stub, fails here rather than per request
            self._parser_class = ToolParserManager.get_tool_parser(name)
            _, calls = self.parse(_FORCED_SAMPLE, _SAMPLE_TOOLS)
        except Exception as exc:
            raise ValueError(
                f"gateway.tool_parser {name!r} cannot parse this model's replies: {type(exc).__name__}: {exc}; "
                "use the parser vLLM names for this model's family, or leave it unset for `<tool_call>` JSON"
            ) from None
        self.reads_tool_call_blocks = [
            (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls
        ] == [("probe", {"x": 1})]
        """Whether it reads the `<tool_call>` format forced calls are sampled in."""

    def _new(self, tools: list[dict[str, Any]]) -> tuple[Any, Any]:
        """(a parser, the vLLM request it parses against): a new parser each reply, since vLLM's keep state."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        request = ChatCompletionRequest(
            model="policy", messages=[{"role": "user", "content": ""}], tools=tools, tool_choice="auto"
        )
        return self._parser_class(self._tokenizer, request.tools), request

    def parse(self, text: str, tools: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
        """(the reply's content or None, OpenAI `tool_calls`), as gateway.tools.parse_tool_calls answers."""
        parser, request = self._new(tools)
        found = parser.extract_tool_calls(text, request)
        if not found.tools_called or not found.tool_calls:
            return text, []
        calls = [
            {
                "id": call.id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments or "{}"},
            }
            for call in found.tool_calls
        ]  # fmt: skip
        content = found.content.strip() if found.content else None
        return content or None, calls


def check_tool_parser(name: str, model_path: str, chat_template: str | None) -> None:
    """Raise ValueError, naming `gateway.tool_parser`, unless `name` can parse the model's replies."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    VllmToolParser(name, tokenizer)


class WholeReplyStream:
    """A streamed reply for a parser that reads whole replies: held as it comes, parsed when it ends. The same
    interface as gateway.tools.ToolCallStream."""

    def __init__(self, parser: VllmToolParser, tools: list[dict[str, Any]]) -> None:
        self._parser, self._tools = parser, tools
        self.held = ""
        self.content = ""
        self.calls: list[dict[str, Any]] = []

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self.held += text
        return "", []

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        content, self.calls = self._parser.parse(self.held, self._tools)
        self.content, self.held = content or "", ""
        return self.content, self.calls

    def message(self) -> dict[str, Any]:
        calls = {"tool_calls": self.calls} if self.calls else {}
        return {"role": "assistant", "content": self.content or None, **calls}
