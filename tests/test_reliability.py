"""Reliability: bad input, interruption, resume, crashes and repeated OOM never lose results."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
import warnings
import weakref

import pytest
import torch
from typer.testing import CliRunner

import kvstress.stream as stream_module
from kvstress import control
from kvstress.batch import BatchSchedule
from kvstress.cli import app
from kvstress.config import BatchConfig, NeedleConfig, PplConfig, SweepConfig, build_methods
from kvstress.models import load_model
from kvstress.needle import NeedleSchedule
from kvstress.perplexity import PplSchedule
from kvstress.results import ResultsWriter
from kvstress.stream import Harness
from kvstress.sweep import SweepSchedule

runner = CliRunner()
LENGTHS = "128,256,384,512,640,768,896,1024"
SWEEP = ["sweep", "--model", "tiny-random", "--lengths", LENGTHS, "--chunk", "32", "--decode-steps", "6",
         "--capacity", "48", "-m", "baseline", "-m", "streaming", "-m", "h2o"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "book.txt"
    path.write_text("Call me Ishmael. Some years ago, never mind how long precisely, I went to sea. " * 300)
    return path


def points(path) -> list[tuple[str, int, str]]:
    return sorted((r["method"], r["length"], r["status"]) for r in json.loads(path.read_text())["records"])


def start_sweep(out, text_file, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "kvstress", *SWEEP, "--dataset", str(text_file), "--out", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def wait_for_records(path, count: int, process, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the sweep ended before it could be interrupted: {process.stderr.read()}")
        try:
            if len(json.loads(path.read_text())["records"]) >= count:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass  # not written yet; a torn file would fail the reads below, never this wait
        time.sleep(0.02)
    pytest.fail("the sweep wrote too few records in time")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("full") / "results.json"
    result = runner.invoke(app, [*SWEEP, "--dataset", str(text_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return points(out)


@pytest.mark.slow  # a child interpreter
def test_killed_sweep_resumes_to_the_same_points(tmp_path, text_file, uninterrupted):
    out = tmp_path / "results.json"
    process = start_sweep(out, text_file)
    wait_for_records(out, 10, process)  # mid-way through the second method
    process.kill()
    process.wait()
    survived = points(out)  # the file is readable JSON after SIGKILL at any moment
    assert 10 <= len(survived) < len(uninterrupted)

    result = runner.invoke(app, [*SWEEP, "--dataset", str(text_file), "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert points(out) == uninterrupted
    assert json.loads(out.read_text())["complete"] is True


@pytest.mark.slow  # a child interpreter
def test_ctrl_c_stops_writes_and_says_how_to_resume(tmp_path, text_file, uninterrupted):
    out = tmp_path / "results.json"
    process = start_sweep(out, text_file)
    wait_for_records(out, 3, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "--resume" in stderr and "Traceback" not in stderr
    doc = json.loads(out.read_text())
    assert doc["complete"] is False and len(doc["records"]) >= 3
    assert all(r["status"] == "ok" for r in doc["records"])

    result = runner.invoke(app, [*SWEEP, "--dataset", str(text_file), "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert points(out) == uninterrupted


def test_resume_refuses_a_different_config(tmp_path, text_file):
    out = tmp_path / "results.json"
    assert runner.invoke(app, [*SWEEP, "--dataset", str(text_file), "--out", str(out)]).exit_code == 0
    result = runner.invoke(app, [*SWEEP, "--dataset", str(text_file), "--out", str(out), "--resume", "--chunk", "64"])
    assert result.exit_code == 2
    assert "config differs in chunk" in result.stderr


def test_a_file_from_before_an_option_existed_resumes_at_its_default(tmp_path, text_file):
    out = tmp_path / "results.json"
    assert runner.invoke(app, [*SWEEP, "--dataset", str(text_file), "--out", str(out)]).exit_code == 0
    doc = json.loads(out.read_text())
    del doc["config"]["compile"]  # as written before --compile existed
    doc["complete"] = False
    out.write_text(json.dumps(doc))
    refused = runner.invoke(app, [*SWEEP, "--dataset", str(text_file), "--out", str(out), "--resume", "--compile"])
    assert refused.exit_code == 2
    assert "config differs in compile (compile: file has '(absent)', now True)" in refused.stderr
    result = runner.invoke(app, [*SWEEP, "--dataset", str(text_file), "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["complete"] is True


def _ten_oom_run(command: str, text_file, budget: int):
    """A config of `command` for ten methods that each overrun `budget` at their first measured forward."""
    methods = build_methods(["baseline"] + [f"streaming_4_{c}" for c in range(40, 49)], None, None, None)
    assert len(methods) == 10
    shared = dict(methods=methods, model="tiny-random", dataset=str(text_file), max_memory=budget, chunk=32)
    return {
        "sweep": lambda: SweepSchedule(SweepConfig(**shared, lengths=(512,), decode_steps=4)),
        "ppl": lambda: PplSchedule(PplConfig(**shared, tokens=512, buckets=(256, 512))),
        "needle": lambda: NeedleSchedule(NeedleConfig(**shared, lengths=(256,), depths=(50.0,), needles=1,
                                                      max_new_tokens=2)),
        "batch": lambda: BatchSchedule(BatchConfig(**shared, batch_sizes=(1, 2), length=256, decode_steps=4)),
    }[command]()


def _live_tensor_bytes() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() touches deprecated torch.distributed aliases
        warnings.simplefilter("ignore", FutureWarning)
        return sum(t.numel() * t.element_size() for t in gc.get_objects() if isinstance(t, torch.Tensor))


@pytest.mark.slow  # ten streams per command
@pytest.mark.parametrize("command", ["sweep", "ppl", "needle", "batch"])
def test_ten_ooms_in_a_row_leave_allocated_memory_where_it_started(tmp_path, text_file, monkeypatch, command):
    """Each method runs out of its budget at its first forward; afterwards none of its caches, nor any tensor
    the failed forward held, may still be alive (the exception's frames must not keep them), while the
    harness that ran them all is."""
    loaded = load_model("tiny-random")
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    schedule = _ten_oom_run(command, text_file, weights + 2_000)
    writer = ResultsWriter(tmp_path / "r.json", schedule.config.kind, schedule.config.to_json(), {})
    schedule.check(loaded.tokenizer)
    schedule.prepare(schedule.load_text(loaded.tokenizer), writer)
    harness = Harness(schedule.config, loaded.model, writer, pretrained=False)

    caches = []
    real_make = stream_module.make_run_cache

    def tracked(*args, **kwargs):
        cache = real_make(*args, **kwargs)
        caches.append(weakref.ref(cache))
        return cache

    monkeypatch.setattr(stream_module, "make_run_cache", tracked)
    before = _live_tensor_bytes()
    for spec in schedule.config.methods:
        schedule.run_method(harness, spec)
    assert _live_tensor_bytes() == before
    assert len(caches) >= 20  # at least a warm-up cache and a measured cache per method
    assert [ref() for ref in caches] == [None] * len(caches)
    assert [r["status"] for r in writer.records] == ["oom"] * 10
    events = [e for e in writer.events if e["type"] == "oom"]
    assert len(events) == 10 and all(isinstance(e["tokens_seen"], int) for e in events)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nosuch-model"], "cannot load model 'nosuch-model'"),
        (["--model", "someone/some-model"], "hub is unreachable"),
        (["--dataset", "nosuchset"], "unknown dataset 'nosuchset'"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--resume", "--force"], "give one of them"),
        (["--resume"], "nothing to resume"),
    ],
)
def test_more_bad_input_is_a_one_line_error(tmp_path, text_file, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    defaults = ["--model", "tiny-random", "--dataset", str(text_file), "--lengths", "128"]
    result = runner.invoke(app, ["sweep", *defaults, "--out", str(tmp_path / "r.json"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()  # nothing left behind to block the corrected rerun


def test_not_a_causal_lm(tmp_path, text_file):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    result = runner.invoke(app, ["sweep", "--model", str(tmp_path), "--dataset", str(text_file), "--lengths", "128",
                                 "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 2
    assert "is not a causal language model" in result.stderr


def test_empty_text_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = runner.invoke(app, ["sweep", "--model", "tiny-random", "--dataset", str(empty), "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 2
    assert "empty" in result.stderr


def test_output_path_that_cannot_be_written(tmp_path, text_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = runner.invoke(app, ["sweep", "--model", "tiny-random", "--dataset", str(text_file),
                                 "--out", str(blocker / "r.json")])
    assert result.exit_code == 2
    assert "choose a writable output path" in result.stderr


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"format": "kvstress-results", "version": 1, "kind": "sweep", "records": [', "not valid JSON"),
])
@pytest.mark.parametrize("command", ["plot", "report"])
def test_malformed_results_files(tmp_path, command, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = runner.invoke(app, [command, str(path)])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_ctrl_c_twice_stops_now_but_two_signals_within_a_second_are_one(monkeypatch):
    """torchrun passes the terminal's Ctrl-C on to ranks that got it already: that pair must
    stop after the step like one Ctrl-C; a second Ctrl-C later stops at once."""
    with control.stop_on_interrupt(same_within_s=0.3) as requested:
        assert not requested()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # torchrun's copy of the same Ctrl-C
        time.sleep(0.05)  # signals run their handler between bytecodes of the main thread
        assert requested()
        time.sleep(0.4)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
