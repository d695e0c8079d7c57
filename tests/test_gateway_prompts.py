"""Prompt tokens of gateway chat requests (exact continuation of earlier turns) and tool calls, on SmolLM2's real
tokenizer and on a Hermes-style template that takes tools; no engine needed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.prompts import extend_prompt, render_prompt
from gateway.tools import forced_call_pattern, parse_tool_calls, template_takes_tools

HERMES = (
    "{%- if tools %}<|im_start|>system\nTools:\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n"
    'Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n{% endif %}'
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{%- if message.content %}{{ message.content }}{% endif %}"
    '{%- for call in message.tool_calls %}<tool_call>{"name": "{{ call.function.name }}", "arguments": '
    "{{ call.function.arguments }}}</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>{{ message.content }}</tool_response>"
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir)


def _turn(tokenizer, prompt: list[int], reply: str) -> list[int]:
    """What the engine would have sampled for `reply`: its tokens and the end-of-turn token."""
    return prompt + tokenizer.encode(reply, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_a_new_turn_extends_the_previous_tokens_and_equals_a_fresh_render_when_the_reply_tokenizes_back(tokenizer):
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    prompt = render_prompt(tokenizer, first)
    sampled = _turn(tokenizer, prompt, "Blue.")
    second = [*first, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]
    extended = extend_prompt(tokenizer, [*first, second[2]], sampled, second)
    assert extended is not None and extended[: len(sampled)] == sampled
    # Independent: the whole conversation rendered by the template, for a reply whose tokens are canonical.
    assert extended == render_prompt(tokenizer, second)


def test_a_reply_sampled_as_non_canonical_tokens_keeps_those_tokens(tokenizer):
    first = [{"role": "user", "content": "Say hello."}]
    prompt = render_prompt(tokenizer, first)
    odd = [tokenizer.convert_tokens_to_ids(t) for t in ["h", "ello"]]  # "hello" as the engine might have split it
    sampled = prompt + odd + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    reply = tokenizer.decode(odd)
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "Again."}]
    extended = extend_prompt(tokenizer, second[:2], sampled, second)
    assert extended is not None and extended[: len(sampled)] == sampled
    assert extended != render_prompt(tokenizer, second)  # a fresh render would have re-tokenized the reply


@pytest.mark.parametrize(
    "edit",
    ["history edited", "reply changed", "assistant message added", "nothing new"],
)
def test_requests_that_do_not_extend_the_episode_start_a_new_segment(tokenizer, edit):
    first = [{"role": "user", "content": "Pick a number."}]
    sampled = _turn(tokenizer, render_prompt(tokenizer, first), "Seven.")
    before = [*first, {"role": "assistant", "content": "Seven."}]
    now = {
        "history edited": [{"role": "user", "content": "Pick a letter."}, before[1], {"role": "user", "content": "?"}],
        "reply changed": [first[0], {"role": "assistant", "content": "Eight."}, {"role": "user", "content": "?"}],
        "assistant message added": [*before, {"role": "assistant", "content": "Also nine."}],
        "nothing new": before,
    }[edit]
    assert extend_prompt(tokenizer, before, sampled, now) is None


def test_tool_calls_are_offered_parsed_back_and_the_next_turn_continues_the_tokens(tokenizer):
    hermes = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    hermes.chat_template = HERMES
    assert template_takes_tools(hermes) and not template_takes_tools(tokenizer)
    tools = [{"type": "function", "function": {"name": "price", "parameters": {"type": "object"}}}]
    first = [{"role": "user", "content": "What is the price of RAIN?"}]
    prompt = render_prompt(hermes, first, tools)
    assert '"name": "price"' in hermes.decode(prompt)
    text = 'Let me check. <tool_call>{"name": "price", "arguments": {"market": "RAIN"}}</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me check." and len(calls) == 1
    assert calls[0]["function"]["name"] == "price"
    assert json.loads(calls[0]["function"]["arguments"]) == {"market": "RAIN"}
    reply = {"role": "assistant", "content": content, "tool_calls": calls}
    sampled = _turn(hermes, prompt, text)
    second = [*first, reply, {"role": "tool", "tool_call_id": calls[0]["id"], "content": "0.42"}]
    extended = extend_prompt(hermes, [*first, reply], sampled, second, tools)
    assert extended is not None and extended[: len(sampled)] == sampled
    added = hermes.decode(extended[len(sampled) :])
    assert "<tool_response>0.42</tool_response>" in added and added.endswith("<|im_start|>assistant\n")
    # the reply as the SDK's stream accumulator sends it back (each call with its `index`) is the same reply
    returned = {**reply, "tool_calls": [{**call, "index": i} for i, call in enumerate(calls)]}
    assert extend_prompt(hermes, [*first, reply], sampled, [*second[:1], returned, *second[2:]], tools) == extended
    edited = {**reply, "tool_calls": [{**calls[0], "function": {"name": "price", "arguments": "{}"}}]}
    assert extend_prompt(hermes, [*first, reply], sampled, [*second[:1], edited, *second[2:]], tools) is None


def test_malformed_tool_calls_stay_in_the_text():
    for text in ["<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>', "plain"]:
        assert parse_tool_calls(text) == (text, [])


ORDER = {
    "type": "function",
    "function": {
        "name": "order",
        "parameters": {
            "type": "object",
            "properties": {"market": {"type": "string", "enum": ["RAIN", "SNOW"]}, "urgent": {"type": "boolean"}},
            "required": ["market", "urgent"],
        },
    },
}
WAIT = {"type": "function", "function": {"name": "wait"}}


def test_a_forced_tool_choice_becomes_a_pattern_that_only_its_calls_match():
    import re

    order = '<tool_call>\n{"name": "order", "arguments": {"market": "SNOW", "urgent": false}}\n</tool_call>'
    wait = '<tool_call>\n{"name": "wait", "arguments": {}}\n</tool_call>'
    named = forced_call_pattern([ORDER, WAIT], {"type": "function", "function": {"name": "order"}})
    assert named is not None and re.fullmatch(named, order) and not re.fullmatch(named, wait)
    for wrong in ['{"market": "HAIL", "urgent": false}', '{"market": "SNOW"}', '{"market": "SNOW", "urgent": 1}']:
        assert not re.fullmatch(named, order.replace('{"market": "SNOW", "urgent": false}', wrong)), wrong
    assert not re.fullmatch(named, "Sure. " + order)  # nothing but the call
    required = forced_call_pattern([ORDER, WAIT], "required")
    assert required is not None and re.fullmatch(required, order) and re.fullmatch(required, wait)
    # a function without parameters takes none: nothing can run on inside its arguments
    assert not re.fullmatch(required, wait.replace("{}", '{"x": 1}'))
    _, calls = parse_tool_calls(order)  # whatever the pattern lets through parses back as the call
    assert calls[0]["function"]["name"] == "order" and json.loads(calls[0]["function"]["arguments"])["market"] == "SNOW"
    assert forced_call_pattern([ORDER], "auto") is None and forced_call_pattern([ORDER], None) is None


def test_a_tool_choice_that_cannot_be_forced_is_refused_naming_the_field():
    from gateway.config import GatewayConfig
    from gateway.protocol import ChatRequest, RequestProblem, offered_tools, sampling_of

    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ({"tools": [ORDER], "tool_choice": {"type": "function", "function": {"name": "sell"}}}, "tool_choice"),
        ({"tools": [ORDER], "tool_choice": "always"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {}}], "tool_choice": "required"}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
    ]
    for extra, param in cases:
        with pytest.raises(RequestProblem) as refused:
            sampling_of(ChatRequest.model_validate({**chat, **extra}), GatewayConfig(), 100)
        assert refused.value.param == param, (extra, str(refused.value))
    for stream in (False, True):  # streamed replies are split into tool calls as they arrive
        forced = sampling_of(
            ChatRequest.model_validate({**chat, "tools": [ORDER], "tool_choice": "required", "stream": stream}),
            GatewayConfig(), 100,
        )  # fmt: skip
        assert forced["regex"] is not None
    with pytest.raises(RequestProblem, match="gateway.chat_template") as refused:
        offered_tools(ChatRequest.model_validate({**chat, "tools": [ORDER]}), False, "SmolLM2")
    assert refused.value.param == "tools"
    assert (
        offered_tools(ChatRequest.model_validate({**chat, "tools": [ORDER], "tool_choice": "none"}), False, "m") is None
    )


@pytest.mark.parametrize(
    "text",
    [
        'Let me check.\n<tool_call>\n{"name": "order", "arguments": {"market": "RAIN", "side": 1}}\n</tool_call>',
        '<tool_call>{"name": "wait", "arguments": {}}</tool_call><tool_call>{"name": "order", "arguments": '
        '{"nested": {"a": [1, 2]}}}</tool_call> done',
        "a < b and <tool_ca is not a block; <tool_call>{not json}</tool_call> stays text",
        '<tool_call> <tool_call>{"name": "wait", "arguments": {}}</tool_call>',
        'an unclosed <tool_call>{"name": "wait"',
        # a malformed block is text on its own, and the call after it still parses
        '<tool_call>{"name": "a"</tool_call> <tool_call>{"name": "wait", "arguments": {}}</tool_call>',
        '<tool_call>{ <tool_call>{"name": "wait", "arguments": {}}</tool_call>',
        '<tool_call>\n{"name": "wait", "arguments": {"note": "</tool_call>"}}\n</tool_call>',
        "plain text, no tools at all <",
    ],
)
def test_a_streamed_reply_splits_into_the_calls_and_text_a_whole_reply_parses_to(text):
    """Checked against the whole-reply parser, however the text is cut into deltas (a random model's tokens
    may split `<tool_call>` anywhere)."""
    import random

    from gateway.tools import ToolCallStream, parse_tool_calls

    content, calls = parse_tool_calls(text)
    rng = random.Random(7)
    for trial in range(40):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, trial % 9)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        splitter, sent, streamed = ToolCallStream(), "", []
        for piece in pieces:
            out, done = splitter.feed(piece)
            sent, streamed = sent + out, streamed + done
        rest, none = splitter.finish()
        sent += rest
        assert not none
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in streamed] == [
            (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls
        ], pieces
        # a whole reply's text is stripped around its calls; a stream's was sent as it came
        assert ((sent.strip() or None) if calls else sent) == content, pieces
        message = splitter.message()
        assert message["content"] == (sent or None) and message.get("tool_calls", []) == streamed


def test_a_vllm_tool_parser_reads_its_own_format_and_agrees_with_the_gateway_on_tool_call_blocks(tokenizer):
    """gateway.tool_parser runs vLLM's own parsers: pythonic calls parse to OpenAI calls, and vLLM's `hermes`
    parser (an independent implementation) finds the same calls in `<tool_call>` blocks as the gateway's."""
    from gateway.tool_parsers import VllmToolParser, WholeReplyStream

    def named(calls: list[dict[str, Any]]) -> list[tuple[str, Any]]:
        return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]

    pythonic = VllmToolParser("pythonic", tokenizer)
    assert not pythonic.reads_tool_call_blocks  # so forced calls are refused with it (below)
    request = pythonic.request_for([ORDER, WAIT])
    text = '[order(market="RAIN", side=1), wait()]'
    content, calls = pythonic.parse(text, request)
    assert content is None and named(calls) == [("order", {"market": "RAIN", "side": 1}), ("wait", {})]
    assert len({c["id"] for c in calls}) == 2
    assert pythonic.parse("I would rather wait.", request) == ("I would rather wait.", [])
    assert pythonic.parse("[order(market=", request) == ("[order(market=", [])  # unparseable: the text stands
    # streamed, a whole-reply parser holds the text and answers at the end what the whole reply parses to
    stream = WholeReplyStream(pythonic, request)
    assert [stream.feed(piece) for piece in (text[:7], text[7:19], text[19:])] == [("", [])] * 3
    rest, streamed = stream.finish()
    assert rest == "" and named(streamed) == named(calls) and stream.message()["tool_calls"] == streamed

    hermes = VllmToolParser("hermes", tokenizer)
    assert hermes.reads_tool_call_blocks
    request = hermes.request_for([ORDER, WAIT])
    assert request.skip_special_tokens is False  # as `vllm serve` samples for it: its markers may be special
    for text in (
        'Let me check.\n<tool_call>\n{"name": "order", "arguments": {"market": "RAIN", "side": 1}}\n</tool_call>',
        '<tool_call>{"name": "wait", "arguments": {}}</tool_call>\n<tool_call>{"name": "order", "arguments": '
        '{"market": "SNOW", "side": -1}}</tool_call>',
        "no call at all",
    ):
        ours, theirs = parse_tool_calls(text), hermes.parse(text, request)
        assert named(theirs[1]) == named(ours[1]) and theirs[0] == ours[0], (text, ours, theirs)


