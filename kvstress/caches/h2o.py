"""H2O: heavy hitters by accumulated attention, with sinks and a recent window (Zhang et al., 2023).

Each kept token carries the attention mass it has received, summed over every query
since it entered the cache and over the query heads of its KV group (GQA), separately
per sequence and KV head. When the cache runs over capacity, the tokens with the
least mass are evicted, never a sink (the first `sink` positions) nor one of the
`window` most recent tokens. How the mass is computed: scored.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..spec import Params, Policy
from .scored import AttentionScoredCache


@dataclass(frozen=True, kw_only=True)
class H2OParams(Params):
    sink: int = 4
    window: int | None = None
    capacity: int
    min_window = 1  # the newest token, whose mass so far is its attention to itself
    rest = "heavy hitters"

    @property
    def heavy_hitters(self) -> int:
        """Slots left for the tokens chosen by accumulated attention."""
        return self.capacity - self.sink - self.window


class H2OCache(AttentionScoredCache):
    def update_scores(self, scores: torch.Tensor, mass: torch.Tensor) -> None:
        scores.add_(mass)


POLICY = Policy(
    name="h2o",
    params=H2OParams,
    description="H2O: S sinks + W most recent + the tokens with the most attention accumulated so far",
    cache=H2OCache,
    in_all=True,
)
