"""Padding-free packing of training rows, each shared prefix computed once (a prefix tree of the rows).

A micro-batch's rows become one packed sequence. The rows are inserted into a radix tree of token segments,
so tokens several rows begin with (a GRPO group's shared prompt, a system prompt every scenario starts with,
a first turn two samples happened to share) appear once; the tree's segments are laid out depth first.
A token attends to every token of its segment's ancestors and, causally, to its own segment: exactly the
context it has in its own row. Position ids continue from the ancestors' length, so rotary embeddings see the
row's own positions. Every row that shares a segment takes its log-probs (and sends its gradient) through
that one computation, as in shared-prefix attention ("Prefix Grouper", arXiv 2506.05433).

Pure numpy/torch and no model: trainer.step.packed_token_logprobs turns a layout into model inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class _Segment:
    tokens: np.ndarray
    parent: int
    """Index of the parent segment (-1: a root)."""
    depth: int
    """Tokens before the segment in every row through it (its ancestors' length)."""
    children: dict[int, int] = field(default_factory=dict)
    """First token -> child segment index."""


def _common_length(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    unequal = np.flatnonzero(a[:n] != b[:n])
    return int(unequal[0]) if unequal.size else n


class PrefixTree:
    """A radix tree of token rows: `size` is the number of tokens the packed sequence holds (each shared
    prefix counted once); `pairs` the query-key pairs attention over the tree computes (each segment's tokens
    against its ancestors' and, causally within the segment's square, its own); `paths[r]` the segments row r
    runs through, root first."""

    def __init__(self, share_prefixes: bool = True) -> None:
        self.share_prefixes = share_prefixes
        self.segments: list[_Segment] = []
        self.roots: dict[int, int] = {}
        self.paths: list[list[int]] = []
        self.size = 0
        self.pairs = 0

    def _new(self, tokens: np.ndarray, parent: int) -> int:
        depth = 0 if parent == -1 else self.segments[parent].depth + len(self.segments[parent].tokens)
        self.segments.append(_Segment(tokens=tokens, parent=parent, depth=depth))
        self.size += len(tokens)
        self.pairs += len(tokens) * (depth + len(tokens))
        return len(self.segments) - 1

    def add(self, tokens: np.ndarray) -> None:
        """Insert one row. Rows always end at a segment's end (a segment is split where a row ends)."""
        tokens = np.asarray(tokens)
        path: list[int] = []
        if not self.share_prefixes or len(tokens) == 0:
            self.paths.append([self._new(tokens, -1)] if len(tokens) else [])
            return
        children, parent, rest = self.roots, -1, tokens
        while len(rest):
            index = children.get(int(rest[0]))
            if index is None:
                new = self._new(rest, parent)
                children[int(rest[0])] = new
                path.append(new)
                break
            segment = self.segments[index]
            common = _common_length(segment.tokens, rest)
            if common < len(segment.tokens):
                self._split_keeping_paths(index, common)
            path.append(index)
            children, parent, rest = self.segments[index].children, index, rest[common:]
        self.paths.append(path)

    def _split_keeping_paths(self, index: int, at: int) -> None:
        """Split segment `index` after `at` tokens; every row already through it runs through both halves."""
        segment = self.segments[index]
        tail = _Segment(tokens=segment.tokens[at:], parent=index, depth=segment.depth + at, children=segment.children)
        self.pairs += at * (at - len(segment.tokens))  # the head no longer attends to the tail's keys
        self.segments.append(tail)
        tail_index = len(self.segments) - 1
        for child in tail.children.values():
            self.segments[child].parent = tail_index
        segment.tokens, segment.children = segment.tokens[:at], {int(tail.tokens[0]): tail_index}
        for path in self.paths:  # an existing row ends at a segment end, so it ran through the whole of it
            if index in path:
                path.insert(path.index(index) + 1, tail_index)


@dataclass
class PackedLayout:
    """One packed sequence and where each row's tokens sit in it."""

    tokens: np.ndarray
    """[packed] token ids, segments depth first."""
    positions: np.ndarray
    """[packed] each token's position in its rows (its ancestors' length + its offset in the segment)."""
    segment_of: np.ndarray
    """[packed] the segment each packed token belongs to."""
    ancestors: list[np.ndarray]
    """Per segment: itself and its ancestors' indices."""
    row_index: list[np.ndarray]
    """Per row: the packed index of each of the row's tokens."""


def _tree(rows: list[np.ndarray], share_prefixes: bool) -> PrefixTree:
    tree = PrefixTree(share_prefixes)
    for row in rows:
        tree.add(row)
    return tree


def tree_size(rows: list[np.ndarray], share_prefixes: bool = True) -> int:
    """Tokens in the packed sequence of `rows`."""
    return _tree(rows, share_prefixes).size


def pack(rows: list[np.ndarray], share_prefixes: bool = True) -> PackedLayout:
    """The packed layout of `rows` (each shared prefix once unless share_prefixes is False)."""
    tree = _tree(rows, share_prefixes)
    segments = tree.segments
    order: list[int] = []
    depth = [0] * len(segments)  # tokens before the segment in every row through it
    stack = [index for index, s in reversed(list(enumerate(segments))) if s.parent == -1]
    while stack:  # depth first, so a segment's descendants follow it
        index = stack.pop()
        order.append(index)
        for child in reversed(list(segments[index].children.values())):
            depth[child] = depth[index] + len(segments[index].tokens)
            stack.append(child)
    start = [0] * len(segments)
    offset = 0
    for index in order:
        start[index] = offset
        offset += len(segments[index].tokens)
    tokens = np.concatenate([segments[i].tokens for i in order]) if order else np.zeros(0, np.int64)
    positions = np.concatenate([depth[i] + np.arange(len(segments[i].tokens)) for i in order]) if order else tokens
    segment_of = np.concatenate([np.full(len(segments[i].tokens), i) for i in order]) if order else tokens
    ancestors = []
    for index in range(len(segments)):
        chain = [index]
        while segments[chain[-1]].parent != -1:
            chain.append(segments[chain[-1]].parent)
        ancestors.append(np.array(chain))
    row_index = [
        np.concatenate([start[i] + np.arange(len(segments[i].tokens)) for i in path]) if path else np.zeros(0, int)
        for path in tree.paths
    ]
    return PackedLayout(tokens, positions, segment_of, ancestors, row_index)


def attention_allowed(layout: PackedLayout) -> torch.Tensor:
    """[packed, packed] True where query token i may attend to key token j: j is in i's segment at or before
    i, or anywhere in one of its segment's ancestors."""
    count = len(layout.segment_of)
    segment_count = len(layout.ancestors)
    related = np.zeros((segment_count, segment_count), dtype=bool)
    for index, chain in enumerate(layout.ancestors):
        related[index, chain] = True
    segment = torch.from_numpy(layout.segment_of.astype(np.int64))
    allowed = torch.from_numpy(related)[segment][:, segment]
    same = segment[:, None] == segment[None, :]
    causal = torch.ones((count, count), dtype=torch.bool).tril()
    return allowed & (~same | causal)


FORWARD_OVERHEAD_TOKENS = 32
"""A forward's fixed cost (Python, kernel launches, FSDP's parameter gathers) in tokens' worth of compute: it
makes the planner prefer fewer passes where splitting saves nothing."""


def forward_cost(tokens: int, pairs: int, attention_tokens: int) -> float:
    """Estimated compute of one forward/backward in tokens' worth: each token's pass through the weights, plus
    the attention's `pairs` (query-key pairs computed), a token's worth per `attention_tokens` pairs."""
    return tokens + pairs / attention_tokens + FORWARD_OVERHEAD_TOKENS


def plan_micro_batches(
    rows: list[np.ndarray],
    packing: str,
    token_budget: int,
    row_cap: int | None = None,
    attention_tokens: int = 2048,
    tree_attention: bool = True,
) -> list[slice]:
    """Consecutive rows per forward: of all the ways to cut `rows` into runs whose forwards stay within
    `token_budget` tokens of what they compute (`shared_prefix`: the prefix tree's tokens; `rows`: the rows'
    tokens; `padded`: rows x the longest row) and `row_cap` rows, the one with the least estimated compute
    (`forward_cost`; attention pairs: the tree's with `tree_attention`, else the packed length squared, or
    each padded row's padded length squared). So a GRPO group stays in one forward when it fits, its prompt
    computed once, and where attention runs over the whole packed square, groups that share little are not
    packed together only to attend over each other's masked tokens. A row longer than the budget is a
    micro-batch of its own. Exact dynamic programming over the cut points."""
    share = packing == "shared_prefix"
    # least[i]: the least cost of rows[:i]; cut[i]: where its last micro-batch starts
    least = [0.0] + [float("inf")] * len(rows)
    cut = [0] * (len(rows) + 1)
    for start in range(len(rows)):
        tree = PrefixTree(share_prefixes=share)
        longest = 0
        for stop in range(start + 1, len(rows) + 1):
            row = rows[stop - 1]
            count = stop - start
            longest = max(longest, len(row))
            if packing == "padded":
                tokens, pairs = count * longest, count * longest**2
            else:
                tree.add(row)
                tokens = tree.size
                pairs = tree.pairs if tree_attention else tokens**2
            if count > 1 and (tokens > token_budget or (row_cap is not None and count > row_cap)):
                break
            cost = least[start] + forward_cost(tokens, pairs, attention_tokens)
            if cost < least[stop]:
                least[stop], cut[stop] = cost, start
    plans: list[slice] = []
    stop = len(rows)
    while stop > 0:
        plans.append(slice(cut[stop], stop))
        stop = cut[stop]
    return plans[::-1]
