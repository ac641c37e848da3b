"""The tables a command prints when it finishes (stdout), and its progress bars (stderr).

A timing marked "~" is unstable: its p90 is far above its median, or more threads
wanted to run than the machine has cores while it was measured (stream.UNSTABLE_*);
a ratio between two such numbers may be noise, and the footnote says so.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import control
from .events import book_spreads, describe_max_batch, ppl_scopes, spread_notes
from .results import UNSTABLE_LOAD, UNSTABLE_SPREAD
from .sizes import format_bytes

console = Console(stderr=True)
UNSTABLE_MARK = "~"

Column = tuple[str, Callable[[dict], str]]


def print_out(renderable, **kwargs) -> None:
    """Results go to stdout; piped output has no terminal width, so give tables room."""
    Console(width=None if sys.stdout.isatty() else 160).print(renderable, **kwargs)


def notify(message: str) -> None:
    """A line for the person watching the run (stderr)."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def fmt(value, spec: str = ".2f") -> str:
    return "–" if value is None else f"{value:{spec}}"


def _timing(field: str) -> Callable[[dict], str]:
    def cell(record: dict) -> str:
        text = fmt(record.get(field))
        return text + UNSTABLE_MARK if record.get("timing_unstable") and record.get(field) is not None else text
    return cell


def _peak(record: dict) -> str:
    peak = record.get("peak_allocated_bytes")
    return format_bytes(peak if peak is not None else record.get("peak_rss_bytes"))


def print_table(title: str, columns: list[Column], records: Iterable[dict], *, left: tuple[str, ...] = (),
                notes: Iterable[str] = ()) -> None:
    """A table, then `notes` (caption lines saying what its columns are), a line for each failed
    point (its error and where), then the unstable-timing footnote."""
    records = list(records)
    table = Table(title=title)
    for name, _ in columns:
        table.add_column(name, justify="left" if name in ("method", "status", *left) else "right")
    for record in records:
        table.add_row(*(cell(record) for _, cell in columns))
    print_out(table)
    failed = [f"{r['method']}: failed heading for {r['length']} tokens — {r['error']}" for r in records
              if isinstance(r, dict) and r.get("status") == "error"]
    for note in [*notes, *failed]:
        print_out(note, markup=False, highlight=False)
    unstable = [r for r in records if isinstance(r, dict) and r.get("timing_unstable")]
    if unstable:
        print_out(f"{UNSTABLE_MARK} unstable timing at {len(unstable)} point(s) (p90/median above "
                  f"{UNSTABLE_SPREAD}, or other work's load above {UNSTABLE_LOAD:g} per core): "
                  "ratios between these numbers may be noise; rerun on a quiet machine",
                  markup=False, highlight=False)


METHOD: Column = ("method", lambda r: r["method"])
STATUS: Column = ("status", lambda r: r["status"])
TPOT: list[Column] = [("TPOT p50 (ms)", _timing("tpot_ms_median")), ("TPOT p90 (ms)", _timing("tpot_ms_p90")),
                      ("tok/s", lambda r: fmt(r.get("throughput_tok_s"), ".1f"))]

# The KV cache's bytes between forwards, and with a compressed cache's room for a prefill
# chunk (sized once per run): both flat in length for an evicting policy.
KV_BYTES: list[Column] = [("KV held", lambda r: format_bytes(r.get("cache_bytes"))),
                          ("KV + chunk room", lambda r: format_bytes(r.get("cache_allocated_bytes")))]


def print_sweep(records: list[dict]) -> None:
    print_table("kvstress sweep", [
        METHOD, ("length", lambda r: str(r["length"])), STATUS, ("TTFT (s)", lambda r: fmt(r.get("ttft_s"))), *TPOT,
        ("attn (ms)", lambda r: fmt(r.get("attn_ms_mean"))), ("peak mem", _peak),
        *KV_BYTES, ("cached", lambda r: fmt(r.get("cache_tokens"), "d")),
        ("PPL", lambda r: fmt(r.get("perplexity"))),
    ], records)


def print_ppl(config, records: list[dict], events: list[dict], title: str) -> None:
    """Bucket and overall perplexity of a ppl run, each row's scope from report.ppl_scopes.

    --books (several books): the PPL column is the pooled perplexity, and beside it the mean of the
    books' own perplexities ± their sample SD (the "ppl_books" event); caption lines say which is which.
    """
    starts = dict(zip(config.buckets, (0,) + config.buckets[:-1]))
    scopes = ppl_scopes({"records": records, "events": events})
    rows = [{**r, "context": "all" if scope == "overall" else f"{starts.get(r['length'], 0) + 1}–{r['length']}",
             "scope": scope} for r, scope in zip(records, scopes)]
    spreads = book_spreads({"events": events})
    columns = [METHOD, ("context", lambda r: r["context"]), STATUS, ("scored", lambda r: fmt(r.get("tokens_scored"), "d")),
               ("NLL", lambda r: fmt(r.get("nll_mean"), ".4f")), ("PPL", lambda r: fmt(r.get("perplexity")))]
    notes = []
    if spreads:
        counts = sorted({len(event["books"]) for event in spreads.values()})
        books = "/".join(map(str, counts))
        spread = f"mean of {books} books' PPL ± SD"

        def stats(r: dict) -> dict | None:
            event = spreads.get(r["method"])
            if event is None or r["status"] != "ok":
                return None
            if r["scope"] == "overall":
                return event
            return next((b for b in event.get("buckets") or () if b.get("length") == r["length"]), None)

        def mean_sd(r: dict) -> str:
            s = stats(r)
            if s is None or s["perplexity_mean"] is None:
                return fmt(None)
            return fmt(s["perplexity_mean"]) + ("" if s["perplexity_stdev"] is None else f" ± {s['perplexity_stdev']:.2f}")

        def span(r: dict) -> str:
            s = stats(r)
            return fmt(None) if s is None or s["perplexity_min"] is None else \
                f"{s['perplexity_min']:.2f}–{s['perplexity_max']:.2f}"

        columns[-1] = ("pooled PPL", columns[-1][1])
        columns += [(spread, mean_sd), ("books' PPL min–max", span)]
        pooled, spread_line = spread_notes(books)
        notes += [f"{pooled} (a bucket row: that bucket's tokens in every book)", spread_line]
    columns.append(("TPOT (ms)", _timing("tpot_ms_median")))
    print_table(f"kvstress ppl — {title}, {config.mode}", columns, rows, notes=notes)


