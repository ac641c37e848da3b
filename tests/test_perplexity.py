"""Streaming perplexity: exactness against a plain forward, equality while nothing is evicted,
buckets that partition the tokens, OOM handling, and `kvstress ppl` end to end."""

from __future__ import annotations

import json
import math
import statistics
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from kvstress.cli import app
from kvstress.config import ConfigError, PplConfig
from kvstress.models import load_model
from kvstress.perplexity import PplSchedule, parse_buckets
from kvstress.report import OVERALL_EVENT, split_ppl_records
from kvstress.results import ResultsWriter, load_results
from kvstress.spec import parse_spec
from kvstress.stream import Harness, Stream

N = 96  # tokens scored per test stream


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-random").model


@pytest.fixture(scope="module")
def ids():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(4, 260, (1, N + 1), generator=generator)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "book.txt"
    words = "It was the best of times, it was the worst of times, it was the age of wisdom. "
    path.write_text(words * 40, encoding="utf-8")
    return path


def table_rows(text: str) -> list[dict]:
    """The rows of the rich table printed in `text`, each {column header: cell text}."""
    lines = text.splitlines()
    names = [cell.strip() for cell in next(line for line in lines if line.startswith("┃")).strip("┃").split("┃")]
    return [dict(zip(names, (cell.strip() for cell in line.strip("│").split("│")))) for line in lines
            if line.startswith("│")]


def run(tmp_path, model, ids, methods, *, chunk=1, buckets=(32, 64, N), positions="original"):
    config = PplConfig(methods=tuple(parse_spec(m) for m in methods), tokens=N, buckets=buckets,
                       model="tiny-random", chunk=chunk, positions=positions, out=tmp_path / "ppl.json")
    writer = ResultsWriter(config.out, "ppl", config.to_json(), {"device": "cpu"}, overwrite=True)
    schedule = PplSchedule(config)
    schedule.prepare(SimpleNamespace(tokens=ids[0]), writer)
    harness = Harness(config, model, writer)
    for spec in config.methods:
        schedule.run_method(harness, spec)
    writer.finish()
    return split_ppl_records(load_results(config.out))


def test_exact_baseline_equals_full_sequence_cross_entropy(tmp_path, model, ids):
    buckets, overall = run(tmp_path, model, ids, ["baseline"])
    with torch.no_grad():
        logits = model(ids[:, :N]).logits[0].float()
    per_token = F.cross_entropy(logits, ids[0, 1:], reduction="none").double()
    assert overall["baseline"]["nll_mean"] == pytest.approx(per_token.mean().item(), rel=1e-6, abs=1e-6)
    assert overall["baseline"]["perplexity"] == pytest.approx(math.exp(per_token.mean().item()), rel=1e-6)
    for record, (lo, hi) in zip(buckets, [(0, 32), (32, 64), (64, N)]):
        assert record["length"] == hi
        assert record["nll_mean"] == pytest.approx(per_token[lo:hi].mean().item(), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 8])
@pytest.mark.parametrize("positions", ["original", "shifted"])
def test_compressed_policies_equal_the_baseline_while_tokens_fit(tmp_path, model, ids, chunk, positions):
    methods = ["baseline", f"streaming_4_{N}", f"h2o_4_8_{N + 16}"]
    if positions == "shifted":
        methods = methods[1:]
        reference = run(tmp_path / "ref", model, ids, ["baseline"], chunk=chunk)
    buckets, overall = run(tmp_path, model, ids, methods, chunk=chunk, positions=positions)
    if positions == "shifted":
        buckets, overall = buckets + reference[0], {**overall, **reference[1]}
    for method in methods:
        assert overall[method]["nll_mean"] == pytest.approx(overall["baseline"]["nll_mean"], rel=1e-5)
        mine = [r["nll_mean"] for r in buckets if r["method"] == method]
        base = [r["nll_mean"] for r in buckets if r["method"] == "baseline"]
        assert mine == pytest.approx(base, rel=1e-5)


