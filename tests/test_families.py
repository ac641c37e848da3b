"""Every model family transformers has, as users bring them: exact, or refused by name.

A compatibility matrix of tiny models (2 layers, hidden 64, grouped-query attention where
the family allows it, a 300-id vocabulary) built from transformers' own config classes
with seeded random weights, no download. Each supported family, with every policy, must
give the full cache's logits while the tokens fit, token by token and chunk by chunk, in
both position modes (original only where shifted is refused by name), and hold no more
bytes once past capacity. Hybrid families (sliding-window and global layers) have a window
shorter than the tokens, and their sliding layers must hold what transformers' own
DynamicCache holds there, counted in the cache's bytes. Two checks that do not lean on
that invariant: H2O's scores are the attention weights the model's own eager kernel
returns (softcap, sinks, latent attention included), and in shifted mode the keys turned
after evictions are those the model would rotate at their new positions. Each supported
family also runs, through the CLI, one needle point and one batch point (batch sizes 1
and 2) with an H2O cache that evicts. Each refused family must be refused, through the
CLI, in one line naming why (exit 2, no traceback).
"""

from __future__ import annotations

import gc
import importlib

import pytest
import torch
import transformers
from command_runs import COMMANDS
from test_caches import stream, token_ids, with_cache
from transformers import AutoModelForCausalLM, DynamicCache
from typer.testing import CliRunner

from kvstress import make_cache
from kvstress.caches import UnsupportedModelError, cache_sizes, cached_tokens
from kvstress.cli import app
from kvstress.models import attention_implementation
from kvstress.needle import needle_cells
from kvstress.results import load_results

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, max_position_embeddings=512,
             pad_token_id=0, bos_token_id=1, eos_token_id=2,
             initializer_range=0.2)  # 10x the usual: peaked attention, as trained models have, not uniform
ALL_FULL = dict(layer_types=["full_attention"] * 2)
WINDOW = 8  # sliding window of the hybrid families: shorter than every check's tokens
LONG_WINDOW = 40  # of the families with a window on every layer: above the capacities (24), below the tokens
# Gemma 3, Cohere 2, OLMo 3's published patterns (5:1, 3:1 sliding to global) cut to two
# layers would leave only sliding ones: one of each instead.
HYBRID = dict(layer_types=["sliding_attention", "full_attention"], sliding_window=WINDOW)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
           n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
           first_k_dense_replace=1, n_group=1, topk_group=1)

