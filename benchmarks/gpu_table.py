"""Issue 15's targets in one short table, from the files `benchmarks/gpu_check.sh` wrote.

    python benchmarks/gpu_table.py RESULTS_DIR [--capacity 256]

Reads RESULTS_DIR/sweep.json (targets 2, 3, 5: `kvstress sweep`, methods one after another),
reference.json (targets 1, 2, 4: `benchmarks/reference_step.py`, interleaved in one process),
capacity.json and capacity-batch.json (target 6: `examples/gpu_capacity_study.sh`) and
pytest.log (`pytest -m gpu`). A file that is missing or unreadable gives "–" rows, never a
crash. Prints the table and writes it as RESULTS_DIR/summary.md.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from kvstress.results import load_results


def _sweep(path: Path):
    try:
        return load_results(path)
    except Exception as error:  # noqa: BLE001 - a missing stage is a row saying so
        return {"error": str(error)}


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except Exception as error:  # noqa: BLE001
        return {"error": str(error)}


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _verdict(value, limit: float) -> str:
    if value is None:
        return "not measured"
    return "met" if value <= limit else "NOT met"


def build_rows(results: Path, capacity: int, target1_contexts=(8192, 32768), reference_context: int = 32768,
               ttft_length: int = 32768) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    streaming, h2o = f"streaming_4_{capacity}", f"h2o_4_{max(1, capacity // 8)}_{capacity}"
    rows: list[tuple[str, str, str, str]] = []
    notes: list[str] = []

    # pytest -m gpu
    log = results / "pytest.log"
    summary = None
    if log.exists():
        lines = [line.strip("= \n") for line in log.read_text(encoding="utf-8", errors="replace").splitlines()]
        summary = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", line)), None)
    broken = summary is not None and re.search(r"\d+ (failed|errors?|xpassed)\b", summary)
    rows.append(("0. pytest -m gpu (NVML, real OOM, CUDA graph)", summary or "–", "all pass",
                 "not measured" if summary is None else "NOT met" if broken or "passed" not in summary else "met"))

    # reference_step.py: interleaved decode steps
    reference = _json(results / "reference.json")
    ref_rows = reference.get("rows", [])
    if "error" in reference:
        notes.append(f"reference.json: {reference['error']}")
    for error in reference.get("errors", []):
        notes.append(f"reference_step: {error}")

    def ref(cache, context, compiled):
        for row in ref_rows:
            if row["cache"] == cache and row["context"] == context and row["compiled"] == compiled:
                return row
        return None

    def ref_tpot(cache, context, compiled):
        row = ref(cache, context, compiled)
        return row["tpot_ms_median"] if row else None

    for context in target1_contexts:
        for compiled in (False, True):
            value = _ratio(ref_tpot(h2o, context, compiled), ref_tpot(streaming, context, compiled))
            label = "compiled" if compiled else "eager"
            rows.append((f"1. H2O ÷ StreamingLLM decode, {context}, {label}", _fmt(value), "≤ 1.05",
                         _verdict(value, 1.05)))
    contexts = sorted({row["context"] for row in ref_rows if row["cache"] in (streaming, h2o)})
    if contexts:
        first, last = contexts[0], contexts[-1]
        for method in (streaming, h2o):
            eager = _ratio(ref_tpot(method, last, False), ref_tpot(method, first, False))
            compiled = _ratio(ref_tpot(method, last, True), ref_tpot(method, first, True))
            worst = max((v for v in (eager, compiled) if v is not None), default=None)
            rows.append((f"2. {method} TPOT {last} ÷ {first} (eager / compiled)", f"{_fmt(eager)} / {_fmt(compiled)}",
                         "≤ 1.05", _verdict(worst, 1.05)))

    # kvstress sweep: memory, full-cache comparison, TTFT
    sweep = _sweep(results / "sweep.json")
    if "error" in sweep:
        notes.append(f"sweep.json: {sweep['error']}")
    records = {(r["method"], r["length"]): r for r in sweep.get("records", [])}
    lengths = sorted({length for _, length in records})
    for method in (streaming, h2o):
        sizes = {records[method, n]["cache_bytes"] for n in lengths if (method, n) in records
                 and records[method, n]["status"] == "ok"}
        measured = [n for n in lengths if (method, n) in records and records[method, n]["status"] == "ok"]
        if measured:
            same = len(sizes) == 1
            shown = f"{'identical' if same else 'DIFFER'} at {len(measured)} lengths ({max(sizes) / 1e6:.1f} MB)"
            rows.append((f"2. {method} cache bytes, {measured[0]}–{measured[-1]}", shown, "identical",
                         "met" if same else "NOT met"))
        else:
            rows.append((f"2. {method} cache bytes", "–", "identical", "not measured"))
    worst = None
    compared = []
    for n in lengths:
        if n < 2 * capacity:
            continue
        full = records.get(("baseline", n))
        for method in (streaming, h2o):
            record = records.get((method, n))
            if full and record and full["status"] == record["status"] == "ok":
                value = record["tpot_ms_median"] / full["tpot_ms_median"]
                compared.append(n)
                worst = value if worst is None else max(worst, value)
    span = f" at {min(compared)}–{max(compared)}" if compared else ""
    rows.append((f"3. compressed ÷ full decode, worst{span}", _fmt(worst), "≤ 1.00", _verdict(worst, 1.0)))

    full_32 = ref("DynamicCache (full)", reference_context, False)
    h2o_compiled = ref(h2o, reference_context, True)
    static = next((row for row in ref_rows if row["cache"].startswith("StaticCache")), None)
    small = next((row for row in ref_rows if row["cache"].startswith("DynamicCache (") and "full" not in row["cache"]), None)
    value = h2o_compiled["vs_floor"] if h2o_compiled else None
    floor = f" (floor {h2o_compiled['floor_ms']:.2f} ms, step {h2o_compiled['tpot_ms_median']:.2f} ms)" if h2o_compiled else ""
    rows.append((f"4. H2O compiled step ÷ bandwidth floor, {reference_context}{floor}", _fmt(value), "≤ 1.40",
                 _verdict(value, 1.4)))
    compile_info = reference.get("compile") or {}
    if compile_info.get("ran"):
        skips, replays = compile_info.get("cudagraph_skips"), compile_info.get("cuda_graph_replays")
        verdict = "no CUDA" if replays is None else "met" if skips == 0 and replays else "NOT met"
        rows.append(("4.  compiled steps replayed as CUDA graphs", f"{skips} skipped, {replays} replays",
                     "0 skipped", verdict))
    for label, row in (("4.  beside: StaticCache + compile", static), (f"4.  beside: DynamicCache, {capacity} tokens", small),
                       (f"4.  beside: DynamicCache, full {reference_context}", full_32)):
        shown = f"{row['tpot_ms_median']:.2f} ms = {row['vs_floor']:.2f} × its floor" if row else "–"
        rows.append((label, shown, "reference", ""))

    long = max((n for n in lengths if n <= ttft_length), default=None)
    ttft = None
    if long is not None and ("baseline", long) in records and (h2o, long) in records:
        ttft = _ratio(records[h2o, long]["ttft_s"], records["baseline", long]["ttft_s"])
    rows.append((f"5. H2O TTFT ÷ full TTFT at {long}", _fmt(ttft), "≤ 1.20", _verdict(ttft, 1.2)))
    if lengths and long is not None and (h2o, long) in records and (h2o, lengths[0]) in records:
        peak = _ratio(records[h2o, long]["peak_allocated_bytes"] or records[h2o, long]["peak_rss_bytes"],
                      records[h2o, lengths[0]]["peak_allocated_bytes"] or records[h2o, lengths[0]]["peak_rss_bytes"])
        rows.append((f"5. H2O peak memory {long} ÷ {lengths[0]}", _fmt(peak), "≈ 1.00 (bounded)",
                     _verdict(peak, 1.05)))

    # capacity study
    for name, axis in (("capacity.json", "length"), ("capacity-batch.json", "batch_size")):
        study = _sweep(results / name)
        if "error" in study:
            rows.append((f"6. capacity study by {axis.replace('_size', '')}", "–", "full OOMs, compressed fit", "not measured"))
            continue
        found = {}
        for record in study["records"]:
            entry = found.setdefault(record["method"], {"ok": [], "oom": []})
            if record["status"] in entry:
                entry[record["status"]].append(record[axis])
        full = found.get("baseline", {"ok": [], "oom": []})
        compressed_fit = all(not found[m]["oom"] and found[m]["ok"] for m in found if m != "baseline") and len(found) > 1
        batch = study["config"].get("batch_size")
        where = f"batch {batch}, " if axis == "length" and batch else (
            f"{study['config'].get('length')} tokens, " if axis == "batch_size" else "")
        shown = (f"{where}full: fits ≤ {max(full['ok'], default='–')}, OOM at {min(full['oom'], default='–')}; "
                 f"compressed: {'fit at every ' + axis.replace('_size', '') if compressed_fit else 'OOM too'}")
        rows.append((f"6. capacity study by {axis.replace('_size', '')}", shown, "full OOMs, compressed fit",
                     "met" if full["oom"] and compressed_fit else "NOT met"))
    return rows, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--capacity", type=int, default=256)
    parser.add_argument("--target1-contexts", default="8192,32768", help="contexts of target 1 (H2O ÷ StreamingLLM)")
    parser.add_argument("--reference-context", type=int, default=32768, help="context of target 4 (reference_step.py)")
    parser.add_argument("--ttft-length", type=int, default=32768, help="target 5's length (the longest sweep length up to it)")
    args = parser.parse_args()
    contexts = tuple(int(c) for c in args.target1_contexts.split(","))
    rows, notes = build_rows(args.results, args.capacity, contexts, args.reference_context, args.ttft_length)

    environment = {}
    for name in ("reference.json", "sweep.json"):
        environment = _json(args.results / name).get("environment") or {}
        if environment:
            break
    versions = environment.get("versions") or {}
    header = (f"{environment.get('device_name', '?')}, driver {environment.get('nvidia_driver_version')}, "
              f"torch {versions.get('torch')}, transformers {versions.get('transformers')}, {environment.get('date')}")
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [header, ""]
    names = ("target", "measured", "goal", "")
    lines.append("  ".join(name.ljust(width) for name, width in zip(names, widths)).rstrip())
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    lines += [f"note: {note}" for note in notes]
    text = "\n".join(lines)
    print(text)
    markdown = [header, "", "| target | measured | goal | |", "| :-- | :-- | :-- | :-- |"]
    markdown += [f"| {' | '.join(row)} |" for row in rows]
    markdown += [""] + [f"- {note}" for note in notes]
    (args.results / "summary.md").write_text("\n".join(markdown) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
