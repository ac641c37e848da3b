"""TOVA: keep the tokens the current query attends to most (Oren et al., 2024, "Transformers
are Multi-State RNNs").

At each step TOVA evicts the token with the least attention from the newest query. A
token's score is that attention alone, replaced every forward, not accumulated as in
H2O. For a prefill chunk the score is the attention of the chunk's last query, as the
authors' implementation does when it reduces a prompt.

Where the paper averages the attention over all heads of a layer and evicts the same
token from every head, kvstress decides per sequence and KV head, summing over the
query heads of the KV group, as it does for H2O: heads attend to different tokens, and
a per-head choice keeps a model sharded by heads exact. Optional sinks (`tova_S_C`)
are kept for good; the paper's TOVA has none (`tova_0_C`, the default) and no recent
window: the newest token competes with the others (it usually attends to itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..spec import Params, Policy
from .scored import AttentionScoredCache


@dataclass(frozen=True, kw_only=True)
class TOVAParams(Params):
    sink: int = 0
    capacity: int
    rest = "attended tokens"


class TOVACache(AttentionScoredCache):
    last_query_only = True

    def update_scores(self, scores: torch.Tensor, mass: torch.Tensor) -> None:
        scores.copy_(mass)


POLICY = Policy(
    name="tova",
    params=TOVAParams,
    description="TOVA: S sinks + the tokens the newest query attends to most (per KV head)",
    cache=TOVACache,
)
