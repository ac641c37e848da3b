"""The events of a results file: their names, how each is written and how it is read.

A results file's "events" list says what records alone cannot (see results.py for the
format). The measuring code writes them (run.py, perplexity.py, needle.py, batch.py); the
reading code (tables.py, plot.py, report.py) reads them through the functions here, so
that reading a file needs neither torch nor the code that measured it.

    dataset, fallback    the text a run read (record_text)
    model                the model it loaded (record_model)
    memory_measures      why a memory measure is null (record_unavailable_measures)
    ppl_overall          a ppl file's overall record of a method, by index (OVERALL_EVENT)
    ppl_book, ppl_books  --books: each book's scores, then their spread per method
    needle_cell          one needle cell's answers (CELL_EVENT)
    max_batch            the largest batch that fits (MAX_BATCH_EVENT)
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from .results import ResultsError, ResultsWriter

# The event that marks a ppl file's overall record (see perplexity.py).
OVERALL_EVENT = "ppl_overall"
# --books: the event with the spread of the books' perplexities per method (see perplexity.py).
BOOKS_EVENT = "ppl_books"
# --books: each book's scores as it finishes, then the spread across books per method (BOOKS_EVENT).
BOOK_EVENT = "ppl_book"
CELL_EVENT = "needle_cell"
MAX_BATCH_EVENT = "max_batch"

Notify = Callable[[str], None]


# -- written by every run ------------------------------------------------------------


def record_text(text, writer: ResultsWriter, notify: Notify) -> None:
    notify(f"text: {text.description}")
    writer.add_event({"type": "dataset", "name": text.name, "message": text.description,
                      **({"books": text.books} if getattr(text, "books", None) else {})})
    if text.fallback_note:
        notify(f"note: {text.fallback_note}")
        writer.add_event({"type": "fallback", "message": text.fallback_note})


def record_model(loaded, writer: ResultsWriter, notify: Notify, random_weights_note: str) -> None:
    notify(f"model: {loaded.name} — {loaded.source}")
    writer.add_event({"type": "model", "name": loaded.name, "pretrained": loaded.pretrained, "message": loaded.source})
    if not loaded.pretrained:
        notify(f"note: {random_weights_note}")


def record_unavailable_measures(harness, writer: ResultsWriter) -> None:
    """Why a memory measure is null in the samples (no CUDA device, no NVML device for it, a MIG
    slice, NVML failing mid-run), as a "memory_measures" event whenever the reasons change."""
    reasons = harness.sampler.unavailable
    recorded = [e["unavailable"] for e in writer.events if e["type"] == "memory_measures"]
    if reasons and (not recorded or recorded[-1] != reasons):
        writer.add_event({"type": "memory_measures", "unavailable": reasons})


# -- ppl ------------------------------------------------------------------------------


def overall_events(events: list) -> list[dict]:
    """A ppl results file's "ppl_overall" events: each points at a method's overall record by index."""
    return [event for event in events if isinstance(event, dict) and event.get("type") == OVERALL_EVENT]


def ppl_scopes(doc: dict, path: Path | str = "results") -> list[str | None]:
    """Each record's scope in a ppl results dict ("bucket", "overall", or None for a failed record).

    A record's own "scope" field says it. A file written before that field has none: there the
    records a "ppl_overall" event points at (by index) are "overall" and the other ok ones "bucket".
    """
    records = doc["records"]
    marked: set[int] = set()
    for event in overall_events(doc["events"]):
        index = event.get("record")
        if (not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(records)
                or records[index]["method"] != event.get("method")):
            raise ResultsError(f"{path} is damaged: a {OVERALL_EVENT} event points at no matching record; rerun it")
        marked.add(index)
    return [record.get("scope") or ("overall" if i in marked else "bucket" if record.get("status") == "ok" else None)
            for i, record in enumerate(records)]


def split_ppl_records(doc: dict, path: Path | str = "results") -> tuple[list[dict], dict[str, dict]]:
    """(bucket and oom records, overall record per method) of a ppl results dict, told apart by
    their scope (ppl_scopes; filled in where an older file lacks it). An overall record gets its
    method's total forward time, "total_s", from its "ppl_overall" event.
    """
    total_s = {event.get("method"): event.get("total_s") for event in overall_events(doc["events"])}
    others: list[dict] = []
    overall: dict[str, dict] = {}
    for record, scope in zip(doc["records"], ppl_scopes(doc, path)):
        if scope == "overall":
            overall[record["method"]] = {**record, "scope": scope, "total_s": total_s.get(record["method"])}
        else:
            others.append({**record, "scope": scope})
    return others, overall


def book_spreads(doc: dict) -> dict[str, dict]:
    """--books: each method's last "ppl_books" event (the spread of the books' own perplexities;
    see perplexity.py), when it scored several books."""
    return {event["method"]: event for event in doc["events"]
            if isinstance(event, dict) and event.get("type") == BOOKS_EVENT and len(event.get("books") or ()) > 1}


def pooled_books(doc: dict) -> int:
    """How many books a ppl file's records pool (--books): 1 for a file of one text."""
    if doc["config"].get("books") is None:
        return 1
    for event in reversed(doc["events"]):
        if isinstance(event, dict) and event.get("type") == "dataset" and isinstance(event.get("books"), list):
            return max(len(event["books"]), 1)
    return max((len(e["books"]) for e in book_spreads(doc).values()), default=1)


