"""The comparison table: one row per method, merged from results files. Reads files only.

    kvstress report pg19.json wikitext.json sweep.json --format markdown|csv|json

Columns are the seed experiment's (docs/seed-experiment.md) plus context length and device:

    Configuration                  the method's spec string
    Context length                 tokens scored (ppl) and the sweep length used
    Wikitext PPL, PG-19 PPL        overall perplexity of ppl results, by their dataset;
    <name> PPL                     any other dataset (shakespeare, a file) gets its own column
    PG-19 pooled PPL (N books)     a file that scored N ≥ 2 books (--books): the perplexity of
                                   all their tokens pooled (exp of the mean NLL over them),
    PG-19 mean of N books' PPL ± SD  and beside it the mean of the books' own perplexities
                                   ± their sample standard deviation (n − 1); a note says so
    Total Time (s) ... Peak Mem    time and memory: from a sweep file when one holds the
                                   method (its largest length that is ok), else from the
                                   ppl run with the most tokens (the run's forward time
                                   per token, its total forward time and its peak memory)
    Retrieval acc                  only when a needle results file is given: the method's
                                   mean needle-in-a-haystack accuracy over all its cells
                                   (lengths x depths) that ran; "–" for a method it lacks
    multikey acc, vartrack acc     the same for needle files of RULER's tasks (needle --task),
                                   a column per task
    Device                         the device the numbers were measured on

Peak Mem is torch's peak allocated bytes when measured, else the process's peak RSS,
in GB (1e9 bytes). A sweep's Total Time cannot be derived honestly from its samples
(their clock runs across methods and warm-ups and misses the first forward), so it
shows "–"; a ppl run records its total forward time. TTFT is only measured by sweeps.
A value not measured is "–" (null in JSON), never 0; a ppl run that ran out of
memory shows "OOM".
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .events import (
    BOOKS_EVENT,
    BUDGET_SLACK,
    OVERALL_EVENT,
    best_per_budget,
    book_spreads,
    dataset_name,
    frontier_points,
    mean_accuracy,
    needle_cells,
    overall_events,
    pooled_books,
    ppl_scopes,
    split_ppl_records,
    spread_notes,
)
from .results import ResultsError, load_results, validate_record

FORMATS = ("markdown", "csv", "json")
DATASET_COLUMNS = {"wikitext": "Wikitext PPL", "pg19": "PG-19 PPL"}
TIME_COLUMNS = ("Total Time (s)", "Avg Attn (ms)", "TTFT (s)", "TPOT (ms)", "Throughput (tok/s)", "Peak Mem (GB)")
RETRIEVAL_COLUMN = "Retrieval acc"


def retrieval_column(task: str) -> str:
    """The column of a needle task's accuracy: the needle's keeps the seed table's name."""
    return RETRIEVAL_COLUMN if task == "needle" else f"{task} acc"


# Column → digits after the point, as in the seed table.
_DIGITS = {RETRIEVAL_COLUMN: 2, "Total Time (s)": 4, "Avg Attn (ms)": 4, "TTFT (s)": 4,
           "TPOT (ms)": 2, "Throughput (tok/s)": 2, "Peak Mem (GB)": 2}
MISSING = "–"
OOM = "OOM"


@dataclass
class Report:
    columns: list[str]
    rows: list[dict]  # column → int, float, str or None (not measured); OOM for a ppl that ran out of memory;
    # a books' spread column → {"mean", "stdev", "min", "max", "books"}
    notes: list[str] = field(default_factory=list)


# --- reading ------------------------------------------------------------------------


def _load(path: Path) -> dict:
    doc = load_results(path)
    if doc["kind"] not in ("sweep", "ppl", "needle"):
        raise ResultsError(f"{path} holds {doc['kind']!r} results: the report reads sweep and ppl results files "
                           "(and needle files for the retrieval accuracy), or one frontier file on its own")
    try:
        doc["records"] = [validate_record(record) for record in doc["records"]]
    except (ValueError, TypeError, AttributeError) as error:
        raise ResultsError(f"{path} is damaged: a record is malformed ({error}); rerun to write it again") from None
    if not isinstance(doc.get("environment"), dict):
        raise ResultsError(f"{path} is damaged: 'environment' is missing; rerun to write it again")
    return doc


def pooled_column(dataset: str | None, books: int) -> str:
    """The perplexity column of a ppl file: ppl_column, or for several books the pooled figure's."""
    base = ppl_column(dataset)
    return base if books < 2 else f"{base.removesuffix(' PPL')} pooled PPL ({books} books)"