# family → (config class, what differs from SHAPE): what each one brings that Llama does not.
SUPPORTED = {
    "llama": ("LlamaConfig", {}),
    "llama3-rope": ("LlamaConfig", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-yarn": ("LlamaConfig", dict(rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128})),
    "llama-dynamic": ("LlamaConfig", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),  # MoE
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "qwen3-moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "phi3": ("Phi3Config", {}),  # fused qkv_proj
    "phi3-longrope": ("Phi3Config", dict(max_position_embeddings=256, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
        "original_max_position_embeddings": 32})),
    "phi": ("PhiConfig", dict(partial_rotary_factor=0.5)),  # partial rotary, rotated around apply_rotary_pos_emb
    "stablelm": ("StableLmConfig", dict(partial_rotary_factor=0.25)),
    "gpt-neox": ("GPTNeoXConfig", dict(rotary_pct=0.25)),  # fused query_key_value, partial rotary
    # Fused query_key_value, attention computed by the module itself with torch's SDPA.
    "falcon": ("FalconConfig", dict(num_kv_heads=2, new_decoder_architecture=True)),  # 40B / 180B: GQA
    "falcon-7b": ("FalconConfig", dict(multi_query=True, new_decoder_architecture=False,
                                       parallel_attn=True)),  # one KV head
    "glm": ("GlmConfig", dict(head_dim=16)),  # partial, interleaved rotary
    "glm4": ("Glm4Config", dict(head_dim=16)),
    "cohere": ("CohereConfig", {}),  # interleaved rotary
    "gemma": ("GemmaConfig", dict(head_dim=16)),
    "granite": ("GraniteConfig", {}),
    "olmo2": ("Olmo2Config", {}),
    "starcoder2": ("Starcoder2Config", dict(sliding_window=None)),
    "smollm3": ("SmolLM3Config", dict(no_rope_layers=[1, 0])),  # layer 1 without rotary
    "gemma2-full": ("Gemma2Config", dict(head_dim=16, attn_logit_softcapping=1.0,  # a cap that bites
                                         **ALL_FULL)),  # logit softcap, eager attention
    "gpt-oss-full": ("GptOssConfig", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                           **ALL_FULL)),  # learned attention sinks, eager attention
    "gemma3-full": ("Gemma3TextConfig", dict(head_dim=16, **ALL_FULL)),
    "gemma4-full": ("Gemma4TextConfig", dict(head_dim=16, global_head_dim=32, **ALL_FULL)),  # rotary of one tensor
    "cohere2-full": ("Cohere2Config", ALL_FULL),
    "olmo3-full": ("Olmo3Config", ALL_FULL),
    "beam-full": ("BeamConfig", ALL_FULL),  # rotary on the sliding layers only: none here
    # Hybrid: the sliding layers keep the model's window, the global ones are compressed.
    "gemma2": ("Gemma2Config", dict(head_dim=16, attn_logit_softcapping=1.0, sliding_window=WINDOW)),  # sliding first
    "gpt-oss": ("GptOssConfig", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, **HYBRID)),
    # Global layers with heads twice the sliding ones' size, and values that are their keys.
    "gemma4": ("Gemma4TextConfig", dict(head_dim=16, global_head_dim=32, attention_k_eq_v=True, **HYBRID)),
    "cohere2": ("Cohere2Config", HYBRID),  # rotary on the sliding layers only
    "olmo3": ("Olmo3Config", HYBRID),
    "beam": ("BeamConfig", HYBRID),
    # Chunked layers (attention within fixed chunks of positions) kept as transformers keeps them;
    # the global layer has no rotary.
    "llama4": ("Llama4TextConfig", dict(head_dim=16, num_local_experts=2, intermediate_size_mlp=128,
                                        layer_types=["chunked_attention", "full_attention"], no_rope_layers=[1, 0],
                                        attention_chunk_size=WINDOW)),
    "qwen2-window": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW,
                                         max_window_layers=1)),  # global first, then sliding
    # A window on every layer (Mistral v0.1, Phi-3 mini, Starcoder 2): every layer compressed and
    # masked to the window, which the flatness check's 100 tokens pass.
    "mistral-window": ("MistralConfig", dict(sliding_window=LONG_WINDOW)),
    "phi3-window": ("Phi3Config", dict(sliding_window=LONG_WINDOW)),
    "starcoder2-window": ("Starcoder2Config", dict(sliding_window=LONG_WINDOW)),
    "gemma3-sliding": ("Gemma3TextConfig", dict(head_dim=16, layer_types=["sliding_attention"] * 2,
                                                sliding_window=LONG_WINDOW)),  # the local layers' own rotary
    "cohere2-sliding": ("Cohere2Config", dict(layer_types=["sliding_attention"] * 2, sliding_window=LONG_WINDOW)),
    "deepseek-v2": ("DeepseekV2Config", dict(MLA, q_lora_rank=None)),  # latent attention: keys ≠ values in size
    "deepseek-v3": ("DeepseekV3Config", dict(MLA, q_lora_rank=24)),
    "gptj": ("GPTJConfig", dict(rotary_dim=8, n_inner=128)),  # rotary of its own, partial and interleaved
    "llama4-full": ("Llama4TextConfig", dict(head_dim=16, num_local_experts=2, intermediate_size_mlp=128,
                                             no_rope_layers=[1, 0], **ALL_FULL)),
}
HYBRIDS = ["gemma2", "gpt-oss", "gemma3", "gemma4", "cohere2", "olmo3", "beam", "llama4", "qwen2-window"]
# Families served in original positions only, and the reason shifted positions give.
ORIGINAL_ONLY = {**dict.fromkeys(HYBRIDS, "sliding-window layers, whose window the model counts in absolute positions"),
                 "deepseek-v2": "multi-head latent attention", "deepseek-v3": "multi-head latent attention",
                 "llama4-full": "no rotary embedding that kvstress can call",
                 "llama4": "no rotary embedding that kvstress can call",
                 "gptj": "no rotary embedding that kvstress can call",
                 "llama-dynamic": "dynamic rotary scaling, whose frequencies change with the length"}

