"""Policies that rank tokens by a score: the shared bases.

`ScoredCache` keeps a float32 score per slot beside the keys; sinks and the most recent
`window` tokens are never evicted, the rest go lowest score first. The sinks are the
first tokens ever written and are never evicted, so they sit in slots [0, sink) for
good: they start (and stay) at +inf, and a policy only ever scores slots from `sink` on.
A query-free policy (key norm) writes its scores in `_score_forward`, once per forward
for every layer.

`AttentionScoredCache` scores from the attention each token receives, computed from the
query and the keys attention is about to see, so the model's attention stays SDPA:

  decode step   the layers' queries are collected and scored for all layers at once
                after the last one (absolute positions): one small softmax over
                [layers x batch x kv_heads] rows, RoPE and the softmax scale folded
                into one matrix
  prefill chunk each layer scores itself, in query blocks whose memory is bounded by
                the block size, never by length squared (shifted mode scores decode
                steps this way too: its keys are rotated per layer)

Attention mass is per sequence and KV head, summed over the query heads of the KV
group (GQA). A policy says how a forward's mass updates a slot's score
(`update_scores`: H2O accumulates, TOVA replaces) and, for a chunk, whether every query
counts or only the last (`last_query_only`).
"""

from __future__ import annotations

import torch

from .base import CompressedCache, FixedCapacityLayer, apply_rotary, scaled_rotation

# Memory bound for the score pass over a prefill chunk: query blocks are sized so a
# block's probabilities hold at most this many float32 elements (64 MiB).
_SCORE_BLOCK_ELEMENTS = 1 << 24


