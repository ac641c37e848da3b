"""The fixed-capacity cache every evicting policy shares (StreamingLLM, H2O, TOVA, ...).

A `CompressedCache` keeps every layer's tokens in buffers stacked over the layers,
allocated once and never concatenated:

    keys, values   [layers, batch, kv_heads, slots, head_dim]
    positions      [layers, batch, kv_heads, slots]   each slot's absolute position
    policy state   e.g. H2O's scores [layers, batch, kv_heads, slots] (see scored.py)

and gives transformers one `FixedCapacityLayer` per attention layer, a view of its
layer's slots:

    slots  [0, n)            tokens kept from earlier forwards (n <= capacity + lazy)
    slots  [n, n + q)        the q tokens of the current forward, written in place

Attention sees all n + q slots. Every layer sees the same tokens, so n, the count of
tokens seen and when to evict belong to the cache, not to a layer. Right after the last
layer's attention kernel (transformers' attention interface, see `hooks.py`) the cache evicts back to capacity in
every layer at once if the forward ran over: the policy ranks each (layer, sequence,
head)'s slots with `eviction_priority()` (lowest goes first), and the survivors of the
tail [capacity, n + q) are copied into the holes the victims left below `capacity`.
One set of small ops per forward, not one per layer: on CPU each op costs microseconds
of dispatch, on GPU a kernel launch, and a decode step is made of little else. With
keys rotated before they are cached, attention does not care about slot order.

Layers the model bounds itself with a sliding window (Gemma 2 / 3, Cohere 2, OLMo 3,
GPT-OSS) are not stacked: each keeps the model's window as transformers' DynamicCache
does (`SlidingLayer`), and only the global layers are compressed. A model whose every
layer attends within one window W (Mistral v0.1, Phi-3 mini) has them all compressed to
a capacity below W - 1, and its mask keeps the window: a new token sees the kept tokens
less than W positions before it (`window_mask`), the others are held but hidden.

Positions (`positions="original"` or `"shifted"`):
  original  keys keep their absolute RoPE positions (the H2O paper); `get_seq_length`
            counts every token seen, so the model rotates new tokens at their
            absolute position.
  shifted   positions inside the cache (the StreamingLLM paper): the query sits right
            after the kept tokens, and each kept key is seen at its rank among them.
            Keys are stored as the model rotated them (with its own rotary code,
            whatever its variant) and, once evictions have closed gaps, turned on every
            forward by the difference between the position they were rotated at and
            the one they are seen at, again with the model's own rotary code; until
            the first eviction that difference is zero and nothing is turned.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from ..errors import KvstressError, SpecError
from ..policy import POSITION_MODES
from .contract import choose_victims


class UnsupportedModelError(KvstressError, ValueError):
    """A model (or a position mode) the compressed caches cannot serve faithfully: the message
    names the family, why, and what to run instead."""


class _Handoff:
    """The cache layer whose update() the model called last: that layer's attention kernel
    comes next, and the attention interface (hooks.py) picks the layer up there. A model
    runs its layers one after the other, so one slot is enough."""

    layer: LinkedLayer | None = None


HANDOFF = _Handoff()


class LinkedLayer(CacheLayerMixin):
    """What the attention interface (hooks.py) hands every layer of a `CompressedCache`."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner: CompressedCache, layer_idx: int):
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.shifted = owner.shifted

    @property
    def kept(self) -> int:
        """Tokens held from earlier forwards: where this forward's first token goes."""
        raise NotImplementedError

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The mask works in slot space: query i of this forward sits at slot kept + i.
        return self.kept + query_length, 0

    def get_max_length(self) -> int:
        return -1  # streams without limit; capacity bounds what is held, not what is seen

    def _hand_over(self) -> None:
        """End of update(): the model's attention kernel for this layer comes next."""
        waiting = HANDOFF.layer
        if waiting is not None and waiting.owner is self.owner:
            raise UnsupportedModelError(
                f"the model ran layer {waiting.layer_idx}'s attention without transformers' attention interface or SDPA, "
                "where compressed caches see the queries: use baseline or quant_B_R with this model")
        HANDOFF.layer = self

    def before_attention(self, query: torch.Tensor, keys: torch.Tensor, mask, options: dict):
        """Called by the attention interface (hooks.py) with what the kernel is about to get:
        query [batch, heads, q, head_dim] as the model rotated it, the keys this layer's
        update returned, the mask and the kernel's keyword arguments (scaling, softcap, s_aux).
        Returns the mask the kernel is to use."""
        if self.owner.whole_layers and isinstance(mask, torch.Tensor) and mask.dim() == 4:
            # transformers builds one mask, from layer 0's sizes; whole and compressed
            # layers hold different counts of tokens, so the other kind gets its own.
            return self.owner.mask_for(mask, query.shape[2], keys.shape[2])
        return mask

    def after_attention(self) -> None:
        """The kernel has used the slots; after the model's last layer the cache evicts."""
        if self.layer_idx == self.owner.num_layers - 1:
            self.owner.end_forward()


