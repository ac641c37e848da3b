"""Run one method of a sweep in a child process, so a hard crash is a result too.

A segfault, a CUDA error that poisons the context, or the OS killing the process
takes the child down, not the sweep. The child writes its own results file as it
goes (atomically, like every results file); the parent merges whatever it holds
into the main file and, if the child died, records the point it was heading for as
an "error" with the cause.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from pathlib import Path

from .config import RunConfig
from .results import RECORD_FIELDS, ResultsWriter, environment, load_results
from .spec import parse_spec
from .stream import FinishedPoints, RunInterrupted, SweepRunner, stop_on_interrupt, load_run_model, load_run_text

# Fault injection for tests: "METHOD:TOKENS" makes the child for METHOD kill itself
# with SIGSEGV once it has fed TOKENS tokens of context.
CRASH_ENV = "KVSTRESS_INJECT_CRASH"


def _child(config_json: dict, out: str, method: str, finished: tuple[list, list]) -> None:
    config = RunConfig.from_json(config_json, Path(out))
    spec = parse_spec(method)
    _, tokens = load_run_text(config)
    loaded = load_run_model(config)
    writer = ResultsWriter(out, "sweep", config.to_json(), environment(loaded.model.device), overwrite=True)
    points, ended = finished
    with stop_on_interrupt() as stop_requested:
        runner = SweepRunner(
            config, loaded.model, tokens, writer, score=loaded.pretrained, on_progress=_crash_injector(method),
            stop_requested=stop_requested,
            finished=FinishedPoints(frozenset(map(tuple, points)), frozenset(ended)),
        )
        try:
            runner.run_method(spec, config.lengths)
        except RunInterrupted:
            sys.exit(130)
    writer.finish()


def _crash_injector(method: str):
    target = os.environ.get(CRASH_ENV, "")
    crash_method, _, crash_tokens = target.partition(":")
    if crash_method != method:
        return None
    seen = 0

    def progress(name: str, tokens: int) -> None:
        nonlocal seen
        seen += tokens
        if seen >= int(crash_tokens):
            os.kill(os.getpid(), signal.SIGSEGV)

    return progress


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def run_method_isolated(config: RunConfig, method: str, writer: ResultsWriter) -> tuple[list[dict], int | None]:
    """Run `method` in a child; merge its results into `writer`. Returns (records added, child exit code)."""
    part = writer.path.with_name(f".{writer.path.name}.{method}.part")
    finished = FinishedPoints.from_records(writer.records)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state inherited
    child = context.Process(
        target=_child,
        args=(config.to_json(), str(part), method, ([list(p) for p in finished.points], list(finished.ended))),
    )
    child.start()
    child.join()
    added = []
    if part.exists():
        doc = load_results(part)
        for record in doc["records"]:
            added.append(writer.add_record(record))
        for event in doc["events"]:
            writer.add_event(event)
        writer.add_samples(doc["samples"])
        part.unlink()
    if child.exitcode not in (0, 130):
        recorded = {r["length"] for r in writer.records if r["method"] == method}
        pending = [length for length in config.lengths if length not in recorded]
        cause = f"the child process {describe_exit(child.exitcode)}"
        writer.add_event({"method": method, "type": "crash", "message": cause})
        if pending:
            record = dict.fromkeys(RECORD_FIELDS, None)
            record.update(method=method, length=pending[0], status="error", batch_size=config.batch_size, error=cause)
            added.append(writer.add_record(record))
    return added, child.exitcode
