from __future__ import annotations

from transformers import AutoTokenizer

from rollout.chat import next_turn_tokens


def test_extension_reproduces_the_rendered_conversation(base_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    messages = [{"role": "system", "content": "Trade."}, {"role": "user", "content": "Turn 1: price 0.31"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    reply = '{"type": "hold"}'
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for completion in (
        tokenizer.encode(reply, add_special_tokens=False) + [eos],
        tokenizer.encode(reply, add_special_tokens=False),
    ):
        extended = list(prompt) + completion + next_turn_tokens(tokenizer, completion, "Turn 2: price 0.35")
        full = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Turn 2: price 0.35"}]
        rendered = tokenizer.apply_chat_template(full, tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(extended) == rendered
        assert extended[: len(prompt) + len(completion)] == list(prompt) + completion  # earlier tokens untouched
