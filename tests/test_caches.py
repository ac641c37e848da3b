"""The fixed-capacity cache policies: exactness, what they keep, memory, generate.

One table of specs runs through every generic test. The model is a tiny random Llama
with grouped-query attention (`peaked_llama` in conftest.py), in float32 on CPU.
The registry, the quantized cache and the plugin API: test_policies.py.
"""

from __future__ import annotations

import pytest
import torch
from reference_policies import ReferencePolicyModel
from transformers import DynamicCache

from kvstress import make_cache
from kvstress.caches import cache_bytes
from kvstress.spec import MethodSpec, SpecError, parse_spec
from kvstress.stream import cache_argument

# Every compressed policy × position mode; the sizes let a short text overflow them.
COMPRESSED = [
    ("streaming_4_24", "original"),
    ("streaming_4_24", "shifted"),
    ("streaming_0_16", "original"),
    ("h2o_2_6_24", "original"),
    ("h2o_2_6_24", "shifted"),
    ("h2o_0_1_16", "original"),
    ("tova_2_24", "original"),
    ("tova_2_24", "shifted"),
    ("tova_0_16", "original"),
    ("tovahead_2_24", "original"),
    ("tovahead_0_16", "shifted"),
    ("knorm_2_6_0_24", "original"),
    ("knorm_2_6_0_24", "shifted"),
    ("knorm_0_0_1_16", "original"),  # the authors' form: layer 0 whole, no sinks, no window
    ("knorm_0_0_1_16", "shifted"),
    ("knorm_0_0_0_16", "original"),
    ("random_2_6_24", "original"),
    ("random_2_6_24", "shifted"),
    ("random_0_0_16", "original"),
]
COMPRESSED_IDS = [f"{spec}-{positions}" for spec, positions in COMPRESSED]


@pytest.fixture(scope="module")
def model(peaked_llama):
    return peaked_llama


def token_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=generator)


def with_cache(model, cache) -> dict:
    """The forward's (and generate's) cache keyword, whichever name this transformers uses."""
    return {cache_argument(model): cache}


