"""RULER's tasks (kvstress needle --task multikey|vartrack): seeding, placement, scoring, config, end to end."""

from __future__ import annotations

import json
import random
import re

import pytest
from command_runs import filler_text
from typer.testing import CliRunner

from kvstress.cli import app
from kvstress.config import ConfigError, NeedleConfig
from kvstress.events import needle_cells
from kvstress.models import ByteTokenizer
from kvstress.needle import PromptBuilder, make_trials, task_haystack
from kvstress.ruler import (
    MULTIKEY_KEYS,
    NOISE,
    RULER_DEPTHS,
    VARTRACK_HOPS,
    answer_finished,
    grade,
    make_problem,
)
from kvstress.spec import parse_spec

runner = CliRunner()
# ByteTokenizer prompts: one token per byte, so the fixed texts take ~550 (multikey) and ~1,300 (vartrack) tokens.
LENGTHS = {"multikey": 900, "vartrack": 1700}


@pytest.fixture(scope="module")
def builder():
    return PromptBuilder(ByteTokenizer())


def _trials(builder, task: str, depths=(0.0, 50.0, 100.0), needles: int = 2, seed: int = 0):
    length = LENGTHS[task]
    haystack = task_haystack(builder, task, ByteTokenizer().encode(filler_text(600)), length)
    return make_trials(builder, haystack, [length], list(depths), needles, seed, task)


def _haystack_before(trial, builder, i: int) -> int:
    """Haystack tokens before insert i: its position less the head and the inserts placed before it."""
    head, _ = builder.frame(trial.problem.preamble, trial.problem.question, trial.problem.answer_start)
    inserts = [builder.encode(text) for text in trial.problem.inserts]
    before = sum(len(tokens) for j, tokens in enumerate(inserts) if trial.positions[j] < trial.positions[i])
    return trial.positions[i] - len(head) - before


# --- seeding ----------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["multikey", "vartrack"])
def test_same_seed_same_prompts_and_answers(builder, task):
    first, again = _trials(builder, task, seed=5), _trials(builder, task, seed=5)
    assert first == again  # problems (keys, values, names), offsets, positions and token ids
    trials = [t for ts in first.values() for t in ts]
    assert len({t.problem.expected for t in trials}) == len(trials)  # each trial its own answer
    other = [t for ts in _trials(builder, task, seed=6).values() for t in ts]
    assert [t.problem.expected for t in other] != [t.problem.expected for t in trials]
    assert [t.ids for t in other] != [t.ids for t in trials]


# --- placement --------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [0.0, 50.0, 100.0])
def test_multikey_prompt_hides_four_keys_and_asks_one_at_the_depth(builder, depth):
    (trial,) = _trials(builder, "multikey", depths=[depth], needles=1)[(LENGTHS["multikey"], depth)]
    problem = trial.problem
    assert len(trial.ids) == LENGTHS["multikey"]
    text = ByteTokenizer().decode(trial.ids)
    keys = [insert.split(" for ")[1].split(" is: ")[0] for insert in problem.inserts]
    assert len(set(keys)) == MULTIKEY_KEYS and problem.query == keys[0]
    for insert, position in zip(problem.inserts, trial.positions):
        assert text.count(insert) == 1  # each key once, with its own value
        assert list(trial.ids[position : position + len(insert)]) == ByteTokenizer().encode(insert)
    assert problem.expected[0] in problem.inserts[0] and problem.expected[0] not in problem.others
    assert text.endswith(f"What is the special magic number for {keys[0]} mentioned in the provided text? "
                         f"The special magic number for {keys[0]} mentioned in the provided text is")
    # The asked key: exactly at its depth of the haystack, after a sentence's end.
    _, tail = builder.frame(problem.preamble, problem.question, problem.answer_start)
    size = LENGTHS["multikey"] - len(builder.frame(problem.preamble, "", "")[0]) - len(tail) - sum(
        len(insert) for insert in problem.inserts)
    assert _haystack_before(trial, builder, 0) == round(depth / 100 * size)
    assert text[: trial.positions[0]].rstrip(" ").endswith((".", "\n"))
    # The other keys at depths of RULER's grid.
    assert problem.depths[0] == depth and all(d in RULER_DEPTHS for d in problem.depths[1:])