def spread_column(dataset: str | None, books: int) -> str:
    """Several books: the column of the mean of the books' own perplexities ± their sample SD."""
    return f"{ppl_column(dataset).removesuffix(' PPL')} mean of {books} books' PPL ± SD"


def ppl_column(dataset: str | None) -> str:
    """pg19 → "PG-19 PPL", wikitext → "Wikitext PPL", shakespeare → "shakespeare PPL", a/b.txt → "b.txt PPL"."""
    if dataset is None:
        return "unknown dataset PPL"
    return DATASET_COLUMNS.get(dataset, f"{Path(dataset).name} PPL")


def _device(doc: dict) -> str | None:
    env = doc["environment"]
    return env.get("device_name") or env.get("device")


def _peak_gb(record: dict) -> float | None:
    peak = record.get("peak_allocated_bytes")
    if peak is None:
        peak = record.get("peak_rss_bytes")
    return None if peak is None else peak / 1e9


def _time_columns(record: dict, total_s: float | None) -> dict:
    return {
        "Total Time (s)": total_s,
        "Avg Attn (ms)": record.get("attn_ms_mean"),
        "TTFT (s)": record.get("ttft_s"),
        "TPOT (ms)": record.get("tpot_ms_median"),
        "Throughput (tok/s)": record.get("throughput_tok_s"),
        "Peak Mem (GB)": _peak_gb(record),
    }


# --- building -----------------------------------------------------------------------


class _Row:
    def __init__(self, method: str):
        self.method = method
        self.lengths: list[int] = []
        self.devices: list[str] = []
        self.ppl: dict[str, float | str | None] = {}
        self.time: dict | None = None
        self.time_rank: tuple = ()  # sweep beats ppl; then the longer context
        self.time_source: str | None = None
        self.retrieval: dict[str, float | str | None] = {}  # by needle task

    def add_context(self, length: int | None, device: str | None) -> None:
        if length is not None and length not in self.lengths:
            self.lengths.append(length)
        if device and device not in self.devices:
            self.devices.append(device)

    def offer_time(self, rank: tuple, columns: dict, source: str) -> None:
        if self.time is None or rank > self.time_rank:
            self.time, self.time_rank, self.time_source = columns, rank, source


def build_report(paths: Sequence[Path | str], *, datasets: Sequence[str] = ()) -> Report:
    """Merge results files into one row per method. `datasets` adds PPL columns even when no file has them."""
    paths = [Path(path) for path in paths]
    if not paths:
        raise ResultsError("no results files given: pass at least one results .json file")
    if len(paths) == 1 and load_results(paths[0])["kind"] == "frontier":
        return frontier_report(paths[0])
    docs = [(path, _load(path)) for path in paths]
    rows: dict[str, _Row] = {}
    books = {dataset_name(doc): pooled_books(doc) for _, doc in docs if doc["kind"] == "ppl"}
    ppl_columns = [pooled_column(name, books.get(name, 1)) for name in datasets]
    notes: list[str] = []
    tasks: list[str] = []  # the needle tasks the files hold, each a column

    def row(method: str) -> _Row:
        return rows.setdefault(method, _Row(method))

    for order, (path, doc) in enumerate(docs):
        device = _device(doc)
        if doc["kind"] == "needle":
            task = _add_needle(doc, path, row, notes, device)
            if task not in tasks:
                tasks.append(task)
        elif doc["kind"] == "ppl":
            count = pooled_books(doc)
            column = pooled_column(dataset_name(doc), count)
            spread = spread_column(dataset_name(doc), count) if count > 1 else None
            for name in (column, spread):
                if name is not None and name not in ppl_columns:
                    ppl_columns.append(name)
            if spread is not None:
                notes.extend(f"{path.name}: {line}" for line in spread_notes(count, column, spread))
            spreads = book_spreads(doc)
            others, overall = split_ppl_records(doc, path)
            for method in dict.fromkeys(r["method"] for r in doc["records"]):
                entry = row(method)
                if method in overall:
                    record = overall[method]
                    entry.ppl[column] = record["perplexity"]
                    if spread is not None:
                        entry.ppl[spread] = _spread_value(spreads.get(method))
                    entry.add_context(record["length"], device)
                    entry.offer_time((0, record["length"], -order), _time_columns(record, record["total_s"]),
                                     f"{path.name} (ppl)")
                elif any(r["method"] == method and r["status"] == "oom" for r in others):
                    entry.ppl.setdefault(column, OOM)
                    if spread is not None:
                        entry.ppl.setdefault(spread, OOM)
                    oom = next(r for r in others if r["method"] == method and r["status"] == "oom")
                    notes.append(f"{method}: out of memory heading for {oom['length']} tokens in {path.name}")
                else:
                    entry.ppl.setdefault(column, None)
                    if spread is not None:
                        entry.ppl.setdefault(spread, None)
                    notes.append(f"{method}: {path.name} has no overall perplexity (run interrupted?)")
        else:
            for method in dict.fromkeys(r["method"] for r in doc["records"]):
                entry = row(method)
                ok = [r for r in doc["records"] if r["method"] == method and r["status"] == "ok"]
                failed = [r for r in doc["records"] if r["method"] == method and r["status"] != "ok"]
                for r in failed:
                    notes.append(f"{method}: {r['status']} at {r['length']} tokens in {path.name}")
                if not ok:
                    continue
                record = max(ok, key=lambda r: r["length"])
                entry.add_context(record["length"], device)
                entry.offer_time((1, record["length"], -order), _time_columns(record, None), f"{path.name} (sweep)")

    retrieval = [retrieval_column(task) for task in tasks]
    columns = ["Configuration", "Context length", *_order_ppl(ppl_columns), *retrieval, *TIME_COLUMNS, "Device"]
    table = []
    for entry in rows.values():
        values = dict.fromkeys(columns)
        values["Configuration"] = entry.method
        values["Context length"] = " / ".join(map(str, entry.lengths)) or None
        values["Device"] = "; ".join(entry.devices) or None
        for column in ppl_columns:
            values[column] = entry.ppl.get(column)
        if entry.time is not None:
            values.update(entry.time)
        for task in tasks:
            values[retrieval_column(task)] = entry.retrieval.get(task)
        table.append(values)
    sources = sorted({entry.time_source for entry in rows.values() if entry.time is not None})
    if sources:
        notes.insert(0, f"time and memory from: {', '.join(sources)}")
    return Report(columns, table, notes)