@torch.no_grad()
def stream(model, cache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Feed ids chunk by chunk through the model with `cache`; logits for every position."""
    logits = [model(ids[:, i : i + chunk], **with_cache(model, cache)).logits for i in range(0, ids.shape[1], chunk)]
    return torch.cat(logits, dim=1)


def capacity_of(spec: str) -> int:
    return parse_spec(spec).capacity


# -- specs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, fields",
    [
        ("baseline", dict(method="baseline")),
        ("streaming_4_256", dict(method="streaming", sink=4, capacity=256)),
        ("h2o_4_32_256", dict(method="h2o", sink=4, window=32, capacity=256)),
        ("H2O_0_1_8", dict(method="h2o", sink=0, window=1, capacity=8)),
    ],
)
def test_spec_string_and_fields_are_one_thing(text, fields):
    spec = parse_spec(text)
    assert spec == MethodSpec(**fields)
    assert parse_spec(spec.name) == spec


def test_heavy_hitters_are_what_is_left():
    assert parse_spec("h2o_4_32_256").heavy_hitters == 220


@pytest.mark.parametrize(
    "text, message",
    [
        ("lru_4_256", "write baseline, streaming_S_C or h2o_S_W_C"),
        ("streaming_256", "should look like streaming_S_C"),
        ("h2o_4_256", "should look like h2o_S_W_C"),
        ("streaming_8_8", "use a capacity above 8"),
        ("h2o_4_32_36", "use a capacity above 36"),
        ("h2o_4_32_20", "use a capacity above 36"),
        ("streaming_4_0", "capacity must be positive"),
        ("h2o_4_0_256", "window must be at least 1"),
        ("h2o_-1_4_256", "sink must be 0 or more"),
        ("baseline_4", "should look like baseline"),
        ("", "cannot read method spec"),
    ],
)
def test_invalid_specs_say_what_to_fix(text, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(text)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(method="streaming"), "needs a capacity"),
        (dict(method="streaming", capacity=64, window=8), "drop --window"),
        (dict(method="baseline", capacity=64), "give it no capacity"),
        (dict(method="snapkv", capacity=64), "unknown method"),
    ],
)
def test_invalid_fields_say_what_to_fix(fields, message):
    with pytest.raises(SpecError, match=message):
        MethodSpec(**fields)


def test_make_cache_rejects_options_that_do_not_apply(model):
    with pytest.raises(ValueError, match="positions must be one of"):
        make_cache("streaming_4_24", model, positions="absolute")
    with pytest.raises(ValueError, match="lazy eviction buffer"):
        make_cache("h2o_2_6_24", model, lazy=-1)
    with pytest.raises(ValueError, match="do not apply"):
        make_cache("baseline", model, lazy=8)


def test_baseline_is_transformers_dynamic_cache(model):
    assert type(make_cache("baseline", model)) is DynamicCache


# -- exactness while everything fits ---------------------------------------------------


# Every (batch, chunk, lazy) for every policy and mode; the fast tier runs two of the eight per
# (policy, mode), in turn.
EXACT_VARIANTS = [(batch, chunk, lazy) for batch in (1, 2) for chunk in (1, 5) for lazy in (0, 4)]
EXACT_CASES = [
    pytest.param(spec, positions, batch, chunk, lazy, id=f"{spec}-{positions}-batch{batch}-chunk{chunk}-lazy{lazy}",
                 marks=() if v % 4 == i % 4 else pytest.mark.slow)
    for i, (spec, positions) in enumerate(COMPRESSED)
    for v, (batch, chunk, lazy) in enumerate(EXACT_VARIANTS)
]


@pytest.mark.parametrize("spec, positions, batch, chunk, lazy", EXACT_CASES)
def test_logits_equal_full_cache_while_tokens_fit(model, spec, positions, batch, chunk, lazy):
    ids = token_ids(batch, capacity_of(spec))
    expected = stream(model, DynamicCache(config=model.config), ids, chunk)
    actual = stream(model, make_cache(spec, model, positions=positions, lazy=lazy), ids, chunk)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# -- what each policy keeps -------------------------------------------------------------


@pytest.mark.parametrize("positions", ["original", "shifted"])
@pytest.mark.parametrize("chunk", [1, 7, 40])
def test_streaming_keeps_sinks_and_most_recent(model, positions, chunk):
    cache = make_cache("streaming_4_24", model, positions=positions)
    ids = token_ids(2, 203)
    stream(model, cache, ids, chunk)
    expected = list(range(4)) + list(range(203 - 20, 203))
    for layer in range(2):
        kept = cache.kept_positions(layer)
        assert kept.shape == (2, 2, 24)
        assert (kept == torch.tensor(expected)).all()


def test_lazy_streaming_runs_over_by_the_buffer_then_evicts_it_at_once(model):
    cache = make_cache("streaming_4_24", model, lazy=6)
    sizes = []
    for t in range(60):
        stream(model, cache, token_ids(1, 60)[:, t : t + 1], 1)
        sizes.append(cache.kept_positions(0).shape[-1])
    assert max(sizes) == 30
    assert sizes[23:31] == [24, 25, 26, 27, 28, 29, 30, 24]  # 24 held after token 24, evicted after token 31
    kept = cache.kept_positions(0)[0, 0].tolist()
    assert kept[:4] == [0, 1, 2, 3] and kept[4:] == list(range(60 - len(kept) + 4, 60))


# Token by token, in chunks, and with lazy eviction. The fast tier runs one of the three per
# (policy, mode), in turn, so that each variant is covered there; the slow tier runs them all.
REFERENCE_VARIANTS = [(1, 0), (6, 0), (1, 5)]
REFERENCE_CASES = [
    pytest.param(spec, positions, chunk, lazy, id=f"{spec}-{positions}-chunk{chunk}-lazy{lazy}",
                 marks=() if v == i % len(REFERENCE_VARIANTS) else pytest.mark.slow)
    for i, (spec, positions) in enumerate(COMPRESSED)
    for v, (chunk, lazy) in enumerate(REFERENCE_VARIANTS)
]


@pytest.mark.parametrize("spec, positions, chunk, lazy", REFERENCE_CASES)
def test_policy_matches_reference_implementation(model, spec, positions, chunk, lazy):
    """Kept positions and logits equal a slow eager reference, batch 2 with different texts, GQA."""
    reference = ReferencePolicyModel(model, parse_spec(spec), positions=positions, lazy=lazy, seed=7)
    cache = make_cache(spec, model, positions=positions, lazy=lazy, seed=7)
    # No token twice in a sequence: two copies of a token have the same first-layer key up
    # to RoPE, which preserves norms, so key norm would tie them and rounding would decide.
    ids = torch.stack([torch.randperm(256, generator=torch.Generator().manual_seed(s))[:66] for s in (3, 4)])
    with torch.no_grad():
        for i in range(0, ids.shape[1], chunk):
            expected = reference.forward(ids[:, i : i + chunk])
            actual = model(ids[:, i : i + chunk], **with_cache(model, cache)).logits
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    for layer in range(2):
        assert cache.kept_positions(layer).tolist() == reference.kept_positions(layer)


# What each reference pins of its authors' definition (tests/reference_policies.py follows
# the papers and the authors' code; where they disagree, the code, as noted).
PUBLISHED_DETAILS = {
    "streaming": "sinks: the first S positions for good; candidates: every other token; oldest out (paper §3.2)",
    "h2o": "per KV head, attention summed over its query group and over every query so far; the newest W "
           "and first S protected; least mass out (paper §3, authors' code)",
    "tova": "the last query's attention averaged over all the layer's query heads; one eviction shared by "
            "the layer's heads; no window, the newest token competes; least attended out (authors' code)",
    "tovahead": "kvstress's variant: TOVA's score summed over each KV head's query group, evicted per head",
    "knorm": "per KV head, L2 norm of the key as cached; the newest key competes; no sinks or window by "
             "default; the first F layers whole (README's usage: layers 0 and 1); largest norm out",
    "random": "kvstress's baseline: a seeded hash per (step, lane, position); lowest out",
}


def test_every_built_in_evicting_policy_states_what_its_reference_pins():
    from kvstress.caches import CompressedCache
    from kvstress.spec import registered_policies

    evicting = {p.name for p in registered_policies() if isinstance(p.cache, type) and issubclass(p.cache, CompressedCache)
                and p.cache.__module__.startswith("kvstress.")}  # kvstress's own, not an installed plugin's
    assert evicting <= set(PUBLISHED_DETAILS)


@pytest.mark.parametrize("positions", ["original", "shifted"])
@pytest.mark.parametrize("chunk", [1, 6])
def test_key_norm_default_is_the_authors_two_whole_layers(peaked_llama_three_layers, positions, chunk):
    """`--method knorm` is knorm_0_0_2_C: layers 0 and 1 keep every token, layer 2 keeps
    the C lowest-norm keys per head with nothing protected, as the reference has it."""
    from kvstress.spec import spec_from_flags

    model3 = peaked_llama_three_layers
    spec = spec_from_flags("knorm", capacity=16)
    assert spec.name == "knorm_0_0_2_16"
    reference = ReferencePolicyModel(model3, spec, positions=positions)
    cache = make_cache(spec, model3, positions=positions)
    ids = torch.randperm(256, generator=torch.Generator().manual_seed(3))[:60].unsqueeze(0)
    with torch.no_grad():
        for i in range(0, ids.shape[1], chunk):
            expected = reference.forward(ids[:, i : i + chunk])
            actual = model3(ids[:, i : i + chunk], **with_cache(model3, cache)).logits
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert [cache.kept_positions(layer).shape[-1] for layer in range(3)] == [60, 60, 16]
    assert cache.kept_positions(2).tolist() == reference.kept_positions(2)


def test_key_norm_with_every_layer_whole_is_refused_by_name(model):
    with pytest.raises(SpecError, match="leaves its first 2 layers uncompressed but the model has 2"):
        make_cache("knorm_0_0_2_16", model)


def test_h2o_keeps_heavy_hitters_not_just_the_oldest(model):
    """The reference comparison could pass for a policy that keeps the oldest tokens if
    accumulated attention happened to favour them; make sure heads really differ."""
    cache = make_cache("h2o_0_4_16", model)
    stream(model, cache, token_ids(2, 80, seed=5), 1)
    kept = cache.kept_positions(1)
    rows = {tuple(row) for row in kept.reshape(-1, kept.shape[-1]).tolist()}
    assert len(rows) > 1, "every sequence and head kept the same tokens"
    assert all(row[-4:] == (76, 77, 78, 79) for row in rows)


def test_batched_h2o_keeps_per_sequence_what_it_keeps_alone(model):
    texts = [token_ids(1, 70, seed=s) for s in (6, 7)]
    batched = make_cache("h2o_2_6_24", model)
    stream(model, batched, torch.cat(texts), 3)
    for b, text in enumerate(texts):
        alone = make_cache("h2o_2_6_24", model)
        stream(model, alone, text, 3)
        for layer in range(2):
            assert batched.kept_positions(layer)[b].tolist() == alone.kept_positions(layer)[0].tolist()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_decode_scoring_matches_the_chunk_scoring_it_shortcuts(batch, softcap):
    """A decode step scores every layer's query, as the model rotated it, with one bmm; it
    must give what the general (prefill) path gives, logit softcap included."""
    from kvstress.caches.scored import attention_mass, decode_attention_mass

    generator = torch.Generator().manual_seed(3)
    heads, kv_heads, dim, total, scaling = 4, 2, 16, 37, 0.25
    query = torch.randn(batch, heads, 1, dim, generator=generator) * 4
    keys = torch.randn(batch, kv_heads, total, dim, generator=generator)
    expected = attention_mass(query, keys, scaling, start=total - 1, softcap=softcap)
    actual = decode_attention_mass(query.view(batch, heads, dim), keys, scaling, softcap)
    torch.testing.assert_close(actual, expected)
    if softcap is not None:  # the cap changes the scores: the test would see it missing
        assert not torch.allclose(actual, decode_attention_mass(query.view(batch, heads, dim), keys, scaling))


# -- memory ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, positions", [
    pytest.param(spec, positions, marks=pytest.mark.slow if positions == "shifted" else ())
    for spec, positions in COMPRESSED], ids=COMPRESSED_IDS)
def test_memory_does_not_grow_with_tokens_seen(model, spec, positions):
    """The compressed layers' buffers never move nor grow; a whole layer (key norm's first
    ones) grows by exactly one full-cache layer's bytes per token."""
    cache = make_cache(spec, model, positions=positions, chunk=50)
    ids = token_ids(1, 5000)
    stream(model, cache, ids[:, :100], 50)
    compressed = cache.stacked_layers
    held_at_100, allocated_at_100 = cache_bytes(cache), cache_bytes(cache, allocated=True)
    whole_at_100 = sum(layer.nbytes for layer in cache.whole_layers)
    pointers = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in compressed]
    stream(model, cache, ids[:, 100:4990], 50)
    stream(model, cache, ids[:, 4990:], 1)
    whole = sum(layer.nbytes for layer in cache.whole_layers)
    assert whole == whole_at_100 * 50  # 5000 tokens where there were 100
    assert cache_bytes(cache) - whole == held_at_100 - whole_at_100
    assert cache_bytes(cache, allocated=True) - whole == allocated_at_100 - whole_at_100
    assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in compressed] == pointers
    assert cache.seen == 5000 and all(layer.kept == 5000 for layer in cache.whole_layers)


