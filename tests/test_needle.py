"""Needle in a haystack: placement, scoring, seeding, the CLI end to end, plot and report."""

from __future__ import annotations

import json

import pytest
import torch
from command_runs import filler_text
from typer.testing import CliRunner

from kvstress.cli import app
from kvstress.config import ConfigError
from kvstress.models import ByteTokenizer
from kvstress.needle import (
    CELL_EVENT,
    NEEDLE,
    QUESTION,
    Haystack,
    NeedleSchedule,
    PromptBuilder,
    answer_complete,
    make_trial,
    make_trials,
    mean_accuracy,
    needle_cells,
    parse_depths,
    score_answer,
)
from kvstress.results import ResultsWriter

runner = CliRunner()
LENGTH = 300


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "hay.txt"
    path.write_text(filler_text(400), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def builder():
    return PromptBuilder(ByteTokenizer())


@pytest.fixture(scope="module")
def haystack(builder):
    return Haystack(ByteTokenizer().encode(filler_text(400)), builder)


# --- placement -------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [0.0, 50.0, 100.0])
def test_needle_sits_at_the_requested_depth_as_a_token_position(builder, haystack, depth):
    trial = make_trial(builder, haystack, LENGTH, depth, 0, seed=0)
    needle = builder.needle(trial.number)
    question = builder.tail
    assert builder.head == []  # ByteTokenizer adds no BOS: the prompt is haystack + needle + question
    assert len(trial.ids) == LENGTH  # the context length is the whole prompt
    expected = round(depth / 100 * (LENGTH - len(needle) - len(question)))
    assert trial.needle_position == expected
    assert list(trial.ids[expected : expected + len(needle)]) == needle
    assert list(trial.ids[-len(question):]) == question
    assert trial.context_tokens == LENGTH - len(question)
    # Nowhere else: the needle is hidden once.
    text = ByteTokenizer().decode(trial.ids)
    assert text.count(f"magic number is {trial.number}") == 1
    assert text.endswith(QUESTION)
    if depth == 0:
        assert text.startswith(NEEDLE.format(number=trial.number))
    if depth == 100:
        assert text.endswith(NEEDLE.format(number=trial.number) + QUESTION)
    if depth == 50:
        # The segment is chosen so that the text before the needle ends a sentence.
        assert text[: trial.needle_position].rstrip(" ").endswith(".")


def test_haystack_is_the_corpus_segment(builder, haystack):
    trial = make_trial(builder, haystack, LENGTH, 25.0, 1, seed=3)
    size = LENGTH - trial.needle_tokens - len(builder.tail)
    segment = haystack.tokens[trial.offset : trial.offset + size]
    split = trial.needle_position
    assert list(trial.ids[:split]) == segment[:split]
    assert list(trial.ids[split + trial.needle_tokens : -len(builder.tail)]) == segment[split:]


# --- seeding --------------------------------------------------------------------------


def test_same_seed_same_prompts_and_numbers(builder, haystack):
    first = make_trials(builder, haystack, [200, 300], [0.0, 50.0, 100.0], 3, seed=7)
    again = make_trials(builder, haystack, [200, 300], [0.0, 50.0, 100.0], 3, seed=7)
    assert first == again
    numbers = [t.number for trials in first.values() for t in trials]
    assert all(len(n) == 5 and n.isdigit() for n in numbers)
    assert len(set(numbers)) > len(numbers) // 2  # a number per needle, not one for all
    assert len({t.offset for trials in first.values() for t in trials}) > 1  # different segments
    other = make_trials(builder, haystack, [200, 300], [0.0, 50.0, 100.0], 3, seed=8)
    assert [t.number for ts in other.values() for t in ts] != numbers
    assert [t.ids for ts in other.values() for t in ts] != [t.ids for ts in first.values() for t in ts]


# --- scoring --------------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "score"), [
    ("73914", "exact"),
    (" 73914.", "exact"),
    (" 73,914 is it", "exact"),
    ("\n\nThe magic number is 73914", "exact"),
    ("7391", "partial"),  # a prefix
    (" 739.", "partial"),  # a three-digit prefix: half or more of the digits
    (" 73.", "wrong"),  # a two-digit prefix is what a guess like "11" gets for 11726
    ("73915", "partial"),  # four digits in place
    ("739145", "partial"),  # all the digits and one more
    ("12, then 73914", "partial"),  # the right number, but not first
    ("12345", "wrong"),
    ("7", "wrong"),  # one digit is chance
    (" forty", "wrong"),
    ("", "wrong"),
])
def test_scoring(answer, score):
    assert score_answer(answer, "73914") == score


