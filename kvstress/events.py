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
    """The cells of a needle results dict, the last one per (method, task, length, depth): a frontier
    file holds several tasks' cells (a cell written before tasks existed is the needle's)."""
    latest: dict[tuple, dict] = {}
    for event in doc["events"]:
        if isinstance(event, dict) and event.get("type") == CELL_EVENT:
            try:
                key = (str(event["method"]), str(event.get("task", "needle")), int(event["length"]),
                       float(event["depth"]))
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


# -- frontier ---------------------------------------------------------------------------

# A frontier file's decode-cost event per method: its cost record (by index), the prefill time,
# and its decode step against StreamingLLM's at the same budget, measured in turns (frontier.py).
COST_EVENT = "frontier_cost"


def cost_events(events: list) -> dict[str, dict]:
    """method → its last "frontier_cost" event."""
    return {e["method"]: e for e in events if isinstance(e, dict) and e.get("type") == COST_EVENT}


def frontier_points(doc: dict) -> list[dict]:
    """One dict per method of a frontier results dict, in its plan's order: the plan entry
    (method, policy, budget, capacity) and what was measured, None where it was not:

        status          "ok", or the first failed record's status ("oom", "error")
        cache_bytes     bytes the cache holds at the run's length (the cost record's)
        bytes_fraction  ÷ the full cache's cache_bytes
        perplexity      overall (pooled over the books with --books); perplexity_ratio ÷ the full cache's
        books           the "ppl_books" spread (perplexity_mean, _stdev, _min, _max) when several books
        accuracy        task → mean exact-answer rate over its cells; accuracy_ratio ÷ the full cache's
        decode_ratio, reference, decode_ms_median, prefill_s   the "frontier_cost" event's
    """
    _, overall = split_ppl_records(doc)
    spreads = book_spreads(doc)
    costs = cost_events(doc["events"])
    cells: dict[tuple[str, str], list[dict]] = {}
    for cell in needle_cells(doc):
        cells.setdefault((cell["method"], cell.get("task", "needle")), []).append(cell)
    tasks = list(doc["config"].get("tasks") or ["needle"])
    points = []
    for entry in doc["config"]["plan"]:
        method = entry["method"]
        failed = [r for r in doc["records"] if r["method"] == method and r["status"] != "ok"]
        cost = costs.get(method)
        record = doc["records"][cost["record"]] if cost is not None else None
        points.append({
            **entry, "status": failed[0]["status"] if failed else "ok",
            "cache_bytes": record["cache_bytes"] if record is not None else None,
            "perplexity": overall[method]["perplexity"] if method in overall else None,
            "books": spreads.get(method),
            "accuracy": {task: mean_accuracy(cells.get((method, task), [])) for task in tasks},
            **{key: cost.get(key) if cost is not None else None
               for key in ("decode_ratio", "reference", "decode_ms_median", "prefill_s")},
        })
    full = next((p for p in points if p["method"] == "baseline"), None)

    def ratio(value, reference):
        return value / reference if value is not None and reference else None

    for point in points:
        point["bytes_fraction"] = ratio(point["cache_bytes"], full and full["cache_bytes"])
        point["perplexity_ratio"] = ratio(point["perplexity"], full and full["perplexity"])
        point["accuracy_ratio"] = {task: ratio(value, full and full["accuracy"][task])
                                   for task, value in point["accuracy"].items()}
    return points


# A point is within a budget when it holds at most the budget's share of the full cache's
# bytes (capacity ÷ the run's tokens) times this: room for what a policy keeps beside the
# keys and values (scores, positions: H2O holds 3 % more than StreamingLLM at 64 of 1,024).
BUDGET_SLACK = 1.1


def best_per_budget(points: list[dict], tokens: int) -> list[dict]:
    """For each budget, in order: among the points that fit in its bytes (`BUDGET_SLACK`), whatever
    their own budget (a 4-bit cache with every token competes where its bytes fit), the policy with
    the lowest perplexity and the one with the highest accuracy on each task (ties: fewer bytes;
    none when no policy answered), and how much of the full cache's quality each keeps (full
    perplexity ÷ its perplexity; its accuracy ÷ the full cache's). A point whose bytes were not
    measured competes at its own budget only."""
    full = next((p for p in points if p["method"] == "baseline"), {})
    rows = []
    for budget in dict.fromkeys(p["budget"] for p in points if p["budget"] is not None):
        capacity = next(p["capacity"] for p in points if p["budget"] == budget)
        share = capacity / tokens
        allowed = share * full["cache_bytes"] * BUDGET_SLACK if full.get("cache_bytes") else None
        at = [p for p in points if p["budget"] is not None and (
            p["cache_bytes"] <= allowed if allowed is not None and p["cache_bytes"] is not None
            else p["budget"] == budget)]
        row = {"budget": budget, "capacity": capacity, "share": share, "best_ppl": None, "best_accuracy": {}}
        scored = [p for p in at if p["perplexity"] is not None]
        if scored:
            best = min(scored, key=lambda p: (p["perplexity"], p["cache_bytes"] or 0))
            kept = full.get("perplexity") / best["perplexity"] if full.get("perplexity") else None
            row["best_ppl"] = {"method": best["method"], "policy": best["policy"], "perplexity": best["perplexity"],
                               "kept": kept, "bytes_fraction": best["bytes_fraction"]}
        for task in (full.get("accuracy") or {}):
            ran = [p for p in at if p["accuracy"].get(task)]  # a best that answers nothing names nothing
            if ran:
                best = max(ran, key=lambda p: (p["accuracy"][task], -(p["cache_bytes"] or 0)))
                row["best_accuracy"][task] = {"method": best["method"], "policy": best["policy"],
                                              "accuracy": best["accuracy"][task],
                                              "kept": best["accuracy_ratio"][task]}
        rows.append(row)
    return rows
