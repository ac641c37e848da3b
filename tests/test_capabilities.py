"""Every shared capability works for every measuring command: the matrix of issue 12.

Each test is parametrised over sweep, ppl, needle and batch, and fails when its
capability is broken for that command: --max-memory, --resume refuses a changed
config, --isolate records a crashed child and goes on, --lazy, --compile (every command
here has single-token steps; ppl with --chunk 1), --debug. The ten-OOMs test is in
test_reliability.py; a stop signal (SIGTERM, and Ctrl-C whose handling is the same code)
keeping what was measured, printing the resume command and --resume measuring nothing
twice, per command: test_signals.py.
"""

from __future__ import annotations

import json

import pytest
from command_runs import COMMANDS, METHODS
from typer.testing import CliRunner

import kvstress.stream as stream_module
from kvstress.caches.compiled import CompiledDecode
from kvstress.cli import FAILED_EXIT, app
from kvstress.isolate import CRASH_ENV
from kvstress.models import load_model
from kvstress.texts import TextError

runner = CliRunner()
ALL = list(COMMANDS)
# The matrix's cells for sweep run in the fast tier; the other commands' cells are slow.
MATRIX = [command if command == "sweep" else pytest.param(command, marks=pytest.mark.slow) for command in COMMANDS]
# The same runs cut short (a repeated option's last value wins), for the cells that need no interruption.
SHORTER = {"sweep": ["--lengths", "128,256"], "ppl": ["--tokens", "256", "--buckets", "128"],
           "needle": ["--lengths", "128,192", "--depths", "0"], "batch": ["--batch-sizes", "1,2"]}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "book.txt"
    path.write_text("Call me Ishmael. Some years ago, never mind how long precisely, I went to sea. " * 400)
    return path


def args(command: str, text_file, out, *extra: str, methods: list[str] = METHODS) -> list[str]:
    return [*COMMANDS[command], "--model", "tiny-random", *methods, "--dataset", str(text_file), "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, text_file):
    """command → the results file of a short run that finished (run when first asked for)."""
    found = {}

    def results_of(command: str):
        if command not in found:
            out = tmp_path_factory.mktemp(command) / "full.json"
            result = runner.invoke(app, args(command, text_file, out, *SHORTER[command]))
            assert result.exit_code == 0, result.output
            found[command] = out
        return found[command]

    return results_of


@pytest.mark.parametrize("command", MATRIX)
def test_max_memory(tmp_path, text_file, command):
    weights = sum(p.numel() * p.element_size() for p in load_model("tiny-random").model.parameters())
    out = tmp_path / "r.json"
    result = runner.invoke(app, args(command, text_file, out, "--max-memory", str(weights + 60_000), *SHORTER[command]))
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())["records"]
    baseline = [r for r in records if r["method"] == "baseline" and r["status"] == "oom"]
    assert baseline and "memory budget exceeded" in baseline[0]["error"]
    assert any(r["method"] != "baseline" and r["status"] == "ok" for r in records)


@pytest.mark.parametrize("command", MATRIX)
def test_resume_refuses_a_changed_config(text_file, finished, command):
    out = finished(command)
    before = out.read_text()
    result = runner.invoke(app, args(command, text_file, out, *SHORTER[command], "--resume", "--positions", "shifted"))
    assert result.exit_code == 2
    assert "config differs in positions" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert out.read_text() == before


