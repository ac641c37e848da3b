"""The comparison table from hand-made results files, `kvstress report` and `kvstress compare`."""

from __future__ import annotations

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from kvstress.cli import app
from kvstress.perplexity import book_spread
from kvstress.report import OVERALL_EVENT, build_report, render, split_ppl_records
from kvstress.results import ResultsError, ResultsWriter, load_results

runner = CliRunner()
COLUMNS = ["Configuration", "Context length", "Wikitext PPL", "PG-19 PPL", "shakespeare PPL", "Total Time (s)",
           "Avg Attn (ms)", "TTFT (s)", "TPOT (ms)", "Throughput (tok/s)", "Peak Mem (GB)", "Device"]


def write_ppl(path, dataset, ppl: dict, *, tokens=4096, oom=(), device_name="Intel Xeon", scoped=True,
              books: dict | None = None):
    """A ppl file: two buckets and an overall record per method; methods in oom run out of memory.

    scoped=False: as written before records had "scope" (the key absent). books: method → its books'
    own perplexities (--books), which give a "ppl_books" event; ppl is then the pooled perplexity.
    """
    count = len(next(iter(books.values()))) if books else None
    writer = ResultsWriter(path, "ppl", {"model": "m", "dataset": dataset, "tokens": tokens,
                                         **({"books": str(count)} if books else {})},
                           {"device": "cpu", "device_name": device_name})
    writer.add_event({"type": "dataset", "name": dataset, "message": "test",
                      **({"books": [{"index": i} for i in range(count)]} if books else {})})
    for method, value in ppl.items():
        writer.add_record({"method": method, "length": tokens // 2, "status": "ok", "scope": "bucket", "nll_mean": 2.0,
                           "perplexity": value + 1, "tokens_scored": tokens // 2})
        if method in oom:
            writer.add_record({"method": method, "length": tokens, "status": "oom", "error": "out of memory"})
            continue
        writer.add_record({"method": method, "length": tokens, "status": "ok", "scope": "bucket", "nll_mean": 2.0,
                           "perplexity": value - 1, "tokens_scored": tokens // 2})
        writer.add_record({"method": method, "length": tokens, "status": "ok", "scope": "overall", "batch_size": 1,
                           "nll_mean": 2.0, "perplexity": value, "tokens_scored": tokens, "tpot_ms_median": 40.0,
                           "throughput_tok_s": 25.0, "peak_rss_bytes": 2_000_000_000})
        writer.add_event({"type": OVERALL_EVENT, "method": method, "record": len(writer.records) - 1,
                          "length": tokens, "total_s": 163.84})
        if books:
            writer.add_event({"type": "ppl_books", "method": method, "books": [{"index": i} for i in range(count)],
                              **book_spread(books[method])})
    writer.finish()
    if not scoped:
        doc = json.loads(path.read_text())
        for record in doc["records"]:
            del record["scope"]
        path.write_text(json.dumps(doc))
    return path


def write_sweep(path, methods, *, device_name="NVIDIA H100"):
    writer = ResultsWriter(path, "sweep", {"model": "m"}, {"device": "cuda", "device_name": device_name})
    for m, method in enumerate(methods):
        for length in (2048, 4096, 8192):
            if method == "baseline" and length == 8192:
                writer.add_record({"method": method, "length": length, "status": "oom", "error": "CUDA oom"})
                continue
            writer.add_record({
                "method": method, "length": length, "status": "ok", "batch_size": 1, "ttft_s": 0.1 * length / 2048,
                "tpot_ms_median": 30.0 + m + length / 1000, "tpot_ms_p90": 40.0, "throughput_tok_s": 30.0 - m,
                "attn_ms_mean": 12.5 + m, "peak_allocated_bytes": 5_480_000_000 + length,
                "peak_rss_bytes": 9_000_000_000,
            })
    writer.finish()
    return path


@pytest.fixture
def files(tmp_path):
    return [
        write_ppl(tmp_path / "pg19.json", "pg19", {"baseline": 8.54, "streaming_8_256": 23.94, "h2o_4_32_256": 13.69}),
        write_ppl(tmp_path / "wikitext.json", "wikitext", {"baseline": 6.99, "streaming_8_256": 32.24},
                  oom=("streaming_8_256",)),
        write_ppl(tmp_path / "plays.json", "shakespeare", {"baseline": 11.0}, tokens=2048),
        write_sweep(tmp_path / "sweep.json", ["baseline", "streaming_8_256"]),
    ]


def test_every_column_with_missing_values(files):
    report = build_report(files)
    assert report.columns == COLUMNS
    rows = {row["Configuration"]: row for row in report.rows}
    assert list(rows) == ["baseline", "streaming_8_256", "h2o_4_32_256"]
    base = rows["baseline"]
    assert base["PG-19 PPL"] == 8.54 and base["Wikitext PPL"] == 6.99 and base["shakespeare PPL"] == 11.0
    # Time and memory from the sweep's largest length that is ok (8192 ran out of memory).
    assert base["TPOT (ms)"] == 30.0 + 4.096 and base["TTFT (s)"] == pytest.approx(0.2)
    assert base["Peak Mem (GB)"] == pytest.approx(5.480004096)  # allocated bytes, not RSS
    assert base["Total Time (s)"] is None  # a sweep cannot give it honestly
    assert base["Context length"] == "4096 / 2048"  # ppl tokens, then the sweep length used
    assert base["Device"] == "Intel Xeon; NVIDIA H100"
    streaming = rows["streaming_8_256"]
    assert streaming["Wikitext PPL"] == "OOM" and streaming["shakespeare PPL"] is None
    assert streaming["Throughput (tok/s)"] == 29.0
    h2o = rows["h2o_4_32_256"]  # ppl only: time from its ppl run
    assert h2o["Total Time (s)"] == 163.84 and h2o["TPOT (ms)"] == 40.0 and h2o["TTFT (s)"] is None
    assert h2o["Avg Attn (ms)"] is None and h2o["Peak Mem (GB)"] == 2.0 and h2o["Wikitext PPL"] is None
    assert any("out of memory" in note for note in report.notes)


def test_markdown(files):
    text = render(build_report(files), "markdown")
    lines = text.splitlines()
    assert lines[0].startswith("| Configuration") and all(c in lines[0] for c in COLUMNS)
    assert lines[1].startswith("| :---") and lines[1].rstrip().endswith("|")
    baseline = next(line for line in lines if line.startswith("| baseline"))
    assert "8.54" in baseline and "6.99" in baseline and "34.10" in baseline and "5.48" in baseline
    h2o = next(line for line in lines if line.startswith("| h2o_4_32_256"))
    cells = [cell.strip() for cell in h2o.strip("|").split("|")]
    assert cells[COLUMNS.index("Wikitext PPL")] == "–" and cells[COLUMNS.index("TTFT (s)")] == "–"
    assert cells[COLUMNS.index("Total Time (s)")] == "163.8400"
    assert not any(cell in ("0", "0.00", "0.0000") for cell in cells)  # missing is never 0
    assert "OOM" in text


def test_csv(files):
    rows = list(csv.reader(io.StringIO(render(build_report(files), "csv"))))
    assert rows[0] == COLUMNS
    by_name = {row[0]: dict(zip(COLUMNS, row)) for row in rows[1:]}
    assert by_name["h2o_4_32_256"]["Wikitext PPL"] == "–"
    assert by_name["baseline"]["PG-19 PPL"] == "8.54"
    assert by_name["streaming_8_256"]["Wikitext PPL"] == "OOM"


def test_json(files):
    doc = json.loads(render(build_report(files), "json"))
    assert doc["columns"] == COLUMNS
    h2o = next(row for row in doc["rows"] if row["Configuration"] == "h2o_4_32_256")
    assert h2o["Wikitext PPL"] is None and h2o["PG-19 PPL"] == 13.69
    streaming = next(row for row in doc["rows"] if row["Configuration"] == "streaming_8_256")
    assert streaming["Wikitext PPL"] is None  # OOM: not measured; the notes say why
    assert doc["notes"]


def test_forced_dataset_columns_show_as_missing(tmp_path):
    path = write_ppl(tmp_path / "plays.json", "shakespeare", {"baseline": 11.0})
    report = build_report([path], datasets=["pg19", "shakespeare"])
    assert report.columns[2:4] == ["PG-19 PPL", "shakespeare PPL"]
    assert report.rows[0]["PG-19 PPL"] is None


def test_report_cli(files):
    result = runner.invoke(app, ["report", *map(str, files), "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == ",".join(COLUMNS)


@pytest.mark.parametrize("content, message", [
    ({"hello": "world"}, "not a kvstress results file"),
    (None, "not found"),
    ("{not json", "not valid JSON"),
    ({"format": "kvstress-results", "version": 1, "kind": "batch", "config": {}, "records": [], "samples": [],
      "events": [], "environment": {}}, "the report reads sweep and ppl"),
    ({"format": "kvstress-results", "version": 1, "kind": "sweep", "config": {}, "environment": {},
      "records": [{"method": "baseline"}], "samples": [], "events": []}, "damaged"),
    ({"format": "kvstress-results", "version": 1, "kind": "ppl", "config": {}, "environment": {},
      "records": [], "samples": [], "events": [{"type": OVERALL_EVENT, "method": "x", "record": 3}]}, "damaged"),
])
def test_report_errors_are_one_line_with_exit_2(tmp_path, content, message):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    result = runner.invoke(app, ["report", str(path)])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(ResultsError):
        build_report([path])


def test_report_cli_unknown_format(files):
    result = runner.invoke(app, ["report", str(files[0]), "--format", "html"])
    assert result.exit_code == 2 and "use one of markdown, csv, json" in result.stderr


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("It was the best of times, it was the worst of times. " * 12, encoding="utf-8")
    return path


def test_compare_on_tiny_random(tmp_path, text_file):
    out_dir = tmp_path / "cmp"
    missing = tmp_path / "absent.txt"
    result = runner.invoke(app, [
        "compare", "--model", "tiny-random", "--datasets", f"{text_file},{missing}", "--tokens", "300",
        "--chunk", "30", "--out-dir", str(out_dir),
    ])
    assert result.exit_code == 0, result.output
    assert "skipping dataset" in result.stderr and "absent.txt" in result.stderr
    written = json.loads((out_dir / "book.json").read_text())
    assert written["kind"] == "ppl" and written["config"]["chunk"] == 30
    lines = result.stdout.splitlines()
    assert "book.txt PPL" in lines[0] and "absent.txt PPL" in lines[0]
    methods = [line.split("|")[1].strip() for line in lines[2:8]]
    assert methods == ["baseline", "streaming_8_256", "streaming_8_512", "h2o_4_32_256", "h2o_8_32_256", "h2o_8_64_512"]
    assert all("–" in line for line in lines[2:8])  # the skipped dataset's column
    # The run already exists: not overwritten without --force.
    again = runner.invoke(app, ["compare", "--model", "tiny-random", "--datasets", str(text_file), "--tokens", "300",
                                "--out-dir", str(out_dir)])
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_compare_runs_the_methods_given(tmp_path, text_file):
    out_dir = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", "--model", "tiny-random", "--datasets", str(text_file), "--tokens", "128",
                                 "--chunk", "16", "-m", "tova_0_32", "-m", "knorm_4_8_0_32", "--out-dir", str(out_dir)])
    assert result.exit_code == 0, result.output
    written = json.loads((out_dir / "book.json").read_text())
    assert written["config"]["methods"] == ["tova_0_32", "knorm_4_8_0_32"]
    assert {r["method"] for r in written["records"]} == {"tova_0_32", "knorm_4_8_0_32"}


def test_compare_with_no_loadable_dataset(tmp_path):
    result = runner.invoke(app, ["compare", "--model", "tiny-random", "--datasets", str(tmp_path / "none.txt"),
                                 "--tokens", "64", "--out-dir", str(tmp_path / "cmp")])
    assert result.exit_code == 2
    assert "--datasets shakespeare" in result.stderr.splitlines()[-1]


def test_ppl_figure_from_results_files(tmp_path, files):
    from kvstress.plot import build_ppl_figure, plot_results
    from kvstress.results import load_results

    docs = [load_results(path) for path in files[:2]]
    figure = build_ppl_figure(docs, ["pg19", "wikitext"])
    ax = figure.axes[0]
    labels = {line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert "pg19 (pg19): baseline" in labels and "wikitext (wikitext): streaming_8_256" in labels
    baseline = next(line for line in ax.get_lines() if line.get_label() == "pg19 (pg19): baseline")
    assert list(baseline.get_xdata()) == [2048, 4096]  # bucket records only, not the overall one
    assert [line for line in ax.get_lines() if (line.get_gid() or "").startswith("failure:")]  # the OOM
    out = plot_results(files[:1], tmp_path / "ppl.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_ppl_figure_goes_logarithmic_only_when_a_cache_breaks_down(tmp_path):
    from kvstress.plot import build_ppl_figure
    from kvstress.results import load_results

    calm = load_results(write_ppl(tmp_path / "calm.json", "pg19", {"baseline": 30.0, "streaming_8_256": 40.0}))
    broken = load_results(write_ppl(tmp_path / "broken.json", "pg19", {"baseline": 2000.0, "streaming_8_256": 40.0}))
    assert build_ppl_figure([calm]).axes[0].get_yscale() == "linear"
    assert build_ppl_figure([broken]).axes[0].get_yscale() == "log"


def test_files_written_before_scope_read_as_before(tmp_path):
    """A ppl file whose records lack "scope": its overall records are known by their ppl_overall event,
    in the report, the plot and `kvstress report`, exactly as in a file with the field."""
    from kvstress.plot import build_ppl_figure

    ppl = {"baseline": 8.54, "streaming_8_256": 23.94}
    new = write_ppl(tmp_path / "new.json", "pg19", ppl, oom=("streaming_8_256",))
    old = write_ppl(tmp_path / "old.json", "pg19", ppl, oom=("streaming_8_256",), scoped=False)
    assert all("scope" not in record for record in json.loads(old.read_text())["records"])
    assert build_report([old]).rows == build_report([new]).rows
    assert split_ppl_records(load_results(old)) == split_ppl_records(load_results(new))
    buckets, overall = split_ppl_records(load_results(old))
    assert [(r["length"], r["status"], r["scope"]) for r in buckets] == [
        (2048, "ok", "bucket"), (4096, "ok", "bucket"), (2048, "ok", "bucket"), (4096, "oom", None)]
    assert overall["baseline"]["scope"] == "overall" and overall["baseline"]["total_s"] == 163.84
    figures = [build_ppl_figure([load_results(path)]).axes[0] for path in (old, new)]
    assert [list(line.get_xdata()) for line in figures[0].get_lines()] == [
        list(line.get_xdata()) for line in figures[1].get_lines()]
    result = runner.invoke(app, ["report", str(old)])
    assert result.exit_code == 0 and "8.54" in result.stdout


def test_readers_tell_overall_from_bucket_by_scope(tmp_path):
    """Without its ppl_overall events a file with "scope" still has its overall records (the last
    bucket ends at the same length); only the total time, which the event holds, is missing."""
    path = write_ppl(tmp_path / "pg19.json", "pg19", {"baseline": 8.54})
    doc = json.loads(path.read_text())
    doc["events"] = [e for e in doc["events"] if e["type"] != OVERALL_EVENT]
    path.write_text(json.dumps(doc))
    buckets, overall = split_ppl_records(load_results(path))
    assert overall["baseline"]["perplexity"] == 8.54 and overall["baseline"]["total_s"] is None
    assert [r["perplexity"] for r in buckets] == pytest.approx([9.54, 7.54])
    assert build_report([path]).rows[0]["PG-19 PPL"] == 8.54


def test_several_books_columns_say_pooled_and_mean_with_sample_sd(tmp_path):
    """--books files: the pooled perplexity and the mean ± sample SD of the books' own, each labelled."""
    path = write_ppl(tmp_path / "pg19.json", "pg19", {"baseline": 20.0, "streaming_8_256": 30.0},
                     books={"baseline": [17.46, 31.38], "streaming_8_256": [25.0, 40.0]})
    pooled, spread = "PG-19 pooled PPL (2 books)", "PG-19 mean of 2 books' PPL ± SD"
    report = build_report([path], datasets=["pg19"])
    assert report.columns[2:4] == [pooled, spread] and "PG-19 PPL" not in report.columns
    baseline = report.rows[0]
    assert baseline[pooled] == 20.0 and baseline[spread]["mean"] == pytest.approx(24.42)
    assert baseline[spread]["stdev"] == pytest.approx(9.843, abs=1e-3)  # sample SD: |a − b| / √2, not / 2
    lines = render(report, "markdown").splitlines()
    row = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert row[2:4] == ["20.00", "24.42 ± 9.84"]
    assert f"- pg19.json: {spread}: the mean of each book's own perplexity ± their sample standard deviation (n − 1), " \
           "each book one sample" in lines
    assert f"- pg19.json: {pooled}: exp of the mean NLL over every scored token of the 2 books together" in lines
    csv_rows = list(csv.reader(io.StringIO(render(report, "csv"))))
    assert csv_rows[2][2:4] == ["30.00", "32.50 ± 10.61"]
    json_row = json.loads(render(report, "json"))["rows"][0]
    assert json_row[spread]["books"] == 2 and json_row[spread]["min"] == 17.46 and json_row[pooled] == 20.0
    from kvstress.plot import build_ppl_figure

    assert build_ppl_figure([load_results(path)]).axes[0].get_ylabel().endswith("(books pooled)")
