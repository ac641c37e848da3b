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

from dataclasses import dataclass

from transformers import QuantizedCache

from ..spec import Params, Policy, SpecError


@dataclass(frozen=True, kw_only=True)
class QuantizedParams(Params):
    bits: int = 4
    residual: int = 128

    def check(self) -> None:
        if self.bits not in (2, 4):
            raise SpecError(f"bits must be 2 or 4 (optimum-quanto's int2 and int4), got {self.bits}: "
                            "use quant_2_R or quant_4_R")
        if self.residual < 0:
            raise SpecError(f"residual must be 0 or more recent tokens kept in full precision, got {self.residual}")


def quantized_cache(spec, model) -> QuantizedCache:
    return QuantizedCache(backend="quanto", config=model.config, nbits=spec.bits, residual_length=spec.residual)


POLICY = Policy(
    name="quant",
    params=QuantizedParams,
    description="quantized KV (optimum-quanto): every token kept in B bits, the R most recent in full precision",
    cache=quantized_cache,
)