class WholeLayer(LinkedLayer):
    """A layer the policy leaves uncompressed (key norm's first layers): every token kept,
    appended as transformers' DynamicLayer does. Its keys are stored as the model rotates
    them, at positions that are absolute and inside the cache alike, since it never evicts."""

    def __init__(self, owner: CompressedCache, layer_idx: int):
        super().__init__(owner, layer_idx)
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def kept(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.keys, self.values = key_states, value_states
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.layer_idx == 0:
            self.owner.begin_forward(key_states.shape[2])
        if self.keys is None:
            self.lazy_initialization(key_states, value_states)
        else:
            self.keys = torch.cat((self.keys, key_states), dim=2)
            self.values = torch.cat((self.values, value_states), dim=2)
        self._hand_over()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.kept

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def kept_positions(self) -> torch.Tensor:
        if self.keys is None:
            return torch.empty(0, 0, 0, dtype=torch.long)
        batch, heads = self.keys.shape[:2]
        return torch.arange(self.kept, device=self.keys.device).expand(batch, heads, -1)


class SlidingLayer(LinkedLayer):
    """A layer the model bounds itself with a sliding window (Gemma 2 / 3's local layers):
    kept exactly as transformers' DynamicCache keeps it, the last `window - 1` tokens, by its
    own `DynamicSlidingWindowLayer`; the policy compresses the other layers only. Its slots
    are the window's tokens in order, so the mask transformers builds for it is right as is."""

    is_sliding = True

    def __init__(self, owner: CompressedCache, layer_idx: int, window: int):
        super().__init__(owner, layer_idx)
        self.window = DynamicSlidingWindowLayer(window)

    @property
    def kept(self) -> int:
        # The mask's row for this forward's first query (get_query_offset): every token seen,
        # as the window's slots start at the first token still held (get_mask_sizes' offset).
        return self.window.get_seq_length()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.window.lazy_initialization(key_states, value_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.layer_idx == 0:
            self.owner.begin_forward(key_states.shape[2])
        keys, values = self.window.update(key_states, value_states)
        self._hand_over()
        return keys, values

    def before_attention(self, query: torch.Tensor, keys: torch.Tensor, mask, options: dict):
        return mask  # built from a sliding layer's sizes, which every sliding layer shares

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.window.get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self.window.get_seq_length()

    def get_max_length(self) -> int:
        return self.window.get_max_length()

    def reset(self) -> None:
        self.window.reset()

    @property
    def nbytes(self) -> int:
        if not self.window.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.window.keys, self.window.values))

    def kept_positions(self) -> torch.Tensor:
        if not self.window.is_initialized:
            return torch.empty(0, 0, 0, dtype=torch.long)
        batch, heads, held = self.window.keys.shape[:3]
        seen = self.window.get_seq_length()
        return torch.arange(seen - held, seen, device=self.window.keys.device).expand(batch, heads, -1)


