"""TOVA: keep the tokens the current query attends to most (Oren et al., 2024, "Transformers
are Multi-State RNNs", §3; the authors' code: schwartz-lab-NLP/TOVA, `src/tova_cache.py`).

As the authors define it (`tova_S_C`, default `tova_0_C`): after each forward, a layer
that holds more than `capacity` tokens keeps the `capacity` tokens with the most
attention from the forward's *last* query, that attention averaged over *all the
layer's query heads*, and evicts the same tokens from every head of the layer. A
token's score is that attention alone, replaced every forward, not accumulated as in
H2O; a prefill chunk is scored by its last query, as the authors' `reduce` does for a
prompt. There is no recent window: the newest token competes with the others. The
sinks (`S`, 0 in the authors' TOVA) are kvstress's addition: kept for good when asked for.

`tovahead_S_C` is kvstress's variant, not the authors': the same score summed over the
query heads of each KV head only, and each KV head evicts its own tokens (how H2O pools).
A per-head choice also keeps a model sharded by heads (--tp) exact, which the
layer-wide average cannot be without gathering every rank's heads.

Departures from the authors' code, both variants: scores are float32 whatever the
model's dtype (the authors average the model-dtype attention weights); an exact tie goes
to whichever `argmin`/`topk` returns, where the authors' `topk` leaves it unspecified too.
"""

from __future__ import annotations

import torch

from .scored import AttentionScoredCache


class TOVACache(AttentionScoredCache):
    """The authors' TOVA: one score per token and layer, shared by the layer's heads."""

    last_query_only = True

    def update_scores(self, scores: torch.Tensor, mass: torch.Tensor) -> None:
        # mass [rows, kv_heads, slots], each KV head's already summed over its query group:
        # the sum over KV heads is the layer's sum over all its query heads, which ranks
        # the tokens as the authors' mean does. Every head gets the same row, so every
        # head's argmin (same slots, same ties) evicts the same token.
        scores.copy_(mass.sum(dim=1, keepdim=True).expand_as(scores))


class PerHeadTOVACache(AttentionScoredCache):
    """kvstress's variant: each KV head ranks its tokens by its own query group's attention."""

    last_query_only = True

    def update_scores(self, scores: torch.Tensor, mass: torch.Tensor) -> None:
        scores.copy_(mass)
