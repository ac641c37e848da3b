"""A plugin policy's output is checked where it enters the cache, and the base protects
what the policy declares (kvstress/caches/contract.py; the README's "Your own policy").

Each policy here is a plugin as a user writes one, registered the way installed plugins
are (the registry's plugin table): a broken priority is refused with one line naming the
policy, the hook and the shape expected; a priority that would evict the sinks or the
recent window keeps them anyway, at the exact positions a correct policy keeps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from test_caches import stream, token_ids

import kvstress.spec as spec_module
from kvstress import make_cache
from kvstress.caches.base import CompressedCache
from kvstress.caches.scored import AttentionScoredCache
from kvstress.errors import PolicyError
from kvstress.spec import Params, Policy

# The tiny model (conftest.build_peaked_llama): 2 layers, 2 KV heads. With batch 2 the
# priority is [layers × batch, kv_heads, total] = [4, 2, total]; capacity 24 first evicts
# at total 25 one token at a time (argmin), at total 28 in chunks of 7 (topk).
BATCH, ROWS, HEADS = 2, 4, 2
FIRST_TOTAL = {1: 25, 7: 28}

@dataclass(frozen=True, kw_only=True)
class SizesParams(Params):
    sink: int = 2
    window: int = 6
    capacity: int = 24


def positions(cache, total):
    return cache._flat("positions", 0, total)


def recent(cache, total):
    return positions(cache, total) >= cache.seen_after_update() - cache.window


def nan_at_protected(cache, total):
    """Oldest first, NaN where the base protects (sinks, window): those values are not read."""
    values = positions(cache, total).float()
    return values.masked_fill((values < cache.sink) | recent(cache, total), float("nan"))


PRIORITIES = {
    "nanprio": lambda cache, total: torch.full(positions(cache, total).shape, float("nan")),
    "neginfprio": lambda cache, total: positions(cache, total).float().masked_fill(positions(cache, total) == 5,
                                                                                  float("-inf")),
    "flatprio": lambda cache, total: positions(cache, total)[:, 0].float(),  # [rows, total]: heads forgotten
    "shortprio": lambda cache, total: positions(cache, total)[..., :-1].float(),  # the newest slot forgotten
    "boolprio": lambda cache, total: positions(cache, total) > 3,
    "metaprio": lambda cache, total: torch.zeros(positions(cache, total).shape, device="meta"),
    "listprio": lambda cache, total: positions(cache, total).tolist(),
    "oldestfirst": lambda cache, total: positions(cache, total),  # would evict the sinks first
    "newestfirst": lambda cache, total: -positions(cache, total).float(),  # would evict the window first
    "posinfprio": lambda cache, total: positions(cache, total).float().masked_fill(positions(cache, total) == 5,
                                                                                  float("inf")),
    "alltie": lambda cache, total: torch.full(positions(cache, total).shape, torch.finfo(torch.float32).max),
    "nanprotected": nan_at_protected,
}


def priority_cache(name):
    return type(f"{name}Cache", (CompressedCache,), {"eviction_priority": lambda self, total: PRIORITIES[name](self, total)})


class NaNScoresCache(AttentionScoredCache):
    """An attention-scored plugin whose update_scores writes NaN into its scores."""

    def update_scores(self, scores, mass):
        scores.copy_(mass).mul_(float("nan"))


PLUGINS = {name: Policy(name=name, params=SizesParams, description=f"test plugin {name}", cache=priority_cache(name))
           for name in PRIORITIES}
PLUGINS["nanscores"] = Policy(name="nanscores", params=SizesParams, description="test plugin", cache=NaNScoresCache)


@pytest.fixture(scope="module")
def model(peaked_llama):
    return peaked_llama


@pytest.fixture(autouse=True)
def plugins(monkeypatch):
    """The policies above, as installed plugins: in the registry's table of entry-point policies."""
    monkeypatch.setattr(spec_module, "_plugins", dict(PLUGINS))


