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

    def __init__(self, owner, spec, lazy: int, shifted: bool):
        super().__init__(owner, spec, lazy, shifted)
        self.window = spec.window
        self.scores: torch.Tensor | None = None  # [batch, kv_heads, slots] float32

    def _allocate_policy_buffers(self, batch, heads, slots, device) -> None:
        self.scores = torch.zeros(batch, heads, slots, dtype=torch.float32, device=device)

    def _buffers(self) -> list[torch.Tensor]:
        return super()._buffers() + ([self.scores] if self.scores is not None else [])

    def observe_attention(self, keys: torch.Tensor, start: int, total: int) -> None:
        if self.query is None or self.rope is None:
            raise RuntimeError("H2O needs the attention hooks to see queries: build the cache with make_cache")
        cos, sin = self.rope
        query = apply_rotary(self.query, cos.unsqueeze(1), sin.unsqueeze(1))
        # New tokens start from nothing, except sinks, which start (and stay) at +inf so
        # that eviction only has to protect the recent window.
        self.scores[:, :, start:total] = 0
        new_sinks = min(max(self.sink - (self.seen - (total - start)), 0), total - start)
        if new_sinks:
            self.scores[:, :, start : start + new_sinks] = float("inf")
        self.scores[:, :, :total] += attention_mass(query, keys, self.scaling, start)

    def eviction_priority(self, total: int) -> torch.Tensor:
        recent = self.positions[:, :, :total] >= self.seen - self.window
        return self.scores[:, :, :total].masked_fill(recent, float("inf"))


def attention_mass(query: torch.Tensor, keys: torch.Tensor, scaling: float, start: int) -> torch.Tensor:
    """Attention each key receives from the queries, summed over queries and each KV group.

    query [batch, heads, q, dim] for the tokens at slots start..start+q-1 (causal among
    themselves); keys [batch, kv_heads, total, dim]. Returns [batch, kv_heads, total] float32.
    """
    batch, heads, length, dim = query.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    if length == 1:  # a decode step: one small softmax, no blocks, no mask
        logits = torch.matmul(query.reshape(batch, kv_heads, group, dim), keys.transpose(-1, -2))
        return logits.float().mul_(scaling).softmax(dim=-1).sum(dim=2)
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