def _spread_value(event: dict | None) -> dict | None:
    """A "ppl_books" event as a spread cell; None when the file lacks it."""
    if event is None or event.get("perplexity_mean") is None:
        return None
    return {"mean": event["perplexity_mean"], "stdev": event.get("perplexity_stdev"),
            "min": event.get("perplexity_min"), "max": event.get("perplexity_max"), "books": len(event["books"])}


def _add_needle(doc: dict, path: Path, row, notes: list[str], device: str | None) -> str:
    """Mean retrieval accuracy per method of a needle file, under its task (a file from before
    --task is the needle's); a method with no cell that ran shows OOM. Returns the task."""
    task = doc["config"].get("task", "needle")
    cells = needle_cells(doc)
    ran = [c for c in cells if c.get("status") == "ok"]
    if ran:
        lengths = ", ".join(map(str, sorted({c["length"] for c in ran})))
        depths = ", ".join(f"{d:g}%" for d in sorted({float(c["depth"]) for c in ran}))
        notes.append(f"{retrieval_column(task).lower()}: mean exact-answer rate over the {task} cells of {path.name} "
                     f"(lengths {lengths}; depths {depths})")
    for method in dict.fromkeys([c["method"] for c in cells] + [r["method"] for r in doc["records"]]):
        entry = row(method)
        entry.add_context(None, device)
        mine = [c for c in cells if c["method"] == method]
        accuracy = mean_accuracy(mine)
        failed = [r for r in doc["records"] if r["method"] == method and r["status"] != "ok"]
        for r in failed:
            notes.append(f"{method}: {r['status']} at {r['length']} tokens in {path.name} ({task})")
        if accuracy is not None:
            entry.retrieval[task] = accuracy
        elif failed and entry.retrieval.get(task) is None:
            entry.retrieval[task] = OOM if any(r["status"] == "oom" for r in failed) else None
    return task


def _order_ppl(columns: list[str]) -> list[str]:
    """Wikitext and PG-19 first, as in the seed table; the others in the order met."""
    seeded = [c for c in DATASET_COLUMNS.values() if c in columns]
    return seeded + [c for c in columns if c not in seeded]