class ScoredCache(CompressedCache):
    """Sinks and a recent window kept; the other slots evicted lowest score first."""

    buffer_names = CompressedCache.buffer_names + ("scores",)

    def _allocate_policy_buffers(self, shape: tuple[int, ...], key_like: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": torch.zeros(shape, dtype=torch.float32, device=key_like.device)}

    def _start_policy_state(self, start: int, total: int) -> None:
        # New tokens start from nothing, except sinks, which start (and stay) at +inf so
        # that eviction only has to protect the recent window. A compiled decode step
        # only runs once the sinks are in (see CompiledDecode).
        self._flat("scores", start, total).zero_()
        new_sinks = 0 if self.in_graph else min(max(self.sink - self.seen, 0), total - start)
        if new_sinks:
            self._flat("scores", start, start + new_sinks).fill_(float("inf"))

    def eviction_priority(self, total: int) -> torch.Tensor:
        scores = self._flat("scores", 0, total)
        if not self.window:
            return scores
        recent = self._flat("positions", 0, total) >= self.seen_after_update() - self.window
        return scores.masked_fill(recent, float("inf"))


class AttentionScoredLayer(FixedCapacityLayer):
    wants_query = True

    def observe_attention(self, keys: torch.Tensor, start: int, total: int) -> None:
        if self.query is None or self.rope is None:
            raise RuntimeError(f"{type(self.owner).__name__} needs the attention hooks to see queries: "
                               "build the cache with make_cache")
        owner = self.owner
        query, (cos, sin) = self.query, self.rope
        if query.shape[2] == 1 and not self.shifted:
            owner.keep_decode_query(self)
            return
        if owner.last_query_only:
            query, cos, sin, start = query[:, :, -1:], cos[:, -1:], sin[:, -1:], total - 1
        query = apply_rotary(query, cos.unsqueeze(1), sin.unsqueeze(1))
        mass = attention_mass(query, keys, self.scaling, start)
        owner.update_scores(self._view("scores", owner.sink, total), mass[..., owner.sink:])


def decode_attention_mass(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`attention_mass` for one query token already rotated and scaled: one small softmax.

    query [batch, heads, dim]; keys [batch, kv_heads, total, dim] → [batch, kv_heads, total]
    float32. Written with bmm and views only: on CPU every op costs microseconds of dispatch.
    """
    batch, heads, dim = query.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    grouped = query.view(batch * kv_heads, heads // kv_heads, dim)
    logits = torch.bmm(grouped, keys.reshape(batch * kv_heads, total, dim).transpose(1, 2))
    return logits.softmax(dim=-1, dtype=torch.float32).sum(dim=1).view(batch, kv_heads, total)


def attention_mass(query: torch.Tensor, keys: torch.Tensor, scaling: float, start: int) -> torch.Tensor:
    """Attention each key receives from the queries, summed over queries and each KV group.

    query [batch, heads, q, dim] for the tokens at slots start..start+q-1 (causal among
    themselves); keys [batch, kv_heads, total, dim]. Returns [batch, kv_heads, total] float32.
    """
    batch, heads, length, dim = query.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, group, length, dim)
    mass = torch.zeros(batch, kv_heads, total, dtype=torch.float32, device=keys.device)
    block = max(1, _SCORE_BLOCK_ELEMENTS // (batch * heads * total))
    key_index = torch.arange(total, device=keys.device)
    for first in range(0, length, block):
        rows = grouped[:, :, :, first : first + block]  # [b, kv, g, r, d]
        r = rows.shape[3]
        logits = torch.matmul(rows.reshape(batch, kv_heads, group * r, dim), keys.transpose(-1, -2))
        logits = logits.float().mul_(scaling).view(batch, kv_heads, group, r, total)
        # Query at slot start + i sees keys up to and including its own slot.
        last_visible = start + first + torch.arange(r, device=keys.device)
        logits.masked_fill_(key_index > last_visible[:, None], float("-inf"))
        mass += logits.softmax(dim=-1).sum(dim=(2, 3))
    return mass


class AttentionScoredCache(ScoredCache):
    """A `ScoredCache` whose scores come from the attention the queries pay each token."""

    layer_class = AttentionScoredLayer
    last_query_only = False  # for a chunk: score from its last query only, not all of them

    def __init__(self, spec, num_layers: int, rotary_embedding, **options):
        super().__init__(spec, num_layers, rotary_embedding, **options)
        self._decode_rope: tuple[torch.Tensor, torch.Tensor] | None = None  # set when a decode step's queries wait
        self._scaling: float | None = None

    def update_scores(self, scores: torch.Tensor, mass: torch.Tensor) -> None:
        """Fold a forward's attention mass into the scores, in place.

        scores, mass [rows, kv_heads, slots]: one layer's or every layer's rows, the slots
        past the sinks up to the last one written.
        """
        raise NotImplementedError

    def _allocate_policy_buffers(self, shape: tuple[int, ...], key_like: torch.Tensor) -> dict[str, torch.Tensor]:
        layers, batch = shape[:2]
        query = self.layers[0].query  # captured before the first update: [batch, heads, q, head_dim]
        if query is None:
            raise RuntimeError(f"{type(self).__name__} needs the attention hooks to see queries: "
                               "build the cache with make_cache")
        return {
            **super()._allocate_policy_buffers(shape, key_like),
            # One decode step's query per layer, scored together after the last layer.
            "queries": query.new_zeros(layers, batch, query.shape[1], 1, query.shape[-1]),
        }

    def keep_decode_query(self, layer: AttentionScoredLayer) -> None:
        index = layer.stack_index
        self.cached_view(("query", index), lambda: self.buffers["queries"][index]).copy_(layer.query)
        self._decode_rope, self._scaling = layer.rope, layer.scaling

    def _score_forward(self, total: int) -> None:
        if self._decode_rope is None:
            return  # a chunk: its layers scored themselves
        cos, sin = self._decode_rope
        self._decode_rope = None
        queries = self.buffers["queries"]  # [layers, batch, heads, 1, head_dim]
        layers, batch, heads, _, dim = queries.shape
        rotation = scaled_rotation(cos, sin, self._scaling)  # [batch or 1, dim, dim]
        rotated = torch.matmul(queries.view(layers, batch, heads, dim), rotation.unsqueeze(0))
        mass = decode_attention_mass(rotated.view(layers * batch, heads, dim), self._flat("keys", 0, total))
        self.update_scores(self._flat("scores", self.sink, total), mass[..., self.sink:])
