"""A slow, obviously-correct reference for the cache policies, for tests only.

It runs a Llama-family model by hand with eager attention, one (sequence, KV head)
at a time, keeping an explicit list of cached entries with their absolute position,
pre-RoPE key, value and accumulated attention. Nothing is vectorised, nothing is
preallocated, nothing moves in place: it is the policy as the papers describe it.

Semantics shared with kvstress's caches (and stated here so a reader can check them):
  * a forward of q tokens attends over the kept entries plus the q new ones
    (causal among the new ones), then evicts down to `capacity` if the cache holds
    more than `capacity + lazy`;
  * StreamingLLM evicts the oldest entries that are not sinks;
  * H2O evicts the entries with the least accumulated attention, summed over the
    queries of a forward and the query heads of the KV group, never a sink
    (position < sink) nor one of the `window` most recent tokens;
  * positions "original" rotate keys and queries at absolute positions, "shifted" at
    their rank among the entries attention sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Entry:
    position: int
    raw_key: torch.Tensor  # [head_dim], before RoPE
    value: torch.Tensor  # [head_dim]
    score: float = 0.0


class ReferencePolicyModel:
    def __init__(self, model, method: str, capacity: int, sink: int, window: int = 0, positions="original", lazy=0):
        self.model = model
        self.method = method
        self.capacity = capacity
        self.sink = sink
        self.window = window
        self.shifted = positions == "shifted"
        self.lazy = lazy
        config = model.config
        self.kv_heads = config.num_key_value_heads
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.seen = 0
        self.entries: list[list[list[list[Entry]]]] | None = None  # [layer][sequence][kv_head]
        table_ids = torch.arange(4096).unsqueeze(0)
        dummy = torch.zeros(1, dtype=torch.float32)
        cos, sin = model.model.rotary_emb(dummy, table_ids)
        self.cos, self.sin = cos[0], sin[0]

    def rope(self, vector: torch.Tensor, position: int) -> torch.Tensor:
        half = vector.shape[-1] // 2
        rotated = torch.cat((-vector[half:], vector[:half]))
        return vector * self.cos[position] + rotated * self.sin[position]

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [batch, q] → logits [batch, q, vocab]."""
        batch, length = ids.shape
        layers = self.model.model.layers
        if self.entries is None:
            self.entries = [[[[] for _ in range(self.kv_heads)] for _ in range(batch)] for _ in layers]
        hidden = self.model.model.embed_tokens(ids)
        group = self.heads // self.kv_heads
        for layer_idx, layer in enumerate(layers):
            attention = layer.self_attn
            normed = layer.input_layernorm(hidden)
            queries = attention.q_proj(normed).view(batch, length, self.heads, self.head_dim)
            keys = attention.k_proj(normed).view(batch, length, self.kv_heads, self.head_dim)
            values = attention.v_proj(normed).view(batch, length, self.kv_heads, self.head_dim)
            out = torch.zeros(batch, length, self.heads, self.head_dim)
            for b in range(batch):
                for kv_head in range(self.kv_heads):
                    kept = self.entries[layer_idx][b][kv_head]
                    new = [
                        Entry(self.seen + i, keys[b, i, kv_head].clone(), values[b, i, kv_head].clone())
                        for i in range(length)
                    ]
                    candidates = kept + new
                    ranks = {e.position: r for r, e in enumerate(sorted(candidates, key=lambda e: e.position))}
                    rope_position = (lambda e: ranks[e.position]) if self.shifted else (lambda e: e.position)
                    key_matrix = torch.stack([self.rope(e.raw_key, rope_position(e)) for e in candidates])
                    value_matrix = torch.stack([e.value for e in candidates])
                    for head in range(kv_head * group, (kv_head + 1) * group):
                        for i in range(length):
                            query_position = (len(kept) + i) if self.shifted else (self.seen + i)
                            query = self.rope(queries[b, i, head], query_position)
                            visible = len(kept) + i + 1
                            logits = (key_matrix[:visible] @ query) * attention.scaling
                            probs = logits.softmax(dim=-1)
                            out[b, i, head] = probs @ value_matrix[:visible]
                            for entry, p in zip(candidates[:visible], probs.tolist()):
                                entry.score += p
                    self.entries[layer_idx][b][kv_head] = self._evict(candidates, self.seen + length)
            attended = attention.o_proj(out.reshape(batch, length, -1))
            hidden = hidden + attended
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        self.seen += length
        return self.model.lm_head(self.model.model.norm(hidden))

    def _evict(self, candidates: list[Entry], seen: int) -> list[Entry]:
        if len(candidates) <= self.capacity + self.lazy:
            return candidates
        excess = len(candidates) - self.capacity
        if self.method == "streaming":
            evictable = [e for e in candidates if e.position >= self.sink]
            victims = {e.position for e in sorted(evictable, key=lambda e: e.position)[:excess]}
        else:
            evictable = [e for e in candidates if self.sink <= e.position < seen - self.window]
            victims = {e.position for e in sorted(evictable, key=lambda e: e.score)[:excess]}
        return [e for e in candidates if e.position not in victims]

    def kept_positions(self, layer_idx: int) -> list[list[list[int]]]:
        return [[sorted(e.position for e in head) for head in seq] for seq in self.entries[layer_idx]]