def test_a_tool_parser_that_cannot_serve_is_refused_by_name(tokenizer):
    from gateway.config import GatewayConfig
    from gateway.protocol import ChatRequest, RequestProblem, sampling_of
    from gateway.tool_parsers import VllmToolParser

    with pytest.raises(ValueError, match="not one of vLLM's tool parsers: .*pythonic"):
        VllmToolParser("no-such-parser", tokenizer)
    # tools vLLM cannot take are a 400 before anything is generated (the gateway raises it naming `tools`)
    with pytest.raises(ValueError, match="^tools: .*pythonic"):
        VllmToolParser("pythonic", tokenizer).request_for([{"type": "custom", "custom": {"name": "run_sql"}}])
    # Llama's parser needs Llama's <|python_tag|> token, which this tokenizer lacks: refused at start, not per call
    with pytest.raises(ValueError, match=r"gateway.tool_parser 'llama3_json' cannot parse.*python_tag"):
        VllmToolParser("llama3_json", tokenizer)
    forced = ChatRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [ORDER], "tool_choice": "required"}
    )
    with pytest.raises(RequestProblem, match="does not read it") as refused:
        sampling_of(forced, GatewayConfig(tool_parser="pythonic"), 100, forced_calls=False)
    assert refused.value.param == "tool_choice"