class FixedCapacityLayer(LinkedLayer):
    """One compressed layer's view of a `CompressedCache`; what to evict is the cache's call."""

    def __init__(self, owner: CompressedCache, layer_idx: int, stack_index: int):
        super().__init__(owner, layer_idx)
        self.stack_index = stack_index  # this layer's index in the cache's stacked buffers
        # Shifted positions turn this layer's keys: not where the model gives it no rotary (NoPE layers).
        self.turns = owner.shifted and layer_idx not in owner.rotary.unrotated_layers
        # This layer's slice of the cache's buffers ([batch, kv_heads, slots(, head_dim)]),
        # set when the cache allocates them.
        self.positions: torch.Tensor | None = None
        # In a model that attends within a window on every layer, once some kept token has left
        # it: which slots each new token sees ([batch, kv_heads, q, total]); else None.
        self.visible: torch.Tensor | None = None

    @property
    def kept(self) -> int:
        return self.owner.kept

    def before_attention(self, query: torch.Tensor, keys: torch.Tensor, mask, options: dict):
        mask = super().before_attention(query, keys, mask, options)
        if self.owner.model_window is None:
            return mask
        mask, self.visible = self.owner.window_mask(self, query.shape[1], keys.shape[2], mask)
        return mask

    @property
    def seen(self) -> int:
        return self.owner.seen

    @property
    def capacity(self) -> int:
        return self.owner.capacity

    def _attach(self, buffers: dict[str, torch.Tensor]) -> None:
        """Take this layer's slices of the cache's (re)allocated buffers."""
        for name, buffer in buffers.items():
            view = buffer[self.stack_index]
            # A compiled step's graph takes these views as inputs of their own: unmarked, a
            # write into one makes inductor skip the CUDA graph ("mutated inputs").
            torch._dynamo.mark_static_address(view)
            setattr(self, name, view)
        self.is_initialized = True

    def _view(self, name: str, start: int, stop: int) -> torch.Tensor:
        """This layer's `buffer[:, :, start:stop]` for the buffer called `name`, made once per range."""
        return self.owner.cached_view((name, self.stack_index, start, stop),
                                      lambda: getattr(self, name)[:, :, start:stop])

    # -- the transformers layer interface ---------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a compressed cache allocates its buffers for all layers at the first layer's update")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        owner = self.owner
        if self.layer_idx == 0:
            owner.begin_forward(key_states.shape[2])
        elif owner.pending_total is None:
            raise RuntimeError("kvstress cache: layer 0 must be updated first in each forward")
        if self.stack_index == 0:
            owner.open_slots(key_states, value_states)
        start, total = owner.kept, owner.pending_total
        self._view("keys", start, total).copy_(key_states)
        self._view("values", start, total).copy_(value_states)
        keys = self._view("keys", 0, total)
        if self.turns and owner.evicted:
            keys = self._turn_to_rank(keys, total)
        self._hand_over()
        return keys, self._view("values", 0, total)

    def get_seq_length(self) -> int:
        # What the model adds to arange(q) to position new tokens when the caller gives no
        # position_ids: absolute positions, or positions inside the cache.
        return self.kept if self.shifted else self.seen

    def reset(self) -> None:
        if self.layer_idx == 0:
            self.owner.reset_buffers()

    # -- per-layer work ------------------------------------------------------------

    def _turn_to_rank(self, keys: torch.Tensor, total: int) -> torch.Tensor:
        """Shifted mode: each key turned from the position the model rotated it at to its
        rank among the kept tokens, offset as the model offsets this forward's first new
        token from its slot (zero unless whole layers set the model's positions)."""
        turn = self.ranks(total) + self.owner.rank_offset - self._view("rotated_at", 0, total)
        # Ranks and the positions keys were rotated at lie in [0, slots + offset), the offset
        # never shrinking: a bound known without reading `turn` back (a compiled step cannot).
        return self.owner.rotary.turn(keys, turn, span=self.owner.slots + self.owner.rank_offset)

    def ranks(self, total: int) -> torch.Tensor:
        """[batch, kv_heads, total] each slot's rank among the tokens held, by position (0 the oldest)."""
        return self._view("positions", 0, total).argsort(dim=-1).argsort(dim=-1)

    def kept_positions(self) -> torch.Tensor:
        """[batch, kv_heads, kept] absolute positions held, ascending."""
        if self.positions is None:
            return torch.empty(0, 0, 0, dtype=torch.long)
        return self.positions[:, :, : self.kept].sort(dim=-1).values