@pytest.mark.parametrize("depth", [0.0, 50.0, 100.0])
def test_vartrack_chain_starts_at_the_depth_and_runs_in_order_on_its_own_lines(builder, depth):
    (trial,) = _trials(builder, "vartrack", depths=[depth], needles=1)[(LENGTHS["vartrack"], depth)]
    problem = trial.problem
    text = ByteTokenizer().decode(trial.ids)
    names, value = problem.expected, problem.query
    assert len(names) == VARTRACK_HOPS + 1 and len(set(names)) == len(names)
    assert all(len(n) == 5 and n.isupper() for n in names) and len(value) == 5 and value.isdigit()
    lines = [f"VAR {names[0]} = {value}\n"] + [f"VAR {b} = VAR {a} \n" for a, b in zip(names, names[1:])]
    assert list(problem.inserts) == lines  # variable_tracking.py's chain, its trailing spaces kept
    assert list(trial.positions) == sorted(trial.positions)  # in order
    for line, position in zip(lines, trial.positions):
        assert text[position : position + len(line)] == line
        assert text[position - 1] == "\n"  # each on a line of its own among the noise lines
    assert 5 <= text.count(NOISE) and "they are: " == text[-len("they are: "):]
    assert f"5 variables are assigned the value {value}" in text
    # The one-shot example in front shows a chain and its answer: three-letter names, none of the asked ones.
    shown = re.search(r"they are:  ([A-Z]{3}(?: [A-Z]{3}){4})\n\nMemorize and track", problem.preamble)
    assert shown and all(f"VAR {name} = " in problem.preamble for name in shown.group(1).split())
    assert all(name not in problem.preamble for name in names)
    _, tail = builder.frame(problem.preamble, problem.question, problem.answer_start)
    size = LENGTHS["vartrack"] - len(builder.frame(problem.preamble, "", "")[0]) - len(tail) - sum(
        len(line) for line in lines)
    assert _haystack_before(trial, builder, 0) == round(depth / 100 * size)


# --- scoring ----------------------------------------------------------------------------


def _problem(task: str):
    return make_problem(task, random.Random(3), 50.0)


@pytest.mark.parametrize(("answer", "score", "recall"), [
    ("{0} {1} {2} {3} {4}", "exact", 1.0),
    ("{4}, {3}, {2}, {1} and {0}", "exact", 1.0),  # order is free
    ("{0} {1} {2} {3} {4} XQZWV", "exact", 1.0),  # RULER counts the names found, not extra ones
    ("{0} {1} {2}", "partial", 0.6),
    ("VAR {0} and then nothing", "partial", 0.2),
    ("{0}".lower() + " {1} {2} {3} {4}", "exact", 1.0),  # RULER matches case-insensitively
    ("ABCDE FGHIJ", "wrong", 0.0),
    ("", "wrong", 0.0),
])
def test_vartrack_scores_every_name_recalled(answer, score, recall):
    problem = _problem("vartrack")
    result = grade(problem, answer.format(*problem.expected))
    assert result == {"score": score, "recall": pytest.approx(recall)}


def test_multikey_scores_the_asked_value_and_flags_a_distractor():
    problem = _problem("multikey")
    value, other = problem.expected[0], problem.others[0]
    assert grade(problem, f" {value}.") == {"score": "exact", "distractor": False}
    assert grade(problem, f" {other}.") == {"score": "wrong", "distractor": True}  # another key's value
    assert grade(problem, f" {value[:5]}.")["score"] == "partial"
    assert grade(problem, " twelve.") == {"score": "wrong", "distractor": False}