def frontier_report(path: Path | str) -> Report:
    """A frontier file's table: for each budget, the policy that keeps the most of the full cache's
    perplexity and the one that answers most on each retrieval task, with how much each keeps."""
    doc = load_results(path)
    if doc["kind"] != "frontier":
        raise ResultsError(f"{path} holds {doc['kind']!r} results, not a frontier: give the file kvstress frontier wrote")
    points = frontier_points(doc)
    full = next(p for p in points if p["method"] == "baseline")
    tasks = list(full["accuracy"])
    columns = ["Budget", "Best by PPL", "PPL (× full)", "PPL kept", "KV bytes (of full)"]
    for task in tasks:
        columns += [f"Best by {task}", f"{task} acc (kept)"]
    rows = []
    for best in best_per_budget(points, doc["config"]["tokens"]):
        budget = best["budget"]
        row = dict.fromkeys(columns)
        row["Budget"] = (f"{budget:g} ({best['capacity']} tokens)" if isinstance(budget, float)
                         else f"{budget} tokens ({best['share']:.1%})")
        by_ppl = best["best_ppl"]
        if by_ppl is not None:
            ratio = by_ppl["perplexity"] / full["perplexity"] if full["perplexity"] else None
            row["Best by PPL"] = by_ppl["method"]
            row["PPL (× full)"] = f"{by_ppl['perplexity']:.2f}" + ("" if ratio is None else f" (×{ratio:.3f})")
            row["PPL kept"] = None if by_ppl["kept"] is None else f"{by_ppl['kept']:.1%}"
            row["KV bytes (of full)"] = None if by_ppl["bytes_fraction"] is None else f"{by_ppl['bytes_fraction']:.1%}"
        for task, chosen in best["best_accuracy"].items():
            row[f"Best by {task}"] = chosen["method"]
            row[f"{task} acc (kept)"] = f"{chosen['accuracy']:.2f}" + (
                "" if chosen["kept"] is None else f" ({chosen['kept']:.0%})")
        rows.append(row)
    config = doc["config"]
    books = pooled_books(doc)
    text = f"{books} books pooled" if books > 1 else "one text"
    accuracy = ", ".join(f"{task} {full['accuracy'][task]:.2f}" for task in tasks if full["accuracy"][task] is not None)
    held = "–" if full["cache_bytes"] is None else f"{full['cache_bytes'] / 1e6:.1f} MB"
    notes = [f"full cache: perplexity {format_value(' PPL', full['perplexity'])} ({text}, {config.get('ppl_mode')}, "
             f"{config.get('tokens')} tokens), {accuracy or 'no retrieval'}, KV held {held}",
             f"Budget: its tokens' share of the full cache's bytes; the best of every point holding at most that share "
             f"(× {BUDGET_SLACK:g}, for scores and positions), whatever its own budget",
             "PPL kept: the full cache's perplexity ÷ the policy's; acc kept: its mean exact-answer rate ÷ the full "
             "cache's; KV bytes: what the cache holds at the run's length, measured, ÷ the full cache's"]
    return Report(columns, rows, notes)


# --- rendering ----------------------------------------------------------------------


def format_value(column: str, value) -> str:
    if value is None:
        return MISSING
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # mean ± sample SD of several books' perplexities
        return f"{value['mean']:.2f}" + ("" if value.get("stdev") is None else f" ± {value['stdev']:.2f}")
    if " PPL" in column:
        return f"{value:.2f}"
    if column in _DIGITS or column.endswith(" acc"):
        return f"{value:.{_DIGITS.get(column, 2)}f}"
    return str(value)


def render(report: Report, fmt: str = "markdown") -> str:
    if fmt not in FORMATS:
        raise ResultsError(f"unknown report format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "json":
        rows = [{c: (None if v == OOM else v) for c, v in row.items()} for row in report.rows]
        return json.dumps({"columns": report.columns, "rows": rows, "notes": report.notes}, indent=1) + "\n"
    cells = [[format_value(c, row[c]) for c in report.columns] for row in report.rows]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(report.columns)
        writer.writerows(cells)
        return buffer.getvalue()
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(report.columns)]
    left = {0, len(report.columns) - 1}  # Configuration and Device read left to right

    def line(values):
        return "| " + " | ".join(v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))) + " |"

    rule = "| " + " | ".join((":" + "-" * (w - 1)) if i in left else ("-" * (w - 1) + ":") for i, w in enumerate(widths)) + " |"
    text = "\n".join([line(report.columns), rule, *(line(r) for r in cells)]) + "\n"
    if report.notes:
        text += "\n" + "\n".join(f"- {note}" for note in report.notes) + "\n"
    return text


__all__ = ["BOOKS_EVENT", "FORMATS", "MISSING", "OVERALL_EVENT", "Report", "book_spreads", "build_report", "dataset_name",
           "overall_events", "ppl_column", "ppl_scopes", "pooled_books", "render", "split_ppl_records"]