# family → (config class, what differs from SHAPE, what the one-line refusal says).
REFUSED = {
    "falcon-alibi": ("FalconConfig", dict(alibi=True, multi_query=False, new_decoder_architecture=False),  # RW-1B
                     "FalconForCausalLM uses ALiBi position biases"),
    "bloom": ("BloomConfig", {}, "BloomForCausalLM's attention (BloomAttention) does not run through"),
    "mpt": ("MptConfig", dict(d_model=64, n_layers=2, n_heads=4), "MptForCausalLM's attention (MptAttention) does not"),
    "gpt-neo": ("GPTNeoConfig", dict(attention_types=[[["global", "local"], 1]]),
                "GPTNeoForCausalLM has no attention layers that transformers' attention interface runs"),
    "mamba": ("MambaConfig", dict(state_size=8), "MambaForCausalLM keeps a recurrent state"),
    "jamba": ("JambaConfig", dict(num_experts=2, attn_layer_period=2, attn_layer_offset=1),  # Mamba, attention
              "JambaForCausalLM keeps a recurrent state"),
    "zamba2": ("Zamba2Config", dict(layers_block_type=["mamba", "hybrid"], num_mem_blocks=1),
               "Zamba2ForCausalLM keeps a recurrent state"),
    "falcon-h1": ("FalconH1Config", {}, "FalconH1ForCausalLM keeps a recurrent state"),
    "qwen3-next": ("Qwen3NextConfig", dict(head_dim=16, full_attention_interval=2),  # linear, full attention
                   "Qwen3NextForCausalLM keeps a recurrent state"),
    "gemma4-kv-shared": ("Gemma4TextConfig", dict(head_dim=16, global_head_dim=32, sliding_window=WINDOW,
                                                  layer_types=["sliding_attention", "full_attention"] * 2,
                                                  num_hidden_layers=4, num_kv_shared_layers=2),
                         "Gemma4ForCausalLM's last 2 layers attend with the keys and values of earlier ones"),
    "llama4-all-chunked": ("Llama4TextConfig", dict(head_dim=16, num_local_experts=2, intermediate_size_mlp=128),
                           "Llama4ForCausalLM attends within fixed chunks of absolute positions in every layer"),
    # Every layer sliding, with a window the capacity (32) does not fit under: nothing to compress.
    "mistral-small-window": ("MistralConfig", dict(sliding_window=16),
                             "MistralForCausalLM attends within a sliding window of 16 tokens in every layer"),
    "starcoder2-small-window": ("Starcoder2Config", dict(sliding_window=16),
                                "Starcoder2ForCausalLM attends within a sliding window of 16 tokens in every layer"),
}
# Families newer than the installed transformers (Beam is not in 5.17) are not in the matrix.
SUPPORTED = {family: entry for family, entry in SUPPORTED.items() if hasattr(transformers, entry[0])}
REFUSED = {family: entry for family, entry in REFUSED.items() if hasattr(transformers, entry[0])}
HYBRIDS = [family for family in HYBRIDS if family in SUPPORTED]
ORIGINAL_ONLY = {family: why for family, why in ORIGINAL_ONLY.items() if family in SUPPORTED}
if not hasattr(importlib.import_module("transformers.models.gptj.modeling_gptj"), "ALL_ATTENTION_FUNCTIONS"):
    # GPT-J's attention joined the attention interface after transformers 5.17: refused before.
    ORIGINAL_ONLY.pop("gptj")
    REFUSED["gptj"] = (*SUPPORTED.pop("gptj"), "GPTJForCausalLM's attention (GPTJAttention) does not run through")

# Through the CLI, every family in the whole suite; the fast tier runs one of each kind of attention.
CLI_POINT_FAMILIES = [family if family in ("llama", "phi3", "falcon", "gemma2", "mistral-window", "deepseek-v2")
                      else pytest.param(family, marks=pytest.mark.slow) for family in SUPPORTED]

