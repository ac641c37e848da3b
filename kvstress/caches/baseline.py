"""The full cache: every token kept, transformers' own `DynamicCache`."""

from __future__ import annotations

from transformers import DynamicCache


def full_cache(spec, model) -> DynamicCache:
    return DynamicCache(config=model.config)
