"""A method that fails is a result: the other methods run, the failure is recorded where it
happened, and the command ends with exit 3; launch mistakes and small input mistakes are one line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kvstress.spec as spec_module
from kvstress.caches.streaming import StreamingCache
from kvstress.cli import FAILED_EXIT, app
from kvstress.config import build_methods, launch_problem
from kvstress.errors import SpecError
from kvstress.policies import StreamingParams
from kvstress.spec import Policy

runner = CliRunner()
FAIL_AFTER = 200  # tokens a failing policy sees before it raises


class FailingCache(StreamingCache):
    """StreamingLLM whose eviction raises once it has seen FAIL_AFTER tokens: a plugin's bug."""

    def eviction_priority(self, total):
        if self.seen > FAIL_AFTER:
            raise ValueError("priority table corrupted")
        return super().eviction_priority(total)


@pytest.fixture
def failing_policy(monkeypatch):
    monkeypatch.setitem(spec_module._builtin, "boom",
                        Policy(name="boom", params=StreamingParams, description="fails mid-run", cache=FailingCache))
    return "boom"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "book.txt"
    path.write_text("Call me Ishmael. Some years ago, never mind how long precisely, I went to sea. " * 200)
    return path


METHODS = ["-m", "baseline,boom_4_48,streaming_4_48"]
COMMANDS = {
    "sweep": ["sweep", "--lengths", "128,256,384", "--chunk", "32", "--decode-steps", "3"],
    "ppl": ["ppl", "--tokens", "384", "--buckets", "128,256", "--chunk", "32"],
    "needle": ["needle", "--lengths", "128,320", "--depths", "50", "--needles", "1", "--max-new-tokens", "2",
               "--chunk", "32"],
    "batch": ["batch", "--length", "320", "--batch-sizes", "1,2", "--chunk", "32", "--decode-steps", "3"],
}


def run(command: str, text_file, out, *extra):
    return runner.invoke(app, [*COMMANDS[command], "--model", "tiny-random", "--dataset", str(text_file), *METHODS,
                               "--out", str(out), *extra])


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_failing_plugin_is_a_failed_point_and_the_other_methods_run(failing_policy, text_file, tmp_path, command):
    out = tmp_path / "r.json"
    result = run(command, text_file, out)
    assert result.exit_code == FAILED_EXIT, result.output
    assert "Traceback" not in result.output
    doc = json.loads(out.read_text())
    failed = [r for r in doc["records"] if r["status"] == "error"]
    assert [r["method"] for r in failed] == ["boom_4_48"]
    site = "tests/test_failures.py"
    assert failed[0]["error"].startswith("ValueError: priority table corrupted (at ")
    assert f"{site}:" in failed[0]["error"] and failed[0]["error"].endswith("in eviction_priority)")
    [event] = [e for e in doc["events"] if e["type"] == "error"]
    assert event["method"] == "boom_4_48" and event["message"] == "ValueError: priority table corrupted"
    assert event["where"].startswith(site) and event["tokens_seen"] > FAIL_AFTER - 32  # fed before the forward
    assert doc["complete"]
    for method in ("baseline", "streaming_4_48"):  # before and after the failure: complete
        assert all(r["status"] == "ok" for r in doc["records"] if r["method"] == method)
        assert any(r["method"] == method for r in doc["records"])
    if command == "batch":
        assert {e["method"] for e in doc["events"] if e["type"] == "max_batch"} == {"baseline", "streaming_4_48"}
    assert "boom_4_48" in result.output.split("failed:")[-1]  # the last line names the method


def test_a_failing_plugin_in_a_frontier_is_its_failed_point_and_the_others_run(failing_policy, text_file, tmp_path):
    out = tmp_path / "f.json"
    result = runner.invoke(app, ["frontier", "--model", "tiny-random", "--dataset", str(text_file), "-m", "boom,streaming",
                                 "--budgets", "48", "--tokens", "384", "--ppl-chunk", "32", "--chunk", "32",
                                 "--needle-lengths", "128", "--depths", "50", "--max-new-tokens", "2",
                                 "--decode-steps", "3", "--out", str(out)])
    assert result.exit_code == FAILED_EXIT and "Traceback" not in result.output, result.output
    doc = json.loads(out.read_text())
    assert {r["method"] for r in doc["records"] if r["status"] == "error"} == {"boom_4_48"}
    assert {r["method"] for r in doc["records"] if r["status"] == "ok"} >= {"baseline", "streaming_4_48"}
    assert "boom_4_48" in result.output.split("failed:")[-1]