# Every built-in compressed policy, capacity 24 (the tokens of the exactness check); the fast
# tier runs the seed's two (H2O's scoring path is TOVA's too), the slow one the others too.
POLICIES = ["streaming_2_24", "h2o_2_4_24"] + [
    pytest.param(spec, marks=pytest.mark.slow)
    for spec in ("tova_2_24", "tovahead_2_24", "knorm_2_4_0_24", "random_2_4_24")]
runner = CliRunner()


def family_config(config_class: str, changes: dict, layers: int = 2):
    """The family's tiny config with `layers` layers (per-layer lists cut to match), unless it says how many."""
    layers = changes.get("num_hidden_layers", layers)
    per_layer = {key: value[:layers] for key, value in changes.items() if isinstance(value, list)}
    return getattr(transformers, config_class)(**{**SHAPE, **changes, **per_layer, "num_hidden_layers": layers})


def build(family: str, layers: int = 2, attention: str | None = None):
    """The family's tiny model, float32, seeded, with the attention kvstress loads it with
    unless `attention` names another."""
    config = family_config(*SUPPORTED[family], layers=layers)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(
        config, attn_implementation=attention or attention_implementation(config)).eval()


@pytest.fixture(scope="module")
def models():
    """family → its two-layer model, built when first asked for."""
    built = {}

    def model_of(family: str):
        if family not in built:
            built[family] = build(family)
        return built[family]

    return model_of


def modes(family: str) -> list[str]:
    return ["original"] if family in ORIGINAL_ONLY else ["original", "shifted"]


# -- supported families -----------------------------------------------------------------


@pytest.mark.parametrize("spec", POLICIES)
@pytest.mark.parametrize("family", SUPPORTED)
def test_logits_equal_full_cache_while_tokens_fit(models, family, spec):
    model = models(family)
    ids = token_ids(2, 24)
    for chunk in (1, 5):
        expected = stream(model, DynamicCache(config=model.config), ids, chunk)
        for positions in modes(family):
            actual = stream(model, make_cache(spec, model, positions=positions), ids, chunk)
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, case=f"{positions} chunk {chunk}": f"{case}: {m}")


@pytest.mark.parametrize("spec", POLICIES)
@pytest.mark.parametrize("family", SUPPORTED)
def test_bytes_stop_growing_at_capacity(models, family, spec):
    """Past capacity every policy holds `capacity` tokens in the same bytes, in every mode:
    scoring and turning keys (partial, interleaved, absent rotary) run on every forward."""
    model = models(family)
    ids = token_ids(2, 100, seed=2)
    for positions in modes(family):
        cache = make_cache(spec, model, positions=positions, chunk=8)
        stream(model, cache, ids[:, :32], 8)
        at_capacity = cache_sizes(cache)
        logits = torch.cat((stream(model, cache, ids[:, 32:92], 8), stream(model, cache, ids[:, 92:], 1)), dim=1)
        assert cache_sizes(cache) == at_capacity, positions
        assert cached_tokens(cache) == 24 and torch.isfinite(logits).all(), positions


@pytest.mark.parametrize("spec", POLICIES)
@pytest.mark.parametrize("family", HYBRIDS)
def test_sliding_layers_hold_the_models_window_in_the_cache_bytes(models, family, spec):
    """Past the window and the capacity, each sliding layer holds the last WINDOW - 1 tokens
    in the bytes transformers' DynamicCache holds there, and the cache's bytes are its
    buffers' (the global layers') plus those."""
    model = models(family)
    ids = token_ids(2, 100, seed=2)
    cache, full = make_cache(spec, model, chunk=8), DynamicCache(config=model.config)
    sliding = [index for index, layer in enumerate(full.layers) if layer.is_sliding]
    assert sliding and all(cache.layers[index].is_sliding for index in sliding)
    for start, stop, chunk in ((0, 96, 8), (96, 100, 1)):  # chunks past the window, then decode steps
        stream(model, cache, ids[:, start:stop], chunk)
        stream(model, full, ids[:, start:stop], chunk)
        window_bytes = sum(tensor.numel() * tensor.element_size()
                           for index in sliding for tensor in (full.layers[index].keys, full.layers[index].values))
        buffers = sum(tensor.numel() * tensor.element_size() for tensor in cache.buffers.values())
        assert cache_sizes(cache)[1] == buffers + window_bytes
        for index in sliding:
            assert torch.equal(cache.kept_positions(index)[0, 0], torch.arange(stop - WINDOW + 1, stop))


