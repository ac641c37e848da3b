"""The built-in cache policies as declared: each one's parameters and its `Policy` (see kvstress.spec).

Torch-free, so that a method spec is parsed and checked before torch and transformers
load. Their caches live in kvstress/caches/, one file each, which maps each policy's name
to its cache (caches.IMPLEMENTATIONS): the caches know the policies, not the other way.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SpecError
from .policy import Params, Policy

# -- baseline (caches/baseline.py) ------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BaselineParams(Params):
    pass


BASELINE = Policy(
    name="baseline",
    params=BaselineParams,
    description="the full cache: every token kept (transformers' DynamicCache)",
    cache=None,  # kvstress.caches.IMPLEMENTATIONS
    in_all=True,
)


# -- streaming (caches/streaming.py) ----------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StreamingParams(Params):
    sink: int = 4
    capacity: int
    rest = "recent tokens"


STREAMING = Policy(
    name="streaming",
    params=StreamingParams,
    description="StreamingLLM: S attention sinks + the C - S most recent tokens (S = 0: window attention)",
    cache=None,  # kvstress.caches.IMPLEMENTATIONS
    in_all=True,
)


# -- h2o (caches/h2o.py) ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class H2OParams(Params):
    sink: int = 4
    window: int | None = None
    capacity: int
    min_window = 1  # the newest token, whose mass so far is its attention to itself
    rest = "heavy hitters"

    @property
    def heavy_hitters(self) -> int:
        """Slots left for the tokens chosen by accumulated attention."""
        return self.capacity - self.sink - self.window


H2O = Policy(
    name="h2o",
    params=H2OParams,
    description="H2O: S sinks + W most recent + the tokens with the most attention accumulated so far",
    cache=None,  # kvstress.caches.IMPLEMENTATIONS
    in_all=True,
)


# -- tova (caches/tova.py) --------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TOVAParams(Params):
    sink: int = 0
    capacity: int
    rest = "attended tokens"


TOVA = Policy(
    name="tova",
    params=TOVAParams,
    description="TOVA (the authors'): S sinks + the tokens the newest query attends to most, "
                "averaged over the layer's heads, one eviction shared by the layer's heads",
    cache=None,  # kvstress.caches.IMPLEMENTATIONS
    per_head=False,
)

TOVA_PER_HEAD = Policy(
    name="tovahead",
    params=TOVAParams,
    description="kvstress's per-KV-head TOVA variant: each KV head keeps the tokens its query group "
                "attends to most",
    cache=None,  # kvstress.caches.IMPLEMENTATIONS
)


# -- knorm (caches/knorm.py) ------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class KeyNormParams(Params):
    sink: int = 0
    window: int = 0
    full_layers: int = 2
    capacity: int
    rest = "low-norm keys"

    def check(self) -> None:
        if self.full_layers < 0:
            raise SpecError(f"full_layers must be 0 or more, got {self.full_layers}")


KEY_NORM = Policy(
    name="knorm",
    params=KeyNormParams,
    description="key norm (the authors'): the first F layers whole, elsewhere each KV head keeps the keys with "
                "the smallest L2 norm; S sinks and W recent optional",
    cache=None,  # kvstress.caches.IMPLEMENTATIONS
)


# -- random_eviction (caches/random_eviction.py) ----------------------------------------


@dataclass(frozen=True, kw_only=True)
class RandomParams(Params):
    sink: int = 4
    window: int | None = None
    capacity: int
    rest = "random tokens"


RANDOM = Policy(
    name="random",
    params=RandomParams,
    description="random eviction (the control): S sinks + W most recent + tokens kept at random, seeded",
    cache=None,  # kvstress.caches.IMPLEMENTATIONS
)


# -- quantized (caches/quantized.py) ----------------------------------------------------


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


QUANTIZED = Policy(
    name="quant",
    params=QuantizedParams,
    description="quantized KV (optimum-quanto): every token kept in B bits, the R most recent in full precision",
    cache=None,  # kvstress.caches.IMPLEMENTATIONS
)


# In this order in the registry (`kvstress policies`, `--method all`).
BUILTIN_POLICIES = (BASELINE, STREAMING, H2O, TOVA, TOVA_PER_HEAD, KEY_NORM, RANDOM, QUANTIZED)
