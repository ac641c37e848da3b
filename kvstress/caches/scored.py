"""Policies that rank tokens by a score: the shared bases.

`ScoredCache` keeps a float32 score per slot beside the keys; sinks and the most recent
`window` tokens are never evicted, the rest go lowest score first. The sinks are the
first tokens ever written and are never evicted, so they sit in slots [0, sink) for
good: they start (and stay) at +inf, and a policy only ever scores slots from `sink` on.
A query-free policy (key norm) writes its scores in `_score_forward`, once per forward
for every layer.

`AttentionScoredCache` scores from the attention each token receives, computed from
what the model's attention kernel is about to get (transformers' attention interface,
see hooks.py): the query as the model rotated it, the keys the cache returned, the
scaling, and the family's logit softcap or attention sinks, as the kernel applies them.
The model's own kernel (SDPA, or its eager function) stays the one that attends:

  decode step   the layers' queries are collected and scored for all layers at once
                after the last one (original positions): one small softmax over
                [layers x batch x kv_heads] rows
  prefill chunk each layer scores itself, in query blocks whose memory is bounded by
                the block size, never by length squared (shifted mode and attention
                sinks score decode steps this way too: the keys are turned per layer,
                the sinks differ per layer; so does multi-head latent attention, whose
                kernel attends keys made from the cached latents, not the latents)

Attention mass is per sequence and KV head, summed over the query heads of the KV
group (GQA); under multi-head latent attention, per cached latent, summed over every
query head. A policy says how a forward's mass updates a slot's score
(`update_scores`: H2O accumulates, TOVA replaces) and, for a chunk, whether every query
counts or only the last (`last_query_only`).
"""

from __future__ import annotations

import torch

from .base import CompressedCache, FixedCapacityLayer

# Memory bound for the score pass over a prefill chunk: query blocks are sized so a
# block's probabilities hold at most this many float32 elements (64 MiB).
_SCORE_BLOCK_ELEMENTS = 1 << 24


