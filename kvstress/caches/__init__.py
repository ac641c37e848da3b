"""KV-cache policies as transformers caches: `make_cache("h2o_4_32_256", model)`.

One file per policy's cache; the policies themselves are declared, torch-free, in
kvstress/policies.py (see kvstress.spec), each naming its cache here.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from ..spec import MethodSpec, as_spec
from .base import POSITION_MODES, CompressedCache
from .baseline import full_cache
from .h2o import H2OCache
from .hooks import UnsupportedModelError, attach
from .knorm import KeyNormCache
from .quantized import quantized_cache
from .random_eviction import RandomCache
from .streaming import StreamingCache
from .tova import PerHeadTOVACache, TOVACache

# The cache of each built-in policy (declared, torch-free, in kvstress/policies.py), by name.
IMPLEMENTATIONS = {"baseline": full_cache, "streaming": StreamingCache, "h2o": H2OCache, "tova": TOVACache,
                   "tovahead": PerHeadTOVACache, "knorm": KeyNormCache, "random": RandomCache, "quant": quantized_cache}


def make_cache(spec: str | MethodSpec, model: nn.Module, *, positions: str = "original", lazy: int = 0,
               seed: int = 0, chunk: int = 1) -> Cache:
    """A cache for `model` implementing `spec`.

    Fixed-capacity policies link themselves to the model's attention modules (hooks
    installed once per model) and allocate their buffers on the first forward, taking
    batch size, dtype and device from it. `positions` is "original" or "shifted"; `lazy`
    lets the cache run over capacity by that many tokens and then evict them at once;
    `seed` seeds the policies that draw random numbers; `chunk` is the room allocated
    for a forward's new tokens (the longest forward the caller will run, so that the
    buffers are allocated once: a longer forward reallocates them). The others (`baseline`, the
    quantized cache) are transformers' own caches, to which none of these apply.
    """
    spec = as_spec(spec)
    policy = spec.policy
    cache = IMPLEMENTATIONS[policy.name] if policy.cache is None else policy.cache
    if not spec.is_compressed:
        if positions != "original" or lazy:
            raise ValueError(f"{spec.method} keeps every token at its own position: positions and lazy do not apply")
        return cache(spec, model)
    if not (isinstance(cache, type) and issubclass(cache, CompressedCache)):
        raise TypeError(f"policy {spec.method} has a capacity, so its cache must subclass kvstress.caches.CompressedCache")
    links = attach(model)
    if links.window is not None and spec.capacity + lazy >= links.window - 1:
        held = f"{spec.capacity} + {lazy} lazy" if lazy else str(spec.capacity)
        raise UnsupportedModelError(
            f"{type(model).__name__} attends within a sliding window of {links.window} tokens in every layer, so the "
            f"full cache holds at most {links.window - 1} per layer: {spec.name} holding {held} compresses nothing; "
            f"use baseline, or a capacity below {links.window - 1}")
    return cache(spec, links.num_layers, links.rotary_embedding, positions=positions, lazy=lazy, seed=seed,
                 chunk=chunk, sliding_windows=links.sliding_windows, model_window=links.window)


def make_run_cache(spec: MethodSpec, model: nn.Module, *, positions: str, lazy: int, seed: int = 0,
                   chunk: int = 1) -> Cache:
    """A cache for a run whose position mode, lazy buffer, seed and chunk room apply to the fixed-capacity methods only."""
    if spec.is_compressed:
        return make_cache(spec, model, positions=positions, lazy=lazy, seed=seed, chunk=chunk)
    return make_cache(spec, model)


def cached_tokens(cache: Cache) -> int | None:
    """Tokens the cache holds now (per sequence and layer); None for a cache that holds a
    recurrent state only (Mamba), not tokens."""
    if isinstance(cache, CompressedCache):
        return cache.kept  # in each compressed layer (a sliding one holds the model's window)
    if not any(isinstance(layer, CacheLayerMixin) for layer in cache.layers):
        return None
    return cache.get_seq_length()


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; for a tensor subclass that packs its data in inner tensors
    (optimum-quanto's quantized tensors: packed ints, scales, shifts), the inner ones'."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def cache_sizes(cache: Cache) -> tuple[int, int]:
    """(held, allocated): bytes of tensors the cache holds between forwards (keys, values,
    quantized data and any policy state), and the same with a compressed cache's room for a
    forward's new tokens. transformers' caches hold what they allocate: the two are equal."""
    if isinstance(cache, CompressedCache):
        return cache.held_bytes, cache.nbytes
    # transformers' layers: every tensor they hold (full-precision keys and values, quantized
    # ones, a residual), found by walking them rather than assumed from their class.
    size = sum(tensor_bytes(value) for layer in cache.layers for value in vars(layer).values()
               if isinstance(value, torch.Tensor))
    return size, size


def cache_bytes(cache: Cache, *, allocated: bool = False) -> int:
    """One of cache_sizes' figures: what the cache holds between forwards, or (`allocated`) with its room."""
    return cache_sizes(cache)[1 if allocated else 0]


__all__ = [
    "POSITION_MODES",
    "CompressedCache",
    "H2OCache",
    "KeyNormCache",
    "PerHeadTOVACache",
    "RandomCache",
    "StreamingCache",
    "TOVACache",
    "UnsupportedModelError",
    "cache_bytes",
    "cache_sizes",
    "cached_tokens",
    "make_cache",
    "make_run_cache",
]
