"""The fixed-capacity cache that StreamingLLM and H2O share.

Every compressed policy is a `FixedCapacityLayer` per attention layer inside one
`CompressedCache`. A layer allocates its buffers once and never concatenates:

    slots  [0, n)            tokens kept from earlier forwards (n <= capacity + lazy)
    slots  [n, n + q)        the q tokens of the current forward, written in place

Attention sees all n + q slots. Right after the attention module returns (a forward
hook, see `hooks.py`), the layer evicts back to capacity if it ran over: the policy
ranks the slots with `eviction_priority()` (lowest goes first), and the survivors of
the tail [capacity, n + q) are copied into the holes the victims left below
`capacity`. With keys rotated before they are cached, attention does not care about
slot order, so nothing else moves.

Positions (`positions="original"` or `"shifted"`):
  original  keys keep their absolute RoPE positions (the H2O paper); `get_seq_length`
            counts every token seen, so the model rotates new tokens at their
            absolute position.
  shifted   positions inside the cache (the StreamingLLM paper): keys are stored
            before rotation and rotated by their rank among the kept tokens on every
            forward, and the query sits right after them.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

POSITION_MODES = ("original", "shifted")

# Memory bound for H2O's score pass over a prefill chunk: query blocks are sized so a
# block's probabilities hold at most this many float32 elements (64 MiB).
_SCORE_BLOCK_ELEMENTS = 1 << 24


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The Llama-family RoPE, written exactly as transformers writes it so results match bit for bit."""
    return (x * cos) + (rotate_half(x) * sin)


