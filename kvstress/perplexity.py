"""Streaming perplexity under a compressed KV cache: `kvstress ppl` and `kvstress compare`.

Every token of a text is scored by the model whose cache is the compressed one, as
the StreamingLLM paper measures it:

    exact    (--chunk 1)  one token per forward: the prediction at position p sees
                          exactly what the cache kept of tokens 0..p
    chunked  (--chunk N)  N tokens per forward, all N logits scored. Faster, but an
                          APPROXIMATION: a token inside a chunk also attends to the
                          chunk's earlier tokens that a per-token cache would already
                          have evicted (the cache evicts back to capacity after each
                          forward), so chunked perplexity is optimistic once the text
                          is longer than the capacity.

Position p's logits (float32) predict token p + 1. With --tokens N the text holds
N + 1 tokens, N forwards' worth of positions are fed and N predictions are scored.
A prediction's *context length* is p + 1 (the tokens it has seen); length buckets
(lo, hi] group predictions by context length and partition all N of them.

Results (kind "ppl", see results.py) are written as the run goes, one method after
the other:

    per method × bucket  scope "bucket", length = bucket end, nll_mean, perplexity,
                         tokens_scored (that bucket's), status "ok"; every other field null
    per method, overall  scope "overall", length = N, nll_mean / perplexity /
                         tokens_scored over all N,
                         batch_size 1, tpot_ms_median / p90 (forward time per token),
                         throughput_tok_s (N / total forward time), attn_ms_mean,
                         peak memory, cache_bytes, cache_tokens; and right after it an
                         event {"type": "ppl_overall", "method", "record": its index in
                         "records", "length": N, "total_s": total forward time}.
                         "scope" tells the overall record from the last bucket's (the
                         same length); files written before that field have only the
                         event to tell them apart (report.ppl_scopes).
    out of memory        a record with status "oom" at the bucket it was heading for,
                         and an "oom" event; the next method runs.

With --books (several PG-19 books, one sample each) each book is streamed on its own:
a "ppl_book" event per book (its overall and bucket NLL and perplexity); then the same
records as above, each POOLING the books' tokens (every book scores the same number of
tokens, so the mean of the books' NLLs is the mean NLL over all their tokens, and the
record's perplexity is exp of it: the "pooled" perplexity); then a "ppl_books" event
with the spread across books of each book's own perplexity: perplexity_mean (the
arithmetic mean of the books' perplexities, not the pooled one), perplexity_stdev (their
SAMPLE standard deviation, n − 1 denominator; null for one book), perplexity_min,
perplexity_max, and the same per bucket under "buckets".

Timing: each forward is timed by the stream core (synchronized on CUDA). The last
forward of a bucket that took several forwards is an attention-time probe (hooks on
every attention module, see stream.AttentionTimer); it counts in the total time but
not in the TPOT statistics.

Resume: a method whose overall record is written is done; a method cut short is
streamed again from its start (its cache state depends on every token before), and
only the buckets the file lacks are written.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ConfigError, PplConfig, parse_buckets  # noqa: F401 - parse_buckets: read from here too
from .events import BOOK_EVENT, BOOKS_EVENT, OVERALL_EVENT, overall_records
from .run import Schedule, execute
from .spec import MethodSpec, parse_spec
from .stream import AttentionTimer, Harness
from .sweep import perplexity

DEFAULT_TOKENS = 4096
# The seed experiment's six configurations (docs/seed-experiment.md).
COMPARE_METHODS = ("baseline", "streaming_8_256", "streaming_8_512", "h2o_4_32_256", "h2o_8_32_256", "h2o_8_64_512")
COMPARE_DATASETS = ("pg19", "wikitext")


class PplSchedule(Schedule):
    """Scores one text ([1, tokens + 1] ids), or each of several PG-19 books, under each method."""

    random_weights_note = "random weights: these perplexities only compare methods with each other"
    length_option = "--tokens"

    config_type = PplConfig
    config: PplConfig

    def __init__(self, config: PplConfig, *, bucket_note: str | None = None, **options):
        super().__init__(config, **options)
        self.bucket_note = bucket_note
        self.samples: list | None = None  # --books: one TextSource per book

    def load_text(self, tokenizer):
        if self.config.books is None:
            return super().load_text(tokenizer)
        from .texts import load_books, parse_books

        self.samples = load_books(tokenizer, self.config.tokens_needed, parse_books(self.config.books),
                                  length_option=self.length_option)
        books = [book for sample in self.samples for book in sample.books]
        titles = "; ".join(f"{book['index']}: {book['title']}" for book in books)
        return replace(self.samples[0], description=f"PG-19 test split, {len(books)} books ({titles})", books=books)

    def prepare(self, text, writer) -> None:
        if self.bucket_note:
            self.notify(f"note: {self.bucket_note}")
            writer.add_event({"type": "buckets", "message": self.bucket_note})
        if self.config.mode == "chunked":
            self.notify(f"note: chunked mode ({self.config.chunk} tokens per forward) approximates streaming "
                        "perplexity; --chunk 1 is exact")
        self.text = text.tokens  # the one text scored without --books

    def is_done(self, spec: MethodSpec, writer) -> bool:
        return spec.name in overall_records(writer.events) or any(
            r["method"] == spec.name and r["status"] == "oom" for r in writer.records)

    def crash_point(self, spec: MethodSpec, records: list[dict]) -> dict | None:
        recorded = {r["length"] for r in records if r["method"] == spec.name}
        pending = [hi for hi in self.config.buckets if hi not in recorded]
        return {"length": pending[0], "batch_size": 1} if pending else None

    def saved(self, writer) -> str:
        if self.samples is None:
            return super().saved(writer)
        books = sum(1 for event in writer.events if event.get("type") == BOOK_EVENT)
        return f"{super().saved(writer)} and {books} finished book{'s' if books != 1 else ''}"

    def run_method(self, harness: Harness, spec: MethodSpec) -> None:
        if self.samples is None:
            self._run_one_text(harness, spec)
        else:
            self._run_books(harness, spec)

    def _run_one_text(self, harness: Harness, spec: MethodSpec) -> None:
        """Bucket records as each bucket finishes, then the overall record."""
        writer = harness.writer
        written = {r["length"] for r in writer.records if r["method"] == spec.name and r["status"] == "ok"}

        def bucket_done(lo: int, hi: int, bucket_nll: float) -> None:
            if hi not in written:
                writer.add_record(_bucket_record(spec, lo, hi, bucket_nll))

        scored = self._score(harness, spec, self.text, bucket_done)
        if scored is not None:
            self._write_overall(writer, spec, scored)

    def _run_books(self, harness: Harness, spec: MethodSpec) -> None:
        """One "ppl_book" event per book as it finishes; then records of the mean over the books
        (bucket NLLs averaged, tokens summed) and a "ppl_books" event with the spread."""
        writer = harness.writer
        finished = {e["book"]["index"]: e for e in writer.events if e.get("type") == BOOK_EVENT and e["method"] == spec.name}
        for sample in self.samples:
            book = sample.books[0]
            if book["index"] in finished:
                continue
            buckets: list[dict] = []

            def bucket_done(lo: int, hi: int, nll: float, buckets: list[dict] = buckets) -> None:
                buckets.append(_bucket_record(spec, lo, hi, nll))

            scored = self._score(harness, spec, sample.tokens, bucket_done)
            if scored is None:
                return  # out of memory or failed: recorded by the guard; the mean needs every book
            finished[book["index"]] = writer.add_event({
                "type": BOOK_EVENT, "method": spec.name, "book": {key: book[key] for key in ("index", "title", "id")},
                "buckets": [{key: r[key] for key in ("length", "nll_mean", "perplexity")} for r in buckets],
                **{key: scored[key] for key in ("nll_mean", "perplexity", "total_s")},
                "tpot_ms_median": scored["measured"]["tpot_ms_median"]})
        per_book = [finished[sample.books[0]["index"]] for sample in self.samples]
        count = len(per_book)
        for i, (lo, hi) in enumerate(self.config.bucket_ranges):
            writer.add_record({**_bucket_record(spec, lo, hi, statistics.fmean(e["buckets"][i]["nll_mean"] for e in per_book)),
                               "tokens_scored": (hi - lo) * count})
        nll_mean = statistics.fmean(e["nll_mean"] for e in per_book)
        self._write_overall(writer, spec, {
            "nll_mean": nll_mean, "perplexity": perplexity(nll_mean), "tokens_scored": self.config.tokens * count,
            "total_s": sum(e["total_s"] for e in per_book), "measured": {}, "attn_ms_mean": None})
        writer.add_event({"type": BOOKS_EVENT, "method": spec.name, "books": [e["book"] for e in per_book],
                          **book_spread([e["perplexity"] for e in per_book]),
                          "buckets": [{"length": hi, **book_spread([e["buckets"][i]["perplexity"] for e in per_book])}
                                      for i, (_, hi) in enumerate(self.config.bucket_ranges)]})

    def _score(self, harness: Harness, spec: MethodSpec, text: torch.Tensor, bucket_done) -> dict | None:
        """Stream `text` (1-D ids) under `spec`, scoring every prediction; bucket_done(lo, hi, nll) as each
        bucket ends. Returns the overall measurements, or None when it ran out of memory or failed."""
        config = self.config
        tokens = text[: config.tokens + 1].unsqueeze(0).to(harness.device)
        harness.progress.start(spec.name, config.tokens)
        per_token_ms: list[float] = []
        attention_ms: list[float] = []
        with harness.guard(spec, length=config.buckets[0]) as point:
            stream = harness.open(spec, tokens)
            nll = torch.empty(config.tokens, dtype=torch.float32, device=harness.device)
            total_s = 0.0
            phase = "decode" if config.chunk == 1 else "prefill"
            for lo, hi in config.bucket_ranges:
                point.length = hi
                first = True
                while stream.position < hi:
                    start, end = stream.position, min(stream.position + config.chunk, hi)
                    probe = end == hi and not first
                    with AttentionTimer(harness.model, harness.device) if probe else nullcontext() as timer:
                        logits, elapsed = stream.feed(end, phase, logits_to_keep=0, compiled=not probe)
                    # logits [1, q, vocab] → [q, vocab], float32 before the softmax.
                    nll[start:end] = F.cross_entropy(logits[0].float(), tokens[0, start + 1 : end + 1], reduction="none")
                    del logits
                    total_s += elapsed
                    if probe:
                        attention_ms.append(timer.total_s * 1000 / (end - start))
                    else:
                        per_token_ms.append(elapsed * 1000 / (end - start))
                    first = False
                harness.flush_samples()
                bucket_done(lo, hi, nll[lo:hi].double().sum().item() / (hi - lo))
            nll_mean = nll.double().sum().item() / config.tokens
            scored = {"nll_mean": nll_mean, "perplexity": perplexity(nll_mean), "tokens_scored": config.tokens,
                      "total_s": total_s, "measured": harness.measurements(stream, per_token_ms),
                      "attn_ms_mean": statistics.fmean(attention_ms) if attention_ms else None}
        harness.progress.finish()
        return None if point.failed else scored

    def _write_overall(self, writer, spec: MethodSpec, scored: dict) -> None:
        total_s = scored["total_s"]
        writer.add_record({
            "method": spec.name, "length": self.config.tokens, "status": "ok", "scope": "overall", "batch_size": 1,
            **scored["measured"],
            "throughput_tok_s": scored["tokens_scored"] / total_s if total_s > 0 else None,
            "attn_ms_mean": scored["attn_ms_mean"], "nll_mean": scored["nll_mean"], "perplexity": scored["perplexity"],
            "tokens_scored": scored["tokens_scored"],
        })
        writer.add_event({"type": OVERALL_EVENT, "method": spec.name, "record": len(writer.records) - 1,
                          "length": self.config.tokens, "total_s": total_s})


def _bucket_record(spec: MethodSpec, lo: int, hi: int, nll_mean: float) -> dict:
    return {"method": spec.name, "length": hi, "status": "ok", "scope": "bucket", "nll_mean": nll_mean,
            "perplexity": perplexity(nll_mean), "tokens_scored": hi - lo}


def book_spread(perplexities: Sequence[float | None]) -> dict:
    """The spread of the books' own perplexities (a book whose perplexity overflowed is left out):
    arithmetic mean, sample standard deviation (n − 1; None below two books), minimum, maximum."""
    values = [value for value in perplexities if value is not None]
    return {"perplexity_mean": statistics.fmean(values) if values else None,
            "perplexity_stdev": statistics.stdev(values) if len(values) > 1 else None,
            "perplexity_min": min(values, default=None), "perplexity_max": max(values, default=None)}


# --- compare: the seed's table ----------------------------------------------------------


def dataset_file_stem(dataset: str) -> str:
    """pg19 → pg19; a file path → its stem (for compare's one results file per dataset)."""
    return Path(dataset).stem if dataset not in ("pg19", "wikitext", "shakespeare") else dataset


@dataclass
class CompareRun:
    written: list[Path]
    skipped: dict[str, str]  # dataset → why it could not be loaded
    failed: list[dict]  # the "error" records of every dataset's run


def run_compare(datasets: Sequence[str], config: PplConfig, *, bucket_note: str | None = None,
                out_dir: Path = Path("compare"), notify=lambda message: None, progress=None) -> CompareRun:
    """The seed's six configurations (or config.methods) on each dataset: one ppl results file per
    dataset in out_dir, the model loaded once. A dataset that cannot be loaded is skipped with a
    note; none at all is a TextError."""
    from . import models
    from .results import ResultsError
    from .texts import TextError, load_text

    if not datasets:
        raise ConfigError("--datasets is empty: give e.g. pg19,wikitext or shakespeare")
    configs = [replace(config, dataset=name, books=config.books if name == "pg19" else None,
                       out=Path(out_dir) / f"{dataset_file_stem(name)}.json") for name in datasets]
    if len({c.out for c in configs}) != len(configs):
        raise ConfigError(f"--datasets {','.join(datasets)} would write two results files with one name: name each once")
    if config.resume and any(c.out.exists() for c in configs):  # stopped in an earlier dataset: start the later ones
        configs = [c if c.out.exists() else replace(c, resume=False) for c in configs]
    for c in configs:
        if c.out.exists() and not (c.force or c.resume):
            raise ResultsError(f"results file {c.out} already exists: use --force, --resume, another --out-dir, "
                               "or delete it")
    models.resolve_device(config.device)
    tokenizer = models.load_tokenizer(config.model)
    texts, skipped = {}, {}
    schedules = {c.dataset: PplSchedule(c, bucket_note=bucket_note, notify=notify) for c in configs}
    for name, schedule in schedules.items():
        if schedule.config.books is not None:
            continue  # the schedule loads the books, one sample each
        try:
            texts[name] = load_text(name, tokenizer, config.tokens_needed, book=schedule.book if name == "pg19" else None,
                                    length_option=schedule.length_option)
        except TextError as error:
            skipped[name] = str(error)
            notify(f"note: skipping dataset {name}: {error}")
    if not texts and config.books is None:
        raise TextError(
            f"none of the datasets {', '.join(datasets)} could be loaded (see the notes above): "
            "use --datasets shakespeare (bundled, offline) or a text file"
        )
    loaded = None if config.isolate else models.load_model(config.model, device=config.device, dtype=config.dtype,
                                                           seed=config.seed)
    written, failed = [], []
    for c in configs:
        if c.dataset not in texts and c.books is None:
            continue
        notify(f"dataset {c.dataset}: {len(c.methods)} methods, {c.tokens} tokens, {c.mode} mode")
        failed += execute(schedules[c.dataset], progress=progress, loaded=loaded, text=texts.get(c.dataset)).failed
        written.append(c.out)
    return CompareRun(written, skipped, failed)


def compare_methods() -> tuple[MethodSpec, ...]:
    return tuple(parse_spec(name) for name in COMPARE_METHODS)