@pytest.mark.parametrize(("answer", "complete"), [(" 73914.", True), (" 7391", False), (" 73,", False),
                                                  (" the", False), (" 12 ", True)])
def test_decoding_stops_after_the_first_number(answer, complete):
    assert answer_complete(answer) is complete


def test_depths_and_mistakes_are_one_line_config_errors(builder, haystack):
    assert parse_depths("100,0,50%, 25") == (0.0, 25.0, 50.0, 100.0)
    for bad in ("", "x", "150", "-5"):
        with pytest.raises(ConfigError):
            parse_depths(bad)
    with pytest.raises(ConfigError, match="use lengths of at least"):
        make_trial(builder, haystack, 80, 50.0, 0, seed=0)
    with pytest.raises(ConfigError, match="shorter --lengths"):
        make_trial(builder, Haystack(haystack.tokens[:500], builder), 1000, 50.0, 0, seed=0)


class ChatByteTokenizer(ByteTokenizer):
    """A ByteTokenizer with a (ChatML-like) chat template, as instruction-tuned tokenizers have."""

    chat_template = "chatml"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<user>{m['content']}</user>\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def test_chat_prompt_wraps_the_question_and_keeps_the_placement(haystack):
    builder = PromptBuilder(ChatByteTokenizer(), chat=True)
    trial = make_trial(builder, Haystack(haystack.tokens, builder), LENGTH, 50.0, 0, seed=0)
    text = ByteTokenizer().decode(trial.ids)
    assert text.startswith("<user>") and text.endswith("</user>\n<assistant>The magic number is")
    size = LENGTH - len(builder.head) - trial.needle_tokens - len(builder.tail)
    assert trial.needle_position == len(builder.head) + round(0.5 * size)
    assert len(trial.ids) == LENGTH
    with pytest.raises(ConfigError, match="drop --chat"):
        PromptBuilder(ByteTokenizer(), chat=True)


# --- end to end -----------------------------------------------------------------------

