"""Key norm: evict the keys with the largest L2 norm (Devoto et al., 2024, "A Simple and
Effective L2 Norm-Based Strategy for KV Cache Compression", EMNLP; the authors' code:
alessiodevoto/l2compress, `cache.py`, `l2_compress`).

Keys with a low norm draw high attention, so the policy keeps them. As the authors'
`l2_compress` does it after each forward: in every compressed layer, each KV head ranks
every cached key, the forward's new ones included (so the newest token can be evicted),
by the L2 norm of the key as cached, and keeps the `capacity` lowest; no query, no
softmax. The first `F` layers are left whole (`full_layers`): the authors skip layers
0 and 1 in their README's usage, whose keys do not show the norm–attention link (their
model class defaults to layer 0 alone, `l2_compress` itself to none). A whole layer
keeps every token, so with `F > 0` the cache grows with the text in those layers.
RoPE rotates pairs of coordinates, so the norm is the same before and after it.

`knorm_S_W_F_C`; the authors' policy is `knorm_0_0_2_C`, the default. Sinks `S` and a
recent window `W` are kvstress's additions, protected regardless of norm when asked for.

Departures: the authors keep a fraction of the cache (`keep_ratio`) once it passes
`prune_after` tokens; kvstress keeps a fixed count (`capacity`), the streaming reading
every policy here shares. Only the first `F` layers can be left whole, not any list
(every setting the authors use is such a prefix). Norms are float32; exact ties go to
whichever `argmin`/`topk` returns, as the authors' `argsort` leaves them unspecified.
"""

from __future__ import annotations

import torch

from .scored import ScoredCache


class KeyNormCache(ScoredCache):
    def _score_forward(self, total: int) -> None:
        start = max(self.kept, self.sink)  # this forward's tokens; sinks keep their +inf
        norms = torch.linalg.vector_norm(self._flat("keys", start, total), dim=-1, dtype=torch.float32)
        self._flat("scores", start, total).copy_(norms.neg_())
