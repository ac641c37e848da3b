"""What a policy hands a `CompressedCache`, checked where it enters, and what the base protects.

A policy's `eviction_priority(total)` (or, for a `ScoredCache`, the scores its
`update_scores` / `_score_forward` write, which ScoredCache's `eviction_priority` returns)
must be

    a torch.Tensor of shape [layers * batch, kv_heads, total]: one priority per slot
    0..total-1 of every compressed layer, sequence and KV head (the layout of
    `cache._flat("positions", 0, total)`), on the cache's device, of a floating-point
    or integer dtype. The lowest `total - capacity` of each row are evicted.

Values (floating point): finite numbers. NaN is refused: it has no order (argmin takes it
first, topk last), so it would evict arbitrary tokens. -inf and +inf are refused: they are
what a score that lost its value becomes (log 0, exp or a float16 overflow), never a
deliberate ranking; a policy that wants a slot gone first, or kept, gives it its lowest or
highest finite score.

Whatever the priority says, the base protects the policy's declared sizes (`sink`,
`window`): the sinks are never candidates, and the `window` most recent tokens rank
above every candidate. The priority's values at protected slots are not
read, so they are neither refused nor obeyed.

A refusal is a PolicyError: one line naming the policy, the hook, the shape expected
and what came instead. A run records it as the method's failed point and goes on.

Cost per eviction (every decode step once the cache is full): the form check reads a
few attributes; the value check, on floating-point priorities only, is one reduction
over the candidates and one read of its scalar (a host synchronisation on CUDA). Inside
a compiled decode graph nothing can raise, so values are checked on the eager forwards
only (prefill chunks and filling up); the form is checked when the graph is traced.
"""

from __future__ import annotations

import math

import torch

from ..errors import PolicyError

# Dtypes argmin and topk rank on every device.
_RANKABLE = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64,
                       torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


def choose_victims(cache, total: int) -> torch.Tensor:
    """[layers * batch, kv_heads, total - capacity] slots to evict: the lowest priorities
    among the slots that are neither sinks nor in the recent window."""
    priority = cache.eviction_priority(total)
    positions = cache._flat("positions", 0, total)
    _check_form(cache, priority, positions)
    sink, excess = cache.sink, total - cache.capacity
    # The sinks are the first tokens written and are never evicted, so they hold slots
    # [0, sink) for good: leaving those slots out protects them at no cost.
    candidates = priority[..., sink:] if sink else priority
    recent = None
    if cache.window:
        recent = cache._flat("positions", sink, total) >= cache.seen_after_update() - cache.window
    if excess == 1 and not cache.in_graph:
        # The decode step's eviction: one read tells whether anything is off (the victims'
        # values and the largest candidate, see _suspect), not every candidate's value.
        values, victims = _protected(candidates, recent, strict=False).min(dim=-1, keepdim=True)
        if not _suspect(values, candidates, recent):
            return victims.add_(sink) if sink else victims
    # A chunk's eviction, a suspect step, or a compiled graph (which reads nothing back):
    # every candidate checked, then the window strictly above every candidate.
    if candidates.is_floating_point() and not cache.in_graph:
        _check_values(cache, candidates, recent, positions)
    ranked = _protected(candidates, recent, strict=True)
    if excess == 1:
        victims = ranked.argmin(dim=-1, keepdim=True)
    else:
        victims = ranked.topk(excess, dim=-1, largest=False, sorted=False).indices
    return victims.add_(sink) if sink else victims


def _protected(candidates: torch.Tensor, recent: torch.Tensor | None, *, strict: bool) -> torch.Tensor:
    """The candidates with the recent window at the dtype's top value (+inf), out of place:
    for a ScoredCache the priority is its score buffer. `strict` steps candidates already at
    the top just below it, so that no tie can rank one with the window."""
    if recent is None:
        return candidates
    below, top = _ranks(candidates.dtype)
    if strict:
        return candidates.clamp_max(below).masked_fill_(recent, top)
    return candidates.masked_fill(recent, top)


def _suspect(values: torch.Tensor, candidates: torch.Tensor, recent: torch.Tensor | None) -> bool:
    """Whether the victims' values [rows, kv_heads, 1] or the candidates may hold what the contract
    refuses, or, under protection, a victim ties with the window's top value."""
    if values.is_floating_point():
        # One read: argmin takes a NaN or a -inf first, so the victims' sum is finite unless one is
        # there; the largest unprotected candidate is finite unless one is +inf (or NaN). A sum that
        # overflows only costs the careful path.
        unprotected = candidates if recent is None else candidates.masked_fill(recent, 0)
        return not all(map(math.isfinite, torch.stack((values.sum(), unprotected.amax())).tolist()))
    return recent is not None and values.amax().item() == _ranks(values.dtype)[1]


def _ranks(dtype: torch.dtype) -> tuple[float | int, float | int]:
    """(the highest value a candidate keeps under strict protection, the protected slots' value) for `dtype`."""
    if dtype.is_floating_point:
        return torch.finfo(dtype).max, math.inf
    top = torch.iinfo(dtype).max
    return top - 1, top


def _check_form(cache, priority, positions: torch.Tensor) -> None:
    if (isinstance(priority, torch.Tensor) and priority.shape == positions.shape
            and priority.device == positions.device and priority.dtype in _RANKABLE):
        return
    expected = _expected(positions)
    if not isinstance(priority, torch.Tensor):
        raise PolicyError(f"{_source(cache)} returned {type(priority).__name__}, expected a tensor of shape {expected}: "
                          f"return one priority per slot, lowest evicted first")
    got = f"shape {list(priority.shape)} ({str(priority.dtype).removeprefix('torch.')} on {priority.device})"
    if priority.shape != positions.shape:
        fix = "return one priority per slot of every layer, sequence and KV head, lowest evicted first"
    elif priority.device != positions.device:
        fix = f"compute it on the cache's device, {positions.device}"
    else:
        fix = "return a floating-point or integer tensor, which argmin and topk rank: cast it, e.g. .float()"
    raise PolicyError(f"{_source(cache)} returned {got}, expected shape {expected} on {positions.device}: {fix}")


def _check_values(cache, candidates: torch.Tensor, recent: torch.Tensor | None, positions: torch.Tensor) -> None:
    # The window's values are not read, so not checked; one reduction and one read when all is well.
    unprotected = candidates if recent is None else candidates.masked_fill(recent, 0)
    if bool(unprotected.isfinite().all()):
        return
    found = {"NaN": unprotected.isnan(), "+inf": unprotected.isposinf(), "-inf": unprotected.isneginf()}
    kind, where = next((kind, where) for kind, where in found.items() if where.any())
    raise PolicyError(f"{_source(cache)} gave {kind} to {int(where.sum())} slots it may evict "
                      f"(shape {_expected(positions)}): give every slot a finite number, lowest evicted first; "
                      f"NaN, -inf and +inf are refused")


def _expected(positions: torch.Tensor) -> str:
    rows, heads, total = positions.shape
    return f"[layers × batch, kv_heads, total] = {[rows, heads, total]}"


def _source(cache) -> str:
    """'policy NAME (SPEC): HOOK' — the hook whose output was refused."""
    return f"policy {cache.spec.method} ({cache.spec.name}): {cache.priority_hook()}"
