"""Attention over a packed prefix tree that computes only the query-key pairs the tree allows.

A packed sequence (trainer.packing) is one row to the model. SDPA with the layout's [packed, packed] mask
computes every pair and then masks most of them away: a GRPO group's four samples after their shared prompt
make about 2.6 times the pairs that count, and packing two groups together doubles the waste again. Here each
segment's queries attend to the keys of its ancestors and, causally, to its own: one SDPA call per segment
over the keys gathered for it. The values are the same (the pairs left out are exactly the masked ones); the
dense mask stays the reference in tests/test_packing.py.

Models load with attention "sdpa" and are switched to ATTENTION ("ziggurat_tree"), which is SDPA unless a
forward passes `tree_attention=` (a TreeAttentionPlan): generation, the padded path and one-token passes
run exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from trainer.packing import PackedLayout

ATTENTION = "ziggurat_tree"


@dataclass
class TreeAttentionPlan:
    """Per segment, in packed order: its query span, the packed indices of the keys it attends to (its
    ancestors' tokens root first, then its own) and the [span, keys] mask (ancestors whole, itself causal)."""

    spans: list[tuple[int, int]]
    keys: list[torch.Tensor]
    masks: list[torch.Tensor]

    @property
    def pairs(self) -> int:
        """Query-key pairs computed: what the attention costs, against packed length squared for the mask."""
        return sum(int(mask.numel()) for mask in self.masks)


def plan_tree_attention(layout: PackedLayout, device: torch.device | str = "cpu") -> TreeAttentionPlan:
    """The per-segment attention of `layout` (segments are contiguous in the packed sequence)."""
    segment_of = layout.segment_of
    if len(segment_of) == 0:
        return TreeAttentionPlan([], [], [])
    starts = np.flatnonzero(np.r_[True, segment_of[1:] != segment_of[:-1]])
    stops = np.r_[starts[1:], len(segment_of)]
    span_of = {int(segment_of[a]): (int(a), int(b)) for a, b in zip(starts, stops, strict=True)}
    spans, keys, masks = [], [], []
    for start, stop in zip(starts, stops, strict=True):
        chain = layout.ancestors[int(segment_of[start])][::-1]  # root first, the segment itself last
        ranges = [span_of[int(s)] for s in chain]
        context = np.concatenate([np.arange(a, b) for a, b in ranges])
        own = int(stop - start)
        before = len(context) - own
        mask = torch.ones((own, len(context)), dtype=torch.bool)
        mask[:, before:] = torch.ones((own, own), dtype=torch.bool).tril()
        spans.append((int(start), int(stop)))
        keys.append(torch.from_numpy(context).to(device))
        masks.append(mask.to(device))
    return TreeAttentionPlan(spans, keys, masks)


def tree_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    tree_attention: TreeAttentionPlan | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: [batch, heads, length, dim] in, [batch, length, heads, dim] out."""
    if tree_attention is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    outputs = []
    for (start, stop), keys, mask in zip(tree_attention.spans, tree_attention.keys, tree_attention.masks, strict=True):
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:stop],
                key.index_select(2, keys),
                value.index_select(2, keys),
                attn_mask=mask,
                dropout_p=dropout,
                scale=scaling,
                enable_gqa=grouped,
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, tree_attention_forward)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def attention_implementation(model: Any) -> str:
    """The attention a (possibly DDP-wrapped) transformers model runs: "sdpa", "eager", ATTENTION, ..."""
    inner = getattr(model, "module", model)  # DDP
    return getattr(inner.config, "_attn_implementation", None) or "sdpa"


def use_tree_attention(model: Any) -> None:
    """Switch a model loaded with SDPA to ATTENTION (others, e.g. eager or flash, are left as they are)."""
    if attention_implementation(model) == "sdpa":
        model.set_attn_implementation(ATTENTION)


def uses_tree_attention(model: Any) -> bool:
    return attention_implementation(model) == ATTENTION
