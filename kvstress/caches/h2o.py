"""H2O: heavy hitters by accumulated attention, with sinks and a recent window (Zhang et al., 2023).

Each kept token carries the attention mass it has received, summed over every query
since it entered the cache and over the query heads of its KV group (GQA), separately
per sequence and KV head. When the cache runs over capacity, the tokens with the
least mass are evicted, never a sink (the first `sink` positions) nor one of the
`window` most recent tokens. How the mass is computed: scored.py.
"""

from __future__ import annotations

import torch

from .scored import AttentionScoredCache


class H2OCache(AttentionScoredCache):
    def update_scores(self, scores: torch.Tensor, mass: torch.Tensor) -> None:
        scores.add_(mass)