def overall_records(events: list[dict]) -> set[str]:
    """Methods whose overall record a ppl results file holds."""
    return {event["method"] for event in overall_events(events)}


def spread_notes(books: int | str, pooled: str = "pooled PPL", spread: str | None = None) -> tuple[str, str]:
    """What the two perplexities of a --books run are, one line each, for a caption or the notes."""
    spread = spread or f"mean of {books} books' PPL ± SD"
    return (f"{pooled}: exp of the mean NLL over every scored token of the {books} books together",
            f"{spread}: the mean of each book's own perplexity ± their sample standard deviation (n − 1), "
            "each book one sample")


def dataset_name(doc: dict) -> str | None:
    """The text a results file scored: its last "dataset" event, else its config's dataset."""
    for event in reversed(doc["events"]):
        if isinstance(event, dict) and event.get("type") == "dataset" and isinstance(event.get("name"), str):
            return event["name"]
    name = doc["config"].get("dataset")
    return name if isinstance(name, str) else None


# -- needle ----------------------------------------------------------------------------


def needle_cells(doc: dict) -> list[dict]:
    """The cells of a needle results dict, the last one per (method, length, depth)."""
    latest: dict[tuple, dict] = {}
    for event in doc["events"]:
        if isinstance(event, dict) and event.get("type") == CELL_EVENT:
            try:
                key = (str(event["method"]), int(event["length"]), float(event["depth"]))
            except (KeyError, TypeError, ValueError):
                continue
            latest[key] = event
    return list(latest.values())


def mean_accuracy(cells: Sequence[dict]) -> float | None:
    """Mean accuracy over the cells that ran (OOM cells have none)."""
    values = [c["accuracy"] for c in cells if c.get("status") == "ok" and c.get("accuracy") is not None]
    return statistics.fmean(values) if values else None


# -- batch -----------------------------------------------------------------------------


def describe_max_batch(event: dict) -> str:
    """One line: the largest batch that fit and what ended the search."""
    method, best = event["method"], event["batch_size"]
    if best is None:
        return f"{method}: even batch 1 ran out of memory at {event['length']} tokens"
    if event["limited_by"] == "oom":
        return f"{method}: largest batch that fits is {best} (batch {event['first_oom']} ran out of memory)"
    return f"{method}: largest batch that fits is at least {best} (no OOM up to the {event['limited_by']} limit)"


def largest_batches(events: Sequence[dict]) -> dict[str, dict]:
    """method → its (last) max_batch event, from a results file's events."""
    return {event["method"]: event for event in events if event.get("type") == MAX_BATCH_EVENT}
