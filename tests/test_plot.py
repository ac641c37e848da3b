"""Tests for kvstress.plot: a hand-made sweep file, drawn and inspected."""

from __future__ import annotations

import json

import pytest

from kvstress.plot import PlotError, build_sweep_figure, plot_results
from kvstress.results import ResultsError, ResultsWriter, load_results

METHODS = ("baseline", "streaming_4_256", "h2o_4_32_256")
LENGTHS = (2000, 4000, 8000, 16000)
OOM = ("baseline", 16000)


def write_sweep(path, *, device_name="Intel Xeon", gpu=False):
    """Three methods over four lengths; the baseline runs out of memory at 16k."""
    writer = ResultsWriter(
        path, "sweep", {"model": "tiny-random", "device": "cpu"},
        {"device": "cpu", "device_name": device_name},
    )
    for m, method in enumerate(METHODS):
        for length in LENGTHS:
            if (method, length) == OOM:
                writer.add_record(
                    {"method": method, "length": length, "status": "oom",
                     "error": "memory budget exceeded"}
                )
                continue
            cache = length if method == "baseline" else 256
            writer.add_record({
                "method": method, "length": length, "status": "ok", "batch_size": 1,
                "tpot_ms_median": 10.0 + m + length / 1000,
                "tpot_ms_p90": 12.0 + m + length / 1000,
                "cache_bytes": cache * 32_768,
                "cache_tokens": cache,
                "peak_rss_bytes": 300_000_000 + cache * 32_768,
                "peak_allocated_bytes": 20_000_000_000 + cache * 32_768 if gpu else None,
                "perplexity": 12.0 + m,
                "nll_mean": 2.5,
                "tokens_scored": length - 1,
            })
    writer.finish()
    return path


def method_lines(ax):
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def failure_markers(ax):
    return [line for line in ax.get_lines() if (line.get_gid() or "").startswith("failure:")]


def test_plot_writes_a_real_png(tmp_path):
    path = write_sweep(tmp_path / "cpu.json")
    out = plot_results([path], tmp_path / "figs" / "sweep.png")
    assert out == tmp_path / "figs" / "sweep.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # four panels of lines, not an empty canvas


@pytest.mark.parametrize(("suffix", "magic"), [(".pdf", b"%PDF"), (".svg", b"<?xml")])
def test_suffix_picks_the_format(tmp_path, suffix, magic):
    out = plot_results([write_sweep(tmp_path / "cpu.json")], tmp_path / f"sweep{suffix}")
    assert out.read_bytes().startswith(magic)


def test_cpu_sweep_panels_lines_and_oom_marker(tmp_path):
    doc = load_results(write_sweep(tmp_path / "cpu.json"))
    figure = build_sweep_figure([doc], ["cpu"])
    ylabels = [ax.get_ylabel() for ax in figure.axes]
    # CPU: the cache and the process are measured separately, and said so.
    assert ylabels == [
        "KV cache held between forwards (MB)", "peak process RSS (MB)", "TPOT (ms): median, band to p90", "perplexity",
    ]
    for ax in figure.axes:
        lines = method_lines(ax)
        assert sorted(lines) == sorted(METHODS), ax.get_ylabel()
        assert ax.get_xscale() == "log"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["2k", "4k", "8k", "16k"]
        # The OOM point has no value: the baseline line stops at 8k ...
        assert list(lines["baseline"].get_xdata()) == [2000, 4000, 8000]
        assert list(lines["h2o_4_32_256"].get_xdata()) == list(LENGTHS)
        # ... and a red x sits at the OOM length, labelled.
        (marker,) = failure_markers(ax)
        assert list(marker.get_xdata()) == [OOM[1]]
        assert marker.get_marker() == "x" and marker.get_color() == "red"
        assert any(text.get_text() == "OOM baseline" for text in ax.texts)
    cache = method_lines(figure.axes[0])
    assert list(cache["streaming_4_256"].get_ydata()) == [256 * 32_768 / 1e6] * 4
    ppl = method_lines(figure.axes[3])
    assert list(ppl["h2o_4_32_256"].get_ydata()) == [14.0] * 4
    assert figure.get_suptitle() == "sweep: tiny-random on Intel Xeon"


