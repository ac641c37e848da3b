"""H2O: heavy hitters by accumulated attention, with sinks and a recent window (Zhang et al., 2023).

Each kept token carries the attention mass it has received, summed over every query
since it entered the cache and over the query heads of its KV group (GQA), separately
per sequence and KV head. When the cache runs over capacity, the tokens with the
least mass are evicted, never a sink (the first `sink` positions) nor one of the
`window` most recent tokens.

The mass is computed here from the query and the keys attention is about to see, so
the model's attention stays SDPA: one small softmax per decode step, and for a
prefill chunk a blocked pass whose memory is bounded by the block size, never by
length squared.
"""

from __future__ import annotations

import torch

from .base import _SCORE_BLOCK_ELEMENTS, CompressedCache, FixedCapacityLayer, apply_rotary


class H2OLayer(FixedCapacityLayer):
    wants_query = True
    buffer_names = FixedCapacityLayer.buffer_names + ("scores",)

    def __init__(self, owner, spec, lazy: int, shifted: bool):
        super().__init__(owner, spec, lazy, shifted)
        self.window = spec.window
        self.scores: torch.Tensor | None = None  # [batch, kv_heads, slots] float32

    def _allocate_policy_buffers(self, batch, heads, slots, device) -> None:
        self.scores = torch.zeros(batch, heads, slots, dtype=torch.float32, device=device)

    def observe_attention(self, keys: torch.Tensor, start: int, total: int) -> None:
        if self.query is None or self.rope is None:
            raise RuntimeError("H2O needs the attention hooks to see queries: build the cache with make_cache")
        cos, sin = self.rope
        if self.query.shape[2] == 1:
            # A decode step: RoPE and the softmax scale as one small matmul, shared by all layers.
            batch, heads, _, dim = self.query.shape
            rotation = self.owner.scaled_rotation(cos, sin, self.scaling)
            rows = rotation.shape[0]  # 1 when every sequence is at the same position
            query = torch.bmm(self.query.reshape(rows, batch * heads // rows, dim), rotation)
            mass = decode_attention_mass(query.view(batch, heads, dim), keys)
        else:
            query = apply_rotary(self.query, cos.unsqueeze(1), sin.unsqueeze(1))
            mass = attention_mass(query, keys, self.scaling, start)
        # New tokens start from nothing, except sinks, which start (and stay) at +inf so
        # that eviction only has to protect the recent window.
        self._view("scores", start, total).zero_()
        # A compiled decode step only runs once the sinks are in (see CompiledDecode).
        new_sinks = 0 if self.owner.in_graph else min(max(self.sink - (self.seen - (total - start)), 0), total - start)
        if new_sinks:
            self._view("scores", start, start + new_sinks).fill_(float("inf"))
        self._view("scores", 0, total).add_(mass)

    def eviction_priority(self, total: int) -> torch.Tensor:
        recent = self._view("positions", 0, total) >= self.seen_after_update() - self.window
        return self._view("scores", 0, total).masked_fill(recent, float("inf"))


def decode_attention_mass(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`attention_mass` for one query token already rotated and scaled: one small softmax.

    query [batch, heads, dim]; keys [batch, kv_heads, total, dim] → [batch, kv_heads, total]
    float32. Written with bmm and views only: on CPU each extra op costs about as much as
    this whole computation.
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
