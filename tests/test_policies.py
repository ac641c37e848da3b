"""The policy registry, the policies test_caches.py's generic table does not cover, and plugins.

test_caches.py runs every fixed-capacity policy through exactness, the reference
implementation, memory and generate; here: what the registry derives (grammar, flags,
`--method all`, descriptions), what sets the new policies apart from their neighbours,
the quantized cache (transformers' own, so none of those generic tests apply), and a
policy installed from outside kvstress through the entry point.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from matplotlib.colors import to_rgb
from test_caches import stream, token_ids, with_cache
from transformers import DynamicCache, QuantizedCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvstress import make_cache
from kvstress.caches import cache_bytes, cached_tokens, make_run_cache
from kvstress.plot import build_sweep_figure
from kvstress.results import ResultsWriter, load_results
from kvstress.spec import (
    MethodSpec,
    SpecError,
    all_methods,
    describe_policies,
    method_specs,
    parse_spec,
    registered_policies,
    spec_from_flags,
)


@pytest.fixture(scope="module")
def model(peaked_llama):
    return peaked_llama


# -- the registry ---------------------------------------------------------------------


def test_every_policy_spells_its_spec_both_ways():
    for policy in registered_policies():
        spec = spec_from_flags(policy.name)
        fields = {field.name: getattr(spec.params, field.name) for field in dataclasses.fields(spec.params)}
        assert parse_spec(spec.name) == spec == MethodSpec(policy.name, **fields)
        assert spec.name.count("_") == policy.form.count("_")
        assert spec.is_compressed == (spec.capacity is not None)


@pytest.mark.parametrize(
    "name, flags, expected",
    [
        ("h2o", {}, "h2o_4_32_256"),  # window = capacity // 8
        ("h2o", dict(capacity=8), "h2o_4_1_8"),  # ... at least the newest token
        ("streaming", dict(window=16), "streaming_4_256"),  # a flag the policy lacks is ignored
        ("streaming", dict(sink=0, capacity=512), "streaming_0_512"),  # window attention
        ("tova", {}, "tova_0_256"),  # the paper's TOVA: no sinks
        ("tova", dict(sink=4, window=9), "tova_4_256"),
        ("knorm", dict(capacity=512), "knorm_0_0_2_512"),
        ("random", dict(sink=2, window=6, capacity=24), "random_2_6_24"),
        ("quant", dict(capacity=64, sink=2), "quant_4_128"),  # keeps every token: no sizes apply
        ("baseline", dict(capacity=64), "baseline"),
    ],
)
def test_size_flags_give_each_policy_its_defaults(name, flags, expected):
    assert spec_from_flags(name, **flags).name == expected


def test_method_all_is_the_seed_experiment_and_lists_expand_in_order():
    assert all_methods() == ("baseline", "streaming", "h2o")
    specs = method_specs(["tova", "all,knorm_2_6_0_128", "h2o", "quant_2_64"], capacity=128)
    assert [spec.name for spec in specs] == [
        "tova_0_128", "baseline", "streaming_4_128", "h2o_4_16_128", "knorm_2_6_0_128", "quant_2_64"
    ]
    assert [spec.name for spec in method_specs([])] == ["baseline", "streaming_4_256", "h2o_4_32_256"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("tova_4_4", "use a capacity above 4"),
        ("tova_4_32_256", "should look like tova_S_C"),
        ("knorm_4_-1_0_256", "window must be at least 0"),
        ("knorm_0_0_-1_256", "full_layers must be 0 or more"),
        ("knorm_0_0_256", "should look like knorm_S_W_F_C"),
        ("random_4_32_36", "use a capacity above 36"),
        ("quant_3_128", "use quant_2_R or quant_4_R"),
        ("quant_4_-1", "residual must be 0 or more"),
        ("snapkv_4_256", "or one of tova_S_C, tovahead_S_C, knorm_S_W_F_C, random_S_W_C, quant_B_R"),
    ],
)
def test_new_policies_say_what_to_fix(text, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(text)


def test_describe_policies_lists_every_policy_with_its_form_and_defaults():
    rows = {row.name: row for row in describe_policies()}
    assert list(rows) == [policy.name for policy in registered_policies()]
    assert rows["h2o"].form == "h2o_S_W_C"
    assert rows["h2o"].parameters == "S sink = 4, W window = capacity // 8 (at least 1), C capacity = 256 (--capacity)"
    assert rows["quant"].parameters == "B bits = 4, R residual = 128"
    assert rows["tova"].example == "tova_0_256"
    assert all(row.description for row in rows.values())


# -- what sets each policy apart ---------------------------------------------------------


def test_tova_replaces_scores_where_h2o_accumulates(model):
    """Same capacity, no window: TOVA, ranking by the newest query alone, must keep
    different tokens from H2O. The authors' TOVA evicts the same tokens from every head of
    a layer; kvstress's per-head variant lets each KV head keep its own."""
    ids = token_ids(2, 90, seed=5)
    tova, per_head, h2o = (make_cache(spec, model) for spec in ("tova_0_16", "tovahead_0_16", "h2o_0_1_16"))
    for cache in (tova, per_head, h2o):
        stream(model, cache, ids, 1)
    kept = tova.kept_positions(1)
    assert not torch.equal(kept, h2o.kept_positions(1))
    assert torch.equal(kept[:, 0], kept[:, 1])  # one eviction shared by the layer's heads
    assert not torch.equal(kept[0], kept[1])  # ... decided per sequence
    assert len({tuple(row) for row in per_head.kept_positions(1).reshape(-1, 16).tolist()}) == 4


