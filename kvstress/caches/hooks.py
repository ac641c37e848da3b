"""Links between a model and the compressed caches it runs with, through transformers' attention interface.

transformers 5.x hands a cache's update() the keys and values but never the queries,
which attention-scored policies (H2O, TOVA) need. Every modern family runs its attention
kernel through `ALL_ATTENTION_FUNCTIONS.get_interface(...)`, and hands it the queries as
the model rotated them, the keys and values the cache's update() returned, the mask, the
scaling and the family's own extras (softcap, attention sinks) — whatever the
projections are called or however they are fused (Phi-3's qkv_proj, GPT-NeoX's
query_key_value). kvstress wraps that lookup once per process: the kernel the
model asked for (SDPA, its own eager function, flash) is still the one that runs, and
when a kvstress cache layer has just been updated (`base.HANDOFF`), the layer sees what
the kernel is about to get first, and after the kernel the layer ends its part of the
forward (after the last layer, the cache evicts in every layer at once). For any other
cache the wrapper is one attribute read. Falcon's attention calls torch's SDPA itself
right after its cache update, with the same inputs; for such a model kvstress wraps that
function the same way (its eager and flash branches compute attention inline and are refused).

A forward pre-hook on the model itself (whatever its modules are called) starts each
forward clean, and in shifted mode lets the model position the new tokens right after
the kept ones (a caller such as generate() passes absolute position_ids).

Which families can be served is decided before anything runs: the layer types
transformers' own DynamicCache would build from the config (sliding-window layers keep
the model's window, as do Llama 4's chunked ones, and the others are compressed; a model
whose every layer attends within one window has them all compressed and masked to it;
recurrent layers, models chunked everywhere and models whose sliding windows differ in
size are refused by name), whether the attention modules' code looks its kernel up in the
interface or calls SDPA (Bloom's and MPT's do neither), and for shifted positions, the
model's own rotary embedding and `apply_rotary_pos_emb` (`Rotary`).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .base import HANDOFF, CompressedCache, UnsupportedModelError

_LINKS_ATTRIBUTE = "_kvstress_attention_links"

# Layer types that hold a recurrent state (Mamba, linear attention, convolutions), not tokens.
_RECURRENT = ("mamba", "conv", "linear_attention", "hybrid", "hybrid_sliding", "recurrent", "rwkv")
# Rotary types whose frequencies depend on how long the sequence is: a key cannot be turned
# from one position to another with one table.
_LENGTH_DEPENDENT_ROPE = ("dynamic",)
# Layers the model bounds itself, kept as transformers' DynamicCache keeps them (a window).
_BOUNDED_BY_THE_MODEL = ("sliding_attention", "chunked_attention")
# Families whose full-attention layers have no rotary (only their sliding-window layers do).
_ROTARY_ON_SLIDING_LAYERS_ONLY = ("cohere2",)


@dataclass
class Rotary:
    """The model's own rotary code, which shifted positions use to move cached keys.

    A key the model rotated at position p becomes the key at position p + d by the
    model's rotation by d, for every rotary layout (rotate-half, interleaved, partial):
    each is a set of planar rotations by angles proportional to the position.
    """

    embedding: nn.Module | None  # cos, sin = embedding(x, position_ids)
    # The modeling file's apply_rotary_pos_emb(q, k, cos, sin), or (rotates_one) (x, cos, sin) as Gemma 4's.
    apply: Callable | None
    rotates_one: bool
    # The leading dims the model hands apply_rotary_pos_emb, passing the rest through itself
    # (Phi-2, StableLM: their attention's `rotary_ndims`); None: the whole head.
    rotated_dims: int | None
    # The table an embedding with one per layer type (Gemma 3, OLMo 3) is asked for: that of
    # the layers compressed caches serve (the global ones, or all where every layer is
    # sliding); None: it has one table.
    layer_type: str | None
    unrotated_layers: frozenset[int]  # layers the model gives no rotary (SmolLM3's NoPE layers)
    refusal: str | None  # why shifted positions are refused for this model, else None

    def __post_init__(self):
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def turn(self, keys: torch.Tensor, by: torch.Tensor, span: int) -> torch.Tensor:
        """keys [batch, heads, n, dim] rotated as the model rotates them, each rotated by
        `by` [batch, heads, n] positions more (|by| <= span), with the model's own
        apply_rotary_pos_emb, given what the model gives it: the whole head, or its leading
        `rotated_dims`."""
        cos, sin = self.table(span, keys)
        batch, heads, n, dim = keys.shape
        rotated = dim if self.rotated_dims is None else self.rotated_dims
        flat = keys.reshape(batch * heads, 1, n, dim)  # the model's function broadcasts cos over dim 1
        if rotated < dim:
            flat = flat[..., :rotated]
        index = (by + cos.shape[0] // 2).view(batch * heads, n)
        if self.rotates_one:
            turned = self.apply(flat, cos[index], sin[index])
        else:  # the function rotates a query and a key; the keys go in as both
            _, turned = self.apply(flat, flat, cos[index], sin[index])
        turned = turned.view(batch, heads, n, rotated)
        return turned if rotated == dim else torch.cat((turned, keys[..., rotated:]), dim=-1)

    def table(self, span: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [2 * size + 1, rotary_dim] for positions -size..size (size >= span), from
        the model's rotary module; kept and doubled as needed, so a step rarely builds one."""
        table = self._table
        if table is None or table[0].shape[0] // 2 < span or table[0].dtype != like.dtype or table[0].device != like.device:
            size = max(span, table[0].shape[0] if table is not None else 64)
            positions = torch.arange(-size, size + 1, device=like.device).unsqueeze(0)
            per_type = {} if self.layer_type is None else {"layer_type": self.layer_type}
            cos, sin = self.embedding(like, positions, **per_type)
            # YaRN and LongRoPE scale cos and sin by an attention factor the model applies once,
            # at the first rotation: a turn must not apply it again.
            prefix = "" if self.layer_type is None else f"{self.layer_type}_"
            factor = getattr(self.embedding, f"{prefix}attention_scaling", 1.0)
            self._table = table = (cos[0] / factor, sin[0] / factor) if factor != 1.0 else (cos[0], sin[0])
        return table


