"""Key norm: evict the keys with the largest L2 norm (Devoto et al., 2024, "A Simple and
Effective L2 Norm-Based Strategy for KV Cache Compression").

Keys with a low norm draw high attention, so the policy keeps them, scoring a token by
the negated norm of its cached key when it enters the cache, once: no query, no
softmax. RoPE rotates pairs of coordinates, so the norm is the same before and after
it (kvpress's KnormPress scores the rotated keys; shifted mode caches them unrotated).
Sinks and a recent window are kept regardless of norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..spec import Params, Policy
from .scored import ScoredCache


@dataclass(frozen=True, kw_only=True)
class KeyNormParams(Params):
    sink: int = 4
    window: int | None = None
    capacity: int
    rest = "low-norm keys"


class KeyNormCache(ScoredCache):
    def _score_forward(self, total: int) -> None:
        start = max(self.kept, self.sink)  # this forward's tokens; sinks keep their +inf
        norms = torch.linalg.vector_norm(self._flat("keys", start, total), dim=-1, dtype=torch.float32)
        self._flat("scores", start, total).copy_(norms.neg_())


POLICY = Policy(
    name="knorm",
    params=KeyNormParams,
    description="key norm: S sinks + W most recent + the tokens whose keys have the smallest L2 norm",
    cache=KeyNormCache,
)
