"""kvstress batch: throughput and memory per batch size, the largest batch that fits, the figure."""

from __future__ import annotations

import gc
import random
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from kvstress.batch import find_max_batch
from kvstress.cli import app
from kvstress.config import SweepConfig
from kvstress.models import ByteTokenizer, load_model, tokenize_text
from kvstress.plot import build_batch_figure
from kvstress.results import ResultsWriter, load_results
from kvstress.spec import parse_spec
from kvstress.stream import Harness
from kvstress.sweep import run_checkpoints
from kvstress.texts import text_segments

runner = CliRunner()

LENGTH, DECODE_STEPS = 192, 4
METHODS = ("baseline", "streaming_4_48", "h2o_4_6_48")
TINY = ["--model", "tiny-random", "--length", str(LENGTH), "--chunk", "64", "--decode-steps", str(DECODE_STEPS),
        "--capacity", "48"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """Words in random order, so that every segment of the text is a different sequence."""
    words = "it was the best of times worst age wisdom foolishness epoch belief incredulity season light".split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(3000)), encoding="utf-8")
    return path


@pytest.fixture(scope="module", autouse=True)
def cheap_garbage_collection():
    """Every point frees memory with gc.collect(); with the test process's imports on the
    heap each collection takes ~0.3 s. Objects alive now are not the points' garbage:
    freeze them out of the collector's sight."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def records_of(doc, method):
    return [r for r in doc["records"] if r["method"] == method]


def max_batch_events(doc):
    return {e["method"]: e for e in doc["events"] if e["type"] == "max_batch"}


@pytest.fixture(scope="module")
def budget():
    """A --max-memory under which the full cache fits 5 sequences of LENGTH + decode steps, not 6
    (and streaming_4_48, ~119 token-equivalents per sequence, fits 9)."""
    model = load_model("tiny-random").model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4  # float32 K and V
    return weights + per_token * (LENGTH + DECODE_STEPS) * 5 + per_token * 100


@pytest.fixture(scope="module")
def sweep_doc(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("sweep") / "batch.json"
    result = invoke("batch", *TINY, "--dataset", str(text_file), "--batch-sizes", "1,2,4", "--out", str(out))
    assert result.exit_code == 0, result.output
    return load_results(out), result, out


def test_throughput_and_memory_per_batch_size(sweep_doc):
    doc, result, _ = sweep_doc
    assert doc["kind"] == "batch" and doc["complete"] is True
    assert [(r["method"], r["batch_size"], r["length"], r["status"]) for r in doc["records"]] == [
        (method, batch, LENGTH, "ok") for method in METHODS for batch in (1, 2, 4)
    ]
    for record in doc["records"]:
        assert record["throughput_tok_s"] == pytest.approx(record["batch_size"] * 1000 / record["tpot_ms_median"])
        assert record["peak_rss_bytes"] > 0 and record["perplexity"] is None
    for method in METHODS:
        cache = [r["cache_bytes"] for r in records_of(doc, method)]
        assert cache[0] < cache[1] < cache[2], (method, cache)
        assert cache[2] == 4 * cache[0]  # every sequence holds as much as one alone
    events = max_batch_events(doc)
    assert {m: (e["batch_size"], e["limited_by"], e["probes"]) for m, e in events.items()} == {
        m: (4, "--batch-sizes", [1, 2, 4]) for m in METHODS
    }
    # The summary table and the largest batch per method are printed.
    assert "tok/s" in result.stdout and "largest batch that fits" in result.stdout
    assert "h2o_4_6_48: largest batch that fits is at least 4" in result.stdout


def test_batch_plot_draws_one_line_per_method(sweep_doc, tmp_path):
    doc, _, out = sweep_doc
    figure_path = tmp_path / "batch.png"
    result = invoke("plot", str(out), "--out", str(figure_path))
    assert result.exit_code == 0, result.output
    assert figure_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    figure = build_batch_figure([doc], ["batch"])
    axes = figure.axes
    assert [ax.get_ylabel() for ax in axes] == [
        "decode throughput (tokens/s, all sequences)", "peak process RSS (MB)", "KV cache held between forwards (MB)",
    ]
    for ax in axes:
        lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
        assert sorted(lines) == sorted(METHODS)
        assert list(lines["baseline"].get_xdata()) == [1, 2, 4]
        assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2


def test_batched_h2o_keeps_per_sequence_what_it_keeps_alone(tmp_path, text_file):
    """Two sequences through the runner in one batch evict exactly as each does alone."""
    loaded = load_model("tiny-random")
    # Random weights this small attend almost uniformly, so every text would keep the oldest
    # tokens; sharper queries and keys make the heavy hitters depend on each sequence's text.
    with torch.no_grad():
        for name, parameter in loaded.model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                parameter.mul_(8)
    spec = parse_spec("h2o_2_6_24")
    config = SweepConfig(methods=(spec,), lengths=(100,), chunk=16, decode_steps=4, batch_size=2, out=tmp_path / "r.json")
    ids = tokenize_text(ByteTokenizer(), text_file.read_text())
    tokens = text_segments(ids, 2, config.tokens_needed)
    assert not torch.equal(tokens[0], tokens[1])

    class KeepCache(Harness):
        def new_cache(self, spec):
            self.cache = super().new_cache(spec)  # the last one made is the measured stream's
            return self.cache

    def run(batch_tokens, name):
        run_config = replace(config, batch_size=batch_tokens.shape[0])
        writer = ResultsWriter(tmp_path / f"{name}.json", "batch", {}, {})
        measured = KeepCache(run_config, loaded.model, writer, pretrained=False)
        assert run_checkpoints(measured, spec, batch_tokens, run_config)[-1]["status"] == "ok"
        return measured.cache

    batched = run(tokens, "both")
    layers = len(batched.layers)
    assert any(not torch.equal(batched.kept_positions(layer)[0], batched.kept_positions(layer)[1])
               for layer in range(layers)), "both sequences kept the same tokens: eviction is not per sequence"
    for b in range(2):
        alone = run(tokens[b : b + 1], f"alone{b}")
        for layer in range(layers):
            assert batched.kept_positions(layer)[b].tolist() == alone.kept_positions(layer)[0].tolist()


def test_simulated_oom_ends_the_doubling_sweep(tmp_path, text_file, budget):
    out = tmp_path / "batch.json"
    result = invoke("batch", *TINY, "--dataset", str(text_file), "--batch-sizes", "1,2,4,8", "--max-memory", str(budget),
                    "-m", "baseline", "-m", "streaming_4_48", "--out", str(out))
    assert result.exit_code == 0, result.output
    doc = load_results(out)
    assert [(r["method"], r["batch_size"], r["status"]) for r in doc["records"]] == [
        ("baseline", 1, "ok"), ("baseline", 2, "ok"), ("baseline", 4, "ok"), ("baseline", 8, "oom"),
        ("streaming_4_48", 1, "ok"), ("streaming_4_48", 2, "ok"), ("streaming_4_48", 4, "ok"),
        ("streaming_4_48", 8, "ok"),
    ]
    assert "memory budget exceeded" in doc["records"][3]["error"]
    events = max_batch_events(doc)
    assert (events["baseline"]["batch_size"], events["baseline"]["first_oom"], events["baseline"]["limited_by"]) == (4, 8, "oom")
    assert events["streaming_4_48"]["batch_size"] == 8 and events["streaming_4_48"]["first_oom"] is None
    assert "baseline: largest batch that fits is 4 (batch 8 ran out of memory)" in result.stdout

    figure = build_batch_figure([doc], ["batch"])
    marks = [line for line in figure.axes[0].get_lines() if (line.get_gid() or "").startswith("failure:")]
    assert [(line.get_gid(), list(line.get_xdata())) for line in marks] == [("failure:baseline", [8])]


def test_find_max_batch_doubles_then_bisects(tmp_path, text_file, budget):
    out = tmp_path / "batch.json"
    result = invoke("batch", *TINY, "--dataset", str(text_file), "--find-max-batch", "--max-batch", "7",
                    "--max-memory", str(budget), "-m", "baseline", "-m", "streaming_4_48", "--out", str(out))
    assert result.exit_code == 0, result.output
    doc = load_results(out)
    baseline = [(r["batch_size"], r["status"]) for r in records_of(doc, "baseline")]
    assert baseline == [(1, "ok"), (2, "ok"), (4, "ok"), (7, "oom"), (5, "ok"), (6, "oom")]
    # The search is bounded by --max-batch: the last doubling is clamped to it.
    assert [(r["batch_size"], r["status"]) for r in records_of(doc, "streaming_4_48")] == [
        (1, "ok"), (2, "ok"), (4, "ok"), (7, "ok"),
    ]
    events = max_batch_events(doc)
    assert events["baseline"] | {"time": None} == {
        "type": "max_batch", "method": "baseline", "batch_size": 5, "first_oom": 6, "limited_by": "oom",
        "search": "find-max-batch", "probes": [1, 2, 4, 7, 5, 6], "length": LENGTH, "time": None,
    }
    assert (events["streaming_4_48"]["batch_size"], events["streaming_4_48"]["limited_by"]) == (7, "--max-batch")
    assert len([e for e in doc["events"] if e["type"] == "oom"]) == 2  # each OOM probe recovered from


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 8, 12, 64])
def test_find_max_batch_search_finds_the_boundary(limit):
    for largest_fit in range(0, limit + 3):
        found, first_fail, probes = find_max_batch(lambda b, fit=largest_fit: b <= fit, limit)
        expected = min(largest_fit, limit)
        assert found == (expected or None)
        assert first_fail == (largest_fit + 1 if largest_fit < limit else None)
        assert len(set(probes)) == len(probes) and all(1 <= p <= limit for p in probes)
        assert len(probes) <= 2 * limit.bit_length() + 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-sizes", "two"], "--batch-sizes: cannot read 'two'"),
        (["--batch-sizes", "4,2"], "--batch-sizes must increase"),
        (["--batch-sizes", "0,1"], "--batch-sizes must be positive"),
        (["--batch-sizes", ","], "--batch-sizes is empty"),
        (["--max-batch", "0"], "--max-batch must be at least 1"),
        (["--max-batch", "1", "--batch-sizes", "2,4"], "no --batch-sizes value is at or below --max-batch 1"),
        (["--length", "zero"], "--length: cannot read length"),
        (["--decode-steps", "2"], "--decode-steps must be at least 3"),
        (["--method", "lru_4_256"], "write baseline, streaming_S_C or h2o_S_W_C"),
        (["--max-memory", "lots"], "--max-memory"),
    ],
)
def test_bad_options_are_one_line_errors_with_exit_2(tmp_path, args, message):
    result = invoke("batch", "--model", "tiny-random", "--out", str(tmp_path / "b.json"), *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b.json").exists()


def test_text_too_short_for_the_largest_batch_fails_before_the_model_loads(tmp_path, text_file):
    # The text holds 3000 words (~17k bytes): 64 sequences of 4k tokens do not fit.
    out = tmp_path / "b.json"
    result = invoke("batch", "--model", "tiny-random", "--dataset", str(text_file), "--length", "1k", "--out", str(out))
    assert result.exit_code == 2
    assert "the largest --batch-sizes value 64 needs 64 × 1041" in result.stderr
    assert "use --max-batch" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "model:" not in result.stderr and not out.exists()
