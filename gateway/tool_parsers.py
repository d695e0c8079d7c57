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
import logging
from typing import Any

from gateway.tools import assistant_message

log = logging.getLogger(__name__)

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
            base = ToolParserManager.get_tool_parser(name)
            # vLLM's parsers read the vocabulary per instance (a copy of 100k+ entries); a new parser per reply
            # shares this one
            self._parser_class = type(base.__name__, (base,), {"vocab": tokenizer.get_vocab()})
            request = self.request_for(_SAMPLE_TOOLS)
            # the sample as the engine would return it: special tokens dropped unless the parser keeps them
            served = tokenizer.decode(
                tokenizer.encode(_FORCED_SAMPLE, add_special_tokens=False),
                skip_special_tokens=request.skip_special_tokens,
            )
            _, calls = self._extract(served, request)
            found = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
        except Exception as exc:
            raise ValueError(
                f"gateway.tool_parser {name!r} cannot parse this model's replies: {type(exc).__name__}: {exc}; "
                "use the parser vLLM names for this model's family, or leave it unset for `<tool_call>` JSON"
            ) from None
        self.reads_tool_call_blocks = found == [("probe", {"x": 1})]
        """Whether it reads the `<tool_call>` format forced calls are sampled in."""

    def request_for(self, tools: list[dict[str, Any]]) -> Any:
        """vLLM's request for a reply offered `tools`, adjusted as `vllm serve` adjusts it: its
        `skip_special_tokens` is how the engine must sample (parsers whose markers are special tokens keep
        them). Raises ValueError saying what vLLM refused in the tools."""
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        try:
            request = ChatCompletionRequest(
                model="policy", messages=[{"role": "user", "content": ""}], tools=tools, tool_choice="auto"
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"tools: {where}: {first['msg']} (gateway.tool_parser {self.name!r})") from None
        return self._parser_class(self._tokenizer, request.tools).adjust_request(request)

    def _extract(self, text: str, request: Any) -> tuple[str | None, list[dict[str, Any]]]:
        found = self._parser_class(self._tokenizer, request.tools).extract_tool_calls(text, request)  # keeps state
        if not found.tools_called or not found.tool_calls:
            return text, []
        calls = [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments or "{}"}}
            for call in found.tool_calls
        ]  # fmt: skip
        content = found.content.strip() if found.content else None
        return content or None, calls

    def parse(self, text: str, request: Any) -> tuple[str | None, list[dict[str, Any]]]:
        """(the reply's content or None, OpenAI `tool_calls`), as gateway.tools.parse_tool_calls answers;
        `request` from `request_for`. A parser that fails leaves the reply as text: it is still recorded."""
        try:
            return self._extract(text, request)
        except Exception as exc:
            log.warning("gateway.tool_parser %r failed on a reply (%s: %s); answered as text", self.name,
                        type(exc).__name__, str(exc)[:200])  # fmt: skip
            return text, []


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

    def __init__(self, parser: VllmToolParser, request: Any) -> None:
        self._parser, self._request = parser, request
        self.held = ""
        self.content = ""
        self.calls: list[dict[str, Any]] = []

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self.held += text
        return "", []

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        content, self.calls = self._parser.parse(self.held, self._request)
        self.content, self.held = content or "", ""
        return self.content, self.calls

    def message(self) -> dict[str, Any]:
        return assistant_message(self.content or None, self.calls)