def print_batch(config, records: list[dict], max_batch: dict[str, dict]) -> None:
    """Every measured point of a batch run, then the largest batch per method."""
    print_table(f"kvstress batch — {config.length}-token context per sequence", [
        METHOD, ("batch", lambda r: fmt(r.get("batch_size"), "d")), STATUS, *TPOT, ("peak mem", _peak), *KV_BYTES,
    ], records)
    print_table("largest batch that fits", [
        METHOD, ("max batch", lambda e: fmt(e["batch_size"], "d")), ("first OOM", lambda e: fmt(e["first_oom"], "d")),
        ("limited by", lambda e: e["limited_by"]), ("probes", lambda e: ",".join(map(str, e["probes"]))),
    ], max_batch.values(), left=("limited by", "probes"))
    for event in max_batch.values():
        print_out(describe_max_batch(event), markup=False, highlight=False)


def print_needle(config, cells: list[dict]) -> None:
    """Exact answers / trials per method and depth (rows) and length (columns)."""
    by_key = {(c["method"], c["length"], c["depth"]): c for c in cells}

    def cell_text(cell: dict | None) -> str:
        if cell is None:
            return "–"
        return cell["status"].upper() if cell["status"] != "ok" else f"{cell['exact']}/{cell['trials']} ({cell['partial']})"

    rows = [{"method": spec.name, "depth": depth} for spec in config.methods for depth in config.depths]
    print_table("kvstress needle — exact / trials (partial)", [
        METHOD, ("depth", lambda r: f"{r['depth']:g}%"),
        *((str(length), lambda r, length=length: cell_text(by_key.get((r["method"], length, r["depth"]))))
          for length in config.lengths),
    ], rows)


def print_policies(policies) -> None:
    """`kvstress policies`: spec.describe_policies() as a table."""
    print_table("kvstress policies", [
        ("name", lambda p: p.name), ("spec", lambda p: p.form), ("example", lambda p: p.example),
        ("parameters", lambda p: p.parameters), ("description", lambda p: p.description),
    ], policies, left=("name", "spec", "example", "parameters", "description"))


class ProgressBars(control.Progress):
    """One rich progress bar per label (method, or method × batch size) on stderr."""

    def __init__(self, bars: Progress):
        self.bars = bars
        self.task = None

    def start(self, label: str, total: int) -> None:
        self.task = self.bars.add_task(label, total=total)

    def advance(self, count: int) -> None:
        if self.task is not None:
            self.bars.advance(self.task, count)

    def finish(self) -> None:
        if self.task is not None:
            self.bars.update(self.task, completed=self.bars.tasks[self.task].total)


@contextmanager
def progress_bars() -> Iterator[ProgressBars]:
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bars:
        yield ProgressBars(bars)


def print_frontier(path) -> None:
    """Every point of a frontier results file: budget, bytes held, perplexity, retrieval, decode cost."""
    from .events import frontier_points
    from .results import load_results

    doc = load_results(path)
    # "state", not "status": print_table's failure lines want a record's length and error.
    points = [{key: value for key, value in p.items() if key != "status"} | {"state": p["status"]}
              for p in frontier_points(doc)]
    tasks = list(points[0]["accuracy"]) if points else []

    def mean_sd(p: dict) -> str:
        books = p["books"]
        if not books or books.get("perplexity_mean") is None:
            return fmt(None)
        return fmt(books["perplexity_mean"]) + ("" if books["perplexity_stdev"] is None else
                                                f" ± {books['perplexity_stdev']:.2f}")

    columns: list[Column] = [
        METHOD, ("budget", lambda p: "full" if p["budget"] is None and p["method"] == "baseline" else
                 fmt(p["budget"], "g") if p["budget"] is not None else "fixed"),
        ("status", lambda p: p["state"]), ("KV held", lambda p: format_bytes(p["cache_bytes"])),
        ("of full", lambda p: fmt(p["bytes_fraction"], ".1%")), ("PPL", lambda p: fmt(p["perplexity"])),
        ("÷ full", lambda p: fmt(p["perplexity_ratio"], ".3f"))]
    if any(p["books"] for p in points):
        columns.append(("books' PPL mean ± SD", mean_sd))
    columns += [(f"{task} acc", lambda p, task=task: fmt(p["accuracy"][task])) for task in tasks]
    columns += [("decode × streaming", lambda p: fmt(p["decode_ratio"], ".3f")),
                ("prefill (s)", lambda p: fmt(p["prefill_s"]))]
    config = doc["config"]
    print_table(f"kvstress frontier — {config.get('tokens')} tokens, perplexity {config.get('ppl_mode')}", columns,
                points, notes=["decode × streaming: the median decode step ÷ StreamingLLM's at the same budget, "
                               "taken in turns in this run (a streaming row: against a second cache of itself)"])
