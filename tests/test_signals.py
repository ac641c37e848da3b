"""SIGTERM, what a scheduler (Slurm, Kubernetes) sends before it kills a job, is Ctrl-C.

Every measuring command, sent the real signal as a real process: the forward in flight
ends, the results file is valid with what was finished, the resume line is printed, the
exit code is 143 (128 + 15; Ctrl-C's stays 130), and --resume finishes the run with the
earlier records untouched. With --isolate the child stops with the parent and what it
measured reaches the results file. A SIGTERM during start-up exits 143 in one line.
(Ctrl-C's own matrix is in test_capabilities.py; --tp's in test_distributed.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import command_runs
import psutil
import pytest
from command_runs import METHODS
from typer.testing import CliRunner

import kvstress.models as models_module
from kvstress import control
from kvstress.cli import app
from kvstress.errors import StopNow

runner = CliRunner()
# test_capabilities.py's runs, and compare's.
COMMANDS = {
    **command_runs.COMMANDS,
    "compare": ["compare", "--tokens", "512", "--buckets", "128,256,384", "--chunk", "1"],
}
RESUME_LINE = "continue with the same command plus --resume"
# In this process a stop comes within milliseconds of the first record: shorter runs do (the last
# of a repeated option wins).
SHORTER = {"ppl": ["--tokens", "256", "--buckets", "64,128,192"], "needle": ["--lengths", "128,192"],
           "batch": ["--batch-sizes", "1,2,3"], "compare": ["--tokens", "192", "--buckets", "64,128"]}


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    first, second = folder / "moby.txt", folder / "dickens.txt"
    first.write_text("Call me Ishmael. Some years ago, never mind how long precisely, I went to sea. " * 400)
    second.write_text("It was the best of times, it was the worst of times, it was the age of wisdom. " * 400)
    return first, second


def args(command: str, texts, folder: Path, *extra: str, methods: list[str] = METHODS) -> list[str]:
    where = (["--datasets", f"{texts[0]},{texts[1]}", "--out-dir", str(folder)] if command == "compare" else
             ["--dataset", str(texts[0]), "--out", str(folder / "r.json")])
    return [*COMMANDS[command], "--model", "tiny-random", *methods, *where, *extra]


def results(folder: Path) -> dict[str, dict]:
    """Every results file in `folder` (compare writes one per dataset), by name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def keys(doc: dict) -> Counter:
    """Every record as (method, length, batch size, status), with multiplicity, and every needle cell."""
    found = Counter((r["method"], r["length"], r["batch_size"], r["status"]) for r in doc["records"])
    found.update((e["method"], e["length"], e["depth"], "cell") for e in doc["events"] if e["type"] == "needle_cell")
    return found