class FixedCapacityLayer(CacheLayerMixin):
    """One attention layer's fixed-capacity cache; subclasses only say what to evict."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False
    wants_query = False  # whether the hooks should hand this layer the query

    def __init__(self, owner: "CompressedCache", spec, lazy: int, shifted: bool):
        super().__init__()
        self.owner = owner
        self.capacity = spec.capacity
        self.sink = spec.sink
        self.lazy = lazy
        self.shifted = shifted
        self.kept = 0  # n: slots holding tokens from earlier forwards
        self.seen = 0  # tokens ever written, i.e. the next token's absolute position
        self.positions: torch.Tensor | None = None  # [batch, kv_heads, slots] absolute positions
        # Slices of the buffers by slot range, made once: a decode step touches the same few
        # ranges every time, and on CPU making a view costs as much as a small kernel.
        self._views: dict[tuple[str, int, int], torch.Tensor] = {}
        self._pending_total: int | None = None  # n + q while a forward is between update and eviction
        # Filled by the attention hooks for the current forward (see hooks.py).
        self.query: torch.Tensor | None = None  # [batch, heads, q, head_dim], before RoPE
        self.raw_keys: torch.Tensor | None = None  # [batch, kv_heads, q, head_dim], before RoPE
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin used for this forward's tokens
        self.scaling: float | None = None

    # -- buffers -----------------------------------------------------------------

    @property
    def slots(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self._allocate(self.capacity + self.lazy + key_states.shape[2], key_states, value_states)
        self.is_initialized = True

    def _allocate(self, slots: int, key_like: torch.Tensor, value_like: torch.Tensor) -> None:
        """(Re)allocate every per-slot buffer with `slots` slots, keeping what is held.

        Called once with room for capacity + lazy buffer + the first chunk, and again
        only when a later chunk is larger than any before it.
        """
        batch, heads = key_like.shape[:2]
        old = self._buffers()
        self.keys = key_like.new_zeros(batch, heads, slots, key_like.shape[-1])
        self.values = value_like.new_zeros(batch, heads, slots, value_like.shape[-1])
        self.positions = torch.full((batch, heads, slots), -1, dtype=torch.long, device=key_like.device)
        self._allocate_policy_buffers(batch, heads, slots, key_like.device)
        self._views.clear()
        for buffer in self._buffers():
            # Fixed addresses let a compiled decode step update them in place inside a CUDA graph.
            torch._dynamo.mark_static_address(buffer)
        for new, previous in zip(self._buffers(), old):
            new[:, :, : self.kept].copy_(previous[:, :, : self.kept])

    def _allocate_policy_buffers(self, batch: int, heads: int, slots: int, device: torch.device) -> None:
        """Per-slot state a policy needs besides keys, values and positions."""

    # Every tensor indexed by slot on dim 2; compaction moves them together.
    buffer_names: tuple[str, ...] = ("keys", "values", "positions")

    def _buffers(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, name) for name in self.buffer_names) if t is not None]

    def _view(self, name: str, start: int, stop: int) -> torch.Tensor:
        """`buffer[:, :, start:stop]` for the buffer called `name`, made once per range."""
        if self.owner.in_graph:  # a compiled graph slices for free; the buffers are its inputs, not views
            return getattr(self, name)[:, :, start:stop]
        key = (name, start, stop)
        view = self._views.get(key)
        if view is None:
            if len(self._views) > 256:  # ranges seen while filling up are not seen again
                self._views.clear()
            view = self._views[key] = getattr(self, name)[:, :, start:stop]
        return view

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers())

    # -- the transformers layer interface ---------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._pending_total is not None:
            raise RuntimeError(
                "kvstress cache was updated twice without its eviction hook running: build it with "
                "make_cache(spec, model) for the model that runs it"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        incoming = key_states.shape[2]
        start, total = self.kept, self.kept + incoming
        if total > self.slots:
            self._allocate(total, key_states, value_states)

        stored_keys = key_states
        if self.shifted:
            if self.raw_keys is None:
                raise RuntimeError("shifted positions need the attention hooks: build the cache with make_cache")
            stored_keys = self.raw_keys
        self._view("keys", start, total).copy_(stored_keys)
        self._view("values", start, total).copy_(value_states)
        new_positions = self._view("positions", start, total)
        if self.owner.in_graph:
            # A compiled decode step reads the position from a tensor, so the graph does not
            # depend on it; CompiledDecode moves the Python counters on after the step.
            new_positions.copy_(self.owner.next_position)
        else:
            if incoming == 1:
                new_positions.fill_(self.seen)
            else:
                new_positions.copy_(torch.arange(self.seen, self.seen + incoming, device=self.device))
            self.seen += incoming
        self._pending_total = total

        keys = self._view("keys", 0, total)
        if self.shifted:
            keys = self._rotate_by_rank(keys, self._view("positions", 0, total))
        self.observe_attention(keys, start, total)
        return keys, self._view("values", 0, total)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The mask works in slot space: query i of this forward sits at slot kept + i.
        return self.kept + query_length, 0

    def seen_after_update(self) -> int | torch.Tensor:
        """Tokens seen including this forward's: a tensor inside a compiled decode step."""
        return self.owner.next_position + 1 if self.owner.in_graph else self.seen

    def get_seq_length(self) -> int:
        # What the model adds to arange(q) to position new tokens when the caller gives no
        # position_ids: absolute positions, or positions inside the cache.
        return self.kept if self.shifted else self.seen

    def get_max_length(self) -> int:
        return -1  # streams without limit; capacity bounds what is held, not what is seen

    def reset(self) -> None:
        for buffer in self._buffers():
            buffer.zero_()
        if self.positions is not None:
            self.positions.fill_(-1)
        self.kept = self.seen = 0
        self._pending_total = None

    # -- eviction -----------------------------------------------------------------

    def _rotate_by_rank(self, raw_keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rank = positions.argsort(dim=-1).argsort(dim=-1)
        cos, sin = self.owner.rope_table(int(rank.shape[-1]), raw_keys)
        return apply_rotary(raw_keys, cos[rank], sin[rank])

    def observe_attention(self, keys: torch.Tensor, start: int, total: int) -> None:
        """Called with the keys attention will see; H2O accumulates its scores here."""

    def eviction_priority(self, total: int) -> torch.Tensor:
        """[batch, kv_heads, total]: the lowest `total - capacity` slots are evicted."""
        raise NotImplementedError

    def after_attention(self) -> None:
        """Evict back to capacity once the attention module has used the slots."""
        total = self._pending_total
        if total is None:
            return
        self._pending_total = None
        self.query = self.raw_keys = self.rope = None
        if total <= self.capacity + self.lazy:
            self.kept = total
            return
        excess = total - self.capacity
        priority = self.eviction_priority(total)
        if excess == 1:
            victims = priority.argmin(dim=-1, keepdim=True)
        else:
            victims = priority.topk(excess, dim=-1, largest=False, sorted=False).indices
        self._compact(victims, total)
        self.kept = self.capacity

    def _compact(self, victims: torch.Tensor, total: int) -> None:
        """Move the tail's survivors into the victims' slots below capacity.

        Per (sequence, head), the holes below capacity and the survivors in the tail
        [capacity, total) are equally many; both lists are sorted so pairs line up and
        the padding (where a head has fewer moves than others) copies slot `capacity`
        onto itself, which is discarded afterwards.
        """
        capacity = self.capacity
        if victims.shape[-1] == 1:
            # One victim (a decode step): the only tail slot moves into it, or stays if it is the victim.
            expanded: dict[int, torch.Tensor] = {}  # keys and values usually share the head size
            for name in self.buffer_names:
                buffer = getattr(self, name)
                if buffer.dim() == 3:
                    index = victims
                else:
                    index = expanded.get(buffer.shape[-1])
                    if index is None:
                        index = expanded[buffer.shape[-1]] = _expand_index(victims, buffer)
                buffer.scatter_(2, index, self._view(name, capacity, capacity + 1))
            return
        in_tail = torch.ones(victims.shape[:2] + (total,), dtype=torch.bool, device=victims.device)
        in_tail.scatter_(2, victims, False)
        tail_index = torch.arange(capacity, total, device=victims.device).expand(*victims.shape[:2], -1)
        sentinel = torch.iinfo(torch.long).max
        sources = torch.where(in_tail[:, :, capacity:], tail_index, sentinel).sort(dim=-1).values
        destinations = torch.where(victims < capacity, victims, sentinel).sort(dim=-1).values
        sources = sources.masked_fill(sources == sentinel, capacity)
        destinations = destinations.masked_fill(destinations == sentinel, capacity)
        for buffer in self._buffers():
            moved = buffer.gather(2, _expand_index(sources, buffer))
            buffer.scatter_(2, _expand_index(destinations, buffer), moved)

    # -- diagnostics --------------------------------------------------------------

    def kept_positions(self) -> torch.Tensor:
        """[batch, kv_heads, kept] absolute positions held, ascending."""
        if self.positions is None:
            return torch.empty(0, 0, 0, dtype=torch.long)
        return self.positions[:, :, : self.kept].sort(dim=-1).values


def _expand_index(index: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """Index [b, h, k] → the shape gather/scatter need for `buffer` ([b, h, slots] or [b, h, slots, d])."""
    if buffer.dim() == 3:
        return index
    return index.unsqueeze(-1).expand(-1, -1, -1, buffer.shape[-1])


def _scaled_rotation(cos: torch.Tensor, sin: torch.Tensor, scaling: float) -> torch.Tensor:
    dim = cos.shape[-1]
    half = dim // 2
    # rotate_half(x) == x @ turn: column j < half takes -x[j + half], j >= half takes x[j - half].
    turn = torch.zeros(dim, dim, dtype=cos.dtype, device=cos.device)
    index = torch.arange(half, device=cos.device)
    turn[index + half, index] = -1
    turn[index, index + half] = 1
    return (torch.diag_embed(cos[:, 0]) + turn * sin[:, 0].unsqueeze(1)) * scaling


class CompressedCache(Cache):
    """A transformers `Cache` of fixed-capacity layers, linked to the model it serves."""

    layer_class: type[FixedCapacityLayer] = FixedCapacityLayer

    def __init__(self, spec, num_layers: int, rotary_embedding, *, positions: str = "original", lazy: int = 0):
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {', '.join(POSITION_MODES)}, got {positions!r}")
        if lazy < 0:
            raise ValueError(f"lazy eviction buffer must be 0 or more tokens, got {lazy}")
        if positions == "shifted" and rotary_embedding is None:
            raise ValueError("shifted positions need a model with rotary embeddings (a rotary_emb module)")
        self.spec = spec
        self.position_mode = positions
        self.lazy = lazy
        self._rotary_embedding = rotary_embedding
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        # One forward's RoPE, as every layer asks for it; holding the tensors keeps their
        # identity from being reused while the memo is alive.
        self._cache_positions_memo: tuple | None = None
        self._rotation_memo: tuple | None = None
        # Set by CompiledDecode while a compiled one-token step runs: the layers then take
        # the new token's absolute position from `next_position` instead of Python ints.
        self.in_graph = False
        self.next_position: torch.Tensor | None = None
        self.next_position_synced = 0  # `seen` when next_position was last set
        shifted = positions == "shifted"
        super().__init__(layers=[self.layer_class(self, spec, lazy, shifted) for _ in range(num_layers)])

    def get_query_offset(self, layer_idx: int = 0) -> int:
        # Mask rows are slot indices, whatever the RoPE positions are.
        return self.layers[layer_idx].kept

    def rope_table(self, length: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, head_dim] for positions 0..length-1 from the model's own rotary module."""
        cached = self._rope_cache
        if cached is None or cached[0].shape[0] < length or cached[0].dtype != like.dtype or cached[0].device != like.device:
            size = max(length, 2 * (cached[0].shape[0] if cached is not None else 0))
            position_ids = torch.arange(size, device=like.device).unsqueeze(0)
            cos, sin = self._rotary_embedding(like, position_ids)
            self._rope_cache = cached = (cos[0], sin[0])
        return cached[0][:length], cached[1][:length]

    def rope_in_cache(self, kept: int, length: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, length, head_dim] for positions kept..kept+length-1 (shifted mode's query),
        the same tensors for every layer of a forward."""
        table = self.rope_table(kept + length, like)
        if self.in_graph:  # a compiled graph computes this once for all layers anyway
            return table[0][kept:].unsqueeze(0), table[1][kept:].unsqueeze(0)
        memo = self._cache_positions_memo
        if memo is None or memo[0] is not self._rope_cache[0] or memo[1:3] != (kept, length):
            rope = (table[0][kept:].unsqueeze(0), table[1][kept:].unsqueeze(0))
            memo = self._cache_positions_memo = (self._rope_cache[0], kept, length, rope)
        return memo[3]

    def scaled_rotation(self, cos: torch.Tensor, sin: torch.Tensor, scaling: float) -> torch.Tensor:
        """[batch, dim, dim] M with query @ M == apply_rotary(query, cos, sin) * scaling for one
        query token per sequence (cos, sin [batch, 1, dim]); built once per forward, not per layer."""
        if self.in_graph:  # a compiled graph computes this once for all layers anyway
            return _scaled_rotation(cos, sin, scaling)
        memo = self._rotation_memo
        if memo is None or memo[0] is not cos or memo[1] is not sin or memo[2] != scaling:
            memo = self._rotation_memo = (cos, sin, scaling, _scaled_rotation(cos, sin, scaling))
        return memo[3]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's buffers (keys, values and policy state)."""
        return sum(layer.nbytes for layer in self.layers)

    def kept_positions(self, layer_idx: int = 0) -> torch.Tensor:
        """Absolute positions held by one layer, [batch, kv_heads, kept], ascending per row."""
        return self.layers[layer_idx].kept_positions()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name}, positions={self.position_mode}, lazy={self.lazy})"