@dataclass
class AttentionLinks:
    """What caches need to know about a model: its attention layers and its rotary code."""

    num_layers: int
    rotary_embedding: Rotary
    # Hybrid models: layer index → the model's window, for its sliding-window layers (kept as
    # the model keeps them, not compressed); empty otherwise.
    sliding_windows: dict[int, int]
    # The window every layer attends within (Mistral v0.1, Phi-3 mini, Starcoder 2 with
    # sliding_window set): all layers compressed, each also masked to the window; else None.
    window: int | None


def _cache_from(kwargs: dict):
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's attention modules: those holding a layer index whose class is an attention
    (whatever their projections are called), outermost only."""
    found = [module for module in model.modules()
             if hasattr(module, "layer_idx") and type(module).__name__.endswith("Attention")]
    inner = {id(sub) for module in found for sub in module.modules() if sub is not module}
    return [module for module in found if id(module) not in inner]


# -- the attention interface -------------------------------------------------------------------

_WRAPPED: dict[Callable, Callable] = {}


def _linked(kernel: Callable) -> Callable:
    """`kernel` (the attention function a model looked up), run as is, with the kvstress
    layer updated just before it (if any) seeing its inputs first and told when it is done."""
    wrapped = _WRAPPED.get(kernel)
    if wrapped is None:
        def wrapped(module, query, key, value, attention_mask, *args, **kwargs):
            layer = HANDOFF.layer
            if layer is None or getattr(module, "layer_idx", layer.layer_idx) != layer.layer_idx:
                return kernel(module, query, key, value, attention_mask, *args, **kwargs)
            HANDOFF.layer = None
            attention_mask = layer.before_attention(query, key, attention_mask, kwargs)
            output = kernel(module, query, key, value, attention_mask, *args, **kwargs)
            layer.after_attention()
            return output

        wrapped = _WRAPPED[kernel] = wrapped
    return wrapped


_plain_get_interface = AttentionInterface.get_interface


def _get_interface(self, attn_implementation: str, default: Callable) -> Callable:
    return _linked(_plain_get_interface(self, attn_implementation, default))


def _install_interface() -> None:
    """Once per process: the models' lookup of their attention kernel returns it linked."""
    if ALL_ATTENTION_FUNCTIONS.get_interface.__func__ is not _get_interface:
        AttentionInterface.get_interface = _get_interface


# -- attention that calls SDPA itself ----------------------------------------------------------

_plain_sdpa = torch.nn.functional.scaled_dot_product_attention


def _linked_sdpa(query, key, value, attn_mask=None, *args, **kwargs):
    """torch's SDPA, with the kvstress layer updated just before it seeing its inputs first.

    Falcon's attention calls SDPA itself, right after its cache update, instead of looking a
    kernel up in the interface; the interface's own SDPA kernel calls it too, but the linked
    interface has taken the layer by then, so for any other caller this is one attribute read.
    """
    layer = HANDOFF.layer
    if layer is None:
        return _plain_sdpa(query, key, value, attn_mask, *args, **kwargs)
    HANDOFF.layer = None
    attn_mask = layer.before_attention(query, key, attn_mask, {"scaling": kwargs.get("scale")})
    output = _plain_sdpa(query, key, value, attn_mask, *args, **kwargs)
    layer.after_attention()
    return output


