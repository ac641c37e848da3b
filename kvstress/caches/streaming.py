"""StreamingLLM: attention sinks plus the most recent tokens (Xiao et al., 2023).

Keeps the `sink` first tokens and the `capacity - sink` most recent ones. The window
is a ring in all but name: each decode step the oldest non-sink token is the victim
and the new token takes its slot.

`streaming_0_C` keeps no sinks: the paper's "window attention" ablation, whose
perplexity collapses once the first tokens leave the window — the reason sinks exist.
"""

from __future__ import annotations

import torch

from .base import CompressedCache


class StreamingCache(CompressedCache):
    def eviction_priority(self, total: int) -> torch.Tensor:
        # Oldest first; the base never lets the sinks be candidates (contract.py).
        return self._flat("positions", 0, total)