def test_tpot_panel_shades_median_to_p90(tmp_path):
    doc = load_results(write_sweep(tmp_path / "cpu.json"))
    ax = build_sweep_figure([doc]).axes[2]
    assert len(ax.collections) == len(METHODS)  # one band per method


def test_gpu_sweep_uses_allocated_bytes(tmp_path):
    doc = load_results(write_sweep(tmp_path / "gpu.json", gpu=True))
    ylabels = [ax.get_ylabel() for ax in build_sweep_figure([doc]).axes]
    assert ylabels[0] == "peak torch allocated (GB)"
    assert "peak process RSS (MB)" not in ylabels


def test_no_perplexity_panel_without_perplexity(tmp_path):
    path = write_sweep(tmp_path / "cpu.json")
    doc = load_results(path)
    for record in doc["records"]:
        record["perplexity"] = None
    ylabels = [ax.get_ylabel() for ax in build_sweep_figure([doc]).axes]
    assert "perplexity" not in ylabels


def test_two_files_with_the_same_methods_are_told_apart(tmp_path):
    paths = [
        write_sweep(tmp_path / "a" / "results.json", device_name="H100"),
        write_sweep(tmp_path / "b" / "results.json", device_name="A100"),
    ]
    out = plot_results(paths, tmp_path / "both.png")
    assert out.exists()
    docs = [load_results(p) for p in paths]
    figure = build_sweep_figure(docs, ["results (H100)", "results (A100)"])
    labels = sorted(method_lines(figure.axes[0]))
    assert labels == sorted(
        f"results ({gpu}): {method}" for gpu in ("H100", "A100") for method in METHODS
    )
    assert len(failure_markers(figure.axes[0])) == 2
    assert figure.get_suptitle() == "sweep: tiny-random on H100, A100"


def test_errors_are_one_line_with_the_fix(tmp_path):
    path = write_sweep(tmp_path / "cpu.json")
    with pytest.raises(PlotError, match=r"end the name in \.png, \.pdf, \.svg"):
        plot_results([path], tmp_path / "sweep.jpg")
    with pytest.raises(ResultsError, match="not found"):
        plot_results([tmp_path / "missing.json"], tmp_path / "x.png")

    other = ResultsWriter(tmp_path / "batch.json", "batch", {}, {})
    other.add_record({"method": "baseline", "length": 2000, "status": "ok", "batch_size": 8})
    with pytest.raises(PlotError, match="different kinds of results"):
        plot_results([path, other.path], tmp_path / "x.png")
    # A kind this version has no figure for (e.g. from a newer kvstress).
    future = tmp_path / "future.json"
    future.write_text(json.dumps({**json.loads(other.path.read_text()), "kind": "future"}))
    with pytest.raises(PlotError, match="cannot plot 'future' results yet"):
        plot_results([future], tmp_path / "x.png")

    empty = ResultsWriter(tmp_path / "empty.json", "sweep", {}, {})
    with pytest.raises(PlotError, match="no records yet"):
        plot_results([empty.path], tmp_path / "x.png")


def test_a_retried_point_counts_once(tmp_path):
    path = write_sweep(tmp_path / "cpu.json")
    doc = json.loads(path.read_text())
    retry = dict(doc["records"][0], tpot_ms_median=99.0)  # baseline at 2k, measured again
    doc["records"].append(retry)
    figure = build_sweep_figure([doc])
    line = method_lines(figure.axes[2])["baseline"]
    assert list(line.get_xdata()) == [2000, 4000, 8000]
    assert line.get_ydata()[0] == 99.0