class ScoredCache(CompressedCache):
    """Sinks and a recent window kept; the other slots evicted lowest score first."""

    buffer_names = CompressedCache.buffer_names + ("scores",)
    score_writer = "_score_forward"  # the hook that writes the scores

    def _allocate_policy_buffers(self, shape: tuple[int, ...], key_like: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": torch.zeros(shape, dtype=torch.float32, device=key_like.device)}

    def _start_policy_state(self, start: int, total: int) -> None:
        # New tokens start from nothing, except sinks, which start (and stay) at +inf; the
        # base never makes the sinks candidates either (contract.py). A compiled decode step
        # only runs once the sinks are in (see CompiledDecode).
        self._flat("scores", start, total).zero_()
        new_sinks = 0 if self.in_graph else min(max(self.sink - self.first_new_position, 0), total - start)
        if new_sinks:
            self._flat("scores", start, start + new_sinks).fill_(float("inf"))

    def eviction_priority(self, total: int) -> torch.Tensor:
        # The scores as they are: the base keeps the sinks and the recent window (contract.py).
        return self._flat("scores", 0, total)

    def priority_hook(self) -> str:
        if type(self).eviction_priority is not ScoredCache.eviction_priority:
            return super().priority_hook()
        return f"{self.score_writer} (the scores eviction_priority ranks)"


class AttentionScoredLayer(FixedCapacityLayer):
    def before_attention(self, query: torch.Tensor, keys: torch.Tensor, mask, options: dict):
        mask = super().before_attention(query, keys, mask, options)
        owner = self.owner
        start, total = owner.kept, owner.pending_total
        scaling = options.get("scaling") or query.shape[-1] ** -0.5  # None: the kernels' default
        softcap, sinks = options.get("softcap"), options.get("s_aux")
        # Multi-head latent attention (DeepSeek) caches latents and makes the kernel's keys
        # from them, one per query head: the cached slots are not what the kernel attends.
        attends_cached = keys.shape[1] == self.keys.shape[1] and keys.shape[-1] == self.keys.shape[-1]
        # Decode steps scored for all layers at once, from the cached keys; not where the model's
        # window hides some of them (self.visible), which differ per layer.
        batched = not self.shifted and sinks is None and attends_cached and self.visible is None
        if batched and "queries" not in owner.buffers:
            owner.allocate_query_buffer(query)
        if batched and query.shape[2] == 1:
            owner.keep_decode_query(self, query, scaling, softcap)
            return mask
        visible = self.visible
        if owner.last_query_only:
            query, start = query[:, :, -1:], total - 1
            visible = None if visible is None else visible[:, :, -1:]
        mass = attention_mass(query, keys, scaling, start, softcap=softcap, sinks=sinks, visible=visible)
        if not attends_cached:  # each cached head's mass: that of the kernel's heads made from it
            mass = mass.view(mass.shape[0], self.keys.shape[1], -1, mass.shape[-1]).sum(dim=2)
        owner.update_scores(self._view("scores", owner.sink, total), mass[..., owner.sink:])
        return mask


def _softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Logits as the model's kernel caps them (Gemma 2: softcap * tanh(logits / softcap))."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def decode_attention_mass(query: torch.Tensor, keys: torch.Tensor, scaling: float,
                          softcap: float | None = None) -> torch.Tensor:
    """`attention_mass` for one query token: one small softmax.

    query [batch, heads, dim]; keys [batch, kv_heads, total, dim] → [batch, kv_heads, total]
    float32. Written with bmm and views only: on CPU every op costs microseconds of dispatch.
    """
    batch, heads, dim = query.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    grouped = query.view(batch * kv_heads, heads // kv_heads, dim) * scaling
    logits = _softcapped(torch.bmm(grouped, keys.reshape(batch * kv_heads, total, dim).transpose(1, 2)), softcap)
    return logits.softmax(dim=-1, dtype=torch.float32).sum(dim=1).view(batch, kv_heads, total)


def attention_mass(query: torch.Tensor, keys: torch.Tensor, scaling: float, start: int, *,
                   softcap: float | None = None, sinks: torch.Tensor | None = None,
                   visible: torch.Tensor | None = None) -> torch.Tensor:
    """Attention each key receives from the queries, summed over queries and each KV group.

    query [batch, heads, q, dim] for the tokens at slots start..start+q-1 (causal among
    themselves); keys [batch, kv_heads, total, dim]. `softcap` caps the logits and `sinks`
    [heads] adds a learned logit per head to each softmax's denominator (GPT-OSS), as the
    model's kernel does. `visible` [batch, kv_heads, q, total], where the model's sliding window
    hides keys from a query, says which each query sees. Returns [batch, kv_heads, total] float32.
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
        logits = _softcapped(logits.float().mul_(scaling), softcap).view(batch, kv_heads, group, r, total)
        # Query at slot start + i sees keys up to and including its own slot.
        last_visible = start + first + torch.arange(r, device=keys.device)
        logits.masked_fill_(key_index > last_visible[:, None], float("-inf"))
        if visible is not None:
            logits.masked_fill_(~visible[:, :, None, first : first + r], float("-inf"))
        if sinks is None:
            mass += logits.softmax(dim=-1).sum(dim=(2, 3))
        else:
            sink = sinks.float().view(1, kv_heads, group, 1, 1).expand(batch, -1, -1, r, 1)
            mass += torch.cat((logits, sink), dim=-1).softmax(dim=-1)[..., :total].sum(dim=(2, 3))
    return mass


class AttentionScoredCache(ScoredCache):
    """A `ScoredCache` whose scores come from the attention the queries pay each token."""

    layer_class = AttentionScoredLayer
    score_writer = "update_scores"
    last_query_only = False  # for a chunk: score from its last query only, not all of them

    def __init__(self, spec, num_layers: int, rotary_embedding, **options):
        super().__init__(spec, num_layers, rotary_embedding, **options)
        # (scaling, softcap) while a decode step's queries wait to be scored; every layer of
        # the families served has the same.
        self._decode_options: tuple[float, float | None] | None = None

    def update_scores(self, scores: torch.Tensor, mass: torch.Tensor) -> None:
        """Fold a forward's attention mass into the scores, in place.

        scores, mass [rows, kv_heads, slots]: one layer's or every layer's rows, the slots
        past the sinks up to the last one written.
        """
        raise NotImplementedError

    def _allocate_policy_buffers(self, shape: tuple[int, ...], key_like: torch.Tensor) -> dict[str, torch.Tensor]:
        # The decode queries' buffer is not per slot: one reallocating the slots keeps it.
        queries = {"queries": self.buffers["queries"]} if "queries" in self.buffers else {}
        return {**super()._allocate_policy_buffers(shape, key_like), **queries}

    def allocate_query_buffer(self, query: torch.Tensor) -> None:
        """[layers, batch, heads, 1, head_dim] for one decode step's queries, sized from the
        first forward's query (the cache's update never sees one), so it is there from the start."""
        batch, heads, _, dim = query.shape
        queries = self.buffers["queries"] = query.new_zeros(len(self.stacked_layers), batch, heads, 1, dim)
        torch._dynamo.mark_static_address(queries)

    def keep_decode_query(self, layer: AttentionScoredLayer, query: torch.Tensor, scaling: float,
                          softcap: float | None) -> None:
        """Hold a decode step's query [batch, heads, 1, head_dim] until every layer has run."""
        queries = self.buffers["queries"]
        index = layer.stack_index
        self.cached_view(("query", index), lambda: queries[index]).copy_(query)
        self._decode_options = (scaling, softcap)

    def _score_forward(self, total: int) -> None:
        if self._decode_options is None:
            return  # a chunk: its layers scored themselves
        scaling, softcap = self._decode_options
        self._decode_options = None
        queries = self.buffers["queries"]  # [layers, batch, heads, 1, head_dim]
        layers, batch, heads, _, dim = queries.shape
        mass = decode_attention_mass(queries.view(layers * batch, heads, dim), self._flat("keys", 0, total),
                                     scaling, softcap)
        self.update_scores(self._flat("scores", self.sink, total), mass[..., self.sink:])