def _install_sdpa() -> None:
    """Once per process, for models whose attention calls SDPA itself (Falcon)."""
    torch.nn.functional.scaled_dot_product_attention = _linked_sdpa


def _outside_interface(attention: type) -> bool:
    """Whether an attention class's modeling file never looks its kernel up in the interface."""
    return not hasattr(sys.modules[attention.__module__], "ALL_ATTENTION_FUNCTIONS")


def _calls_sdpa_itself(attention: type) -> bool:
    """Whether an attention class's forward runs torch's SDPA itself, after its cache update (Falcon)."""
    try:
        return "scaled_dot_product_attention(" in inspect.getsource(attention.forward)
    except (OSError, TypeError):
        return False


# -- which models ------------------------------------------------------------------------------


_BASELINE = "use baseline (the full cache) with this model"


def state_refusal(model: nn.Module) -> str | None:
    """Why `model`'s cache is not (only) tokens that a policy could evict or quantize, or None."""
    config = model.config.get_text_config(decoder=True)
    state_layers = [kind for kind in _layer_types(config) if kind in _RECURRENT]
    if (state_layers or getattr(config, "state_size", None) or getattr(config, "ssm_state_size", None)
            or getattr(config, "mamba_d_state", None)):
        return (f"{type(model).__name__} keeps a recurrent state (Mamba / linear-attention layers), which is not "
                f"a token cache: compressed caches cannot evict from it or quantize it; {_BASELINE}")
    return None


def _refusal(model: nn.Module, config) -> str | None:
    """Why compressed caches cannot serve `model` faithfully, or None."""
    name = type(model).__name__
    baseline = _BASELINE
    state = state_refusal(model)
    if state:
        return state
    modules = attention_modules(model)
    if not modules:
        return f"{name} has no attention layers that transformers' attention interface runs; {baseline}"
    # A modeling file that never looks its kernel up in the interface (Bloom, MPT) runs
    # attention where no cache layer can see the queries, unless it calls torch's SDPA
    # itself (Falcon loaded with SDPA: its eager and flash branches compute attention inline).
    outside = {attention.__name__ for attention in {type(module) for module in modules}
               if _outside_interface(attention)
               and not (_calls_sdpa_itself(attention) and config._attn_implementation == "sdpa")}
    if outside:
        return (f"{name}'s attention ({', '.join(sorted(outside))}) does not run through transformers' attention "
                f"interface or torch's SDPA, where compressed caches see the queries: {baseline}, or quant_B_R")
    kinds = set(_layer_types(config))
    if getattr(config, "num_kv_shared_layers", 0):
        return (f"{name}'s last {config.num_kv_shared_layers} layers attend with the keys and values of earlier ones "
                f"(KV sharing), which a compressed cache's slots would move under them: {baseline}")
    if "chunked_attention" in kinds and "full_attention" not in kinds:
        return (f"{name} attends within fixed chunks of absolute positions in every layer, which a compressed "
                f"cache's slots do not keep, and has no global layer to compress: {baseline}")
    if kinds == {"sliding_attention"} and len(set(_sliding_windows(config).values())) > 1:
        return f"{name} has sliding windows of different sizes on every layer, which compressed caches do not serve: {baseline}"
    if kinds - set(_BOUNDED_BY_THE_MODEL) - {"full_attention"}:
        others = ", ".join(sorted(kinds - set(_BOUNDED_BY_THE_MODEL) - {"full_attention"}))
        return f"{name} has layers of type {others}, which compressed caches do not serve: {baseline}"
    if getattr(config, "alibi", False):
        return (f"{name} uses ALiBi position biases, which follow the slots rather than the tokens kept: "
                f"{baseline}, or a config with rotary embeddings")
    return None


def _layer_types(config) -> list[str]:
    """The kind of each layer, as transformers' DynamicCache reads it from the config."""
    return get_layer_types_and_kwargs(config)[0]


def _sliding_windows(config) -> dict[int, int]:
    """Layer index → window, for the layers transformers' DynamicCache keeps in a sliding window:
    sliding ones, and Llama 4's chunked ones, kept the same way (the last chunk-size - 1 tokens;
    only their mask differs, which transformers builds)."""
    kinds, options = get_layer_types_and_kwargs(config)
    if isinstance(options, dict):  # transformers before per-layer options: the same for every layer
        options = [options] * len(kinds)
    return {index: option["sliding_window"] for index, (kind, option) in enumerate(zip(kinds, options))
            if kind in _BOUNDED_BY_THE_MODEL}