@pytest.mark.parametrize("spec, pooled", [("tova_0_8", True), ("tovahead_0_8", False)])
def test_tova_scores_a_chunk_by_its_last_query(model, spec, pooled):
    """After one chunk that overflows the cache, the kept tokens are those the chunk's last
    query attends to most: averaged over all the layer's query heads (the authors' TOVA),
    or summed over each KV head's query group (kvstress's per-head variant)."""
    cache = make_cache(spec, model)
    ids = token_ids(1, 30, seed=2)
    captured = {}
    attention = model.model.layers[0].self_attn
    hooks = [attention.q_proj.register_forward_hook(lambda m, a, out: captured.update(query=out)),
             attention.k_proj.register_forward_hook(lambda m, a, out: captured.update(keys=out))]
    try:
        stream(model, cache, ids, 30)
    finally:
        for hook in hooks:
            hook.remove()
    query = captured["query"].view(1, 30, 4, 16).transpose(1, 2)
    keys = captured["keys"].view(1, 30, 2, 16).transpose(1, 2)
    cos, sin = model.model.rotary_emb(keys, torch.arange(30).unsqueeze(0))
    last_query, rotated_keys = apply_rotary_pos_emb(query, keys, cos, sin)
    last_query = last_query[:, :, -1:]
    # Each query head's attention, written out: [heads, keys].
    grouped_keys = rotated_keys.repeat_interleave(2, dim=1)
    attention_of = ((last_query @ grouped_keys.transpose(-1, -2)) * attention.scaling).softmax(dim=-1)[0, :, 0]
    if pooled:
        expected = attention_of.mean(dim=0).topk(8).indices.sort().values.expand(1, 2, 8)
    else:
        expected = attention_of.view(2, 2, 30).sum(dim=1).topk(8, dim=-1).indices.sort(dim=-1).values.unsqueeze(0)
    assert cache.kept_positions(0).tolist() == expected.tolist()


def test_key_norm_keeps_the_smallest_keys(model):
    """With no sinks and no window, what stays is the smallest-norm keys of all seen."""
    cache = make_cache("knorm_0_0_0_12", model)
    ids = torch.randperm(256, generator=torch.Generator().manual_seed(8))[:60].unsqueeze(0)
    keys = []
    attention = model.model.layers[1].self_attn
    hook = attention.k_proj.register_forward_hook(lambda m, a, out: keys.append(out))
    try:
        stream(model, cache, ids, 7)
    finally:
        hook.remove()
    norms = torch.cat(keys, dim=1).view(1, 60, 2, 16).transpose(1, 2).norm(dim=-1)  # [1, kv_heads, 60]
    expected = norms.topk(12, dim=-1, largest=False).indices.sort(dim=-1).values
    assert cache.kept_positions(1).tolist() == expected.tolist()


