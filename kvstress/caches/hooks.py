"""Links between a model's attention modules and the compressed caches it runs with.

transformers 5.x does not hand the cache the queries, nor the attention function the
cache, so a compressed cache learns what it needs from forward hooks (the way kvpress
does it), installed once per model and inert for any other cache:

  pre-hook on the attention module   finds the cache in the forward's kwargs, gives the
                                     layer the RoPE cos/sin of this forward's tokens, and
                                     in shifted mode replaces them with positions inside
                                     the cache
  hooks on q_proj / k_proj           hand the layer the query (H2O scores) and the keys
                                     before rotation (shifted mode), at no extra matmul
  hook after the attention module    ends the layer's part of the forward; after the last
                                     layer the cache evicts back to capacity in every layer

A cache with whole (uncompressed) layers beside compressed ones also gets each layer's
causal mask from the pre-hook: transformers makes one per forward, for layer 0's count
of cached tokens.

The model's own attention (SDPA) runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import KvstressError

_LINKS_ATTRIBUTE = "_kvstress_attention_links"


class UnsupportedModelError(KvstressError, ValueError):
    """The model's attention is not the Llama-style attention the compressed caches hook into."""


@dataclass
class _AttentionLink:
    """What one attention module's hooks share during a forward."""

    layer_idx: int
    head_dim: int
    scaling: float
    active_cache: object | None = None


@dataclass
class AttentionLinks:
    rotary_embedding: nn.Module | None
    links: list[_AttentionLink] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.links)


def _cache_from(kwargs: dict):
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _split_heads(projection: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[batch, q, heads * head_dim] (or [batch, q, heads, head_dim]) → [batch, heads, q, head_dim]."""
    batch, length = projection.shape[:2]
    return projection.reshape(batch, length, -1, head_dim).transpose(1, 2)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The Llama-style attention modules of `model` (those with q_proj, k_proj and a layer_idx)."""
    return [
        module
        for module in model.modules()
        if hasattr(module, "layer_idx") and hasattr(module, "q_proj") and hasattr(module, "k_proj")
    ]


def _rotary_module(model: nn.Module) -> nn.Module | None:
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):
            return module
    return None


def attach(model: nn.Module) -> AttentionLinks:
    """Install the hooks on `model` once and return what caches need to know about it."""
    existing = getattr(model, _LINKS_ATTRIBUTE, None)
    if existing is not None:
        return existing
    from .base import CompressedCache  # the hooks only act for kvstress's own caches

    modules = attention_modules(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    expected = getattr(config, "num_hidden_layers", None)
    if not modules or (expected is not None and len(modules) != expected):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no Llama-style attention (q_proj/k_proj with a layer_idx) in every "
            "layer: compressed caches support Llama, Qwen2, Mistral and similar decoder-only models"
        )
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        layer_types = getattr(config, "layer_types", None) or []
        if any(kind != "full_attention" for kind in layer_types):
            raise UnsupportedModelError(
                f"{type(model).__name__} uses sliding-window attention layers, which compressed caches do not support"
            )
    links = AttentionLinks(rotary_embedding=_rotary_module(model))

    for module in sorted(modules, key=lambda m: m.layer_idx):
        link = _AttentionLink(
            layer_idx=module.layer_idx,
            head_dim=module.head_dim,
            scaling=float(getattr(module, "scaling", module.head_dim**-0.5)),
        )
        links.links.append(link)

        def before_attention(module, args, kwargs, link=link):
            cache = _cache_from(kwargs)
            if not isinstance(cache, CompressedCache):
                link.active_cache = None
                return None
            link.active_cache = cache
            layer = cache.layers[link.layer_idx]
            layer.scaling = link.scaling
            rope = kwargs.get("position_embeddings")
            if layer.shifted:
                hidden_states = args[0] if args else kwargs["hidden_states"]
                length = hidden_states.shape[1]
                rope = cache.rope_in_cache(layer.kept, length, hidden_states)
                kwargs["position_embeddings"] = rope
            layer.rope = rope
            mask = kwargs.get("attention_mask")
            if cache.whole_layers and isinstance(mask, torch.Tensor) and mask.dim() == 4:
                # transformers builds one mask, from layer 0's sizes; whole and compressed
                # layers hold different counts of tokens, so the other kind gets its own.
                length = (args[0] if args else kwargs["hidden_states"]).shape[1]
                kwargs["attention_mask"] = cache.mask_for(layer, mask, length)
            return args, kwargs

        def after_attention(module, args, kwargs, output, link=link):
            if link.active_cache is not None:
                link.active_cache.layers[link.layer_idx].after_attention()
                link.active_cache = None

        def capture_query(module, args, output, link=link):
            if link.active_cache is not None:
                layer = link.active_cache.layers[link.layer_idx]
                if layer.wants_query:
                    layer.query = _split_heads(output, link.head_dim)

        def capture_keys(module, args, output, link=link):
            if link.active_cache is not None:
                layer = link.active_cache.layers[link.layer_idx]
                if layer.shifted:
                    layer.raw_keys = _split_heads(output, link.head_dim)

        module.register_forward_pre_hook(before_attention, with_kwargs=True)
        module.register_forward_hook(after_attention, with_kwargs=True)
        # Models that normalise q/k per head (Qwen3, OLMo2) do it after the projection.
        (getattr(module, "q_norm", None) or module.q_proj).register_forward_hook(capture_query)
        (getattr(module, "k_norm", None) or module.k_proj).register_forward_hook(capture_keys)

    setattr(model, _LINKS_ATTRIBUTE, links)
    return links
