"""The full cache: every token kept, transformers' own `DynamicCache`."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import DynamicCache

from ..spec import Params, Policy


@dataclass(frozen=True, kw_only=True)
class BaselineParams(Params):
    pass


def full_cache(spec, model) -> DynamicCache:
    return DynamicCache(config=model.config)


POLICY = Policy(
    name="baseline",
    params=BaselineParams,
    description="the full cache: every token kept (transformers' DynamicCache)",
    cache=full_cache,
    in_all=True,
)