def _like(mask: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """`allowed` (boolean, True where a query may attend) in the form of `mask`: boolean, or additive."""
    if mask.dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=mask.dtype, device=mask.device).masked_fill_(
        ~allowed, torch.finfo(mask.dtype).min)


def _expand_index(index: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """Index [b, h, k] → the shape gather/scatter need for `buffer` ([b, h, slots] or [b, h, slots, d])."""
    if buffer.dim() == 3:
        return index
    return index.unsqueeze(-1).expand(-1, -1, -1, buffer.shape[-1])


class CompressedCache(Cache):
    """A transformers `Cache` of fixed-capacity layers, linked to the model it serves.

    Subclasses say what to evict (`eviction_priority`) and may keep per-slot state of
    their own (`buffer_names`, `_allocate_policy_buffers`, `_score_forward`). A policy
    whose spec has `full_layers` F leaves the model's first F layers whole (`WholeLayer`):
    they keep every token, and the buffers stack the other layers only. The layers the model
    bounds with a sliding window (`sliding_windows`, layer index → window) keep the model's
    window (`SlidingLayer`), neither stacked nor counted among the F whole ones.

    Memory: the buffers hold `capacity + lazy` slots between forwards, plus room for the
    longest forward's new tokens (`chunk`, sized once per run so that the buffers do not
    grow with the text). `held_bytes` counts the former, `nbytes` everything allocated.
    """

    layer_class: type[FixedCapacityLayer] = FixedCapacityLayer
    # Every buffer indexed by slot on its dim 3 (after layers, batch, heads); compaction moves them together.
    buffer_names: tuple[str, ...] = ("keys", "values", "positions")

    def __init__(self, spec, num_layers: int, rotary_embedding, *, positions: str = "original", lazy: int = 0,
                 seed: int = 0, chunk: int = 1, sliding_windows: dict[int, int] | None = None,
                 model_window: int | None = None):
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {', '.join(POSITION_MODES)}, got {positions!r}")
        if lazy < 0:
            raise ValueError(f"lazy eviction buffer must be 0 or more tokens, got {lazy}")
        if positions == "shifted" and (rotary_embedding is None or rotary_embedding.refusal):
            raise UnsupportedModelError(rotary_embedding.refusal if rotary_embedding is not None else
                                        "shifted positions need the model's rotary embedding: use --positions original")
        if chunk < 1:
            raise ValueError(f"chunk room must be 1 or more tokens, got {chunk}")
        sliding_windows = sliding_windows or {}
        whole = getattr(spec.params, "full_layers", 0)
        if whole >= num_layers - len(sliding_windows):
            raise SpecError(f"{spec.name} leaves its first {whole} layers uncompressed but the model has "
                            f"{num_layers - len(sliding_windows)} without a sliding window: use fewer full layers "
                            "than that, or the full cache (baseline)")
        self.spec = spec
        self.capacity = spec.capacity
        self.sink = spec.sink
        self.window = spec.window  # 0 for a policy without a recent window
        self.position_mode = positions
        self.shifted = positions == "shifted"
        self.lazy = lazy
        self.seed = seed  # for policies that draw random numbers
        self.num_layers = num_layers
        self.chunk = chunk
        self.model_window = model_window
        self.kept = 0  # n: slots holding tokens from earlier forwards, in every layer
        self.seen = 0  # tokens ever written, i.e. the next token's absolute position
        self.pending_total: int | None = None  # n + q while a forward is between its first update and eviction
        self.evicted = False  # whether any token was ever evicted (shifted keys are turned from then on)
        self.rank_offset = 0  # shifted mode: the model's position for this forward's first new token, less its slot
        self.first_new_position = 0  # the absolute position of the forward's first new token
        if self.shifted:  # the position each slot's key was rotated at moves with the slots
            self.buffer_names = type(self).buffer_names + ("rotated_at",)
        self.buffers: dict[str, torch.Tensor] = {}
        # Views of the buffers, made once each (see cached_view), by what they show.
        self._views: dict[tuple, torch.Tensor] = {}
        self.rotary = rotary_embedding  # the model's own rotary code (hooks.Rotary), for shifted mode
        # Set by CompiledDecode while a compiled one-token step runs: the new token's
        # absolute position then comes from `next_position` instead of Python ints.
        self.in_graph = False
        self.next_position: torch.Tensor | None = None
        self.next_position_synced = 0  # `seen` when next_position was last set
        layers: list[LinkedLayer] = []
        self.whole_layers: list[WholeLayer | SlidingLayer] = []
        self.stacked_layers: list[FixedCapacityLayer] = []
        for index in range(num_layers):
            if index in sliding_windows:
                layers.append(SlidingLayer(self, index, sliding_windows[index]))
            elif len(self.whole_layers) < whole:
                # Left whole, a layer of a model with a window everywhere keeps what the full cache keeps: the window.
                self.whole_layers.append(WholeLayer(self, index) if model_window is None
                                         else SlidingLayer(self, index, model_window))
                layers.append(self.whole_layers[-1])
            else:
                self.stacked_layers.append(self.layer_class(self, index, len(self.stacked_layers)))
                layers.append(self.stacked_layers[-1])
        # Layers holding tensors of their own, outside the stacked buffers: whole and sliding ones.
        self.unstacked_layers = [layer for layer in layers if not isinstance(layer, FixedCapacityLayer)]
        super().__init__(layers=layers)

    # -- buffers -------------------------------------------------------------------

    @property
    def slots(self) -> int:
        return self.buffers["keys"].shape[3] if self.buffers else 0

    def _allocate(self, slots: int, key_like: torch.Tensor, value_like: torch.Tensor) -> None:
        """(Re)allocate every buffer with `slots` slots per layer, keeping what is held.

        Called once with room for capacity + lazy buffer + the run's chunk, and again
        only when a forward brings more tokens than that room.
        """
        batch, heads = key_like.shape[:2]
        shape = (len(self.stacked_layers), batch, heads, slots)
        old = self.buffers
        self.buffers = {
            "keys": key_like.new_zeros(*shape, key_like.shape[-1]),
            "values": value_like.new_zeros(*shape, value_like.shape[-1]),
            "positions": torch.full(shape, -1, dtype=torch.long, device=key_like.device),
            **({"rotated_at": torch.zeros(shape, dtype=torch.long, device=key_like.device)} if self.shifted else {}),
            **self._allocate_policy_buffers(shape, key_like),
        }
        if any(layer.turns for layer in self.stacked_layers):  # the turns' table made here, never in a compiled step
            self.rotary.table(slots + self.rank_offset, key_like)
        for name, buffer in self.buffers.items():
            if name in old and name in self.buffer_names:
                buffer.narrow(3, 0, self.kept).copy_(old[name].narrow(3, 0, self.kept))
            # Fixed addresses let a compiled decode step update them in place inside a CUDA graph.
            torch._dynamo.mark_static_address(buffer)
        self._views.clear()
        for layer in self.stacked_layers:
            layer._attach({name: self.buffers[name] for name in self.buffer_names})

    def _allocate_policy_buffers(self, shape: tuple[int, ...], key_like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Buffers a policy needs besides keys, values and positions (named in buffer_names to move with them)."""
        return {}

    def cached_view(self, key: tuple, make) -> torch.Tensor:
        """`make()`, a view of the buffers, made once per key: a decode step touches the same
        few slot ranges every time, and on CPU making a view costs as much as a small kernel.
        Inside a compiled graph views are free and the buffers are its inputs, so not kept."""
        if self.in_graph:
            return make()
        view = self._views.get(key)
        if view is None:
            # Ranges seen while filling up are not seen again; a steady state needs a few per layer.
            if len(self._views) > 16 * (len(self.stacked_layers) + 1):
                self._views.clear()
            view = self._views[key] = make()
        return view

    def _flat(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Buffer `name` as [layers * batch, heads, slots(, head_dim)], slots start..stop: the
        per-(sequence, head) code then runs over every layer at once."""
        def make():
            buffer = self.buffers[name]
            return buffer.view(-1, *buffer.shape[2:])[:, :, start:stop]
        return self.cached_view(("flat", name, start, stop), make)

    @property
    def nbytes(self) -> int:
        """Bytes allocated: the buffers (keys, values, policy state, the chunk's room), the whole
        layers and the sliding ones."""
        return sum(t.numel() * t.element_size() for t in self.buffers.values()) + self._unstacked_bytes

    @property
    def held_bytes(self) -> int:
        """Bytes the cache holds between forwards: the buffers' `capacity + lazy` slots (and
        the per-layer state that is not per slot), and the whole and sliding layers' tokens."""
        held = self._unstacked_bytes
        for name, buffer in self.buffers.items():
            size = buffer.numel() * buffer.element_size()
            held += size * (self.capacity + self.lazy) // self.slots if name in self.buffer_names else size
        return held

    @property
    def _unstacked_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.unstacked_layers)

    def reset_buffers(self) -> None:
        for layer in self.unstacked_layers:
            layer.reset()
        for name, buffer in self.buffers.items():
            buffer.fill_(-1 if name == "positions" else 0)
        self.kept = self.seen = 0
        self.pending_total = None
        self.evicted = False

    # -- one forward ---------------------------------------------------------------

    def begin_forward(self, incoming: int) -> None:
        """Layer 0's update, before it stores anything: the forward brings `incoming` tokens."""
        if self.pending_total is not None:
            raise RuntimeError(
                "kvstress cache was updated twice without its eviction hook running: build it with "
                "make_cache(spec, model) for the model that runs it"
            )
        if self.shifted:
            # Where the model rotates this forward's first new token, less its slot: layer 0's length less ours.
            self.rank_offset = self.layers[0].get_seq_length() - self.kept
        if not self.in_graph:  # a compiled step reads the position from a tensor (open_slots)
            self.first_new_position = self.seen
            self.seen += incoming
        self.pending_total = self.kept + incoming

    def open_slots(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The first compressed layer's update: room for the forward's tokens, and their positions
        recorded in every compressed layer. Not layer 0's: that one may be whole or sliding, with
        keys of another size (Gemma 4's sliding and global layers differ in head size)."""
        start, total = self.kept, self.pending_total
        incoming = total - start
        if not self.buffers:
            self._allocate(self.capacity + self.lazy + max(self.chunk, incoming), key_states, value_states)
        elif total > self.slots:
            self._allocate(total, key_states, value_states)
        if self.shifted:
            first = start + self.rank_offset
            self._flat("rotated_at", start, total).copy_(
                torch.arange(first, first + incoming, device=key_states.device))
        new_positions = self._flat("positions", start, total)
        if self.in_graph:
            # A compiled decode step reads the position from a tensor, so the graph does not
            # depend on it; CompiledDecode moves the Python counters on after the step.
            new_positions.copy_(self.next_position.view(1, 1, 1).expand_as(new_positions))
        elif incoming == 1:
            new_positions.fill_(self.first_new_position)
        else:
            first = self.first_new_position
            new_positions.copy_(torch.arange(first, first + incoming, device=key_states.device))
        self._start_policy_state(start, total)

    def _start_policy_state(self, start: int, total: int) -> None:
        """Per-slot policy state for the forward's new tokens (slots start..total-1)."""

    def seen_after_update(self) -> int | torch.Tensor:
        """Tokens seen including this forward's: a tensor inside a compiled decode step."""
        return self.next_position + 1 if self.in_graph else self.seen

    def end_forward(self) -> None:
        """After the last layer's attention: score (policies that batch it) and evict in every layer."""
        total = self.pending_total
        if total is None:
            return
        self.pending_total = None
        self._score_forward(total)
        if total <= self.capacity + self.lazy:
            self.kept = total
            return
        # The policy's priority is checked where it enters, sinks and window protected whatever it says.
        self._compact(choose_victims(self, total), total)
        self.kept = self.capacity
        self.evicted = True

    def _score_forward(self, total: int) -> None:
        """Work a policy does once per forward, for all layers, before eviction."""

    def eviction_priority(self, total: int) -> torch.Tensor:
        """[layers * batch, kv_heads, total]: the lowest `total - capacity` slots are evicted."""
        raise NotImplementedError

    def priority_hook(self) -> str:
        """The hook whose output `eviction_priority` hands on, for a refusal to name."""
        return "eviction_priority"

    def _compact(self, victims: torch.Tensor, total: int) -> None:
        """Move the tail's survivors into the victims' slots below capacity.

        victims [layers * batch, kv_heads, excess]. Per (layer, sequence, head), the holes
        below capacity and the survivors in the tail [capacity, total) are equally many;
        both lists are sorted so pairs line up and the padding (where a head has fewer
        moves than others) copies slot `capacity` onto itself, which is discarded afterwards.
        """
        capacity = self.capacity
        if victims.shape[-1] == 1:
            # One victim (a decode step): the only tail slot moves into it, or stays if it is the victim.
            expanded: dict[int, torch.Tensor] = {}  # keys and values usually share the head size
            for name in self.buffer_names:
                buffer = self._flat(name)
                if buffer.dim() == 3:
                    index = victims
                else:
                    index = expanded.get(buffer.shape[-1])
                    if index is None:
                        index = expanded[buffer.shape[-1]] = _expand_index(victims, buffer)
                buffer.scatter_(2, index, self._flat(name, capacity, capacity + 1))
            return
        in_tail = torch.ones(victims.shape[:2] + (total,), dtype=torch.bool, device=victims.device)
        in_tail.scatter_(2, victims, False)
        tail_index = torch.arange(capacity, total, device=victims.device).expand(*victims.shape[:2], -1)
        sentinel = torch.iinfo(torch.long).max
        sources = torch.where(in_tail[:, :, capacity:], tail_index, sentinel).sort(dim=-1).values
        destinations = torch.where(victims < capacity, victims, sentinel).sort(dim=-1).values
        sources = sources.masked_fill(sources == sentinel, capacity)
        destinations = destinations.masked_fill(destinations == sentinel, capacity)
        for name in self.buffer_names:
            buffer = self._flat(name)
            moved = buffer.gather(2, _expand_index(sources, buffer))
            buffer.scatter_(2, _expand_index(destinations, buffer), moved)

    # -- the transformers cache interface ---------------------------------------------

    def get_query_offset(self, layer_idx: int = 0) -> int:
        # Mask rows are slot indices, whatever the RoPE positions are.
        return self.layers[layer_idx].kept

    def reset(self) -> None:
        self.reset_buffers()

    def mask_for(self, mask: torch.Tensor, length: int, keys: int) -> torch.Tensor:
        """The causal mask of a layer attending with `length` queries over `keys` keys, given
        the one transformers made ([batch, 1, q, keys], boolean or additive): the queries
        are the last `length` keys and see every key up to their own."""
        if mask.shape[-1] == keys:
            return mask
        allowed = torch.ones(length, keys, dtype=torch.bool, device=mask.device).tril(keys - length)
        return _like(mask, allowed).expand(mask.shape[0], mask.shape[1], length, keys)

    def window_mask(self, layer: FixedCapacityLayer, heads: int, total: int, mask):
        """(the mask, which slots each new token sees) for a compressed layer of a model whose
        every layer attends within `model_window` tokens of positions, as the model sees them:
        absolute (original) or ranks among the kept (shifted). While no kept token can be that
        far from a new one, the causal mask handed in is right as is (slot distances are at most
        the position distances) and no visibility is needed. Past that, the mask is built here
        per KV head, from the positions; `heads` query heads share each KV head's row."""
        window = self.model_window
        if not self.in_graph and (total if self.shifted else self.seen) <= window:
            return mask, None
        positions = layer.ranks(total) if self.shifted else layer._view("positions", 0, total)
        distance = positions[..., self.kept : total, None] - positions[..., None, :]  # [batch, kv_heads, q, total]
        visible = (distance >= 0) & (distance < window)
        allowed = visible.repeat_interleave(heads // visible.shape[1], dim=1)
        return (_like(mask, allowed) if isinstance(mask, torch.Tensor) else allowed), visible

    # -- diagnostics -------------------------------------------------------------------

    def kept_positions(self, layer_idx: int = 0) -> torch.Tensor:
        """Absolute positions held by one layer, [batch, kv_heads, kept], ascending per row."""
        return self.layers[layer_idx].kept_positions()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name}, positions={self.position_mode}, lazy={self.lazy})"
