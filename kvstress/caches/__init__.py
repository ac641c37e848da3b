"""KV-cache policies as transformers caches: `make_cache("h2o_4_32_256", model)`."""

from __future__ import annotations

from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache

from ..spec import MethodSpec, as_spec
from .base import POSITION_MODES, CompressedCache
from .h2o import H2OCache
from .hooks import UnsupportedModelError, attach
from .streaming import StreamingCache

_CACHE_CLASSES = {"streaming": StreamingCache, "h2o": H2OCache}


def make_cache(spec: str | MethodSpec, model: nn.Module, *, positions: str = "original", lazy: int = 0) -> Cache:
    """A cache for `model` implementing `spec`.

    `baseline` is the `DynamicCache` transformers uses by default. Compressed policies
    link themselves to the model's attention modules (hooks installed once per model)
    and allocate their buffers on the first forward, taking batch size, dtype and
    device from it. `positions` is "original" or "shifted"; `lazy` lets the cache run
    over capacity by that many tokens and then evict them at once.
    """
    spec = as_spec(spec)
    if not spec.is_compressed:
        if positions != "original" or lazy:
            raise ValueError("baseline keeps every token at its own position: positions and lazy do not apply")
        return DynamicCache(config=model.config)
    links = attach(model)
    return _CACHE_CLASSES[spec.method](
        spec, links.num_layers, links.rotary_embedding, positions=positions, lazy=lazy
    )


def make_run_cache(spec: MethodSpec, model: nn.Module, *, positions: str, lazy: int) -> Cache:
    """A cache for a run whose position mode and lazy buffer apply to the compressed methods only."""
    if spec.is_compressed:
        return make_cache(spec, model, positions=positions, lazy=lazy)
    return make_cache(spec, model)


def cached_tokens(cache: Cache) -> int:
    """Tokens the cache holds now (per sequence and layer)."""
    if isinstance(cache, CompressedCache):
        return cache.layers[0].kept
    return cache.get_seq_length()


def cache_bytes(cache: Cache) -> int:
    """Bytes of tensors the cache holds (keys, values and any policy state)."""
    if isinstance(cache, CompressedCache):
        return cache.nbytes
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


__all__ = [
    "POSITION_MODES",
    "CompressedCache",
    "H2OCache",
    "StreamingCache",
    "UnsupportedModelError",
    "cache_bytes",
    "cached_tokens",
    "make_cache",
    "make_run_cache",
]