@pytest.mark.parametrize("chunk", [1, 5])
def test_whole_layers_are_the_first_global_ones_between_sliding_ones(chunk):
    """Key norm's full layers F count the global layers only: with Gemma 2's alternation over
    four layers, F = 1 leaves layer 1 whole, compresses layer 3, and both sliding layers keep
    the window; the logits stay the full cache's while the tokens fit."""
    model = build("gemma2", layers=4)
    ids = token_ids(2, 24)
    cache = make_cache("knorm_2_4_1_24", model)
    assert [layer.is_sliding for layer in cache.layers] == [True, False, True, False]
    assert cache.whole_layers == [cache.layers[1]] and cache.stacked_layers == [cache.layers[3]]
    expected = stream(model, DynamicCache(config=model.config), ids, chunk)
    torch.testing.assert_close(stream(model, cache, ids, chunk), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", SUPPORTED)
@pytest.mark.parametrize("chunk", [1, pytest.param(5, marks=pytest.mark.slow)])
def test_h2o_scores_are_the_attention_the_models_own_kernel_pays(family, chunk):
    """H2O's score of a token is the attention the model's kernel paid it, summed over the
    queries so far and over the query heads made from its cached KV head (a GQA group;
    under latent attention, every head), with the family's softcap or sinks: the weights
    the weights the same model's eager attention returns with the full cache, while the
    tokens fit (H2O runs with the attention kvstress loads: Falcon's SDPA)."""
    model, eager = build(family), build(family, attention="eager")
    sink, length = 2, 20
    ids = token_ids(2, length, seed=4)
    cache, full = make_cache(f"h2o_{sink}_4_24", model, chunk=chunk), DynamicCache(config=model.config)
    paid = None  # [layers, batch, heads, length]
    with torch.no_grad():
        for first in range(0, length, chunk):
            model(ids[:, first : first + chunk], **with_cache(model, cache))
            weights = eager(ids[:, first : first + chunk], output_attentions=True, **with_cache(eager, full)).attentions
            weights = [weights[layer.layer_idx] for layer in cache.stacked_layers]  # not the sliding ones
            forward = torch.stack([torch.nn.functional.pad(w.sum(dim=2), (0, length - w.shape[-1])) for w in weights])
            paid = forward if paid is None else paid + forward
    scores = cache.buffers["scores"][..., sink:length]  # [layers, batch, cached heads, slots]
    expected = paid.view(*scores.shape[:3], -1, length).sum(dim=3)[..., sink:]
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", [family for family in SUPPORTED if family not in ORIGINAL_ONLY])
@pytest.mark.parametrize("chunk", [1, 5])
def test_shifted_keys_are_the_models_own_at_their_new_positions(family, chunk):
    """With one layer a key depends on its token and position only, so a StreamingLLM cache
    in shifted mode, past capacity, must give exactly what the model gives on the kept
    tokens alone, from position 0: the turned keys are what the model would rotate there."""
    model = build(family, layers=1)
    sink, capacity, length = 2, 12, 40
    ids = token_ids(2, length, seed=3)
    actual = stream(model, make_cache(f"streaming_{sink}_{capacity}", model, positions="shifted", chunk=chunk),
                    ids, chunk)[:, -chunk:]
    last = length - chunk  # the last forward's first token: before it, sinks and the most recent are kept
    kept = torch.cat((ids[:, :sink], ids[:, last - (capacity - sink) : last], ids[:, last:]), dim=1)
    with torch.no_grad():
        expected = model(kept).logits[:, -chunk:]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


WINDOWED = ["mistral-window", "phi3-window", "gemma3-sliding"]


def small_window_model(family: str, window: int = 16):
    """The family's one-layer model with a window the streams below run past."""
    config_class, changes = SUPPORTED[family]
    config = family_config(config_class, {**changes, "sliding_window": window}, layers=1)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention_implementation(config)).eval()


