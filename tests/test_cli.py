"""The command line, driven like a user drives it: exit codes, messages, files written."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from kvstress.cli import app
from kvstress.models import load_model

runner = CliRunner()

# A tiny sweep: every method overflows its cache by the second checkpoint.
TINY = ["--model", "tiny-random", "--lengths", "192,384", "--chunk", "64", "--decode-steps", "4", "--capacity", "48"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "book.txt"
    words = "It was the best of times, it was the worst of times, it was the age of wisdom. "
    path.write_text(words * 200, encoding="utf-8")
    return path


def invoke(*args: str):
    return runner.invoke(app, list(args))


def read(path) -> dict:
    return json.loads(path.read_text())


def test_held_bytes_are_flat_in_length_below_and_above_the_chunk(tmp_path, text_file):
    """Every evicting policy reports the same bytes held at every length, whether the text
    so far is shorter or longer than the prefill chunk, and fewer than the full cache's once
    the text outgrows its capacity; the chunk's room is its own, flat, figure."""
    out = tmp_path / "results.json"
    methods = ["baseline", "streaming_4_48", "h2o_4_6_48", "tova_0_48", "tovahead_0_48", "knorm_0_0_0_48",
               "random_4_6_48"]
    result = invoke("sweep", "--model", "tiny-random", "--lengths", "40,128,384", "--chunk", "128", "--decode-steps",
                    "3", "--dataset", str(text_file), "--out", str(out), *[f"-m{m}" for m in methods])
    assert result.exit_code == 0, result.output
    assert "KV held" in result.output and "KV + chunk room" in result.output
    by = {(r["method"], r["length"]): r for r in read(out)["records"]}
    for method in methods[1:]:
        held = {by[method, n]["cache_bytes"] for n in (40, 128, 384)}
        allocated = {by[method, n]["cache_allocated_bytes"] for n in (40, 128, 384)}
        assert len(held) == 1 and len(allocated) == 1, (method, held, allocated)
        assert held.pop() < allocated.pop()
        assert by[method, 384]["cache_bytes"] < by["baseline", 128]["cache_bytes"] < by["baseline", 384]["cache_bytes"]
    assert by["baseline", 384]["cache_bytes"] == by["baseline", 384]["cache_allocated_bytes"]


def test_tiny_sweep_end_to_end(tmp_path, text_file):
    out = tmp_path / "results.json"
    result = invoke("sweep", *TINY, "--dataset", str(text_file), "--out", str(out))
    assert result.exit_code == 0, result.output
    doc = read(out)
    assert doc["complete"] is True
    assert [(r["method"], r["length"], r["status"]) for r in doc["records"]] == [
        (method, length, "ok")
        for method in ("baseline", "streaming_4_48", "h2o_4_6_48")
        for length in (192, 384)
    ]
    by_method = {(r["method"], r["length"]): r for r in doc["records"]}
    # The full cache holds everything; compressed caches hold their capacity.
    assert by_method["baseline", 384]["cache_tokens"] == 384 + 4  # the context and the 4 decode steps after it
    assert by_method["streaming_4_48", 384]["cache_tokens"] == 48
    assert by_method["h2o_4_6_48", 384]["cache_tokens"] == 48
    assert by_method["baseline", 384]["cache_bytes"] > by_method["baseline", 192]["cache_bytes"]
    assert by_method["h2o_4_6_48", 384]["cache_bytes"] == by_method["h2o_4_6_48", 192]["cache_bytes"]
    for record in doc["records"]:
        assert record["tpot_ms_median"] > 0 and record["tpot_ms_p90"] >= record["tpot_ms_median"]
        assert record["ttft_s"] > 0 and record["attn_ms_mean"] > 0 and record["peak_rss_bytes"] > 0
        assert record["perplexity"] is None  # random weights: not measured, not 0
    samples = doc["samples"]
    assert {s["phase"] for s in samples} == {"prefill", "decode"}
    assert {s["method"] for s in samples} == {"baseline", "streaming_4_48", "h2o_4_6_48"}
    assert doc["environment"]["versions"]["transformers"]
    assert "tiny-random" in result.output or "tiny-random" in result.stderr