def _rotary(model: nn.Module, config) -> Rotary:
    """The model's own rotary embedding and rotation, or why shifted positions are refused."""
    name = type(model).__name__
    embeddings = [module for module in model.modules() if type(module).__name__.endswith("RotaryEmbedding")]
    apply = getattr(sys.modules[type(model).__module__], "apply_rotary_pos_emb", None)
    no_rope = getattr(config, "no_rope_layers", None)  # SmolLM3, Llama 4: 1 where a layer has rotary
    unrotated = frozenset(index for index, rotated in enumerate(no_rope or []) if not rotated)
    kinds = set(_layer_types(config))
    # The layers compressed caches serve: the global ones, or every layer where all are sliding.
    served = "sliding_attention" if kinds == {"sliding_attention"} else "full_attention"
    if config.model_type in _ROTARY_ON_SLIDING_LAYERS_ONLY and served == "full_attention":
        unrotated = frozenset(range(config.num_hidden_layers))  # with sliding layers, shifted is refused below
    rope = getattr(config, "rope_parameters", None) or {}
    if served in rope and rope[served] is None:  # Beam: rotary on its sliding layers only
        unrotated = frozenset(range(config.num_hidden_layers))
    rope = rope.get(served, rope) or {}  # one set per layer type (Gemma 3, OLMo 3): the served layers'
    rope_type = rope.get("rope_type", "default")
    arguments = list(inspect.signature(apply).parameters) if apply is not None else []
    arguments = arguments[:3] if arguments[:1] == ["x"] else arguments[:4]
    refusal = None
    why_not = None
    if getattr(config, "kv_lora_rank", None):
        # DeepSeek caches a latent per token and, apart, the rotated part of its key, which it
        # rotates with a layout of its own (complex numbers, or interleaved pairs).
        why_not = "caches multi-head latent attention's latents, with the rotary part of the keys apart"
    elif not embeddings or apply is None or arguments not in (["q", "k", "cos", "sin"], ["x", "cos", "sin"]):
        why_not = "has no rotary embedding that kvstress can call"  # GPT-J's: (tensor, sin, cos), interleaved
    elif "full_attention" in kinds and kinds & set(_BOUNDED_BY_THE_MODEL):
        # A hybrid's sliding layers keep the model's window, whose keys are not the cache's to turn,
        # and the model masks them by absolute position: moved, tokens would fall in or out of it.
        why_not = "has sliding-window layers, whose window the model counts in absolute positions"
    elif len(embeddings) > 1:
        why_not = "has several rotary embeddings"
    elif rope_type in _LENGTH_DEPENDENT_ROPE:
        why_not = f"uses {rope_type} rotary scaling, whose frequencies change with the length"
    if why_not:
        refusal = (f"{name} {why_not}: shifted positions re-rotate cached keys with the model's own rotary code; "
                   "use --positions original")
    embedding = embeddings[0] if embeddings and not why_not else None
    rotated_dims = getattr(attention_modules(model)[0], "rotary_ndims", None)
    per_type = embedding is not None and "layer_type" in inspect.signature(embedding.forward).parameters
    return Rotary(embedding, apply, arguments[:1] == ["x"], rotated_dims, served if per_type else None, unrotated,
                  refusal)


def attach(model: nn.Module) -> AttentionLinks:
    """Link `model` to kvstress's caches once and return what caches need to know about it."""
    existing = getattr(model, _LINKS_ATTRIBUTE, None)
    if existing is not None:
        return existing
    config = model.config.get_text_config(decoder=True)
    refusal = _refusal(model, config)
    if refusal:
        raise UnsupportedModelError(refusal)
    _install_interface()
    if any(_outside_interface(attention) for attention in {type(module) for module in attention_modules(model)}):
        _install_sdpa()  # the refusal above let it through: its attention calls SDPA itself
    windows = _sliding_windows(config)
    every_layer = len(windows) == config.num_hidden_layers
    links = AttentionLinks(num_layers=config.num_hidden_layers, rotary_embedding=_rotary(model, config),
                           sliding_windows={} if every_layer else windows,
                           window=next(iter(windows.values())) if every_layer else None)

    def before_forward(module, args, kwargs):
        # A forward that failed half-way (out of memory) must not leave its last layer waiting.
        HANDOFF.layer = None
        cache = _cache_from(kwargs)
        if isinstance(cache, CompressedCache) and cache.shifted and kwargs.get("position_ids") is not None:
            # Positions inside the cache: the model counts them from the cache's length.
            kwargs["position_ids"] = None
            return args, kwargs
        return None

    model.register_forward_pre_hook(before_forward, with_kwargs=True)
    setattr(model, _LINKS_ATTRIBUTE, links)
    return links
