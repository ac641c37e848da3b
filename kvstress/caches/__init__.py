"""KV-cache policies as transformers caches: `make_cache("h2o_4_32_256", model)`.

One file per policy, each ending in its `POLICY` declaration (see kvstress.spec);
registering it below is what makes it a method of every command.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..spec import MethodSpec, as_spec, register_policy
from . import baseline, h2o, knorm, quantized, random_eviction, streaming, tova
from .base import POSITION_MODES, CompressedCache
from .h2o import H2OCache
from .hooks import UnsupportedModelError, attach
from .knorm import KeyNormCache
from .random_eviction import RandomCache
from .streaming import StreamingCache
from .tova import TOVACache

for _policy_module in (baseline, streaming, h2o, tova, knorm, random_eviction, quantized):
    register_policy(_policy_module.POLICY)


def make_cache(spec: str | MethodSpec, model: nn.Module, *, positions: str = "original", lazy: int = 0,
               seed: int = 0) -> Cache:
    """A cache for `model` implementing `spec`.

    Fixed-capacity policies link themselves to the model's attention modules (hooks
    installed once per model) and allocate their buffers on the first forward, taking
    batch size, dtype and device from it. `positions` is "original" or "shifted"; `lazy`
    lets the cache run over capacity by that many tokens and then evict them at once;
    `seed` seeds the policies that draw random numbers. The others (`baseline`, the
    quantized cache) are transformers' own caches, to which none of these apply.
    """
    spec = as_spec(spec)
    policy = spec.policy
    if not spec.is_compressed:
        if positions != "original" or lazy:
            raise ValueError(f"{spec.method} keeps every token at its own position: positions and lazy do not apply")
        return policy.cache(spec, model)
    if not (isinstance(policy.cache, type) and issubclass(policy.cache, CompressedCache)):
        raise TypeError(f"policy {spec.method} has a capacity, so its cache must subclass kvstress.caches.CompressedCache")
    links = attach(model)
    return policy.cache(spec, links.num_layers, links.rotary_embedding, positions=positions, lazy=lazy, seed=seed)


def make_run_cache(spec: MethodSpec, model: nn.Module, *, positions: str, lazy: int, seed: int = 0) -> Cache:
    """A cache for a run whose position mode, lazy buffer and seed apply to the fixed-capacity methods only."""
    if spec.is_compressed:
        return make_cache(spec, model, positions=positions, lazy=lazy, seed=seed)
    return make_cache(spec, model)


def cached_tokens(cache: Cache) -> int:
    """Tokens the cache holds now (per sequence and layer)."""
    if isinstance(cache, CompressedCache):
        return cache.layers[0].kept
    return cache.get_seq_length()


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; for a tensor subclass that packs its data in inner tensors
    (optimum-quanto's quantized tensors: packed ints, scales, shifts), the inner ones'."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def cache_bytes(cache: Cache) -> int:
    """Bytes of tensors the cache holds (keys, values, quantized data and any policy state)."""
    if isinstance(cache, CompressedCache):
        return cache.nbytes
    # transformers' layers: every tensor they hold (full-precision keys and values, quantized
    # ones, a residual), found by walking them rather than assumed from their class.
    return sum(tensor_bytes(value) for layer in cache.layers for value in vars(layer).values()
               if isinstance(value, torch.Tensor))


__all__ = [
    "POSITION_MODES",
    "CompressedCache",
    "H2OCache",
    "KeyNormCache",
    "RandomCache",
    "StreamingCache",
    "TOVACache",
    "UnsupportedModelError",
    "cache_bytes",
    "cached_tokens",
    "make_cache",
    "make_run_cache",
]
