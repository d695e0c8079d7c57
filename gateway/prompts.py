"""Chat requests as prompt tokens, extending an episode's earlier tokens exactly when the request extends its
conversation.

A client sends the whole conversation every turn, including the replies the policy wrote. Rendering it through
the chat template and tokenizing it again can split an earlier reply differently from how it was sampled, and
then the trainer would score tokens the policy never produced. So when the request's messages are the
episode's previous messages (its last reply included, as returned) plus new ones, and the template only
appends, the prompt is the previous prompt + completion + the template's tokens for the new messages. Any
other request (history edited, a reply changed, a template that rewrites earlier turns) is rendered whole
and starts a new segment; the recorded call says which (`segment`).
"""

from __future__ import annotations

from typing import Any

from rollout.chat import assistant_closing


def message_text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of an OpenAI content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the chat template sees: role, text content, and tool calls / tool ids where present."""
    out = []
    for message in messages:
        item: dict[str, Any] = {"role": message["role"], "content": message_text(message.get("content"))}
        for extra in ("tool_call_id", "name"):
            if message.get(extra) is not None:
                item[extra] = message[extra]
        if message.get("tool_calls"):
            item["tool_calls"] = [_tool_call(call) for call in message["tool_calls"]]
        out.append(item)
    return out


def _tool_call(call: Any) -> Any:
    """A tool call as OpenAI defines it, without what clients add to what they send back (the SDK's stream
    accumulator keeps each call's `index`), so that the reply the gateway recorded and the one a client
    returns compare and render alike."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    function = {k: call["function"][k] for k in ("name", "arguments") if call["function"].get(k) is not None}
    kept = {k: call[k] for k in ("id", "type") if call.get(k) is not None}
    return {**kept, "function": function}  # a key left out stays out: templates test `is defined`


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool, tools: Any) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]], tools: Any = None) -> list[int]:
    """Token ids of a whole conversation with the generation prompt appended."""
    encoded = tokenizer.apply_chat_template(
        template_messages(messages), tools=tools, add_generation_prompt=True, return_dict=True
    )
    return list(encoded["input_ids"])


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["role"] == b["role"] and a["content"] == b["content"] and a.get("tool_calls") == b.get("tool_calls")


def extend_prompt(
    tokenizer: Any,
    previous_messages: list[dict[str, Any]] | None,
    previous_tokens: list[int],
    messages: list[dict[str, Any]],
    tools: Any = None,
) -> list[int] | None:
    """The prompt of `messages` as `previous_tokens` + the tokens of what they add, or None when they do not
    extend the previous conversation (a new segment: render it whole)."""
    if not previous_messages or not previous_tokens:
        return None
    before, now = template_messages(previous_messages), template_messages(messages)
    if len(now) <= len(before) or not all(_same(a, b) for a, b in zip(before, now, strict=False)):
        return None
    if before[-1]["role"] != "assistant" or any(m["role"] == "assistant" for m in now[len(before) :]):
        return None  # a reply the policy wrote would be re-tokenized: only its sampled tokens may stand for it
    closed = _render(tokenizer, before, False, tools)
    opened = _render(tokenizer, now, True, tools)
    if not opened.startswith(closed):
        return None  # the template rewrites earlier turns (or renders them differently with more messages)
    added = tokenizer.encode(opened[len(closed) :], add_special_tokens=False)
    return list(previous_tokens) + assistant_closing(tokenizer, previous_tokens) + added
