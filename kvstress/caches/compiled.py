"""Compiled one-token decode steps for the compressed caches (`--compile`).

A compressed cache in steady state has static shapes: every decode step writes one
token into slot `capacity`, attends over `capacity + 1` slots and evicts one, into
buffers that never move. That makes the step capturable: `torch.compile` fuses the
policy's small ops, and on CUDA `mode="reduce-overhead"` replays the whole step as one
CUDA graph instead of launching hundreds of kernels from Python.

What would make the graph depend on the step is kept out of it: the new token's
absolute position is read from `cache.next_position` (a tensor) and the model gets
explicit `position_ids`; the Python counters (`seen`) move on after the step, here.
Any step that is not a steady-state one-token step (prefill chunks, a cache still
filling up, the sinks not yet in) runs eagerly, unchanged. Caches none of whose steps could
be compiled (lazy eviction, whole or sliding-window layers, which concatenate) are refused
before a run measures anything (`eager_because`).
"""

from __future__ import annotations

import torch

from .base import CompressedCache, WholeLayer


class CompiledDecode:
    """`step(cache, input_ids)` → last-position logits, compiled where the cache allows it."""

    def __init__(self, model: torch.nn.Module, cache_argument: str, *, mode: str | None = None):
        self.model = model
        self.cache_argument = cache_argument
        device = next(model.parameters()).device
        self.mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
        self._compiled = torch.compile(self._forward, mode=self.mode, dynamic=False)

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, cache) -> torch.Tensor:
        output = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True, logits_to_keep=1,
                            **{self.cache_argument: cache})
        return output.logits

    @staticmethod
    def eager_because(cache: CompressedCache) -> str | None:
        """Why no step of a compressed cache can ever be the compiled one, or None: layers that
        concatenate every step's token change shapes or offsets every step."""
        kinds = {"its whole layers" if isinstance(layer, WholeLayer) else "the model's sliding-window layers"
                 for layer in cache.unstacked_layers}
        return f"{' and '.join(sorted(kinds))} concatenate every step's token" if kinds else None

    @staticmethod
    def compiles(cache, input_ids: torch.Tensor) -> bool:
        """Whether this forward is a steady-state decode step the graph covers."""
        if not isinstance(cache, CompressedCache) or input_ids.shape[1] != 1 or cache.lazy or cache.unstacked_layers:
            return False
        return cache.slots > 0 and cache.kept == cache.capacity and cache.seen >= cache.sink

    def __call__(self, cache, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.compiles(cache, input_ids):
            return self._forward(input_ids, None, cache)
        seen = cache.seen
        if cache.next_position is None:
            cache.next_position = torch.full((1,), seen, dtype=torch.long, device=input_ids.device)
            torch._dynamo.mark_static_address(cache.next_position)
        elif cache.next_position_synced != seen:  # eager forwards moved on since the last compiled step
            cache.next_position.fill_(seen)
        # Shifted mode positions the query inside the cache: the model's own arithmetic
        # (kept, a constant here) is already static.
        position_ids = None if cache.position_mode == "shifted" else cache.next_position.expand(input_ids.shape[0], 1)
        if self.mode == "reduce-overhead":
            # Each call is a new step: the previous step's graph outputs are no longer used.
            torch.compiler.cudagraph_mark_step_begin()
        cache.in_graph = True
        try:
            logits = self._compiled(input_ids, position_ids, cache)
        finally:
            cache.in_graph = False
        cache.next_position.add_(1)
        cache.seen += 1
        cache.next_position_synced = seen + 1
        return logits
