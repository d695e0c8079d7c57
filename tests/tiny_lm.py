"""A tiny *pretrained* chat model, built in seconds on the CPU, for the learning check.

A random tiny model cannot show learning: its next-token distribution is almost uniform and bounded by the
final norm, and nothing links one sampled token to the others. A model pretrained on a little text has that
structure. This one is a 2-layer Llama (hidden 64) on a character-level tokenizer (~100 tokens), trained
for a few hundred steps on ChatML conversations whose replies are short word sequences in three styles:
lowercase words, UPPERCASE words and numbers. It learns to answer in words and to pick a style per word, so
the `lowercase` environment (reward = share of lowercase letters and spaces) has a real policy to improve:
write fewer uppercase words and numbers.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

WORDS = (
    "sea market rain city night bread river moon quiet street boat wind light stone tree green cold warm "
    "small long house road field song bird cloud sun water fire sand hill lake door window table paper"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_char_tokenizer(out_dir: Path) -> Path:
    """One token per printable ASCII character plus the ChatML specials, as a fast tokenizer that
    transformers and vLLM load like any other."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    characters = list(dict.fromkeys(string.ascii_letters + string.digits + string.punctuation + " \n"))
    vocab = {token: index for index, token in enumerate(specials + characters)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per char
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _reply(rng: random.Random) -> str:
    words = []
    for _ in range(rng.randint(3, 6)):
        style = rng.random()
        if style < 0.4:
            words.append(rng.choice(WORDS))
        elif style < 0.7:
            words.append(rng.choice(WORDS).upper())
        else:
            words.append(str(rng.randint(10, 9999)))
    return " ".join(words)


def pretrain_tiny_chat_model(out_dir: Path, prompts: list[tuple[str, str]], steps: int = 400, seed: int = 0) -> Path:
    """Pretrain the tiny model on (system, user) prompts answered with `_reply`-style text; save it."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cluster.models import tiny_llama_config

    build_char_tokenizer(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch, masks = [], []
        for _ in range(16):
            system, user = rng.choice(prompts)
            messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            reply_ids = tokenizer(_reply(rng) + "<|im_end|>", add_special_tokens=False)["input_ids"]
            batch.append(prompt_ids + reply_ids)
            masks.append([0] * len(prompt_ids) + [1] * len(reply_ids))  # learn to answer, not to prompt
        width = max(map(len, batch))
        ids = torch.tensor([row + [config.pad_token_id] * (width - len(row)) for row in batch])
        labels = torch.tensor(
            [[t if m else -100 for t, m in zip(row, mask, strict=True)] + [-100] * (width - len(row))
             for row, mask in zip(batch, masks, strict=True)]
        )  # fmt: skip
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
