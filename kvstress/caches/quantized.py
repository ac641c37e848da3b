"""Quantized KV: every token kept, in fewer bits (transformers' `QuantizedCache`, optimum-quanto).

The other answer to "how do I fit a long context?": nothing is evicted, so memory still
grows with the text, but several times slower. transformers quantizes keys and values
per channel in groups of 64 (KIVI-style, with the zero point and scale of each group),
and keeps the most recent tokens in full precision until `residual` of them have
gathered, then requantizes them with the rest. The first forward's tokens are
quantized at once. transformers 5.17 counts one token per forward towards the residual,
so a chunk can leave more than `residual` tokens in full precision until the next forward.
A model's sliding-window layers keep their window in full precision, as the full cache
keeps them: quantizing them would change what the model, not the cache, bounds.
"""

from __future__ import annotations

from transformers import Cache, DynamicCache, QuantizedCache
from transformers.cache_utils import DynamicLayer, QuantoQuantizedLayer

from .hooks import UnsupportedModelError, state_refusal


def quantized_cache(spec, model) -> Cache:
    """transformers' QuantizedCache; for a model that bounds some layers itself (sliding
    windows, Llama 4's chunks), which QuantizedCache refuses outright, its quantized layers
    where the model attends to every token and the others as its DynamicCache keeps them."""
    refusal = state_refusal(model)
    if refusal:
        raise UnsupportedModelError(refusal)
    layers = DynamicCache(config=model.config).layers
    global_layers = [type(layer) is DynamicLayer for layer in layers]  # the others bounded by the model
    if all(global_layers):
        return QuantizedCache(backend="quanto", config=model.config, nbits=spec.bits, residual_length=spec.residual)
    if not any(global_layers):
        raise UnsupportedModelError(
            f"{type(model).__name__} bounds every layer with a window or chunks itself, which leaves {spec.name} nothing to "
            "quantize: use baseline, which holds at most that many tokens per layer")
    return Cache(layers=[QuantoQuantizedLayer(nbits=spec.bits, residual_length=spec.residual) if is_global else layer
                         for layer, is_global in zip(layers, global_layers)])
