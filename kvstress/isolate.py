"""Run one method of any command in a child process, so a hard crash is a result too.

A segfault, a CUDA error that poisons the context, or the OS killing the process
takes the child down, not the run. The child starts from a copy of the run's results
file (so it knows what a resumed run already has), measures the one method through
the same schedule and stream core as an in-process run, and writes as it goes
(atomically, like every results file). The parent merges what the child added and,
if the child died, records the point it was heading for as an "error" with the cause.

Ctrl-C and SIGTERM reach the child too: the parent passes each one on (control.StopRequest;
the child counts a copy of one it got itself, from a process-group signal, as one), the
child stops after its forward and exits 128 + the signal, and the parent merges what it
measured and stops the run. A child ended by either signal is interrupted, not crashed.
A parent killed outright (SIGKILL) cannot pass anything on: on Linux the child is then sent
SIGTERM by the kernel and stops (what it measured stays in its hidden .part file).

Any other failure is a result: inside the method's stream the child's own guard records it
(stream.Harness.guard); before that (loading) the child records an "error" event and exits
with 3, and the parent records the point with that message; a crash is recorded with the
way the child ended. No child traceback reaches the terminal (--debug prints it).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

from .control import STOP_SIGNALS, Progress, StopRequest, stop_on_interrupt
from .errors import RunInterrupted, describe_failure, failure_site
from .events import record_model
from .results import RECORD_FIELDS, ResultsWriter, load_results
from .spec import MethodSpec, parse_spec

# Fault injection for tests: "METHOD:TOKENS" makes the child for METHOD kill itself
# with SIGSEGV once it has fed TOKENS tokens; "METHOD:TOKENS:error" makes it raise instead.
CRASH_ENV = "KVSTRESS_INJECT_CRASH"
# How long a parent stopped at once (a second signal) waits for its child to stop too.
_CHILD_STOP_S = 10.0
# The exit code of a child that failed outside its method's guard (loading) and recorded why.
_CHILD_FAILED = 3
_PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


class _CrashInjector(Progress):
    def __init__(self, tokens: int, raises: bool):
        self.left = tokens
        self.raises = raises

    def advance(self, count: int) -> None:
        self.left -= count
        if self.left <= 0:
            if self.raises:
                raise RuntimeError("injected failure")
            os.kill(os.getpid(), signal.SIGSEGV)


def _stop_with_parent(parent: int) -> None:
    """A parent killed outright (SIGKILL: nothing to pass a stop on) must not leave its child
    computing: on Linux the kernel sends the child SIGTERM, which stops it as the user's would."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux/glibc: only a parent that lives to pass a stop on stops the child
    if os.getppid() != parent:  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def _child(schedule_type: type, config_json: dict, part: str, method: str, parent: int) -> None:
    from . import models
    from .stream import Harness

    with stop_on_interrupt(at_once=True) as stop:  # a signal during start-up stops the child at once
        _stop_with_parent(parent)
        try:
            config = schedule_type.config_type.from_json(config_json, out=Path(part))
            schedule = schedule_type(config)
            spec = parse_spec(method)
            writer = ResultsWriter.resume(part, config.to_json(), kind=config.kind,
                                          defaults=type(config).json_defaults())
            tokenizer = models.load_tokenizer(config.model)
            schedule.check(tokenizer)
            schedule.prepare(schedule.load_text(tokenizer), writer)
            loaded = models.load_model(config.model, device=config.device, dtype=config.dtype, seed=config.seed)
            record_model(loaded, writer, lambda message: None, schedule.random_weights_note)
            crash_method, _, crash = os.environ.get(CRASH_ENV, "").partition(":")
            crash_tokens, _, how = crash.partition(":")
            progress = _CrashInjector(int(crash_tokens), how == "error") if crash_method == method else None
            with stop.deferred():
                harness = Harness(config, loaded.model, writer, pretrained=loaded.pretrained, progress=progress,
                                  stop_requested=stop)
                try:
                    schedule.run_method(harness, spec)
                finally:
                    harness.flush_samples()
        except (RunInterrupted, KeyboardInterrupt) as interrupted:  # StopNow is a KeyboardInterrupt
            sys.exit(128 + (getattr(interrupted, "signum", None) or stop.signum or signal.SIGINT))
        except Exception as error:  # outside the method's guard (loading): the parent records it, no traceback here
            if config_json.get("debug"):
                traceback.print_exception(error)
            copy = ResultsWriter.resume(part, load_results(part)["config"])
            copy.add_event({"method": method, "type": "error", "message": describe_failure(error),
                            "where": failure_site(error)})
            sys.exit(_CHILD_FAILED)


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def stop_signal(code: int | None, stop: StopRequest) -> int | None:
    """The stop signal that ended a child with exit code `code`, or None: it stopped on one
    (128 + N), or one killed it before it could catch it (-N, still importing); any end once
    the parent itself was asked to stop."""
    for signum in STOP_SIGNALS:
        if code in (128 + signum, -signum):
            return signum
    return stop.signum if code != 0 and stop() else None


def run_method_isolated(schedule, spec: MethodSpec, writer: ResultsWriter, stop: StopRequest | None = None) -> int | None:
    """Run `spec` in a child; merge what it added into `writer`. Returns the child's exit code;
    RunInterrupted when the child was interrupted. `stop`: the run's stop request, whose
    signals are passed on to the child (execute's); the child stops with the parent."""
    stop = stop if stop is not None else StopRequest()  # one that never asks
    part = writer.path.with_name(f".{writer.path.name}.{spec.name}.part")
    shutil.copyfile(writer.path, part)
    base = load_results(part)
    records, events, samples = (len(base[key]) for key in ("records", "events", "samples"))
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state inherited
    child = context.Process(target=_child, args=(type(schedule), schedule.config.to_json(), str(part), spec.name,
                                                 os.getpid()))
    child.start()
    try:
        with stop.forwarding(child.pid):
            child.join()
    finally:  # also when the parent was stopped at once (a second signal, passed on to the child)
        child.join(_CHILD_STOP_S)
        if child.is_alive():
            child.kill()
            child.join()
        _merge(part, writer, records, events, samples)
    signum = stop_signal(child.exitcode, stop)
    if signum is not None:
        raise RunInterrupted(f"{spec.name} was interrupted", signum)
    if child.exitcode == _CHILD_FAILED:  # it said why, in an "error" event now merged
        error = writer.events[-1]
        cause = error["message"] + (f" (at {error['where']})" if error.get("where") else "")
    elif child.exitcode != 0:
        cause = f"the child process {describe_exit(child.exitcode)}"
        writer.add_event({"method": spec.name, "type": "crash", "message": cause})
    if child.exitcode != 0:
        point = schedule.crash_point(spec, [r for r in writer.records if r["method"] == spec.name])
        if point is not None:
            record = dict.fromkeys(RECORD_FIELDS, None)
            record.update(method=spec.name, status="error", error=cause, **point)
            writer.add_record(record)
    return child.exitcode


def _merge(part: Path, writer: ResultsWriter, records: int, events: int, samples: int) -> None:
    """Add what the child wrote to its copy `part` (past the first records, events, samples) to `writer`."""
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