@pytest.mark.parametrize("spec", ["streaming_4_24", "h2o_2_6_24", "tova_0_16", "knorm_0_0_0_16", "random_2_6_24"])
@pytest.mark.parametrize("first_chunk", [8, 50, 64])
def test_held_bytes_are_capacity_slots_whatever_the_chunk(model, spec, first_chunk):
    """What a cache holds between forwards is its capacity's slots, the same whether the text
    so far is shorter or longer than the run's chunk; the chunk's room is counted apart,
    sized once for the run."""
    full = DynamicCache(config=model.config)
    stream(model, full, token_ids(1, 64), 64)
    per_token = cache_bytes(full) // 64  # keys and values of every layer, one token
    cache = make_cache(spec, model, chunk=64)
    stream(model, cache, token_ids(1, first_chunk), first_chunk)
    held, allocated = cache_bytes(cache), cache_bytes(cache, allocated=True)
    capacity = capacity_of(spec)
    # Keys and values of `capacity` slots, plus a few bytes of bookkeeping per slot.
    assert capacity * per_token < held < capacity * per_token * 1.2
    assert allocated - held == (allocated - held) // 64 * 64 > 0  # 64 slots of room
    stream(model, cache, token_ids(1, 200, seed=2), 64)
    assert (cache_bytes(cache), cache_bytes(cache, allocated=True)) == (held, allocated)


