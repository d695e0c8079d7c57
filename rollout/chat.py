"""Multi-turn prompts as tokens: turn k+1's prompt is turn k's prompt + its completion + the new turn's tokens.

Re-rendering the whole conversation through the chat template and tokenizing it again can split the
earlier completion differently from how it was sampled, and then the trainer would score tokens the policy
never produced. Instead the tokens of turn k stay as they were and only the text the template adds between
turns (closing the assistant message, the new user message, the generation prompt) is tokenized.
"""

from __future__ import annotations

from typing import Any


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_closing(tokenizer: Any, completion_ids: list[int]) -> list[int]:
    """Tokens the chat template puts after an assistant message, less the end-of-turn token the completion
    already ended with (EOS)."""
    probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    closed = _render(tokenizer, probe, generation_prompt=False)
    closing_text = closed[closed.rindex("a") + 1 :]  # what the template puts after an assistant message
    closing = tokenizer.encode(closing_text, add_special_tokens=False)
    if closing and completion_ids and completion_ids[-1] == closing[0]:
        closing = closing[1:]
    return closing


def next_turn_tokens(tokenizer: Any, completion_ids: list[int], observation: str) -> list[int]:
    """Tokens to append after an assistant completion so that the prompt continues with a user `observation`."""
    probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    closed = _render(tokenizer, probe, generation_prompt=False)
    opened = _render(tokenizer, [*probe, {"role": "user", "content": observation}], generation_prompt=True)
    if not opened.startswith(closed):
        raise ValueError("this chat template rewrites earlier turns; multi-turn token extension needs one that appends")
    return assistant_closing(tokenizer, completion_ids) + tokenizer.encode(
        opened[len(closed) :], add_special_tokens=False
    )
