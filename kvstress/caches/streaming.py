"""StreamingLLM: attention sinks plus the most recent tokens (Xiao et al., 2023).

Keeps the `sink` first tokens and the `capacity - sink` most recent ones. The window
is a ring in all but name: each decode step the oldest non-sink token is the victim
and the new token takes its slot.

`streaming_0_C` keeps no sinks: the paper's "window attention" ablation, whose
perplexity collapses once the first tokens leave the window — the reason sinks exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..spec import Params, Policy
from .base import CompressedCache


@dataclass(frozen=True, kw_only=True)
class StreamingParams(Params):
    sink: int = 4
    capacity: int
    rest = "recent tokens"


class StreamingCache(CompressedCache):
    def eviction_priority(self, total: int) -> torch.Tensor:
        positions = self._flat("positions", 0, total)
        # Oldest first; sinks never.
        return positions.masked_fill(positions < self.sink, torch.iinfo(torch.long).max)


POLICY = Policy(
    name="streaming",
    params=StreamingParams,
    description="StreamingLLM: S attention sinks + the C - S most recent tokens (S = 0: window attention)",
    cache=StreamingCache,
    in_all=True,
)
