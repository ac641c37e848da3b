"""Run one method of any command in a child process, so a hard crash is a result too.

A segfault, a CUDA error that poisons the context, or the OS killing the process
takes the child down, not the run. The child starts from a copy of the run's results
file (so it knows what a resumed run already has), measures the one method through
the same schedule and stream core as an in-process run, and writes as it goes
(atomically, like every results file). The parent merges what the child added and,
if the child died, records the point it was heading for as an "error" with the cause.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sys
from pathlib import Path

from .results import RECORD_FIELDS, ResultsWriter, load_results
from .spec import MethodSpec, parse_spec
from .stream import Progress, RunInterrupted

# Fault injection for tests: "METHOD:TOKENS" makes the child for METHOD kill itself
# with SIGSEGV once it has fed TOKENS tokens.
CRASH_ENV = "KVSTRESS_INJECT_CRASH"


class _CrashInjector(Progress):
    def __init__(self, tokens: int):
        self.left = tokens

    def advance(self, count: int) -> None:
        self.left -= count
        if self.left <= 0:
            os.kill(os.getpid(), signal.SIGSEGV)


def _child(schedule_type: type, config_json: dict, part: str, method: str) -> None:
    from . import models
    from .run import record_model
    from .stream import Harness, stop_on_interrupt

    config = schedule_type.config_type.from_json(config_json, out=Path(part))
    schedule = schedule_type(config)
    spec = parse_spec(method)
    writer = ResultsWriter.resume(part, config.to_json(), kind=config.kind, defaults=type(config).json_defaults())
    tokenizer = models.load_tokenizer(config.model)
    schedule.check(tokenizer)
    schedule.prepare(schedule.load_text(tokenizer), writer)
    loaded = models.load_model(config.model, device=config.device, dtype=config.dtype, seed=config.seed)
    record_model(loaded, writer, lambda message: None, schedule.random_weights_note)
    crash_method, _, crash_tokens = os.environ.get(CRASH_ENV, "").partition(":")
    progress = _CrashInjector(int(crash_tokens)) if crash_method == method else None
    with stop_on_interrupt() as stop_requested:
        harness = Harness(config, loaded.model, writer, pretrained=loaded.pretrained, progress=progress,
                          stop_requested=stop_requested)
        try:
            schedule.run_method(harness, spec)
        except RunInterrupted:
            sys.exit(130)
        finally:
            harness.flush_samples()


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def run_method_isolated(schedule, spec: MethodSpec, writer: ResultsWriter) -> int | None:
    """Run `spec` in a child; merge what it added into `writer`. Returns the child's exit code;
    RunInterrupted when the child was interrupted."""
    part = writer.path.with_name(f".{writer.path.name}.{spec.name}.part")
    shutil.copyfile(writer.path, part)
    base = load_results(part)
    records, events, samples = (len(base[key]) for key in ("records", "events", "samples"))
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state inherited
    child = context.Process(target=_child, args=(type(schedule), schedule.config.to_json(), str(part), spec.name))
    child.start()
    child.join()
    doc = load_results(part)
    part.unlink()
    offset = len(writer.records) - records
    for record in doc["records"][records:]:
        writer.add_record(record)
    for event in doc["events"][events:]:
        if event["type"] == "resume":
            continue  # the child reopening its copy is not an event of the run
        if isinstance(event.get("record"), int):
            event = {**event, "record": event["record"] + offset}  # an index into records
        writer.add_event(event)
    writer.add_samples(doc["samples"][samples:])
    if child.exitcode == 130:
        raise RunInterrupted(f"{spec.name} was interrupted")
    if child.exitcode != 0:
        cause = f"the child process {describe_exit(child.exitcode)}"
        writer.add_event({"method": spec.name, "type": "crash", "message": cause})
        point = schedule.crash_point(spec, [r for r in writer.records if r["method"] == spec.name])
        if point is not None:
            record = dict.fromkeys(RECORD_FIELDS, None)
            record.update(method=spec.name, status="error", error=cause, **point)
            writer.add_record(record)
    return child.exitcode
