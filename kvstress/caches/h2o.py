"""H2O: heavy hitters by accumulated attention, with sinks and a recent window (Zhang et al., 2023).

Each kept token carries the attention mass it has received, summed over every query
since it entered the cache and over the query heads of its KV group (GQA), separately
per sequence and KV head. When the cache runs over capacity, the tokens with the
least mass are evicted, never a sink (the first `sink` positions) nor one of the
`window` most recent tokens.

The mass is computed here from the query and the keys attention is about to see, so
the model's attention stays SDPA. A decode step's queries are collected layer by layer
and scored for all layers at once after the last one (with absolute positions): one
small softmax over [layers x batch x kv_heads] rows, RoPE and the softmax scale folded
into one matrix. A prefill chunk is scored layer by layer, in query blocks whose memory
is bounded by the block size, never by length squared.
"""

from __future__ import annotations

import torch

from .base import _SCORE_BLOCK_ELEMENTS, CompressedCache, FixedCapacityLayer, apply_rotary, scaled_rotation


class H2OLayer(FixedCapacityLayer):
    wants_query = True

    def observe_attention(self, keys: torch.Tensor, start: int, total: int) -> None:
        if self.query is None or self.rope is None:
            raise RuntimeError("H2O needs the attention hooks to see queries: build the cache with make_cache")
        owner = self.owner
        if self.query.shape[2] == 1 and not self.shifted:
            owner.keep_decode_query(self)
            return
        # A chunk, or shifted mode (its keys are rotated per layer for attention): score now.
        cos, sin = self.rope
        query = apply_rotary(self.query, cos.unsqueeze(1), sin.unsqueeze(1))
        self._view("scores", 0, total).add_(attention_mass(query, keys, self.scaling, start))


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


class H2OCache(CompressedCache):
    layer_class = H2OLayer
    buffer_names = CompressedCache.buffer_names + ("scores",)

    def __init__(self, spec, num_layers: int, rotary_embedding, **options):
        super().__init__(spec, num_layers, rotary_embedding, **options)
        self.window = spec.window
        self._decode_rope: tuple[torch.Tensor, torch.Tensor] | None = None  # set when a decode step's queries wait
        self._scaling: float | None = None

    def _allocate_policy_buffers(self, shape: tuple[int, ...], key_like: torch.Tensor) -> dict[str, torch.Tensor]:
        layers, batch = shape[:2]
        query = self.layers[0].query  # captured before the first update: [batch, heads, q, head_dim]
        if query is None:
            raise RuntimeError("H2O needs the attention hooks to see queries: build the cache with make_cache")
        return {
            "scores": torch.zeros(shape, dtype=torch.float32, device=key_like.device),
            # One decode step's query per layer, scored together after the last layer.
            "queries": query.new_zeros(layers, batch, query.shape[1], 1, query.shape[-1]),
        }

    def _start_policy_state(self, start: int, total: int) -> None:
        # New tokens start from nothing, except sinks, which start (and stay) at +inf so
        # that eviction only has to protect the recent window. A compiled decode step
        # only runs once the sinks are in (see CompiledDecode).
        self._flat("scores", start, total).zero_()
        new_sinks = 0 if self.in_graph else min(max(self.sink - self.seen, 0), total - start)
        if new_sinks:
            self._flat("scores", start, start + new_sinks).fill_(float("inf"))

    def keep_decode_query(self, layer: H2OLayer) -> None:
        self.cached_view(("query", layer.layer_idx), lambda: self.buffers["queries"][layer.layer_idx]).copy_(layer.query)
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
        self._flat("scores", 0, total).add_(mass)

    def eviction_priority(self, total: int) -> torch.Tensor:
        recent = self._flat("positions", 0, total) >= self.seen_after_update() - self.window
        return self._flat("scores", 0, total).masked_fill(recent, float("inf"))