def test_eviction_changes_perplexity_and_chunking_is_an_approximation(tmp_path, model, ids):
    _, exact = run(tmp_path / "exact", model, ids, ["baseline", "streaming_4_16"])
    _, chunked = run(tmp_path / "chunked", model, ids, ["streaming_4_16"], chunk=16)
    assert exact["streaming_4_16"]["nll_mean"] != pytest.approx(exact["baseline"]["nll_mean"], rel=1e-6)
    assert chunked["streaming_4_16"]["nll_mean"] != pytest.approx(exact["streaming_4_16"]["nll_mean"], rel=1e-6)


def test_buckets_partition_the_tokens(tmp_path, model, ids):
    buckets, overall = run(tmp_path, model, ids, ["baseline", "h2o_2_4_24"], chunk=5, buckets=(10, 50, N))
    for method in ("baseline", "h2o_2_4_24"):
        mine = [r for r in buckets if r["method"] == method]
        assert [r["length"] for r in mine] == [10, 50, N]
        assert sum(r["tokens_scored"] for r in mine) == overall[method]["tokens_scored"] == N
        weighted = sum(r["nll_mean"] * r["tokens_scored"] for r in mine) / N
        assert weighted == pytest.approx(overall[method]["nll_mean"], rel=1e-9)
        for r in mine:  # bucket records carry only the perplexity fields
            assert r["status"] == "ok" and r["tpot_ms_median"] is None and r["batch_size"] is None
        record = overall[method]
        assert record["length"] == N and record["tpot_ms_median"] > 0 and record["throughput_tok_s"] > 0
        written = [r for r in load_results(tmp_path / "ppl.json")["records"] if r["method"] == method]
        assert [(r["length"], r["scope"]) for r in written] == [(10, "bucket"), (50, "bucket"), (N, "bucket"),
                                                                  (N, "overall")]
        assert record["peak_rss_bytes"] > 0 and record["cache_tokens"] == (N if method == "baseline" else 24)
        assert record["total_s"] > 0


def test_parse_buckets():
    assert parse_buckets(None, 4096) == ((1024, 2048, 4096), None)
    assert parse_buckets(None, 500) == ((500,), None)
    edges, note = parse_buckets("1k,2k,4k,8k", 3000)
    assert edges == (1024, 2048, 3000) and "8192" in note and "4096" in note
    assert parse_buckets("1k,4k", 4096) == ((1024, 4096), None)
    with pytest.raises(ConfigError, match="must increase"):
        parse_buckets("2k,1k", 4096)


def test_out_of_memory_ends_one_method_and_the_next_runs(tmp_path, model, ids, monkeypatch):
    original = Stream.forward

    def forward(self, ids, phase, **options):
        if type(self.cache).__name__ == "DynamicCache" and self.position >= 40:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB\nmore detail")
        return original(self, ids, phase, **options)

    monkeypatch.setattr(Stream, "forward", forward)
    buckets, overall = run(tmp_path, model, ids, ["baseline", "streaming_4_16"])
    assert [(r["method"], r["length"], r["status"]) for r in buckets] == [
        ("baseline", 32, "ok"), ("baseline", 64, "oom"),
        ("streaming_4_16", 32, "ok"), ("streaming_4_16", 64, "ok"), ("streaming_4_16", N, "ok"),
    ]
    assert buckets[1]["error"] == "CUDA out of memory. Tried to allocate 2 GiB"
    written = load_results(tmp_path / "ppl.json")["records"]
    assert [r["scope"] for r in written] == ["bucket", None, "bucket", "bucket", "bucket", "overall"]  # oom: none
    assert set(overall) == {"streaming_4_16"}
    events = [e for e in load_results(tmp_path / "ppl.json")["events"] if e["type"] == "oom"]
    assert events[0]["tokens_seen"] == 40