def run(model, name: str, chunk: int, length: int = 70) -> CompressedCache:
    cache = make_cache(f"{name}_2_6_24", model)
    stream(model, cache, token_ids(BATCH, length, seed=3), chunk)
    return cache


def layout(total: int) -> str:
    """The expected shape as a refusal writes it, as a pattern."""
    return re.escape(f"[layers × batch, kv_heads, total] = [{ROWS}, {HEADS}, {total}]")


def got(shape: str, dtype: str = "float32", device: str = "cpu") -> str:
    return re.escape(f"returned shape {shape} ({dtype} on {device}), expected shape ")


# name, hook, the message after the hook as a pattern, given the total at the first eviction
REFUSALS = [
    ("nanprio", "eviction_priority", lambda total: f"gave NaN to {ROWS * HEADS * (total - 2 - 6)} slots it may evict "
                                                   rf"\(shape {layout(total)}\): .*NaN, -inf and \+inf are refused"),
    ("neginfprio", "eviction_priority", lambda total: f"gave -inf to {ROWS * HEADS} slots it may evict"),
    ("posinfprio", "eviction_priority", lambda total: re.escape(f"gave +inf to {ROWS * HEADS} slots it may evict")),
    ("nanscores", re.escape("update_scores (the scores eviction_priority ranks)"), lambda total: "gave NaN to"),
    ("flatprio", "eviction_priority", lambda total: got(f"[{ROWS}, {total}]") + layout(total)),
    ("shortprio", "eviction_priority", lambda total: got(f"[{ROWS}, {HEADS}, {total - 1}]") + layout(total)),
    ("boolprio", "eviction_priority",
     lambda total: got(f"[{ROWS}, {HEADS}, {total}]", dtype="bool") + layout(total) + ".* cast it"),
    ("metaprio", "eviction_priority", lambda total: got(f"[{ROWS}, {HEADS}, {total}]", device="meta") + layout(total)
                                                    + " on cpu: compute it on the cache's device, cpu"),
    ("listprio", "eviction_priority", lambda total: "returned list, expected a tensor of shape " + layout(total)),
]


@pytest.mark.parametrize("name, hook, message", REFUSALS, ids=[name for name, *_ in REFUSALS])
@pytest.mark.parametrize("chunk", [1, 7], ids=["decode", "chunk"])
def test_a_broken_priority_is_refused_in_one_line_naming_policy_hook_and_shape(model, name, hook, message, chunk):
    with pytest.raises(PolicyError) as refused:
        run(model, name, chunk)
    text = str(refused.value)
    assert "\n" not in text
    assert re.fullmatch(rf"policy {name} \({name}_2_6_24\): {hook} {message(FIRST_TOTAL[chunk])}.*", text), text


@pytest.mark.parametrize("chunk", [1, 7], ids=["decode", "chunk"])
def test_sinks_and_window_are_kept_whatever_the_priority_says(model, chunk):
    # 70 tokens, 2 sinks, a 6-token window, capacity 24.
    sinks, window = [0, 1], list(range(64, 70))
    oldest_first = run(model, "oldestfirst", chunk)  # evicts the oldest it may: StreamingLLM's choice
    newest_first = run(model, "newestfirst", chunk)  # evicts the newest it may: the oldest 16 stay for good
    for layer in range(2):
        assert oldest_first.kept_positions(layer).tolist() == [[sinks + list(range(48, 70))] * HEADS] * BATCH
        assert newest_first.kept_positions(layer).tolist() == [[list(range(18)) + window] * HEADS] * BATCH
    # The largest number everywhere: every candidate ties, and the protected ones still rank above them all.
    kept = run(model, "alltie", chunk).kept_positions(1)
    assert kept.shape == (BATCH, HEADS, 24)
    assert all(set(sinks + window) <= set(row) for sequence in kept.tolist() for row in sequence)


def test_values_at_protected_slots_are_not_read(model):
    cache = run(model, "nanprotected", 1)
    assert cache.kept_positions(0).tolist() == [[[0, 1] + list(range(48, 70))] * HEADS] * BATCH