def test_full_cache_grows_with_tokens_seen(model):
    cache = make_cache("baseline", model)
    ids = token_ids(1, 400)
    stream(model, cache, ids[:, :100], 50)
    small = cache_bytes(cache)
    stream(model, cache, ids[:, 100:], 50)
    assert cache_bytes(cache) == 4 * small


def test_positions_seen_by_the_model(model):
    original = make_cache("streaming_4_24", model)
    shifted = make_cache("streaming_4_24", model, positions="shifted")
    ids = token_ids(1, 50)
    stream(model, original, ids, 10)
    stream(model, shifted, ids, 10)
    assert original.get_seq_length() == 50  # next token rotated at its absolute position
    assert shifted.get_seq_length() == 24  # next token rotated right after the kept ones


# -- generate ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec, positions", COMPRESSED, ids=COMPRESSED_IDS)
def test_generate_runs_and_ends_at_capacity(model, spec, positions):
    cache = make_cache(spec, model, positions=positions)
    prompt = token_ids(2, 20)
    out = model.generate(
        prompt, **with_cache(model, cache), max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0
    )
    assert out.shape == (2, 50)
    assert all(layer.kept == capacity_of(spec) for layer in cache.stacked_layers)
    assert all(layer.kept == 49 for layer in cache.whole_layers)
    assert cache.seen == 49  # the last generated token is never fed back


def test_generate_with_capacity_above_length_matches_full_cache(model):
    prompt = token_ids(1, 10)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **with_cache(model, DynamicCache(config=model.config)), **kwargs)
    for spec in ("streaming_4_64", "h2o_2_6_64", "tova_2_64", "knorm_2_6_0_64", "knorm_0_0_1_64", "random_2_6_64"):
        actual = model.generate(prompt, **with_cache(model, make_cache(spec, model)), **kwargs)
        assert actual.tolist() == expected.tolist()
