"""Quantized KV: every token kept, in fewer bits (transformers' `QuantizedCache`, optimum-quanto).

The other answer to "how do I fit a long context?": nothing is evicted, so memory still
grows with the text, but several times slower. transformers quantizes keys and values
per channel in groups of 64 (KIVI-style, with the zero point and scale of each group),
and keeps the most recent tokens in full precision until `residual` of them have
gathered, then requantizes them with the rest. The first forward's tokens are
quantized at once. transformers 5.17 counts one token per forward towards the residual,
so a chunk can leave more than `residual` tokens in full precision until the next forward.
"""

from __future__ import annotations

from transformers import QuantizedCache


def quantized_cache(spec, model) -> QuantizedCache:
    return QuantizedCache(backend="quanto", config=model.config, nbits=spec.bits, residual_length=spec.residual)