def test_random_eviction_is_seeded(model):
    ids = token_ids(1, 120, seed=9)

    def kept(seed):
        cache = make_run_cache(parse_spec("random_2_4_24"), model, positions="original", lazy=0, seed=seed)
        stream(model, cache, ids, 1)
        return cache.kept_positions(0)

    first, again, other = kept(1), kept(1), kept(2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # Neither the oldest nor the newest: a spread over the text, sinks and window kept.
    row = first[0, 0].tolist()
    assert row[:2] == [0, 1] and row[-4:] == [116, 117, 118, 119]
    assert row[2:-4] != list(range(2, 20)) and row[2:-4] != list(range(98, 116))


def test_window_attention_keeps_only_the_most_recent_tokens(model):
    """streaming_0_C, the StreamingLLM paper's window attention: no sinks, a plain window."""
    cache = make_run_cache(parse_spec("streaming_0_16"), model, positions="shifted", lazy=0)
    stream(model, cache, token_ids(1, 100, seed=4), 9)
    assert (cache.kept_positions(0) == torch.arange(84, 100)).all()


# -- the quantized cache ---------------------------------------------------------------------


def test_quantized_cache_is_transformers_own_and_takes_no_position_options(model):
    cache = make_cache("quant_2_8", model)
    assert type(cache) is QuantizedCache
    assert type(make_run_cache(parse_spec("quant_4_8"), model, positions="shifted", lazy=16)) is QuantizedCache
    with pytest.raises(ValueError, match="do not apply"):
        make_cache("quant_4_8", model, positions="shifted")


def quantized_bytes(layer, bits: int) -> int:
    """What quanto holds for one layer, counted from the shapes: per tensor (keys, values),
    `bits` per element packed in bytes, a float scale and shift per group of 64 elements,
    and the full-precision residual."""
    quantized = layer._quantized_keys.numel()
    residual = layer.keys.numel() if layer.keys.dim() == 4 else 0
    item = layer.keys.element_size()
    packed = math.ceil(quantized * bits / 8)
    groups = quantized // 64
    return 2 * (packed + 2 * groups * item + residual * item)


@pytest.mark.parametrize("bits", [2, 4])
def test_quantized_cache_bytes_are_the_bytes_held(model, bits):
    cache = make_cache(f"quant_{bits}_8", model)
    ids = token_ids(2, 77, seed=3)
    stream(model, cache, ids[:, :64], 64)
    stream(model, cache, ids[:, 64:], 1)  # the 8th step moves the residual into the quantized part
    assert cached_tokens(cache) == 77
    assert cache.layers[0].keys.shape[-2] == 5  # the recent tokens still in full precision
    assert cache_bytes(cache) == sum(quantized_bytes(layer, bits) for layer in cache.layers)

    # Against float32: an element costs bits / 8 bytes plus a float32 scale and shift per 64
    # elements (1 / 8 byte), (bits + 1) / 32 of its full size; 72 tokens quantized, 5 not.
    full = make_cache("baseline", model)
    stream(model, full, ids, 77)
    assert cache_bytes(cache) / cache_bytes(full) == pytest.approx((72 * (bits + 1) / 32 + 5) / 77)


def test_quantized_logits_come_closer_to_the_full_cache_with_more_bits(model):
    ids = token_ids(1, 96, seed=6)
    expected = stream(model, DynamicCache(config=model.config), ids, 16)
    error = {bits: (stream(model, make_cache(f"quant_{bits}_16", model), ids, 16) - expected).abs().mean().item()
             for bits in (2, 4)}
    assert 0 < error[4] < error[2] / 2


def test_quantized_cache_generates(model):
    cache = make_cache("quant_4_4", model)
    out = model.generate(token_ids(2, 20), **with_cache(model, cache), max_new_tokens=10, min_new_tokens=10,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (2, 30)
    assert cached_tokens(cache) == 29


# -- a policy from outside kvstress -------------------------------------------------------------


def test_plugin_policy_is_usable_by_name(model, example_policy):
    example_plugin = example_policy
    rows = {row.name: row for row in describe_policies()}
    assert rows[example_plugin].form == "ema_S_W_C_D"
    assert example_plugin not in all_methods()
    ids = token_ids(2, 24, seed=2)
    expected = stream(model, DynamicCache(config=model.config), ids, 5)
    torch.testing.assert_close(stream(model, make_cache("ema_2_6_24_90", model), ids, 5), expected,
                               rtol=1e-5, atol=1e-5)

    # Decay 100% is plain accumulation: H2O, through the plugin's own cache class.
    ids = token_ids(2, 70, seed=6)
    plugin, h2o = make_cache("ema_2_6_24_100", model), make_cache("h2o_2_6_24", model)
    stream(model, plugin, ids, 1)
    stream(model, h2o, ids, 1)
    assert torch.equal(plugin.kept_positions(1), h2o.kept_positions(1))
    decayed = make_cache(spec_from_flags(example_plugin, capacity=24, sink=2, window=6), model)
    stream(model, decayed, ids, 1)
    assert decayed.spec.name == "ema_2_6_24_90"
    assert not torch.equal(decayed.kept_positions(1), h2o.kept_positions(1))


# -- plots --------------------------------------------------------------------------------------


def test_ten_methods_plot_in_ten_distinct_styles(tmp_path):
    methods = [spec_from_flags(policy.name).name for policy in registered_policies()]
    methods += ["streaming_0_256", "h2o_4_126_256", "quant_2_128"][: 10 - len(methods)]
    writer = ResultsWriter(tmp_path / "r.json", "sweep", {"model": "tiny-random"}, {"device": "cpu"})
    for method in methods:
        for length in (1000, 2000):
            writer.add_record({"method": method, "length": length, "status": "ok", "batch_size": 1,
                               "tpot_ms_median": 1.0, "tpot_ms_p90": 1.5, "cache_bytes": length})
    writer.finish()
    figure = build_sweep_figure([load_results(tmp_path / "r.json")])
    lines = [line for line in figure.axes[0].get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in lines] == methods
    styles = {(to_rgb(line.get_color()), line.get_marker()) for line in lines}
    assert len(styles) == 10
    assert len({color for color, _ in styles}) == 10 and len({marker for _, marker in styles}) >= 9
    assert not {to_rgb("red"), to_rgb("tab:red")} & {color for color, _ in styles}  # red marks failures