def test_ppl_cli_end_to_end(tmp_path, text_file):
    out = tmp_path / "ppl.json"
    result = CliRunner().invoke(app, [
        "ppl", "--model", "tiny-random", "--dataset", str(text_file), "--tokens", "120", "--buckets", "40,80,1k",
        "--capacity", "32", "--chunk", "4", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["kind"] == "ppl" and doc["complete"] is True
    assert doc["config"]["buckets"] == [[0, 40], [40, 80], [80, 120]] and doc["config"]["chunk"] == 4
    assert "approximation" in doc["config"]["mode"]
    buckets, overall = split_ppl_records(doc)
    assert [(r["method"], r["length"]) for r in buckets] == [
        (m, n) for m in ("baseline", "streaming_4_32", "h2o_4_4_32") for n in (40, 80, 120)
    ]
    assert set(overall) == {"baseline", "streaming_4_32", "h2o_4_4_32"}
    assert [(r["method"], r["length"], r["scope"]) for r in doc["records"]] == [
        (m, n, scope) for m in ("baseline", "streaming_4_32", "h2o_4_4_32")
        for n, scope in ((40, "bucket"), (80, "bucket"), (120, "bucket"), (120, "overall"))
    ]
    assert any(e["type"] == "buckets" and "1024" in e["message"] for e in doc["events"])
    assert [(r["method"], r["context"]) for r in table_rows(result.stdout)] == [
        (m, context) for m in ("baseline", "streaming_4_32", "h2o_4_4_32") for context in ("1–40", "41–80", "81–120", "all")
    ]
    assert "books" not in result.stdout  # one text: one perplexity per row, no pooling to explain
    assert "approximates" in result.stderr


def test_resume_of_a_ppl_file_written_before_scope(tmp_path, text_file):
    """A run from before records had "scope", cut short in its second method: --resume finishes it,
    the old records keep no scope, the new ones have it, and every reader tells overall from bucket."""
    from kvstress.plot import build_ppl_figure
    from kvstress.report import build_report

    out = tmp_path / "ppl.json"
    args = ["ppl", "--model", "tiny-random", "--dataset", str(text_file), "--tokens", "120", "--buckets", "40,80",
            "-m", "baseline", "-m", "streaming_4_32", "--chunk", "8", "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    doc = json.loads(out.read_text())
    del doc["records"][6:]  # streaming_4_32: its last bucket and overall record never written
    doc["events"] = [e for e in doc["events"] if not (e["type"] == OVERALL_EVENT and e["method"] == "streaming_4_32")]
    for record in doc["records"]:
        del record["scope"]
    doc["complete"] = False
    out.write_text(json.dumps(doc))

    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    doc = load_results(out)
    assert [r.get("scope") for r in doc["records"]] == [None] * 6 + ["bucket", "overall"]
    buckets, overall = split_ppl_records(doc)
    assert set(overall) == {"baseline", "streaming_4_32"} and overall["baseline"]["scope"] == "overall"
    assert [(r["method"], r["length"], r["scope"]) for r in buckets] == [
        (m, n, "bucket") for m in ("baseline", "streaming_4_32") for n in (40, 80, 120)]
    assert [(r["method"], r["context"]) for r in table_rows(result.stdout)] == [
        (m, context) for m in ("baseline", "streaming_4_32") for context in ("1–40", "41–80", "81–120", "all")]
    assert {row["Configuration"] for row in build_report([out]).rows} == {"baseline", "streaming_4_32"}
    assert all(list(line.get_xdata()) == [40, 80, 120] for line in build_ppl_figure([doc]).axes[0].get_lines()
               if not line.get_label().startswith("_"))


@pytest.mark.parametrize("args, message", [
    (["--chunk", "0"], "--chunk must be positive"),
    (["--tokens", "lots"], "--tokens"),
    (["--buckets", "2k,1k"], "--buckets must increase"),
    (["--method", "lru_4"], "write baseline, streaming_S_C or h2o_S_W_C"),
    (["--dataset", "/nonexistent/book.txt"], "no such file"),
])
def test_ppl_cli_errors_are_one_line(tmp_path, args, message):
    result = CliRunner().invoke(app, ["ppl", "--model", "tiny-random", "--tokens", "64", "--out", str(tmp_path / "p.json"),
                                      *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_bundled_smollm2_ppl(tmp_path):
    out = tmp_path / "ppl.json"
    result = CliRunner().invoke(app, [
        "ppl", "--model", "smollm2-135m", "--dataset", "shakespeare", "--tokens", "512", "--buckets", "128,256",
        "--method", "baseline", "--method", "streaming_4_64", "--chunk", "8", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    _, overall = split_ppl_records(load_results(out))
    assert all(1 < r["perplexity"] < 200 for r in overall.values())
    assert overall["baseline"]["perplexity"] <= overall["streaming_4_64"]["perplexity"]


@pytest.fixture
def pg19_copy(tmp_path, monkeypatch):
    """An offline PG-19 test split of four books: book 0 too short for 96 tokens, books 1-3 long enough."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    copy = tmp_path / "pg19-test"
    (copy / "data").mkdir(parents=True)
    texts = ["Short.", "It was a dark and stormy night; the rain fell in torrents. " * 20,
             "Call me Ishmael. Some years ago I went to sea. " * 30, "Happy families are all alike. " * 40]
    pq.write_table(pa.table({"short_book_title": [f"Book {i}" for i in range(4)], "publication_date": [1900] * 4,
                             "url": [f"http://www.gutenberg.org/ebooks/{100 + i}" for i in range(4)], "text": texts}),
                   copy / "data" / "test-00000-of-00001.parquet")
    monkeypatch.setenv("KVSTRESS_PG19_PATH", str(copy))
    return copy


POOLED = "pooled PPL"
SPREAD = "mean of 2 books' PPL ± SD"


def mean_sd(values) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def test_several_pg19_books_are_scored_one_by_one_and_averaged(tmp_path, pg19_copy):
    """--books: each book is its own stream (a "ppl_book" event each); the records pool the books
    and a "ppl_books" event gives the spread, which the table prints beside the pooled perplexity."""
    from kvstress.perplexity import BOOK_EVENT, BOOKS_EVENT

    out = tmp_path / "ppl.json"
    result = CliRunner().invoke(app, ["ppl", "--model", "tiny-random", "--dataset", "pg19", "--books", "2",
                                      "--tokens", "96", "--buckets", "48", "--chunk", "8", "-m", "baseline",
                                      "-m", "streaming_4_32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = load_results(out)
    dataset = next(e for e in doc["events"] if e["type"] == "dataset")
    assert [book["index"] for book in dataset["books"]] == [1, 2]  # book 0 is too short: never joined to the next
    rows = {(row["method"], row["context"]): row for row in table_rows(result.stdout)}
    for method in ("baseline", "streaming_4_32"):
        books = [e for e in doc["events"] if e["type"] == BOOK_EVENT and e["method"] == method]
        assert [(e["book"]["index"], e["book"]["id"]) for e in books] == [(1, "101"), (2, "102")]
        assert books[0]["nll_mean"] != books[1]["nll_mean"]
        buckets, overall = split_ppl_records(doc)
        mine = [r for r in buckets if r["method"] == method]
        assert [r["length"] for r in mine] == [48, 96] and [r["tokens_scored"] for r in mine] == [96, 96]
        assert [r["scope"] for r in doc["records"] if r["method"] == method] == ["bucket", "bucket", "overall"]
        for i, record in enumerate(mine):
            assert record["nll_mean"] == pytest.approx((books[0]["buckets"][i]["nll_mean"]
                                                        + books[1]["buckets"][i]["nll_mean"]) / 2, rel=1e-12)
        assert overall[method]["nll_mean"] == pytest.approx((books[0]["nll_mean"] + books[1]["nll_mean"]) / 2)
        assert overall[method]["tokens_scored"] == 192
        spread = next(e for e in doc["events"] if e["type"] == BOOKS_EVENT and e["method"] == method)
        perplexities = [e["perplexity"] for e in books]
        assert spread["perplexity_mean"] == pytest.approx(sum(perplexities) / 2)
        assert spread["perplexity_min"] == min(perplexities) and spread["perplexity_max"] == max(perplexities)
        assert spread["perplexity_stdev"] == pytest.approx(statistics.stdev(perplexities))  # sample SD, n − 1
        # The table: the pooled perplexity and the books' mean ± sample SD, each in its labelled column.
        assert rows[(method, "all")][POOLED] == f"{overall[method]['perplexity']:.2f}"
        assert rows[(method, "all")][SPREAD] == mean_sd(perplexities)
        assert rows[(method, "all")]["books' PPL min–max"] == f"{min(perplexities):.2f}–{max(perplexities):.2f}"
        for i, (record, context) in enumerate(zip(mine, ("1–48", "49–96"))):
            assert rows[(method, context)][POOLED] == f"{record['perplexity']:.2f}"
            assert rows[(method, context)][SPREAD] == mean_sd([e["buckets"][i]["perplexity"] for e in books])
            assert spread["buckets"][i]["length"] == record["length"]
    assert "pooled PPL: exp of the mean NLL over every scored token of the 2 books together" in result.stdout
    assert ("mean of 2 books' PPL ± SD: the mean of each book's own perplexity ± their sample standard deviation "
            "(n − 1)") in result.stdout


def test_compare_with_several_books_prints_pooled_and_mean_perplexity(tmp_path, pg19_copy):
    result = CliRunner().invoke(app, ["compare", "--model", "tiny-random", "--datasets", "pg19", "--books", "2",
                                      "--tokens", "96", "--chunk", "16", "-m", "baseline", "-m", "streaming_4_32",
                                      "--out-dir", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    doc = load_results(tmp_path / "cmp" / "pg19.json")
    _, overall = split_ppl_records(doc)
    lines = result.stdout.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    pooled, spread = "PG-19 pooled PPL (2 books)", "PG-19 mean of 2 books' PPL ± SD"
    assert header[2:4] == [pooled, spread] and "PG-19 PPL" not in header
    rows = {cells[0]: dict(zip(header, cells)) for cells in ([c.strip() for c in line.strip("|").split("|")]
                                                             for line in lines[2:4])}
    for method in ("baseline", "streaming_4_32"):
        perplexities = [e["perplexity"] for e in doc["events"] if e["type"] == "ppl_book" and e["method"] == method]
        assert rows[method][pooled] == f"{overall[method]['perplexity']:.2f}"
        assert rows[method][spread] == mean_sd(perplexities)
    assert f"- pg19.json: {pooled}: exp of the mean NLL over every scored token of the 2 books together" in lines
    assert (f"- pg19.json: {spread}: the mean of each book's own perplexity ± their sample standard deviation (n − 1), "
            "each book one sample") in lines


def test_ppl_table_labels_pooled_and_mean_perplexity_apart(capsys):
    """The two figures of a --books run where they differ (hand-made): pooled 20.00 beside mean 24.42 ± 9.84;
    the file is from before "scope", so its overall row is known by its ppl_overall event."""
    from kvstress.tables import print_ppl

    records = [{"method": "baseline", "length": 48, "status": "ok", "nll_mean": 3.0, "perplexity": 20.09,
                "tokens_scored": 96},
               {"method": "baseline", "length": 96, "status": "ok", "nll_mean": 2.9, "perplexity": 18.17,
                "tokens_scored": 96},
               {"method": "baseline", "length": 96, "status": "ok", "nll_mean": 2.996, "perplexity": 20.0,
                "tokens_scored": 192}]
    books = [{"index": 1}, {"index": 2}]
    events = [{"type": OVERALL_EVENT, "method": "baseline", "record": 2},
              {"type": "ppl_books", "method": "baseline", "books": books, "perplexity_mean": 24.42,
               "perplexity_stdev": 9.84, "perplexity_min": 17.46, "perplexity_max": 31.38}]
    print_ppl(SimpleNamespace(buckets=(48, 96), mode="exact"), records, events, "pg19")
    rows = {row["context"]: row for row in table_rows(capsys.readouterr().out)}
    assert list(rows) == ["1–48", "49–96", "all"]
    assert (rows["all"][POOLED], rows["all"][SPREAD]) == ("20.00", "24.42 ± 9.84")
    assert (rows["49–96"][POOLED], rows["49–96"][SPREAD]) == ("18.17", "–")  # an event from before bucket spreads