def test_a_failing_plugin_in_compare_is_its_failed_point_and_the_table_still_prints(failing_policy, text_file, tmp_path):
    result = runner.invoke(app, ["compare", "--model", "tiny-random", "--datasets", str(text_file), *METHODS,
                                 "--tokens", "384", "--chunk", "32", "--out-dir", str(tmp_path)])
    assert result.exit_code == FAILED_EXIT and "Traceback" not in result.output, result.output
    [written] = tmp_path.glob("*.json")
    records = json.loads(written.read_text())["records"]
    assert {r["method"] for r in records if r["status"] == "error"} == {"boom_4_48"}
    assert {r["method"] for r in records if r["status"] == "ok"} == {"baseline", "streaming_4_48"}
    assert "| baseline" in result.output and "boom_4_48" in result.output.split("failed:")[-1]


def test_a_failed_method_is_measured_again_on_resume(failing_policy, text_file, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    assert run("sweep", text_file, out).exit_code == FAILED_EXIT
    monkeypatch.setattr(sys.modules[__name__], "FAIL_AFTER", 10**9)  # the plugin's bug fixed
    result = run("sweep", text_file, out, "--resume")
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())["records"]
    ok = sorted((r["method"], r["length"]) for r in records if r["status"] == "ok")
    assert ok == sorted((m, length) for m in ("baseline", "boom_4_48", "streaming_4_48") for length in (128, 256, 384))


