"""A slow, obviously-correct reference for the cache policies, for tests only.

It runs a Llama-family model by hand with eager attention, one (sequence, KV head)
at a time, keeping an explicit list of cached entries with their absolute position,
pre-RoPE key, value and score. Nothing is vectorised, nothing is preallocated, nothing
moves in place: it is each policy as its paper describes it.

Each policy as its authors define it (the published detail each test pins is in
test_caches.py's PUBLISHED_DETAILS), with kvstress's streaming frame around it:
  * a forward of q tokens attends over the kept entries plus the q new ones
    (causal among the new ones), then evicts down to `capacity` if the cache holds
    more than `capacity + lazy`;
  * sinks (position < sink) are never evicted, nor, where the policy has a window,
    the `window` most recent tokens;
  * StreamingLLM (Xiao et al., §3.2) evicts the oldest entries;
  * H2O (Zhang et al., §3 and the authors' real_drop code) evicts the least accumulated
    attention, summed over the queries of every forward so far; per KV head, summed
    over the query heads of its group;
  * TOVA (Oren et al., §3; the authors' tova_cache.py) ranks tokens by the attention of
    the forward's last query *averaged over all the query heads of the layer*, and
    evicts the same tokens from every head of the layer; no window, the newest token
    competes too. `tovahead` (kvstress's variant) sums over the KV group only and
    evicts per KV head;
  * key norm (Devoto et al.; the authors' l2_compress) evicts, per KV head, the largest
    L2 norm of the key as cached (rotated at its absolute position in "original" mode,
    unrotated in "shifted" mode), the newest key included; its first `full_layers`
    layers are never compressed;
  * random eviction evicts the lowest of a hash of (seed, tokens seen, lane, position),
    computed here with Python integers wrapped to 64 bits;
  * positions "original" rotate keys and queries at absolute positions, "shifted" at
    their rank among the entries attention sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK = (1 << 64) - 1


def _int64(value: int) -> int:
    """`value` wrapped to a signed 64-bit integer, as torch's int64 arithmetic wraps."""
    value &= _MASK
    return value - (1 << 64) if value >> 63 else value


def random_priority(seed: int, seen: int, lane: int, position: int) -> int:
    """splitmix64's finaliser over the policy's hash input (see kvstress/caches/random_eviction.py)."""
    x = _int64(position * 0x9E3779B1 + seen * 0x85EBCA77 + lane * 0xC2B2AE3D + (seed % (1 << 32)) * 0x27D4EB2F)
    x = _int64((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9)
    x = _int64((x ^ (x >> 27)) * 0x94D049BB133111EB)
    return x ^ (x >> 31)


@dataclass
class Entry:
    position: int
    raw_key: torch.Tensor  # [head_dim], before RoPE
    value: torch.Tensor  # [head_dim]
    score: float = 0.0


class ReferencePolicyModel:
    def __init__(self, model, spec, positions="original", lazy=0, seed=0):
        self.model = model
        self.method = spec.method
        self.capacity = spec.capacity
        self.sink = spec.sink
        self.window = spec.window
        self.shifted = positions == "shifted"
        self.lazy = lazy
        self.seed = seed
        self.full_layers = getattr(spec.params, "full_layers", 0)
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
                    key_positions = [ranks[e.position] if self.shifted else e.position for e in candidates]
                    key_matrix = torch.stack([self.rope(e.raw_key, p) for e, p in zip(candidates, key_positions)])
                    value_matrix = torch.stack([e.value for e in candidates])
                    if self.method in ("tova", "tovahead"):  # only this forward's last query counts
                        for entry in candidates:
                            entry.score = 0.0
                    for head in range(kv_head * group, (kv_head + 1) * group):
                        for i in range(length):
                            query_position = (len(kept) + i) if self.shifted else (self.seen + i)
                            query = self.rope(queries[b, i, head], query_position)
                            visible = len(kept) + i + 1
                            logits = (key_matrix[:visible] @ query) * attention.scaling
                            probs = logits.softmax(dim=-1)
                            out[b, i, head] = probs @ value_matrix[:visible]
                            if self.method == "h2o" or (self.method in ("tova", "tovahead") and i == length - 1):
                                for entry, p in zip(candidates[:visible], probs.tolist()):
                                    entry.score += p
                    if self.method == "knorm":  # the norm of the key as the cache holds it
                        for entry in candidates:
                            cached = entry.raw_key if self.shifted else self.rope(entry.raw_key, entry.position)
                            entry.score = -cached.norm().item()
                    if self.method == "random":
                        lane = (layer_idx * batch + b) * self.kv_heads + kv_head
                        for entry in candidates:
                            entry.score = random_priority(self.seed, self.seen + length, lane, entry.position)
                    self.entries[layer_idx][b][kv_head] = candidates
                if layer_idx >= self.full_layers:
                    self.entries[layer_idx][b] = self._evict_layer(self.entries[layer_idx][b], self.seen + length)
            attended = attention.o_proj(out.reshape(batch, length, -1))
            hidden = hidden + attended
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        self.seen += length
        return self.model.lm_head(self.model.model.norm(hidden))

    def _evict_layer(self, heads: list[list[Entry]], seen: int) -> list[list[Entry]]:
        """One layer of one sequence, after its forward: every KV head's candidates → what each keeps."""
        if self.method == "tova":
            # The layer's mean over all its query heads (each KV head's score already sums its
            # group), one ranking for the whole layer, the same victims in every head.
            pooled = {}
            for candidates in heads:
                for entry in candidates:
                    pooled[entry.position] = pooled.get(entry.position, 0.0) + entry.score / self.heads
            for candidates in heads:
                for entry in candidates:
                    entry.score = pooled[entry.position]
        return [self._evict(candidates, seen) for candidates in heads]

    def _evict(self, candidates: list[Entry], seen: int) -> list[Entry]:
        if len(candidates) <= self.capacity + self.lazy:
            return candidates
        excess = len(candidates) - self.capacity
        evictable = [e for e in candidates if self.sink <= e.position < seen - self.window]
        if self.method == "streaming":
            victims = sorted(evictable, key=lambda e: e.position)[:excess]
        else:
            # Ties go to the oldest, as a stable sort leaves them.
            victims = sorted(evictable, key=lambda e: e.score)[:excess]
        gone = {e.position for e in victims}
        return [e for e in candidates if e.position not in gone]

    def kept_positions(self, layer_idx: int) -> list[list[list[int]]]:
        return [[sorted(e.position for e in head) for head in seq] for seq in self.entries[layer_idx]]