def test_simulated_oom_ends_one_method_and_the_rest_are_measured(tmp_path, text_file):
    model = load_model("tiny-random").model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4
    budget = weights + 300 * per_token  # the full cache passes 192 tokens and fails before 384
    out = tmp_path / "results.json"
    result = invoke("sweep", *TINY, "--dataset", str(text_file), "--max-memory", str(budget), "--out", str(out))
    assert result.exit_code == 0, result.output
    doc = read(out)
    statuses = [(r["method"], r["length"], r["status"]) for r in doc["records"]]
    assert statuses == [
        ("baseline", 192, "ok"),
        ("baseline", 384, "oom"),
        ("streaming_4_48", 192, "ok"),
        ("streaming_4_48", 384, "ok"),
        ("h2o_4_6_48", 192, "ok"),
        ("h2o_4_6_48", 384, "ok"),
    ]
    oom = doc["records"][1]
    assert "memory budget exceeded" in oom["error"]
    assert oom["tpot_ms_median"] is None and oom["cache_bytes"] is None
    events = [e for e in doc["events"] if e["type"] == "oom"]
    # Prefill resumes at 196 after the first decode steps; the chunk ending at 324 is the first past 300.
    assert len(events) == 1 and events[0]["tokens_seen"] == 324


def test_plot_writes_a_figure_from_a_results_file(tmp_path, text_file):
    out = tmp_path / "results.json"
    assert invoke("sweep", *TINY, "--dataset", str(text_file), "--out", str(out), "-m", "baseline").exit_code == 0
    figure = tmp_path / "figure.png"
    result = invoke("plot", str(out), "--out", str(figure))
    assert result.exit_code == 0, result.output
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size > 10_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "lru_4_256"], "write baseline, streaming_S_C or h2o_S_W_C"),
        (["--method", "h2o", "--capacity", "8", "--window", "8"], "use a capacity above 12"),
        (["--lengths", "4k,2k"], "--lengths must increase"),
        (["--lengths", "0"], "positive whole number"),
        (["--lengths", "two"], "cannot read length"),
        (["--chunk", "0"], "--chunk must be positive"),
        (["--decode-steps", "2"], "--decode-steps must be at least 3"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--positions", "absolute"], "--positions must be one of"),
        (["--max-memory", "lots"], "--max-memory"),
        (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    ],
)
def test_bad_options_are_one_line_errors_with_exit_2(tmp_path, args, message):
    result = invoke("sweep", "--model", "tiny-random", "--out", str(tmp_path / "r.json"), *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()


def test_missing_text_file_fails_before_the_model_loads(tmp_path):
    result = invoke("sweep", "--model", "tiny-random", "--dataset", str(tmp_path / "none.txt"), "--out", str(tmp_path / "r.json"))
    assert result.exit_code == 2
    assert "none.txt" in result.stderr


def test_text_shorter_than_the_longest_length(tmp_path, text_file):
    result = invoke("sweep", *TINY[:2], "--lengths", "100k", "--dataset", str(text_file), "--out", str(tmp_path / "r.json"))
    assert result.exit_code == 2
    assert "use shorter --lengths" in result.stderr


def test_existing_results_file_is_not_overwritten(tmp_path, text_file):
    out = tmp_path / "r.json"
    out.write_text("{}")
    result = invoke("sweep", *TINY, "--dataset", str(text_file), "--out", str(out))
    assert result.exit_code == 2
    assert "already exists" in result.stderr
    assert out.read_text() == "{}"


def test_debug_shows_the_traceback(tmp_path):
    result = invoke("sweep", "--method", "nope", "--debug", "--out", str(tmp_path / "r.json"))
    assert result.exit_code != 2 and result.exception is not None


def test_plot_refuses_a_file_that_is_not_ours(tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": "world"}))
    result = invoke("plot", str(other))
    assert result.exit_code == 2
    assert "not a kvstress results file" in result.stderr


@pytest.mark.slow
def test_bundled_smollm2_short_sweep(tmp_path):
    out = tmp_path / "results.json"
    result = invoke(
        "sweep", "--model", "smollm2-135m", "--dataset", "shakespeare", "--lengths", "512,1024", "--chunk", "256",
        "--decode-steps", "4", "--capacity", "128", "--out", str(out),
    )
    assert result.exit_code == 0, result.output
    records = read(out)["records"]
    assert len(records) == 6 and all(r["status"] == "ok" for r in records)
    ppl = {(r["method"], r["length"]): r["perplexity"] for r in records}
    # Real weights on real text: a sane perplexity, and evicting costs some of it.
    assert all(math.isfinite(v) and 1 < v < 200 for v in ppl.values())
    assert ppl["baseline", 1024] <= ppl["streaming_4_128", 1024]


def test_policies_lists_every_registered_policy():
    from kvstress.spec import describe_policies

    result = runner.invoke(app, ["policies"])
    assert result.exit_code == 0, result.output
    for policy in describe_policies():
        assert policy.form in result.stdout and policy.example in result.stdout


@pytest.mark.slow  # a pip install of the example package
def test_sweep_with_a_policy_from_a_plugin(tmp_path, text_file, example_plugin):
    """A policy an installed package registers (entry point group kvstress.policies) runs by name."""
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["sweep", "--model", "tiny-random", "--dataset", str(text_file), "--lengths", "128,256",
                                 "--chunk", "32", "--decode-steps", "4", "-m", "ema_2_6_48_90", "-m", "h2o_2_6_48",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())["records"]
    assert [(r["method"], r["length"], r["status"], r["cache_tokens"]) for r in records] == [
        ("ema_2_6_48_90", 128, "ok", 48), ("ema_2_6_48_90", 256, "ok", 48),
        ("h2o_2_6_48", 128, "ok", 48), ("h2o_2_6_48", 256, "ok", 48),
    ]
    assert "ema" in runner.invoke(app, ["policies"]).stdout


@pytest.mark.parametrize("step_ms, others_load, unstable", [
    ([10.0] * 10, 0.0, False),
    ([10.0] * 8 + [20.0, 20.0], 0.0, True),  # p90 twice the median
    ([10.0] * 10, 0.6, True),  # other work wants 60 % of the cores
    ([10.0] * 10, 0.4, False),
])
def test_a_record_says_whether_its_timing_can_be_trusted(tmp_path, step_ms, others_load, unstable):
    import os

    import torch

    from kvstress import stream
    from kvstress.config import SweepConfig
    from kvstress.results import ResultsWriter
    from kvstress.spec import parse_spec

    loaded = load_model("tiny-random")
    config = SweepConfig(methods=(parse_spec("baseline"),), lengths=(64,), out=tmp_path / "r.json")
    harness = stream.Harness(config, loaded.model, ResultsWriter(config.out, "sweep", {}, {}), pretrained=False)
    opened = harness.open(parse_spec("baseline"), torch.arange(4, 80).unsqueeze(0))
    cores = os.cpu_count() or 1
    harness._load_peak = torch.get_num_threads() + others_load * cores  # this run's threads plus the others'
    measured = harness.measurements(opened, step_ms)
    assert measured["tpot_spread"] == pytest.approx(max(step_ms) / 10.0)
    assert measured["load_per_core"] == pytest.approx(torch.get_num_threads() / cores + others_load)
    assert measured["timing_unstable"] is unstable


def test_the_table_marks_unstable_timings(tmp_path, text_file, monkeypatch):
    from kvstress import stream

    monkeypatch.setattr(stream.os, "getloadavg", lambda: (64.0, 64.0, 64.0))  # a machine far busier than its cores
    result = invoke("sweep", *TINY, "--dataset", str(text_file), "-m", "streaming_4_48", "--out", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "r.json").read_text())["records"]
    assert records and all(r["timing_unstable"] for r in records)
    assert "~ unstable timing at" in result.stdout and "ratios between these numbers may be noise" in result.stdout
    row = next(line for line in result.stdout.splitlines() if "streaming_4_48" in line)
    assert "~" in row