def test_debug_shows_the_traceback_and_still_runs_the_rest(failing_policy, text_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    result = run("sweep", text_file, out, "--debug")
    assert result.exit_code == FAILED_EXIT
    assert "Traceback" in capsys.readouterr().err + result.output
    assert any(r["method"] == "streaming_4_48" and r["status"] == "ok" for r in json.loads(out.read_text())["records"])


def test_an_allocation_the_machine_refuses_is_an_oom_and_the_run_goes_on(text_file, tmp_path):
    out = tmp_path / "r.json"
    result = runner.invoke(app, [*COMMANDS["ppl"], "--model", "tiny-random", "--dataset", str(text_file),
                                 "-m", "streaming_4_1000000000000,streaming_4_48", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())["records"]
    [oom] = [r for r in records if r["status"] != "ok"]
    assert oom["method"] == "streaming_4_1000000000000" and oom["status"] == "oom"
    assert oom["error"].startswith("DefaultCPUAllocator: can't allocate memory: you tried to allocate ")
    assert oom["error"].endswith(" bytes")
    assert any(r["method"] == "streaming_4_48" and r["scope"] == "overall" for r in records)


@pytest.mark.slow  # one child interpreter per method
def test_isolate_records_a_child_failure_without_its_traceback(text_file, tmp_path, monkeypatch):
    from kvstress.isolate import CRASH_ENV

    monkeypatch.setenv(CRASH_ENV, "streaming_4_48:100:error")
    out = tmp_path / "r.json"
    result = runner.invoke(app, [*COMMANDS["sweep"], "--model", "tiny-random", "--dataset", str(text_file),
                                 "-m", "streaming_4_48,h2o_4_8_48", "--isolate", "--out", str(out)])
    assert result.exit_code == FAILED_EXIT, result.output
    doc = json.loads(out.read_text())
    [failed] = [r for r in doc["records"] if r["status"] == "error"]
    assert failed["method"] == "streaming_4_48" and failed["error"].startswith("RuntimeError: injected failure (at ")
    assert all(r["status"] == "ok" for r in doc["records"] if r["method"] == "h2o_4_8_48")
    assert "Traceback" not in result.output


def test_torchrun_without_tp_is_one_line_from_rank_0_and_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    out = tmp_path / "r.json"
    for rank, says in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        result = runner.invoke(app, ["sweep", "--model", "tiny-random", "--out", str(out)])
        assert result.exit_code == 2
        line = ("error: torchrun started 2 processes but --tp is 1, so each would run the whole job into the same "
                "results file: add --tp 2")
        assert (line in " ".join(result.output.split())) is says, result.output
        assert not out.exists()
    assert "--tp 3 but torchrun started 2 processes" in launch_problem(3)
    assert launch_problem(2) is None


def test_a_spec_and_a_size_flag_that_disagree_are_refused():
    with pytest.raises(SpecError, match="h2o_4_8_64 sets capacity 64 but --capacity 128 was given: drop --capacity, "
                                        "or write h2o_4_8_128"):
        build_methods(["h2o_4_8_64"], 128, None, None)
    with pytest.raises(SpecError, match="sets window 8 but --window 9"):
        build_methods(["streaming,h2o_4_8_64"], None, None, 9)
    # flags that agree, or that a policy lacks, are fine
    assert [s.name for s in build_methods(["h2o_4_8_64,streaming"], 64, 4, None)] == ["h2o_4_8_64", "streaming_4_64"]


def test_choices_are_read_in_any_case_as_specs_are(tmp_path, text_file):
    result = runner.invoke(app, ["sweep", "--model", "tiny-random", "--dataset", str(text_file), "--lengths", "128",
                                 "--device", "CPU", "--dtype", "Float32", "--positions", "Shifted",
                                 "-m", "STREAMING_4_48", "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "r.json").read_text())["config"]
    assert (config["device"], config["dtype"], config["positions"]) == ("cpu", "float32", "shifted")


def test_a_stopped_books_run_counts_the_books_it_saved(tmp_path):
    from kvstress.config import PplConfig
    from kvstress.perplexity import BOOK_EVENT, PplSchedule
    from kvstress.results import ResultsWriter

    config = PplConfig(methods=build_methods(["baseline"], None, None, None), tokens=256, buckets=(256,), books="2")
    schedule = PplSchedule(config)
    schedule.samples = ["first", "second"]  # as load_text leaves them: what matters is that there are books
    writer = ResultsWriter(tmp_path / "r.json", "ppl", config.to_json(), {})
    for index in (0, 1):
        writer.add_event({"type": BOOK_EVENT, "method": "baseline", "book": {"index": index}})
    assert schedule.saved(writer) == "0 records and 2 finished books"


@pytest.mark.slow  # a child interpreter
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_starting_is_one_line(tmp_path, signum):
    process = subprocess.Popen([sys.executable, "-m", "kvstress", "sweep", "--model", "tiny-random",
                                "--out", str(tmp_path / "r.json")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    time.sleep(0.4)  # importing typer, rich or torch
    process.send_signal(signum)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 128 + signum and "Traceback" not in output, output
    assert "interrupted: stopped by" in output


@pytest.mark.slow  # child interpreters
def test_a_parent_killed_outright_leaves_no_isolated_child_computing(tmp_path):
    import psutil

    process = subprocess.Popen([sys.executable, "-m", "kvstress", "sweep", "--model", "tiny-random", "--dataset",
                                "shakespeare", "--lengths", "8k,16k,32k", "--chunk", "1", "-m", "streaming_4_48",
                                "--isolate", "--out", str(tmp_path / "r.json")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    def measuring_children() -> list:  # not multiprocessing's resource tracker
        def command(child) -> str:
            with contextlib.suppress(psutil.Error):  # a short-lived helper may exit (a zombie) as it is read
                return " ".join(child.cmdline())
            return ""
        return [c for c in psutil.Process(process.pid).children() if "spawn_main" in command(c)]

    def catches_sigterm(child) -> bool:  # the child's stop handling (and the kernel's request) is in place
        with contextlib.suppress(OSError):
            caught = next(line for line in Path(f"/proc/{child.pid}/status").read_text().splitlines()
                          if line.startswith("SigCgt:"))
            return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
        return False

    deadline = time.monotonic() + 120
    while not (measuring_children() and catches_sigterm(measuring_children()[0])) and time.monotonic() < deadline:
        time.sleep(0.1)
    [child] = measuring_children()
    process.kill()  # SIGKILL: the parent passes nothing on
    process.wait()
    # Its run takes minutes (token by token); the kernel's SIGTERM stops it after the current forward.
    child.wait(timeout=30)
    assert not child.is_running()
