"""`kvstress frontier`: budgets, the spec each budget gives each policy, one-line errors, the
figure and the table from a results file (fast), and real runs on the tiny model (slow):
every point present, bytes monotone in the budget for evicting policies, the full cache at
100 % of its bytes, --resume measuring nothing twice."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvstress.cli import app
from kvstress.config import FrontierConfig, budget_tokens, frontier_plan, parse_budgets
from kvstress.errors import ConfigError, KvstressError
from kvstress.events import COST_EVENT, OVERALL_EVENT, best_per_budget, frontier_points
from kvstress.plot import build_frontier_figure, plot_results
from kvstress.report import build_report, render
from kvstress.results import ResultsWriter, load_results

runner = CliRunner()


def names(plan) -> list[str]:
    return [point.method.name for point in plan]


# -- budgets -------------------------------------------------------------------------------


def test_budgets_are_tokens_or_fractions():
    assert parse_budgets("128,256,1k") == (128, 256, 1024)
    assert parse_budgets("0.1, .25,0.5") == (0.1, 0.25, 0.5)
    assert budget_tokens(0.25, 2048) == 512
    assert budget_tokens(300, 2048) == 300


@pytest.mark.parametrize("text, fix", [
    ("0.1,256", "all as tokens"),
    ("1.0", "strictly between 0 and 1"),
    ("0.0", "strictly between 0 and 1"),
    ("0", "positive"),
    ("256,128", "must increase"),
    ("", "is empty"),
    ("abc", "token count"),
])
def test_bad_budgets_name_the_fix(text, fix):
    with pytest.raises(ConfigError, match=fix):
        parse_budgets(text)


@pytest.mark.parametrize("budget, tokens, fix", [(4096, 4096, "not below --tokens 4096"),
                                                 (0.0001, 1000, "less than one token")])
def test_a_budget_must_fit_inside_the_text(budget, tokens, fix):
    with pytest.raises(ConfigError, match=fix):
        budget_tokens(budget, tokens)


# -- the spec each budget gives each policy --------------------------------------------------


def test_each_policy_takes_the_budget_as_its_capacity():
    plan = frontier_plan(["all"], (128, 256), 1024)
    assert names(plan) == [
        "baseline",
        "streaming_4_128", "streaming_4_256",
        "h2o_4_16_128", "h2o_4_32_256",  # the window follows the capacity (capacity // 8)
        "tova_0_128", "tova_0_256",
        "knorm_0_0_2_128", "knorm_0_0_2_256",
        "random_4_16_128", "random_4_32_256",
        "quant_4_128", "quant_4_256",  # quantized: the budget is its full-precision residual
    ]
    assert plan[0].budget is None and plan[0].capacity is None
    assert [(p.budget, p.capacity) for p in plan[1:3]] == [(128, 128), (256, 256)]


def test_templates_fix_every_field_but_the_budgeted_last():
    plan = frontier_plan(["h2o_4_126_C", "quant_2_C", "quant_4_128"], (0.25, 0.5), 1024)
    assert names(plan) == ["baseline", "h2o_4_126_256", "h2o_4_126_512", "quant_2_256", "quant_2_512", "quant_4_128"]
    assert [p.policy for p in plan] == ["baseline", "h2o_4_126_C", "h2o_4_126_C", "quant_2_C", "quant_2_C",
                                        "quant_4_128"]
    assert plan[-1].budget is None  # a spec without a capacity: one point, placed by its bytes


def test_size_flags_apply_to_policies_given_by_name():
    assert names(frontier_plan(["h2o"], (128,), 1024, sink=2, window=60)) == ["baseline", "h2o_2_60_128"]


@pytest.mark.parametrize("method, budgets, fix", [
    ("baseline_C", (128,), "takes no budget: write baseline"),
    ("h2o_4_32_256", (128,), "write h2o_4_32_C or h2o"),
    ("h2o_4_126_C", (128,), "budgets 128 tokens for h2o_4_126_C: .*use a capacity above 130"),
    ("h2o_4_C", (128,), "should look like h2o_S_W_C"),
    ("nosuch", (128,), "unknown method"),
])
def test_a_plan_refuses_what_cannot_be_budgeted(method, budgets, fix):
    with pytest.raises(KvstressError, match=fix):
        frontier_plan([method], budgets, 1024)


def test_the_config_stores_its_plan_and_checks_its_methods():
    plan = frontier_plan(["streaming"], (64,), 256)
    config = FrontierConfig(methods=tuple(p.method for p in plan), policies=("streaming",), budgets=(64,), tokens=256,
                            needle_lengths=(128,))
    assert config.to_json()["plan"] == [p.to_json() for p in plan]
    assert FrontierConfig.from_json(config.to_json()) == config  # what --isolate's child and --resume rebuild
    with pytest.raises(ValueError, match="plan"):
        FrontierConfig(methods=tuple(p.method for p in plan[1:]), policies=("streaming",), budgets=(64,), tokens=256,
                       needle_lengths=(128,))


@pytest.mark.parametrize("extra, fix", [
    (["--budgets", "0.1,256"], "mixes token counts and fractions"),
    (["--budgets", "1.5"], "strictly between 0 and 1"),
    (["--budgets", "8k"], "not below --tokens 4096"),
    (["-m", "baseline_C"], "takes no budget"),
    (["--capacity", "256"], "drop --capacity"),
    (["--books", "3", "--dataset", "wikitext"], "--dataset pg19 or shakespeare"),
    (["--tasks", "needle,needle"], "each task once"),
    (["--tasks", "needle,haystack"], "unknown --tasks haystack: use some of needle, multikey, vartrack"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, extra, fix):
    result = runner.invoke(app, ["frontier", "--model", "tiny-random", "--out", str(tmp_path / "f.json"), *extra])
    assert result.exit_code == 2, result.output
    assert fix in result.output and "Traceback" not in result.output
    assert not (tmp_path / "f.json").exists()


# -- the figure and the table, from a results file -------------------------------------------

BYTES_PER_TOKEN = 1000


def fake_frontier(path, *, perplexities: dict[str, float], accuracy: dict[str, float]):
    """A frontier results file as the schedule writes it, without a model: cost records with
    the bytes held, overall perplexity records, needle cells."""
    policies, budgets, tokens = ("streaming", "h2o", "random"), (64, 128), 256
    plan = frontier_plan(policies, budgets, tokens)
    config = FrontierConfig(methods=tuple(p.method for p in plan), policies=policies, budgets=budgets, tokens=tokens,
                            needle_lengths=(128,))
    writer = ResultsWriter(path, "frontier", config.to_json(), {"device_name": "test cpu"})
    for point in plan:
        method = point.method.name
        writer.add_record({"method": method, "length": tokens, "status": "ok", "scope": "overall",
                           "perplexity": perplexities[method], "nll_mean": 1.0})
        writer.add_event({"type": OVERALL_EVENT, "method": method, "record": len(writer.records) - 1,
                          "length": tokens, "total_s": 1.0})
        writer.add_event({"type": "needle_cell", "method": method, "task": "needle", "length": 128, "depth": 50.0,
                          "status": "ok", "trials": 1, "exact": 1, "partial": 0, "wrong": 0,
                          "accuracy": accuracy[method]})
        writer.add_record({"method": method, "length": tokens, "status": "ok",
                           "cache_bytes": (point.capacity or tokens) * BYTES_PER_TOKEN, "tpot_ms_median": 2.0})
        writer.add_event({"type": COST_EVENT, "method": method, "record": len(writer.records) - 1,
                          "reference": f"streaming_4_{point.capacity or 128}", "prefill_s": 0.5,
                          "decode_ms_median": 2.0, "decode_ratio": 1.0 if "streaming" in method else 1.1})
    writer.finish()
    return path


PERPLEXITY = {"baseline": 10.0, "streaming_4_64": 14.0, "streaming_4_128": 12.0, "h2o_4_8_64": 13.0,
              "h2o_4_16_128": 11.0, "random_4_8_64": 15.0, "random_4_16_128": 12.5}
ACCURACY = {"baseline": 1.0, "streaming_4_64": 0.0, "streaming_4_128": 0.0, "h2o_4_8_64": 0.0,
            "h2o_4_16_128": 0.5, "random_4_8_64": 0.0, "random_4_16_128": 0.0}


@pytest.fixture
def frontier_file(tmp_path):
    return fake_frontier(tmp_path / "frontier.json", perplexities=PERPLEXITY, accuracy=ACCURACY)


def test_points_read_bytes_quality_and_cost_from_the_file(frontier_file):
    points = {p["method"]: p for p in frontier_points(load_results(frontier_file))}
    assert points["baseline"]["bytes_fraction"] == 1.0
    assert points["h2o_4_16_128"]["bytes_fraction"] == 0.5
    assert points["h2o_4_16_128"]["perplexity_ratio"] == pytest.approx(1.1)
    assert points["h2o_4_16_128"]["accuracy"] == {"needle": 0.5}
    assert points["random_4_8_64"]["decode_ratio"] == 1.1


def test_the_table_names_the_best_policy_per_budget_and_what_it_keeps(frontier_file):
    rows = best_per_budget(frontier_points(load_results(frontier_file)), 256)
    assert [(r["budget"], r["best_ppl"]["method"]) for r in rows] == [(64, "h2o_4_8_64"), (128, "h2o_4_16_128")]
    assert rows[1]["best_ppl"]["kept"] == pytest.approx(10 / 11)
    assert rows[1]["best_accuracy"]["needle"]["method"] == "h2o_4_16_128"
    assert rows[0]["best_accuracy"] == {}  # nothing answered at 64 tokens: no best to name
    text = render(build_report([frontier_file]), "markdown")
    assert "| 128 tokens" in text and "h2o_4_16_128" in text and "90.9%" in text


def test_a_budget_is_bytes_a_cache_with_every_token_in_fewer_bits_competes_where_it_fits():
    def point(method, budget, held, perplexity):
        return {"method": method, "policy": method.split("_")[0], "budget": budget, "capacity": budget,
                "cache_bytes": held, "bytes_fraction": held / 1000, "perplexity": perplexity,
                "accuracy": {}, "accuracy_ratio": {}, "status": "ok"}

    points = [point("baseline", None, 1000, 10.0),
              point("streaming_4_100", 100, 100, 14.0), point("h2o_4_12_100", 100, 104, 13.0),
              point("streaming_4_250", 250, 250, 12.0),
              # a 4-bit cache: its bytes are not its budget's (100 tokens) but 20 % of the full cache's
              point("quant_4_100", 100, 200, 10.5), point("quant_4_250", 250, 200, 10.4)]
    rows = best_per_budget(points, 1000)
    # 10 % of the bytes: H2O (4 % over, for its scores) fits, the 4-bit cache does not, though labelled 100.
    assert rows[0]["best_ppl"]["method"] == "h2o_4_12_100"
    # 25 % of the bytes: every point at 20 % competes, the best of them the 4-bit cache.
    assert rows[1]["best_ppl"]["method"] == "quant_4_250" and rows[1]["share"] == 0.25


def test_the_figure_has_a_panel_per_measure_a_line_per_policy_and_the_fronts(frontier_file, tmp_path):
    figure = build_frontier_figure([load_results(frontier_file)])
    quality, needle, cost = figure.axes
    assert quality.get_xscale() == "log" and "KV cache held" in quality.get_xlabel()
    labels = [line.get_label() for line in quality.get_lines()]
    assert labels[:4] == ["full cache", "streaming", "h2o", "random"]
    fronts = {line.get_gid(): line for ax in figure.axes for line in ax.get_lines() if line.get_gid()}
    assert set(fronts) == {"pareto:perplexity", "pareto:needle"}  # the cost panel is no quality
    # The perplexity front: the fewest bytes for each better perplexity (64-token h2o, 128-token h2o, full).
    assert list(fronts["pareto:perplexity"].get_ydata()) == [13.0, 11.0, 10.0]
    out = plot_results([frontier_file], tmp_path / "frontier.png")
    assert out.stat().st_size > 10_000


# -- real runs on the tiny model --------------------------------------------------------------


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "book.txt"
    path.write_text("Call me Ishmael. Some years ago, never mind how long precisely, I went to sea. " * 200)
    return path


def run_args(text_file, out, *extra: str) -> list[str]:
    return ["frontier", "--model", "tiny-random", "--dataset", str(text_file), "--out", str(out),
            "-m", "streaming,h2o,random", "--budgets", "32,48,64", "--tokens", "192", "--ppl-chunk", "16",
            "--chunk", "64", "--needle-lengths", "128", "--depths", "50", "--max-new-tokens", "3",
            "--decode-steps", "4", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("frontier") / "frontier.json"
    result = runner.invoke(app, run_args(text_file, out))
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
def test_every_point_is_measured_and_bytes_grow_with_the_budget(finished):
    out, output = finished
    points = frontier_points(load_results(out))
    assert all(p["status"] == "ok" and p["cache_bytes"] and p["perplexity"] and p["decode_ratio"] for p in points)
    full = points[0]
    assert full["method"] == "baseline" and full["bytes_fraction"] == 1.0
    for policy in ("streaming", "h2o", "random"):
        held = [p["cache_bytes"] for p in points if p["policy"] == policy]
        assert len(held) == 3 and held == sorted(held) and len(set(held)) == 3, (policy, held)
        assert held[-1] < full["cache_bytes"]
    assert "Best by PPL" in output and "decode × streaming" in output


@pytest.mark.slow
def test_resume_measures_nothing_twice(finished, tmp_path, text_file):
    """Cut the finished file back to its first three methods (as an interrupted run leaves it),
    resume: those keep their records and events, the rest are measured once."""
    out, _ = finished
    doc = json.loads(out.read_text())
    plan = [entry["method"] for entry in doc["config"]["plan"]]
    kept = set(plan[:3])
    first_other = next(i for i, r in enumerate(doc["records"]) if r["method"] not in kept)
    doc["records"] = doc["records"][:first_other]
    doc["events"] = [e for e in doc["events"] if e.get("method") in kept or "method" not in e]
    doc["complete"] = False
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps(doc))
    before = json.loads(cut.read_text())["records"]
    result = runner.invoke(app, run_args(text_file, cut, "--resume"))
    assert result.exit_code == 0, result.output
    resumed = load_results(cut)
    assert resumed["records"][: len(before)] == before
    costs = [e["method"] for e in resumed["events"] if e["type"] == COST_EVENT]
    assert sorted(costs) == sorted(plan)  # every method's cost once: none measured twice
    assert all(p["status"] == "ok" and p["perplexity"] for p in frontier_points(resumed))
