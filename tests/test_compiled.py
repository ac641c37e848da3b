"""`--compile`: a compressed cache's steady-state decode step as one compiled graph.

Compiling costs tens of seconds even for a tiny model on CPU, so these tests compile
few graphs and check much with each: same logits and kept tokens as the eager step,
one graph for the whole run (a recompile per step would make CUDA graphs useless),
eager forwards in between, and the sweep's `--compile` end to end.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch._dynamo.utils import counters
from typer.testing import CliRunner

from kvstress import make_cache
from kvstress.caches.compiled import CompiledDecode
from kvstress.cli import app
from kvstress.stream import cache_argument


@pytest.fixture(scope="module")
def model(peaked_llama):
    return peaked_llama


@pytest.mark.slow  # inductor compilations
@pytest.mark.parametrize("spec, positions", [
    ("h2o_2_6_24", "original"),
    ("streaming_4_24", "shifted"),
    ("tova_2_24", "original"),  # the attention-scored base's batched decode scoring, replacing scores
    ("knorm_2_6_0_24", "original"),
    ("random_2_6_24", "original"),
])
def test_compiled_decode_matches_eager_with_one_graph(model, spec, positions):
    argument = cache_argument(model)
    ids = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(4))
    compiled_cache = make_cache(spec, model, positions=positions)
    eager_cache = make_cache(spec, model, positions=positions)
    decode = CompiledDecode(model, argument)
    torch._dynamo.reset()
    counters.clear()

    def eager(cache, start, end):
        return model(input_ids=ids[:, start:end], use_cache=True, logits_to_keep=1, **{argument: cache}).logits

    with torch.no_grad():
        for cache in (compiled_cache, eager_cache):
            eager(cache, 0, 40)
        assert decode.compiles(compiled_cache, ids[:, :1])
        for position in range(40, 120):
            if position == 80:  # an eager chunk in the middle: the compiled step picks up after it
                for cache in (compiled_cache, eager_cache):
                    eager(cache, 80, 96)
            if 80 <= position < 96:
                continue
            compiled_logits = decode(compiled_cache, ids[:, position : position + 1])
            torch.testing.assert_close(compiled_logits, eager(eager_cache, position, position + 1), rtol=1e-5, atol=1e-5)
    for layer in range(2):
        assert torch.equal(compiled_cache.kept_positions(layer), eager_cache.kept_positions(layer))
    assert compiled_cache.layers[0].seen == eager_cache.layers[0].seen == 120

    # The sweep warms up on the stream's own cache, then resets it: afterwards it must
    # behave as a new cache, through the same graph.
    compiled_cache.reset()
    fresh = make_cache(spec, model, positions=positions)
    with torch.no_grad():
        for cache in (compiled_cache, fresh):
            eager(cache, 100, 140)
        for position in range(140, 160):
            compiled_logits = decode(compiled_cache, ids[:, position : position + 1])
            torch.testing.assert_close(compiled_logits, eager(fresh, position, position + 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(compiled_cache.kept_positions(1), fresh.kept_positions(1))
    assert counters["stats"]["unique_graphs"] == 1, "the decode step recompiled"
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.slow  # inductor compilations
@pytest.mark.parametrize("spec", ["h2o_2_6_24", "streaming_4_24", "tova_2_24", "knorm_2_6_0_24", "random_2_6_24"])
def test_compiled_step_writes_only_inputs_marked_static(model, spec):
    """On CUDA, inductor replays the step as a CUDA graph only if every input tensor the graph
    writes into has a fixed address (marked static); one unmarked written view is enough for
    "skipping cudagraphs due to mutated inputs" (seen on an H200). The graph's inputs are
    checked here on CPU: run it through a backend that notes which inputs change."""
    written_unmarked = []

    def noting_backend(graph, example_inputs):
        def run(*inputs):
            before = [value.clone() if isinstance(value, torch.Tensor) else None for value in inputs]
            output = graph(*inputs)
            for index, (value, old) in enumerate(zip(inputs, before)):
                static = isinstance(value, torch.nn.Parameter) or hasattr(value, "_dynamo_static_input_type")
                if old is not None and not static and not torch.equal(value, old):
                    written_unmarked.append((index, tuple(value.shape)))
            return output
        return run

    cache = make_cache(spec, model)
    decode = CompiledDecode(model, cache_argument(model))
    torch._dynamo.reset()
    decode._compiled = torch.compile(decode._forward, backend=noting_backend, dynamic=False)
    ids = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(input_ids=ids[:, :40], use_cache=True, **{cache_argument(model): cache})
        for position in range(40, 44):
            assert decode.compiles(cache, ids[:, :1])
            decode(cache, ids[:, position : position + 1])
    assert cache.layers[0].seen == 44
    assert not written_unmarked, f"the compiled step writes into unmarked inputs (index, shape): {written_unmarked}"


def test_compiled_decode_leaves_other_forwards_eager(model):
    cache = make_cache("h2o_2_6_24", model)
    ids = torch.zeros(1, 30, dtype=torch.long)
    assert not CompiledDecode.compiles(cache, ids[:, :1])  # not filled yet
    assert not CompiledDecode.compiles(make_cache("baseline", model), ids[:, :1])
    assert not CompiledDecode.compiles(make_cache("h2o_2_6_24", model, lazy=4), ids[:, :1])
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{cache_argument(model): cache})
    assert CompiledDecode.compiles(cache, ids[:, :1])
    assert not CompiledDecode.compiles(cache, ids[:, :2])  # a chunk


@pytest.mark.slow  # inductor compilations
def test_sweep_with_compile(tmp_path):
    text = tmp_path / "book.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 300, encoding="utf-8")
    out = tmp_path / "r.json"
    args = ["sweep", "--model", "tiny-random", "--dataset", str(text), "--lengths", "192,384", "--chunk", "64",
            "--decode-steps", "5", "--capacity", "48", "-m", "baseline", "-m", "h2o", "--compile", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["config"]["compile"] is True
    records = {(r["method"], r["length"]): r for r in doc["records"]}
    assert set(records) == {(m, n) for m in ("baseline", "h2o_4_6_48") for n in (192, 384)}
    assert all(r["status"] == "ok" and r["tpot_ms_median"] > 0 for r in records.values())
    assert records["h2o_4_6_48", 384]["cache_tokens"] == 48


def test_compile_refuses_lazy_eviction(tmp_path):
    result = CliRunner().invoke(app, ["sweep", "--model", "tiny-random", "--compile", "--lazy", "8",
                                      "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 2
    assert "--compile needs --lazy 0" in result.stderr



def test_compile_refused_in_one_line_for_a_hybrid_models_compressed_methods(tmp_path):
    """A hybrid model's sliding-window layers concatenate a token per step, so no step of its
    compressed caches could be the compiled one: refused before anything is measured."""
    text = tmp_path / "book.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 300, encoding="utf-8")
    config = tmp_path / "gemma2.json"
    transformers.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=300, sliding_window=8).to_json_file(config)
    result = CliRunner().invoke(app, ["sweep", "--model", f"random:{config}", "--dataset", str(text), "--lengths", "64",
                                      "--chunk", "32", "-m", "h2o_2_4_32", "--compile", "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: h2o_2_4_32 on this model: the model's sliding-window layers concatenate every step's "
                      "token, but a compiled step needs fixed shapes: drop --compile"], result.output