TINY = ["--model", "tiny-random", "--lengths", "128,192", "--depths", "0,50,100", "--needles", "2",
        "--capacity", "48", "--chunk", "64", "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("needle") / "needle.json"
    result = runner.invoke(app, ["needle", *TINY, "--dataset", str(text_file), "--out", str(out)])
    return result, out


def test_cli_end_to_end_on_tiny_random(tiny_run):
    result, out = tiny_run
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["kind"] == "needle" and doc["complete"] is True
    assert doc["config"]["depths"] == [0.0, 50.0, 100.0] and doc["config"]["needles"] == 2
    methods = ("baseline", "streaming_4_48", "h2o_4_6_48")
    cells = needle_cells(doc)
    assert sorted((c["method"], c["length"], c["depth"]) for c in cells) == sorted(
        (m, length, depth) for m in methods for length in (128, 192) for depth in (0.0, 50.0, 100.0)
    )
    for cell in cells:
        assert cell["status"] == "ok" and cell["trials"] == 2 == len(cell["answers"])
        assert cell["exact"] + cell["partial"] + cell["wrong"] == 2
        assert 0.0 <= cell["accuracy"] <= 1.0 and cell["accuracy"] == cell["exact"] / 2
        assert all(a["score"] == score_answer(a["answer"], a["number"]) for a in cell["answers"])
    # Every method saw the same prompts.
    numbers = {m: [a["number"] for c in cells if c["method"] == m for a in c["answers"]] for m in methods}
    assert numbers["baseline"] == numbers["streaming_4_48"] == numbers["h2o_4_6_48"]
    records = {(r["method"], r["length"]): r for r in doc["records"]}
    assert sorted(records) == sorted((m, length) for m in methods for length in (128, 192))
    assert all(r["status"] == "ok" and r["ttft_s"] > 0 for r in records.values())
    assert records["baseline", 192]["cache_tokens"] >= 192 and records["h2o_4_6_48", 192]["cache_tokens"] == 48
    assert "exact / trials" in result.stdout


def test_plot_and_report_of_the_run(tiny_run, tmp_path):
    _, out = tiny_run
    figure = runner.invoke(app, ["plot", str(out), "--out", str(tmp_path / "needle.png")])
    assert figure.exit_code == 0, figure.output
    assert (tmp_path / "needle.png").read_bytes()[:4] == b"\x89PNG"
    report = runner.invoke(app, ["report", str(out), "--format", "json"])
    assert report.exit_code == 0, report.output
    rows = json.loads(report.stdout)["rows"]
    assert [row["Configuration"] for row in rows] == ["baseline", "streaming_4_48", "h2o_4_6_48"]
    assert all(0.0 <= row["Retrieval acc"] <= 1.0 for row in rows)


def test_chat_on_a_tokenizer_without_a_template_is_a_one_line_error(tmp_path, text_file):
    out = tmp_path / "n.json"
    result = runner.invoke(app, ["needle", *TINY, "--dataset", str(text_file), "--chat", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--chat" in result.stderr and "drop --chat" in result.stderr
    assert not out.exists()  # failed before anything was written


def test_too_short_length_is_a_one_line_error(tmp_path, text_file):
    result = runner.invoke(app, ["needle", "--model", "tiny-random", "--lengths", "64", "--dataset", str(text_file),
                                 "--out", str(tmp_path / "n.json")])
    assert result.exit_code == 2 and "use lengths of at least" in result.stderr


def test_oom_records_the_cell_and_moves_to_the_next_method(tmp_path, text_file, monkeypatch):
    answer = NeedleSchedule.answer

    def fake(self, stream, trial):
        if stream.spec.name == "baseline" and trial.length == 192:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return answer(self, stream, trial)

    monkeypatch.setattr(NeedleSchedule, "answer", fake)
    out = tmp_path / "oom.json"
    result = runner.invoke(app, ["needle", "--model", "tiny-random", "--lengths", "128,192,256", "--depths", "0,100",
                                 "--needles", "1", "--max-new-tokens", "2", "-m", "baseline", "-m", "streaming_4_48",
                                 "--dataset", str(text_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    statuses = [(r["method"], r["length"], r["status"]) for r in doc["records"]]
    assert statuses == [("baseline", 128, "ok"), ("baseline", 192, "oom"), ("streaming_4_48", 128, "ok"),
                        ("streaming_4_48", 192, "ok"), ("streaming_4_48", 256, "ok")]
    oom = [c for c in needle_cells(doc) if c["status"] == "oom"]
    assert [(c["method"], c["length"], c["depth"]) for c in oom] == [("baseline", 192, 0.0)]
    assert "out of memory" in result.stderr


# --- plot and report from a hand-made file --------------------------------------------


def write_needle(path, cells: dict, *, oom=()):
    """cells: method → {(length, depth): accuracy}; (method, length) in oom ran out of memory there."""
    writer = ResultsWriter(path, "needle", {"model": "m", "lengths": [1024, 2048], "depths": [0.0, 50.0, 100.0]},
                           {"device": "cpu", "device_name": "Intel Xeon"})
    for method, values in cells.items():
        for length in (1024, 2048):
            if (method, length) in oom:
                writer.add_event({"type": CELL_EVENT, "method": method, "length": length, "depth": 0.0,
                                  "status": "oom", "trials": 0, "exact": 0, "partial": 0, "wrong": 0,
                                  "accuracy": None})
                writer.add_record({"method": method, "length": length, "status": "oom", "error": "out of memory"})
                break
            for depth in (0.0, 50.0, 100.0):
                exact = round(values[length, depth] * 3)
                writer.add_event({"type": CELL_EVENT, "method": method, "length": length, "depth": depth,
                                  "status": "ok", "trials": 3, "exact": exact, "partial": 1 if exact < 3 else 0,
                                  "wrong": 3 - exact - (1 if exact < 3 else 0), "accuracy": exact / 3, "answers": []})
            writer.add_record({"method": method, "length": length, "status": "ok", "batch_size": 1, "ttft_s": 0.5})
    writer.finish()
    return path


@pytest.fixture
def needle_file(tmp_path):
    full = {(length, depth): 1.0 for length in (1024, 2048) for depth in (0.0, 50.0, 100.0)}
    window = {(length, depth): (1.0 if depth == 100.0 else 0.0) for length in (1024, 2048) for depth in (0.0, 50.0, 100.0)}
    return write_needle(tmp_path / "needle.json", {"baseline": full, "streaming_4_256": window},
                        oom=(("baseline", 2048),))


def test_heatmap_panels_scale_annotations_and_oom(needle_file, tmp_path):
    from kvstress.plot import build_needle_figure, plot_results
    from kvstress.results import load_results

    figure = build_needle_figure([load_results(needle_file)], ["needle"])
    panels = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["baseline", "streaming_4_256"]
    for ax in panels:
        (image,) = ax.get_images()
        assert image.get_clim() == (0.0, 1.0)  # one color scale for every panel
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1k", "2k"]
    assert [t.get_text() for t in panels[0].get_yticklabels()] == ["0%", "50%", "100%"]  # shared by the panels
    base_texts = [t.get_text() for t in panels[0].texts]
    assert base_texts.count("OOM") == 3 and base_texts.count("1.00") == 3  # the whole 2k column ran out of memory
    window_texts = [t.get_text() for t in panels[1].texts]
    assert window_texts.count("1.00") == 2 and sum(t.startswith("0.00") for t in window_texts) == 4
    out = plot_results([needle_file], tmp_path / "heat.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_report_retrieval_column(needle_file, tmp_path):
    from kvstress.report import RETRIEVAL_COLUMN, build_report, render

    sweep = ResultsWriter(tmp_path / "sweep.json", "sweep", {"model": "m"}, {"device": "cpu"})
    for method in ("baseline", "h2o_4_32_256"):
        sweep.add_record({"method": method, "length": 2048, "status": "ok", "batch_size": 1, "tpot_ms_median": 30.0})
    sweep.finish()
    report = build_report([needle_file, sweep.path])
    assert RETRIEVAL_COLUMN in report.columns
    rows = {row["Configuration"]: row for row in report.rows}
    assert rows["baseline"][RETRIEVAL_COLUMN] == 1.0  # the cells that ran; the OOM is a note
    assert rows["streaming_4_256"][RETRIEVAL_COLUMN] == pytest.approx(1 / 3)
    assert rows["h2o_4_32_256"][RETRIEVAL_COLUMN] is None  # no needle results: "–"
    assert rows["streaming_4_256"]["Device"] == "Intel Xeon"
    assert any("out of memory" in note or "oom" in note for note in report.notes)
    text = render(report)
    assert "Retrieval acc" in text.splitlines()[0]
    h2o = next(line for line in text.splitlines() if line.startswith("| h2o_4_32_256"))
    cells = [cell.strip() for cell in h2o.strip("|").split("|")]
    assert cells[report.columns.index(RETRIEVAL_COLUMN)] == "–"
    streaming = next(line for line in text.splitlines() if line.startswith("| streaming_4_256"))
    assert "0.33" in streaming
    assert RETRIEVAL_COLUMN not in build_report([sweep.path]).columns
    # Over all cells of the file: baseline 3 x 1.0, streaming 6 x 1/3.
    assert mean_accuracy(needle_cells(json.loads(needle_file.read_text()))) == pytest.approx(5 / 9)


# --- the real model --------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_smollm2_finds_the_needle_with_the_full_cache(tmp_path):
    out = tmp_path / "needle.json"
    result = runner.invoke(app, ["needle", "--model", "smollm2-135m", "--dataset", "shakespeare", "--lengths", "512",
                                 "--depths", "0,50,100", "--needles", "2", "-m", "baseline", "--out", str(out)])
    assert result.exit_code == 0, result.output
    cells = needle_cells(json.loads(out.read_text()))
    assert len(cells) == 3
    exact = sum(c["exact"] for c in cells)
    # Measured on a 2-core Xeon CPU, float32, seed 0: 6 of 6 exact (every answer " NNNNN.").
    # The bar sits just below that: at most one miss.
    assert exact >= 5, [a for c in cells for a in c["answers"]]


def test_needle_prompts_are_unchanged_by_the_ruler_tasks(builder, haystack):
    """--task needle (the default) builds the very prompts it built before --task existed: this
    digest of numbers, offsets, positions and token ids was taken from that code (seed 7)."""
    import hashlib

    trials = make_trials(builder, haystack, [200, 300], [0.0, 50.0, 100.0], 3, seed=7)
    data = json.dumps([[t.number, t.offset, t.needle_position, list(t.ids)] for ts in trials.values() for t in ts])
    assert hashlib.sha256(data.encode()).hexdigest() == "bb7d967c6947cab50d8be3fa34311844e2b4e9f7477174f8737dae1af2b11cce"
