"""Carrying out a run, the same way for every command.

    execute(schedule)
      1. the results file: created (or, with --resume, reopened and its config compared)
         before anything loads, so a path that cannot be written fails in a second
      2. the text, then the model (the tokenizer first: a too-short text or a bad prompt
         fails before the weights load); the environment is in the file from step 1
      3. each method the file does not hold yet: in this process through the stream core,
         or with --isolate in a child process (isolate.py); a method the model cannot run
         is refused first (exit 2), and one that fails while it runs (an exception, a plugin's
         included, or with --isolate a crash) is a failed point: the other methods still run
         and the command exits with 3 once they did
      4. Ctrl-C or SIGTERM: everything measured is kept and RunInterrupted says how to resume
         (and which signal asked: the command exits with 130 or 143); during start-up a signal
         stops at once, while measuring after the current forward (control.StopRequest), and
         with --isolate it is passed on to the child; a run that fails before it measured
         anything leaves no file behind

A command is a Schedule subclass (sweep.py, perplexity.py, needle.py, batch.py): what
text it needs, what it prepares from it, and what one method's measurement is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import RunConfig
from .control import Progress, stop_on_interrupt
from .errors import RunInterrupted
from .events import Notify, record_model, record_text, record_unavailable_measures
from .results import ResultsError, ResultsWriter, environment
from .spec import MethodSpec
from .stream import Harness


class Schedule:
    """One command's plan over the stream core. Subclasses set the config type and write run_method."""

    config_type: type[RunConfig]
    length_option = "--lengths"  # the option that sets how much text the run reads, for advice
    random_weights_note = "random weights: speed and memory are faithful, quality numbers are not"

    def __init__(self, config: RunConfig, *, notify: Notify = lambda message: None):
        self.config = config
        self.notify = notify

    # -- before the model loads --------------------------------------------------------

    def check(self, tokenizer) -> None:
        """Mistakes that need the tokenizer to be seen (a prompt too long for a length)."""

    def load_text(self, tokenizer):
        from .texts import load_text

        return load_text(self.config.dataset, tokenizer, self.config.tokens_needed, book=self.book,
                         length_option=self.length_option)

    @property
    def book(self) -> int | str | None:
        from .texts import parse_book

        return None if self.config.book is None else parse_book(self.config.book)

    def prepare(self, text, writer: ResultsWriter) -> None:
        """What the measurement needs from the text (token segments, prompts)."""

    # -- measuring ------------------------------------------------------------------------

    def is_done(self, spec: MethodSpec, writer: ResultsWriter) -> bool:
        """Whether the results file already holds all of `spec` (a resumed run skips it)."""
        raise NotImplementedError

    def run_method(self, harness: Harness, spec: MethodSpec) -> None:
        """Measure `spec`, writing records as each point finishes; an OOM ends the method (harness.guard)."""
        raise NotImplementedError

    def crash_point(self, spec: MethodSpec, records: list[dict]) -> dict | None:
        """The point an isolated child that died was heading for ({"length", "batch_size"}),
        given the records of `spec`; None when it had recorded every point."""
        raise NotImplementedError

    def saved(self, writer: ResultsWriter) -> str:
        """What a stopped run has saved, for the line that says how to resume."""
        count = len(writer.records)
        return f"{count} record{'s' if count != 1 else ''}"


@dataclass
class RunResult:
    records: list[dict]
    events: list[dict]
    text: object  # texts.TextSource
    failed: list[dict] = field(default_factory=list)  # this run's "error" records: the command exits with 3


def open_results(config: RunConfig, device, notify: Notify = lambda message: None) -> ResultsWriter:
    """The run's results file, new or (--resume) reopened; fails before anything loads."""
    if not config.resume:
        return ResultsWriter(config.out, config.kind, config.to_json(), environment(device), overwrite=config.force)
    if not config.out.exists():
        raise ResultsError(f"nothing to resume: {config.out} does not exist; drop --resume to start a new run")
    writer = ResultsWriter.resume(config.out, config.to_json(), environment(device), kind=config.kind,
                                  defaults=type(config).json_defaults())
    notify(f"resuming {config.out}: {len(writer.records)} records already written")
    return writer