def start(arguments: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kvstress", *arguments], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_a_record(folder: Path, process: subprocess.Popen, pattern: str = "*.json") -> None:
    """Until a file in `folder` matching `pattern` holds a record (a torn read would fail later, not here)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended before it could be stopped: {process.stderr.read()[-3000:]}")
        for path in folder.glob(pattern):
            try:
                if json.loads(path.read_text())["records"]:
                    return
            except (FileNotFoundError, json.JSONDecodeError):
                pass
        time.sleep(0.02)
    pytest.fail("no record was written in time")


def assert_stopped_by_sigterm(process: subprocess.Popen) -> str:
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert RESUME_LINE in stderr and "Traceback" not in stderr, stderr[-3000:]
    return stderr


def stopped_in_this_process(arguments: list[str], folder: Path):
    """Run the command here, and send this process a real SIGTERM once a record is written."""
    finished = threading.Event()

    def send_once_a_record_is_written():
        deadline = time.monotonic() + 120
        while not finished.is_set() and time.monotonic() < deadline:
            for path in folder.glob("*.json"):
                try:
                    if json.loads(path.read_text())["records"] and not finished.is_set():
                        os.kill(os.getpid(), signal.SIGTERM)
                        return
                except (FileNotFoundError, json.JSONDecodeError):
                    pass
            time.sleep(0.01)

    watcher = threading.Thread(target=send_once_a_record_is_written, daemon=True)
    watcher.start()
    try:
        return runner.invoke(app, arguments)
    finally:
        finished.set()
        watcher.join()


# sweep as a real child process (the exit status the shell sees); the other commands signal
# this process, a real SIGTERM too, without a new interpreter's start-up for each.
@pytest.mark.slow  # a run of each command three times (a child interpreter for sweep)
@pytest.mark.usefixtures("sigterm_fails_the_test")
@pytest.mark.parametrize("command, own_process", [
    ("sweep", True), ("ppl", False), ("needle", False), ("batch", False), ("compare", False),
])
def test_sigterm_stops_like_ctrl_c_and_resume_finishes(tmp_path, texts, command, own_process):
    shorter = [] if own_process else SHORTER[command]
    reference = tmp_path / "reference"
    result = runner.invoke(app, args(command, texts, reference, *shorter))
    assert result.exit_code == 0, result.output

    stopped = tmp_path / "stopped"
    if own_process:
        process = start(args(command, texts, stopped))
        wait_for_a_record(stopped, process)
        process.send_signal(signal.SIGTERM)
        assert_stopped_by_sigterm(process)
    else:
        stopped.mkdir()
        result = stopped_in_this_process(args(command, texts, stopped, *shorter), stopped)
        assert result.exit_code == 143, result.output
        assert RESUME_LINE in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    interrupted = results(stopped)  # every file valid JSON
    assert interrupted and not all(doc["complete"] for doc in interrupted.values())
    assert any(doc["records"] for doc in interrupted.values())
    assert all(r["status"] == "ok" for doc in interrupted.values() for r in doc["records"])

    result = runner.invoke(app, args(command, texts, stopped, *shorter, "--resume"))
    assert result.exit_code == 0, result.output
    resumed = results(stopped)
    assert resumed.keys() == results(reference).keys()
    for name, doc in resumed.items():
        assert doc["complete"] is True
        assert keys(doc) == keys(results(reference)[name])  # every point once: nothing measured twice
        earlier = interrupted.get(name, {"records": []})["records"]
        assert doc["records"][: len(earlier)] == earlier  # kept as they were


@pytest.mark.slow
def test_sigterm_to_an_isolated_run_stops_its_child_and_keeps_what_the_child_measured(tmp_path, texts):
    """SIGTERM to the parent alone (as Kubernetes sends it to a container's first process):
    the parent passes it on, the child stops after its forward, and what it measured is merged."""
    command = [*args("sweep", texts, tmp_path, "--isolate", methods=["-m", "streaming_4_48"]),
               "--lengths", ",".join(str(128 * n) for n in range(1, 13))]
    process = start(command)
    wait_for_a_record(tmp_path, process, ".r.json.*.part")  # the child's copy of the results file
    children = psutil.Process(process.pid).children(recursive=True)
    child = next(c for c in children if "spawn_main" in " ".join(c.cmdline()))
    written = len(json.loads(next(tmp_path.glob(".r.json.*.part")).read_text())["records"])
    process.send_signal(signal.SIGTERM)
    assert_stopped_by_sigterm(process)
    assert not child.is_running()  # not orphaned
    assert not list(tmp_path.glob(".r.json.*.part"))
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["complete"] is False and written <= len(doc["records"]) < 12
    assert all(r["status"] == "ok" for r in doc["records"])
    assert not [e for e in doc["events"] if e["type"] == "crash"]  # stopped, not crashed

    result = runner.invoke(app, [*command, "--resume"])
    assert result.exit_code == 0, result.output
    resumed = json.loads((tmp_path / "r.json").read_text())
    assert resumed["complete"] is True and [r["length"] for r in resumed["records"]] == [128 * n for n in range(1, 13)]
    assert resumed["records"][: len(doc["records"])] == doc["records"]


@pytest.fixture
def sigterm_fails_the_test():
    """The tests below signal their own process: a SIGTERM that nothing of kvstress catches
    fails the test, rather than ending pytest."""
    def unhandled(signum, frame):
        pytest.fail("SIGTERM reached the default handler")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.usefixtures("sigterm_fails_the_test")
@pytest.mark.parametrize("command", ["sweep", "compare"])
def test_sigterm_while_the_model_loads_exits_143_in_one_line(tmp_path, texts, monkeypatch, command):
    """Start-up: nothing polls the stop there, so the signal stops the load at once (compare
    loads its model before any run starts)."""
    def slow_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # a big model: the scheduler's SIGKILL would come first
        pytest.fail("the load was not stopped")

    monkeypatch.setattr(models_module, "load_model", slow_load)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    began = time.monotonic()
    result = runner.invoke(app, args(command, texts, tmp_path))
    assert time.monotonic() - began < 20
    assert result.exit_code == 143, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("interrupted:") and "Traceback" not in result.stderr
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # put back


@pytest.mark.usefixtures("sigterm_fails_the_test")
def test_sigterm_asks_like_ctrl_c_and_wins_over_it(monkeypatch):
    """One request whichever signal asks: SIGTERM's number is kept (exit 143) once it came;
    a second signal more than a second later stops at once; both handlers are put back."""
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with control.stop_on_interrupt(same_within_s=0.3) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # the same stop: within the second
        time.sleep(0.05)
        assert stop() and stop.signum == signal.SIGTERM
        time.sleep(0.4)
        with pytest.raises(StopNow) as now:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        assert now.value.exit_code == 143
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