@pytest.mark.parametrize("family", WINDOWED)
@pytest.mark.parametrize("chunk", [1, 5])
def test_the_models_window_hides_kept_tokens_that_left_it(family, chunk):
    """Original positions, a window of 16 on every layer: once 17 tokens are seen, StreamingLLM's
    sinks (positions 0, 1) are out of every query's window, so with one layer (keys depend on
    token and position only) streaming_2_8 must give what streaming_0_6 gives, which keeps the
    same six recent tokens and no sinks; before that, the sinks are seen and the two differ."""
    model = small_window_model(family)
    ids = token_ids(2, 60, seed=5)
    with_sinks = stream(model, make_cache("streaming_2_8", model, chunk=chunk), ids, chunk)
    without = stream(model, make_cache("streaming_0_6", model, chunk=chunk), ids, chunk)
    first_hidden = 20  # past 17, at a chunk boundary for both chunk sizes
    torch.testing.assert_close(with_sinks[:, first_hidden:], without[:, first_hidden:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_sinks[:, 8:16], without[:, 8:16], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("family", WINDOWED)
def test_shifted_positions_mask_the_window_among_the_kept(family):
    """Shifted positions: the window counts ranks among the kept tokens. A forward of 8 tokens
    after 12 kept spans 20 ranks, past the window of 16, so one layer must give what the model
    gives on the kept tokens alone, from position 0, with its own window mask."""
    model = small_window_model(family)
    sink, capacity, chunk, length = 2, 12, 8, 48
    ids = token_ids(2, length, seed=3)
    actual = stream(model, make_cache(f"streaming_{sink}_{capacity}", model, positions="shifted", chunk=chunk),
                    ids, chunk)[:, -chunk:]
    last = length - chunk
    kept = torch.cat((ids[:, :sink], ids[:, last - (capacity - sink) : last], ids[:, last:]), dim=1)
    with torch.no_grad():
        expected = model(kept).logits[:, -chunk:]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", WINDOWED)
def test_attention_scores_leave_out_what_the_window_hides(family):
    """H2O's scores are the attention the model pays: a kept token the window hides from the new
    query gets nothing more, and every token the query sees gets its share."""
    model = small_window_model(family)
    cache = make_cache("h2o_2_4_12", model)
    ids = token_ids(1, 40, seed=6)
    stream(model, cache, ids[:, :30], 1)
    before = cache.buffers["scores"][0].clone()
    stream(model, cache, ids[:, 30:31], 1)
    positions = cache.buffers["positions"][0]
    hidden = (positions <= 30 - 16) & (positions >= 0)
    hidden[..., :2] = False  # the sinks' scores stay +inf
    seen = (positions > 30 - 16) & (positions != 30)  # the kept tokens the query sees, but its own (new: no score before)
    seen[..., :2] = False
    grown = cache.buffers["scores"][0] > before
    assert hidden.any() and not grown[hidden].any()
    assert seen.any() and grown[seen].all()


@pytest.mark.slow  # inductor compilations
@pytest.mark.parametrize("spec", ["h2o_2_6_24", "streaming_4_24"])
def test_compiled_decode_masks_the_window_as_the_eager_step_does(spec):
    """--compile on a model with a window on every layer: past the window, the compiled step
    (which builds the window's mask from the positions every step) gives the eager step's logits
    and keeps the same tokens, through one graph."""
    from torch._dynamo.utils import counters

    from kvstress.caches.compiled import CompiledDecode
    from kvstress.stream import cache_argument

    model = small_window_model("mistral-window", window=32)
    argument = cache_argument(model)
    ids = token_ids(2, 90, seed=7)
    compiled, eager = make_cache(spec, model), make_cache(spec, model)
    decode = CompiledDecode(model, argument)
    torch._dynamo.reset()
    counters.clear()

    def step(cache, start, end):
        return model(input_ids=ids[:, start:end], use_cache=True, logits_to_keep=1, **{argument: cache}).logits

    with torch.no_grad():
        for cache in (compiled, eager):
            step(cache, 0, 30)
        for position in range(30, 90):
            torch.testing.assert_close(decode(compiled, ids[:, position : position + 1]), step(eager, position, position + 1),
                                       rtol=1e-5, atol=1e-5)
    assert torch.equal(compiled.kept_positions(0), eager.kept_positions(0))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


@pytest.mark.parametrize("family", ORIGINAL_ONLY)
def test_shifted_positions_refused_by_name_where_keys_cannot_be_turned(models, family):
    with pytest.raises(UnsupportedModelError, match=ORIGINAL_ONLY[family]) as refused:
        make_cache("streaming_2_24", models(family), positions="shifted")
    assert "use --positions original" in str(refused.value) and "\n" not in str(refused.value)


# -- a needle and a batch point, through the CLI -----------------------------------------


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "book.txt"
    path.write_text("Call me Ishmael. Some years ago, never mind how long precisely, I went to sea. " * 20)
    return path


# The shared small runs cut to one point each (a repeated option's last value wins), with a
# scored policy whose capacity (32) is below the 96 tokens: it evicts.
EVICTING = "h2o_2_4_32"
POINTS = {
    "needle": [*COMMANDS["needle"], "--lengths", "96", "--depths", "50", "--needles", "1", "--max-new-tokens", "2",
               "--chunk", "16"],
    "batch": [*COMMANDS["batch"], "--length", "96", "--batch-sizes", "1,2", "--decode-steps", "3", "--chunk", "16"],
}


@pytest.fixture
def cheap_garbage_collection():
    """Every point frees memory with gc.collect(), ~0.3 s with this module's models and the
    test process's imports on the heap: none of them is the point's garbage, so the
    collector is kept from looking at them while the point runs (as in test_batch.py)."""
    gc.freeze()
    yield
    gc.unfreeze()


def run_point(command: str, family: str, tmp_path, text_file) -> dict:
    """One point of `command` on the family's tiny model, through the CLI: its results."""
    path, out = tmp_path / "config.json", tmp_path / f"{command}.json"
    family_config(*SUPPORTED[family]).to_json_file(path)
    result = runner.invoke(app, [*POINTS[command], "--model", f"random:{path}", "-m", EVICTING,
                                 "--dataset", str(text_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    doc = load_results(out)
    assert doc["kind"] == command and doc["complete"] is True, result.output
    return doc


@pytest.mark.parametrize("family", CLI_POINT_FAMILIES)
def test_a_needle_point_runs(tmp_path, text_file, cheap_garbage_collection, family):
    doc = run_point("needle", family, tmp_path, text_file)
    assert [(c["method"], c["length"], c["depth"], c["status"], c["trials"], len(c["answers"]))
            for c in needle_cells(doc)] == [(EVICTING, 96, 50.0, "ok", 1, 1)]
    cell = needle_cells(doc)[0]
    assert cell["exact"] + cell["partial"] + cell["wrong"] == 1
    assert [(r["method"], r["length"], r["status"]) for r in doc["records"]] == [(EVICTING, 96, "ok")]
    assert doc["records"][0]["cache_tokens"] == 32  # evicted down to capacity


@pytest.mark.parametrize("family", CLI_POINT_FAMILIES)
def test_a_batch_point_runs(tmp_path, text_file, cheap_garbage_collection, family):
    doc = run_point("batch", family, tmp_path, text_file)
    assert [(r["method"], r["batch_size"], r["length"], r["status"]) for r in doc["records"]] == [
        (EVICTING, 1, 96, "ok"), (EVICTING, 2, 96, "ok")]
    assert all(r["cache_tokens"] == 32 and r["throughput_tok_s"] > 0 for r in doc["records"])
    events = [e for e in doc["events"] if e["type"] == "max_batch"]
    assert [(e["method"], e["batch_size"], e["first_oom"], e["probes"]) for e in events] == [(EVICTING, 2, None, [1, 2])]


# -- refused families -------------------------------------------------------------------


def sweep_64_tokens(tmp_path, text_file, config, *methods: str):
    """`kvstress sweep` of `methods` at 64 tokens on a random model of `config`."""
    path = tmp_path / "config.json"
    config.to_json_file(path)
    return runner.invoke(app, ["sweep", "--model", f"random:{path}", *[arg for m in methods for arg in ("-m", m)],
                               "--lengths", "64", "--chunk", "32", "--decode-steps", "3", "--dataset", str(text_file),
                               "--out", str(tmp_path / "r.json")])


@pytest.mark.parametrize("family", REFUSED)
def test_refused_in_one_line_through_the_cli(tmp_path, text_file, family):
    config_class, changes, message = REFUSED[family]
    result = sweep_64_tokens(tmp_path, text_file, family_config(config_class, changes), "baseline", "h2o_2_4_32")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "use baseline" in errors[0], result.output


def test_falcon_is_refused_where_it_computes_attention_inline():
    """Falcon's eager branch computes attention with its own matmuls, where no cache sees the queries."""
    with pytest.raises(UnsupportedModelError, match="FalconAttention.*torch's SDPA") as refused:
        make_cache("h2o_2_4_24", build("falcon", attention="eager"))
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("family", ["mamba", "zamba2", "falcon-h1", "mistral-small-window", "llama4-all-chunked"])
def test_quantized_cache_refused_in_one_line_where_nothing_is_a_token_cache_to_quantize(tmp_path, text_file, family):
    """A recurrent state is not tokens to quantize, and a model that bounds every layer itself
    leaves the full-attention layers a quantized cache quantizes empty: one line, exit 2."""
    config_class, changes, _ = REFUSED[family]
    result = sweep_64_tokens(tmp_path, text_file, family_config(config_class, changes), "quant_4_16")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    why = "keeps a recurrent state" if family in ("mamba", "zamba2", "falcon-h1") else "leaves quant_4_16 nothing"
    assert len(errors) == 1 and why in errors[0] and "use baseline" in errors[0], result.output


@pytest.mark.parametrize("family", HYBRIDS)
def test_quantized_cache_keeps_the_models_window_in_sliding_layers(models, family):
    """transformers' QuantizedCache refuses hybrid models; kvstress's quantizes the global
    layers and keeps each sliding layer as transformers' DynamicCache keeps it: the same
    window of full-precision keys and values, counted in the cache's bytes."""
    model = models(family)
    ids = token_ids(2, 100, seed=2)
    cache, full = make_cache("quant_4_16", model), DynamicCache(config=model.config)
    stream(model, cache, ids, 8)
    stream(model, full, ids, 8)
    sliding = [index for index, layer in enumerate(full.layers) if layer.is_sliding]
    assert sliding and len(sliding) < len(full.layers)
    window_bytes = 0
    for index, (layer, reference) in enumerate(zip(cache.layers, full.layers)):
        if index in sliding:
            assert layer.keys.shape == reference.keys.shape and layer.keys.shape[2] == WINDOW - 1
            if all(earlier in sliding for earlier in range(index)):  # none quantized before it: the same keys
                assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)
            window_bytes += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        else:
            assert type(layer).__name__ == "QuantoQuantizedLayer" and layer._quantized_keys is not None
    held = cache_sizes(cache)[0]
    assert window_bytes < held < window_bytes + sum(
        t.numel() * t.element_size() for index in range(len(full.layers)) if index not in sliding
        for t in (full.layers[index].keys, full.layers[index].values))


@pytest.mark.parametrize("family", ["gemma2", "gpt-oss"])
def test_hybrid_families_run_through_the_cli(tmp_path, text_file, family):
    """A hybrid model as published runs every method, eager attention (Gemma 2, GPT-OSS) and
    the quantized cache included."""
    config_class, changes = SUPPORTED[family]
    # Heads of 64: optimum-quanto groups 64 values, and transformers 5.17 groups over a head's tokens.
    result = sweep_64_tokens(tmp_path, text_file, family_config(config_class, {**changes, "head_dim": 64}),
                             "baseline", "h2o_2_4_32", "streaming_4_32", "quant_4_16")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("family", ["mamba", "jamba", "qwen3-next", "falcon-alibi", "bloom", "mistral-small-window"])
def test_baseline_runs_where_compressed_caches_are_refused(tmp_path, text_file, family):
    """The full cache serves every family that loads: a recurrent state, attention outside the
    interface, or sliding windows on every layer."""
    config_class, changes, _ = REFUSED[family]
    result = sweep_64_tokens(tmp_path, text_file, family_config(config_class, changes), "baseline")
    assert result.exit_code == 0, result.output