def execute(schedule: Schedule, *, progress: Progress | None = None, loaded=None, text=None) -> RunResult:
    """Carry out the run (see the module's docstring); `loaded` (models.LoadedModel) and
    `text` (texts.TextSource) let `compare` load them once for several runs. With --tp the
    ranks are started here, once, and handed to the model loading and the harness."""
    from . import models

    config, notify = schedule.config, schedule.notify
    device = models.resolve_device(config.device)
    ranks = None
    if config.tp > 1:  # one process per rank under torchrun: rank 0 writes and talks (distributed.py)
        from . import distributed

        ranks = distributed.start(config.tp, device)
        device = ranks.device
        if ranks.rank:
            progress, notify = None, (lambda message: None)
            schedule.notify = notify
    writer = open_results(config, device, notify) if ranks is None else ranks.open_results(
        lambda: open_results(config, device, notify))
    first_new = len(writer.records)  # what this run adds (a resumed file holds earlier records)
    try:
        with stop_on_interrupt() as stop:  # under the CLI, the one it installed before start-up
            with stop.at_once():  # nothing polls the stop until the first measured forward
                tokenizer = loaded.tokenizer if loaded is not None else models.load_tokenizer(config.model)
                schedule.check(tokenizer)
                text = text if text is not None else schedule.load_text(tokenizer)
                record_text(text, writer, notify)
                schedule.prepare(text, writer)
                if not config.isolate:
                    loaded = loaded if loaded is not None else models.load_model(
                        config.model, device=str(device) if ranks else config.device, dtype=config.dtype,
                        seed=config.seed, tp=config.tp, ranks=ranks)
                    record_model(loaded, writer, notify, schedule.random_weights_note)
            with stop.deferred():
                if config.isolate:
                    from .isolate import run_method_isolated

                    for spec in config.methods:
                        if not schedule.is_done(spec, writer):
                            if stop():  # asked after the last child's last forward: start no other
                                raise RunInterrupted(f"stopped before {spec.name}", stop.signum)
                            written = len(writer.records)
                            run_method_isolated(schedule, spec, writer, stop)
                            report_failures(writer.records[written:], notify)
                else:
                    harness = Harness(config, loaded.model, writer, pretrained=loaded.pretrained, progress=progress,
                                      stop_requested=stop, ranks=ranks)
                    harness.check_methods(config.methods)
                    record_unavailable_measures(harness, writer)
                    for spec in config.methods:
                        if not schedule.is_done(spec, writer):
                            written = len(writer.records)
                            schedule.run_method(harness, spec)
                            harness.flush_samples()
                            report_failures(writer.records[written:], notify)
                            record_unavailable_measures(harness, writer)
    except (RunInterrupted, KeyboardInterrupt) as interrupted:  # StopNow is a KeyboardInterrupt
        raise RunInterrupted(f"{schedule.saved(writer)} saved in {config.out}; "
                             f"continue with the same command plus --resume",
                             getattr(interrupted, "signum", None)) from None
    except BaseException:
        if not config.resume and not writer.records and (ranks is None or ranks.rank == 0):
            Path(config.out).unlink(missing_ok=True)  # nothing measured: nothing left to block the rerun
        raise
    writer.finish()
    return RunResult(writer.records, writer.events, text, failed=[r for r in writer.records[first_new:]
                                                                  if r["status"] == "error"])


def report_failures(records: list[dict], notify: Notify) -> None:
    """One line for each point that ran out of memory or failed."""
    for record in records:
        if record["status"] != "ok":
            where = f"{record['length']} tokens" + (f", batch {record['batch_size']}" if record["batch_size"] != 1 else "")
            notify(f"{record['method']}: {record['status']} heading for {where} — {record['error']}")
