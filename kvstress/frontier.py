"""`kvstress frontier`: which policy at which budget keeps the most quality for the KV bytes it holds.

    kvstress frontier --budgets 128,256,512 --tokens 2k --dataset shakespeare --books 3

A schedule over the stream core composed of the commands' own schedules, one results file
(kind "frontier"), one model, every method of config.FrontierConfig's plan (the full cache,
then each policy at each budget), and for each method in turn:

    perplexity  the ppl schedule (perplexity.py) on the same text, or each book, as `ppl`:
                bucket and overall records (pooled over the books), "ppl_book" / "ppl_books"
                events with the books' spread
    retrieval   the needle schedule (needle.py) for each --tasks task: "needle_cell" events
                and one record per prompt length
    cost        the method's cache and StreamingLLM's at the same budget (the full cache and
                budget-free specs: at the largest budget) filled to --tokens in prefill chunks,
                then single-token steps taken in turns, a few steps each, so that the machine's
                load falls on both alike (as benchmarks/interleaved_tpot.py does): one record
                (its TPOT, and cache_bytes: the bytes the cache holds at the run's length,
                measured, from which the figure's x and the fraction of the full cache's bytes
                come) and a "frontier_cost" event pointing at it with the prefill time and the
                decode-step ratio to StreamingLLM's. A StreamingLLM method is paired with a
                second cache of itself: its ratio is the noise of the measurement. (The
                record's peak memory holds both caches.)

Every forward goes through the core, so --max-memory, Ctrl-C, --resume, --isolate and --tp
mean here what they mean in every command; an OOM or error ends the method (later parts
are skipped) and the run goes on. A resumed run skips each part the file holds: a method's
perplexity once its overall record is written (a cut-short one streams again), each needle
cell, the cost once its event is written. The figure and the table read the file only
(events.frontier_points).
"""

from __future__ import annotations

from dataclasses import replace

from .config import FrontierConfig, FrontierPoint, budget_tokens, frontier_plan
from .events import CELL_EVENT, COST_EVENT, cost_events
from .needle import NeedleSchedule
from .perplexity import PplSchedule
from .run import Schedule
from .spec import MethodSpec
from .stream import Harness, Stream, timing_stats

# Decode steps each cache takes before the other takes its turn: a few, so that neither
# runs long alone, and not one, so that a turn is not all switching between caches.
ROUND_STEPS = 4