@pytest.mark.parametrize(("task", "answer", "finished"), [
    ("multikey", " 1234567", False), ("multikey", " 1234567.", True),
    ("vartrack", "\nABCDE FGHIJ", False), ("vartrack", " ABCDE FGHIJ\n", True),
])
def test_decoding_stops_where_the_answer_ends(task, answer, finished):
    assert answer_finished(_problem(task), answer) is finished


# --- configuration -----------------------------------------------------------------------


def test_config_task_and_its_answer_budget():
    methods = (parse_spec("baseline"),)
    assert NeedleConfig(methods=methods).task == "needle" and NeedleConfig(methods=methods).max_new_tokens == 24
    assert NeedleConfig(methods=methods, task="vartrack").max_new_tokens == 30  # RULER's tokens_to_generate
    assert NeedleConfig(methods=methods, task="vartrack", max_new_tokens=5).max_new_tokens == 5
    config = NeedleConfig(methods=methods, task="multikey")
    assert config.to_json()["task"] == "multikey" and config.to_json()["max_new_tokens"] == 24
    assert NeedleConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="use one of needle, multikey, vartrack"):
        NeedleConfig(methods=methods, task="niah")


def test_unknown_task_is_a_one_line_error_naming_the_choices(tmp_path):
    out = tmp_path / "n.json"
    result = runner.invoke(app, ["needle", "--task", "niah", "--model", "tiny-random", "--out", str(out)])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert "unknown --task 'niah': use one of needle, multikey, vartrack" in line
    assert not out.exists()


# --- end to end on the tiny model --------------------------------------------------------


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "hay.txt"
    path.write_text(filler_text(600), encoding="utf-8")
    return path


def _run(task: str, out, text_file, *extra: str):
    return runner.invoke(app, ["needle", "--task", task, "--model", "tiny-random", "--lengths", str(LENGTHS[task]),
                               "--depths", "0,100", "--needles", "1", "--max-new-tokens", "4", "-m", "baseline",
                               "-m", "streaming_4_64", "--chunk", "256", "--dataset", str(text_file),
                               "--out", str(out), *extra])


@pytest.mark.parametrize("task", ["multikey", "vartrack"])
def test_needle_task_end_to_end_on_tiny_random(task, tmp_path, text_file):
    out = tmp_path / f"{task}.json"
    result = _run(task, out, text_file)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["kind"] == "needle" and doc["complete"] and doc["config"]["task"] == task
    cells = needle_cells(doc)
    assert sorted((c["method"], c["depth"]) for c in cells) == [
        ("baseline", 0.0), ("baseline", 100.0), ("streaming_4_64", 0.0), ("streaming_4_64", 100.0)]
    for cell in cells:
        assert cell["task"] == task and cell["status"] == "ok" and cell["trials"] == 1
        (answer,) = cell["answers"]
        assert cell["accuracy"] == (answer["score"] == "exact")
        assert answer["expected"] and answer["query"] and len(answer["positions"]) == len(answer["expected"]) + (
            MULTIKEY_KEYS - 1 if task == "multikey" else 0)
        if task == "vartrack":
            assert cell["recall"] == answer["recall"]
    # Both methods were asked the same questions.
    asked = {m: [a["query"] for c in cells if c["method"] == m for a in c["answers"]] for m in ("baseline", "streaming_4_64")}
    assert asked["baseline"] == asked["streaming_4_64"]
    prompt = next(e for e in doc["events"] if e["type"] == "prompt")
    assert prompt["task"] == task and prompt["example"]["task"] == task
    assert sorted(r["method"] for r in doc["records"]) == ["baseline", "streaming_4_64"]
    # Resuming a finished file measures nothing again; another task is another config.
    again = _run(task, out, text_file, "--resume")
    assert again.exit_code == 0, again.output
    assert json.loads(out.read_text())["records"] == doc["records"]
    other = "vartrack" if task == "multikey" else "multikey"
    refused = runner.invoke(app, ["needle", "--task", other, "--model", "tiny-random", "--lengths", str(LENGTHS[other]),
                                  "--dataset", str(text_file), "--out", str(out), "--resume"])
    assert refused.exit_code == 2 and "task" in refused.stderr
