"""Random eviction: the control every scored policy must beat.

Each eviction picks its victims uniformly at random among the tokens that are neither
sinks nor among the `window` most recent, independently per layer, sequence and KV
head: every eviction draws anew, so a token's chance to survive falls with its age
beyond the window (a random score fixed per token would instead keep a uniform sample
of the whole past). The draw is a hash of (seed, tokens seen, layer/sequence/head,
position), not a generator's stream: it does not depend on which slot a token sits in
(so a reference written from positions draws the same tokens), it is reproducible
from the seed (`make_cache(..., seed=)`: the run's seed, 0 by default), and a compiled
decode step computes it inside its graph.
"""

from __future__ import annotations

import torch

from .base import CompressedCache

# Odd multipliers below 2**32 spread position, step, lane and seed over 64 bits before
# splitmix64's finaliser mixes them (in int64's wrapping arithmetic; `>>` on a negative
# value shifts in ones, which still mixes).
POSITION, STEP, LANE, SEED = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F
MIX = (0xBF58476D1CE4E5B9 - (1 << 64), 0x94D049BB133111EB - (1 << 64))


def mix(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ (x >> 30)) * MIX[0]
    x = (x ^ (x >> 27)) * MIX[1]
    return x ^ (x >> 31)


class RandomCache(CompressedCache):
    def eviction_priority(self, total: int) -> torch.Tensor:
        positions = self._flat("positions", 0, total)  # [layers * batch, kv_heads, total]
        rows, heads = positions.shape[:2]
        lanes = torch.arange(rows * heads, device=positions.device).view(rows, heads, 1)
        seen = self.seen_after_update()
        # The base keeps the sinks and the recent window out of the draw (contract.py).
        return mix(positions * POSITION + seen * STEP + lanes * LANE + (self.seed % (1 << 32)) * SEED)