class FrontierSchedule(Schedule):
    config_type = FrontierConfig
    config: FrontierConfig
    random_weights_note = "random weights: perplexity and retrieval mean nothing here (bytes and cost do)"

    def __init__(self, config: FrontierConfig, **options):
        super().__init__(config, **options)
        self.ppl = PplSchedule(config.ppl_config(), **options)
        self.retrieval = [NeedleSchedule(config.needle_config(task), **options) for task in config.tasks]
        self.points = {point.method.name: point for point in config.plan}

    # -- before the model loads --------------------------------------------------------

    def check(self, tokenizer) -> None:
        for part in self.retrieval:
            part.check(tokenizer)

    def load_text(self, tokenizer):
        """One text; or with --books each book (PG-19's, or each bundled play) for perplexity,
        the first of them the needles' haystack and the cost's text."""
        if self.config.books is None:
            return super().load_text(tokenizer)
        from .texts import load_books, load_plays, parse_books

        load = load_plays if self.config.dataset == "shakespeare" else load_books
        self.ppl.samples = load(tokenizer, self.config.tokens_needed, parse_books(self.config.books))
        books = [book for sample in self.ppl.samples for book in sample.books]
        kind = "bundled plays standing in for PG-19 books" if load is load_plays else "PG-19 test split"
        titles = "; ".join(f"{book['index']}: {book['title']}" for book in books)
        return replace(self.ppl.samples[0], description=f"{kind}, {len(books)} books ({titles})", books=books)

    def prepare(self, text, writer) -> None:
        self.ppl.prepare(text, writer)
        for part in self.retrieval:
            part.prepare(text, writer)
        self.tokens = text.tokens[: self.config.tokens + self.config.decode_steps + 1].unsqueeze(0)

    # -- measuring ------------------------------------------------------------------------

    def is_done(self, spec: MethodSpec, writer) -> bool:
        # An OOM is a result that ends the method; an error is tried again by a resumed run.
        ran_out = any(r["method"] == spec.name and r["status"] == "oom" for r in writer.records)
        return ran_out or (self.ppl.is_done(spec, writer) and spec.name in cost_events(writer.events) and all(
            part.is_done(spec, _TaskView(writer, part.config.task)) for part in self.retrieval))

    def run_method(self, harness: Harness, spec: MethodSpec) -> None:
        """Each part the file lacks, in turn; a part that fails (OOM, error) ends the method there."""
        writer = harness.writer
        first = len(writer.records)
        for part in [self.ppl, *self.retrieval]:
            view = _TaskView(writer, part.config.task) if part in self.retrieval else writer
            if not part.is_done(spec, view):
                harness.writer = view
                try:
                    part.run_method(harness, spec)
                finally:
                    harness.writer = writer
                harness.flush_samples()
            if any(r["method"] == spec.name and r["status"] != "ok" for r in writer.records[first:]):
                return
        if spec.name not in cost_events(writer.events):
            self._cost(harness, spec)

    def crash_point(self, spec: MethodSpec, records: list[dict]) -> dict | None:
        """A crashed child was streaming perplexity until the overall record, then at the run's
        length or a prompt's (the run's length is recorded)."""
        if not any(r["scope"] == "overall" for r in records):
            return self.ppl.crash_point(spec, records)
        return {"length": self.config.tokens, "batch_size": 1}

    def reference(self, point: FrontierPoint) -> MethodSpec:
        """StreamingLLM at the point's budget (the largest budget for a point without one): the
        run's own streaming spec at that capacity when it has one, else streaming's defaults."""
        config = self.config
        budget = point.budget if point.budget is not None else config.budgets[-1]
        capacity = budget_tokens(budget, config.tokens)
        own = [p.method for p in self.points.values() if p.method.method == "streaming" and p.capacity == capacity]
        return own[0] if own else frontier_plan(["streaming"], [budget], config.tokens, sink=config.sink,
                                                window=config.window)[1].method

    def _cost(self, harness: Harness, spec: MethodSpec) -> None:
        """Prefill time, then decode steps taken in turns with StreamingLLM's at the same budget."""
        config, writer = self.config, harness.writer
        reference = self.reference(self.points[spec.name])
        length, steps = config.tokens, config.decode_steps
        harness.progress.start(f"{spec.name} × {reference.name}", 2 * (length + steps))
        with harness.guard(spec, length=length):
            # The reference first, so that the measuring window and the guard are the method's own.
            paired = harness.open(reference, self.tokens)
            self._prefill(paired)
            timed = harness.open(spec, self.tokens)
            prefill_s = self._prefill(timed)
            step_ms: dict[Stream, list[float]] = {timed: [], paired: []}
            for stream in (timed, paired):
                stream.feed(stream.position + 1, "decode", compiled=True)  # the first step of each: a warm-up
            ttft_s = timed.build_s
            for turn in range(0, steps - 1, ROUND_STEPS):
                order = (timed, paired) if turn // ROUND_STEPS % 2 == 0 else (paired, timed)
                for stream in order:
                    for _ in range(min(ROUND_STEPS, steps - 1 - turn)):
                        _, elapsed = stream.feed(stream.position + 1, "decode", compiled=True)
                        step_ms[stream].append(elapsed * 1000)
            measured = harness.measurements(timed, step_ms[timed])
            theirs = timing_stats(step_ms[paired])
            record = writer.add_record({"method": spec.name, "length": length, "status": "ok", "batch_size": 1,
                                        "ttft_s": ttft_s, **measured})
            writer.add_event({
                "type": COST_EVENT, "method": spec.name, "record": len(writer.records) - 1, "reference": reference.name,
                "prefill_s": prefill_s, "decode_ms_median": record["tpot_ms_median"],
                "reference_ms_median": theirs["tpot_ms_median"], "reference_spread": theirs["tpot_spread"],
                "decode_ratio": record["tpot_ms_median"] / theirs["tpot_ms_median"],
                "steps": len(step_ms[timed]), "round_steps": ROUND_STEPS})
        harness.progress.finish()

    def _prefill(self, stream: Stream) -> float:
        """Bring the stream to the run's length in prefill chunks; the forward time it took."""
        while stream.position < self.config.tokens:
            stream.feed(min(stream.position + self.config.chunk, self.config.tokens), "prefill")
        return stream.build_s


class _TaskView:
    """The results writer as one retrieval task's schedule sees it: the file's other tasks' cells
    left out, since a needle schedule takes every cell of its file for one of its own."""

    def __init__(self, writer, task: str):
        self._writer, self._task = writer, task

    def __getattr__(self, name: str):
        return getattr(self._writer, name)

    @property
    def events(self) -> list[dict]:
        return [e for e in self._writer.events if e.get("type") != CELL_EVENT or e.get("task", "needle") == self._task]