@pytest.mark.slow  # a child interpreter per method
@pytest.mark.parametrize("command", ALL)
def test_isolate_records_a_crashed_child_and_goes_on(tmp_path, text_file, monkeypatch, command):
    monkeypatch.setenv(CRASH_ENV, "streaming_4_48:150")
    out = tmp_path / "r.json"
    # Two methods (each child is a new interpreter): the crash, then one that must still run; the short
    # runs still go past the crash's 150 tokens.
    result = runner.invoke(app, args(command, text_file, out, "--isolate", *SHORTER[command], methods=METHODS[2:]))
    assert result.exit_code == FAILED_EXIT, result.output  # a crash is a failed point: exit 3 once all ran
    doc = json.loads(out.read_text())
    by_method = {m: [r["status"] for r in doc["records"] if r["method"] == m] for m in ("streaming_4_48", "h2o_4_6_48")}
    assert "error" in by_method["streaming_4_48"]
    assert by_method["h2o_4_6_48"] and set(by_method["h2o_4_6_48"]) == {"ok"}
    if command == "sweep":  # the crashed child's point before the crash (128 tokens) is kept, with its samples
        assert by_method["streaming_4_48"] == ["ok", "error"]
        assert {s["method"] for s in doc["samples"]} == {"streaming_4_48", "h2o_4_6_48"}
    crash = next(r for r in doc["records"] if r["status"] == "error")
    assert "killed by SIGSEGV" in crash["error"]
    assert any(e["type"] == "crash" and e["method"] == "streaming_4_48" for e in doc["events"])
    assert not list(tmp_path.glob(".*.part"))


@pytest.mark.parametrize("command", MATRIX)
def test_lazy_reaches_the_compressed_caches(tmp_path, text_file, monkeypatch, command):
    made = []
    real = stream_module.make_run_cache

    def spy(spec, model, *, lazy, **options):
        made.append((spec.name, lazy))
        return real(spec, model, lazy=lazy, **options)

    monkeypatch.setattr(stream_module, "make_run_cache", spy)
    out = tmp_path / "r.json"
    result = runner.invoke(app, args(command, text_file, out, "--lazy", "8", *SHORTER[command]))
    assert result.exit_code == 0, result.output
    assert {lazy for name, lazy in made if name != "baseline"} == {8}
    assert json.loads(out.read_text())["config"]["lazy"] == 8


class CountingDecode:
    """Stands in for --compile's compiled step (compiling is slow on CPU; test_compiled.py compiles for
    real): counts the steady-state steps handed to it and runs them eagerly."""

    steps = 0  # measured steps, the warm-up's not counted
    warming_up = False
    compiles = staticmethod(CompiledDecode.compiles)
    eager_because = staticmethod(CompiledDecode.eager_because)

    def __init__(self, model, cache_argument):
        self.model, self.cache_argument = model, cache_argument

    def __call__(self, cache, input_ids):
        if CompiledDecode.compiles(cache, input_ids) and not CountingDecode.warming_up:
            CountingDecode.steps += 1
        return self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1,
                          **{self.cache_argument: cache}).logits


@pytest.mark.parametrize("command", MATRIX)
def test_compile_takes_the_single_token_steps(tmp_path, text_file, monkeypatch, command):
    warm_up = stream_module.Harness._warm_up_compiled

    def marked_warm_up(self, cache, tokens):
        CountingDecode.warming_up = True
        try:
            warm_up(self, cache, tokens)
        finally:
            CountingDecode.warming_up = False

    monkeypatch.setattr(stream_module, "CompiledDecode", CountingDecode)
    monkeypatch.setattr(stream_module.Harness, "_warm_up_compiled", marked_warm_up)
    CountingDecode.steps = 0
    out = tmp_path / "r.json"
    result = runner.invoke(app, args(command, text_file, out, "--compile", *SHORTER[command]))
    assert result.exit_code == 0, result.output
    assert CountingDecode.steps > 0
    assert json.loads(out.read_text())["config"]["compile"] is True


@pytest.mark.parametrize("command", ALL)
def test_debug_shows_the_traceback(tmp_path, command):
    plain = runner.invoke(app, [*COMMANDS[command], "--model", "tiny-random", "--dataset", str(tmp_path / "none.txt"),
                                "--out", str(tmp_path / "r.json")])
    assert plain.exit_code == 2 and "no such file" in plain.stderr
    debug = runner.invoke(app, [*COMMANDS[command], "--model", "tiny-random", "--dataset", str(tmp_path / "none.txt"),
                                "--out", str(tmp_path / "r.json"), "--debug"])
    assert isinstance(debug.exception, TextError)
