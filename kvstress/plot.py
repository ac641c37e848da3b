"""Figures from kvstress results files. Reads files only; never loads a model.

    plot_results([Path("results.json")], Path("sweep.png"))

Each results kind has its own figure builder, registered in FIGURE_BUILDERS: a
function (list of results dicts, list of source names) -> matplotlib Figure.
The builders return the Figure without saving it, which is the seam the tests
inspect; plot_results loads, dispatches on "kind" and saves. A new kind
("batch": throughput and peak memory vs batch size, "ppl") is a new builder
and a new entry, without touching the sweep one.

matplotlib is used through its object API with the Agg canvas, never pyplot:
no global figure state, no display needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

from kvstress.events import dataset_name, needle_cells, pooled_books, split_ppl_records
from kvstress.results import ResultsError, load_results

SUFFIXES = (".png", ".pdf", ".svg")
_LINESTYLES = ("-", "--", ":", "-.")  # one per results file; colour and marker are per method
_FAILURE_COLOR = "red"
# Per method, in order of first appearance: matplotlib's ten default colours with red
# (kept for failures) swapped for black, and markers, so lines stay apart in grey print.
# The two cycles differ in length, so the first 90 methods all look different.
_METHOD_COLORS = ("C0", "C1", "C2", "black", "C4", "C5", "C6", "C7", "C8", "C9")
_METHOD_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h")


class PlotError(ResultsError):
    """Results that cannot be drawn; the message names the fix."""


def plot_results(paths: Sequence[Path], out: Path) -> Path:
    """Draw the results files at paths into out (.png, .pdf or .svg); return out."""
    paths = [Path(path) for path in paths]
    out = Path(out)
    if not paths:
        raise PlotError("no results files given: pass at least one results .json file")
    if out.suffix.lower() not in SUFFIXES:
        raise PlotError(f"cannot write a figure to {out}: end the name in {', '.join(SUFFIXES)}")
    docs = [load_results(path) for path in paths]
    kinds = sorted({doc["kind"] for doc in docs})
    if len(kinds) > 1:
        raise PlotError(
            f"these files hold different kinds of results ({', '.join(kinds)}): "
            "plot each kind separately"
        )
    builder = FIGURE_BUILDERS.get(kinds[0])
    if builder is None:
        raise PlotError(
            f"kvstress cannot plot {kinds[0]!r} results yet: it plots {', '.join(FIGURE_BUILDERS)}"
        )
    figure = builder(docs, source_names(paths, docs))
    return save_figure(figure, out)


def save_figure(figure: Figure, out: Path) -> Path:
    """Save with the Agg canvas; the suffix picks the format."""
    FigureCanvasAgg(figure)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=150)
    except OSError as error:
        raise PlotError(
            f"cannot write figure {out}: {error.strerror or error}; choose a writable path"
        ) from error
    return out


def source_names(paths: Sequence[Path], docs: Sequence[dict]) -> list[str]:
    """Short distinct names for the files: the stem, else stem and device, else the path."""
    for names in (
        [path.stem for path in paths],
        [f"{path.stem} ({doc['environment'].get('device_name')})" for path, doc in zip(paths, docs)],
    ):
        if len(set(names)) == len(names):
            return names
    return [str(path) for path in paths]


# --- shared helpers ---------------------------------------------------------------


def _length_label(n: int) -> str:
    """2000 → "2k", 4096 → "4k", 1500 → "1.5k", 512 → "512"."""
    if n < 1000:
        return str(n)
    if n % 1000 == 0:
        return f"{n // 1000}k"
    if n % 1024 == 0:
        return f"{n // 1024}k"
    return f"{n / 1000:.1f}".rstrip("0").rstrip(".") + "k"


def _byte_scale(values: list[float]) -> tuple[float, str]:
    largest = max(values, default=0)
    return (1e9, "GB") if largest >= 1e9 else (1e6, "MB")


def _last_per_length(records: list[dict]) -> dict[int, dict]:
    """A resumed run may measure a point twice (an error, then a retry): the last one counts."""
    latest: dict[int, dict] = {}
    for record in records:
        latest[record["length"]] = record
    return dict(sorted(latest.items()))


def _title(docs: Sequence[dict], kind: str) -> str:
    def unique(values):
        return ", ".join(dict.fromkeys(str(value) for value in values))

    models = unique(doc["config"].get("model", "unknown model") for doc in docs)
    devices = unique(
        doc["environment"].get("device_name") or doc["environment"].get("device") or "unknown device"
        for doc in docs
    )
    return f"{kind}: {models} on {devices}"


# --- sweep ------------------------------------------------------------------------


class _Series:
    """One method of one file: its label, style and records by length."""

    def __init__(self, label: str, color: str, marker: str, linestyle: str, records: list[dict]) -> None:
        self.label = label
        self.color = color
        self.marker = marker
        self.linestyle = linestyle
        self.by_length = _last_per_length(records)

    def points(self, field: str) -> tuple[list[int], list[float]]:
        """Lengths and values of field over the ok records that measured it."""
        pairs = [
            (length, record[field])
            for length, record in self.by_length.items()
            if record["status"] == "ok" and record.get(field) is not None
        ]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def failures(self) -> list[dict]:
        return [record for record in self.by_length.values() if record["status"] != "ok"]


def _method_styles(docs: Sequence[dict], sources: Sequence[str]):
    """(doc, method, label, colour, marker, linestyle) for each method of each file.

    A method keeps one colour and marker across files and each file one line style; spec
    strings alone are ambiguous once two files hold the same method, so labels then name the file.
    """
    methods_per_file = [list(dict.fromkeys(r["method"] for r in doc["records"])) for doc in docs]
    all_methods = list(dict.fromkeys(m for methods in methods_per_file for m in methods))
    collide = sum(len(methods) for methods in methods_per_file) > len(all_methods)
    index_of = {method: i for i, method in enumerate(all_methods)}
    for index, (doc, source, methods) in enumerate(zip(docs, sources, methods_per_file)):
        for method in methods:
            label = f"{source}: {method}" if collide else method
            i = index_of[method]
            yield (doc, method, label, _METHOD_COLORS[i % len(_METHOD_COLORS)],
                   _METHOD_MARKERS[i % len(_METHOD_MARKERS)], _LINESTYLES[index % len(_LINESTYLES)])


def _sweep_series(docs: Sequence[dict], sources: Sequence[str]) -> list[_Series]:
    return [
        _Series(label=label, color=color, marker=marker, linestyle=linestyle,
                records=[r for r in doc["records"] if r["method"] == method])
        for doc, method, label, color, marker, linestyle in _method_styles(docs, sources)
    ]


def _sweep_panels(records: list[dict]) -> list[tuple[str, str]]:
    """(field, y label) per panel, for the measures these records hold.

    Memory is labelled by what was measured: torch's allocated bytes on a GPU;
    on CPU the KV cache's own bytes and the process's RSS, which are different
    things and get separate panels.
    """
    def has(field):
        return any(record.get(field) is not None for record in records)

    panels = []
    if has("peak_allocated_bytes"):
        panels.append(("peak_allocated_bytes", "peak torch allocated"))
    if has("cache_bytes"):
        panels.append(("cache_bytes", "KV cache held between forwards"))
    if not has("peak_allocated_bytes") and has("peak_rss_bytes"):
        panels.append(("peak_rss_bytes", "peak process RSS"))
    panels.append(("tpot_ms_median", "TPOT (ms): median, band to p90"))
    if has("perplexity"):
        panels.append(("perplexity", "perplexity"))
    return panels


def _draw_failures(ax, series: _Series) -> None:
    """A red x at each OOM / error length, at the foot of the panel (it has no value)."""
    for record in series.failures():
        word = "OOM" if record["status"] == "oom" else "error"
        # x in data units, y in axes fraction: the marker sits on the length.
        ax.plot(
            [record["length"]], [0.04], "x", color=_FAILURE_COLOR, markersize=10,
            markeredgewidth=2, transform=ax.get_xaxis_transform(), clip_on=False,
            gid=f"failure:{series.label}", label="_nolegend_",
        )
        ax.annotate(
            f"{word} {series.label}", (record["length"], 0.09), xycoords=ax.get_xaxis_transform(),
            rotation=90, fontsize=7, color=_FAILURE_COLOR, ha="center", va="bottom",
        )


def build_sweep_figure(docs: Sequence[dict], sources: Sequence[str] | None = None) -> Figure:
    """Memory, TPOT and perplexity against context length, one line per method.

    docs are loaded results dicts of kind "sweep"; sources name them (file stems)
    and prefix the labels when two files hold the same method.
    """
    sources = list(sources) if sources is not None else [f"run {i + 1}" for i in range(len(docs))]
    records = [record for doc in docs for record in doc["records"]]
    if not records:
        raise PlotError("these results hold no records yet: plot them once a checkpoint is done")
    series = _sweep_series(docs, sources)
    panels = _sweep_panels(records)
    lengths = sorted({record["length"] for record in records})

    figure = Figure(figsize=(4.6 * len(panels), 4.4), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (field, ylabel) in zip(axes, panels):
        scale, unit = 1.0, ""
        if field.endswith("_bytes"):
            scale, unit = _byte_scale([r[field] for r in records if r.get(field) is not None])
            ylabel = f"{ylabel} ({unit})"
        for line in series:
            xs, ys = line.points(field)
            if xs:
                ax.plot(
                    xs, [y / scale for y in ys], marker=line.marker, markersize=4, color=line.color,
                    linestyle=line.linestyle, label=line.label,
                )
            if field == "tpot_ms_median":
                band = [
                    (length, record["tpot_ms_median"], record["tpot_ms_p90"])
                    for length, record in line.by_length.items()
                    if record["status"] == "ok"
                    and record["tpot_ms_median"] is not None
                    and record["tpot_ms_p90"] is not None
                ]
                if band:
                    ax.fill_between(
                        [b[0] for b in band], [b[1] for b in band], [b[2] for b in band],
                        color=line.color, alpha=0.2, linewidth=0,
                    )
            _draw_failures(ax, line)
        ax.set_xscale("log")
        ax.set_xticks(lengths, [_length_label(n) for n in lengths])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        if field != "perplexity":
            # Memory and time read as proportions from zero; perplexity differences
            # between methods are small next to its size and would vanish.
            ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(_title(docs, "sweep"))
    return figure


# --- ppl --------------------------------------------------------------------------


def build_ppl_figure(docs: Sequence[dict], sources: Sequence[str] | None = None) -> Figure:
    """Perplexity per context-length bucket, one line per method (and file), OOMs marked.

    docs are loaded results dicts of kind "ppl"; each bucket's point sits at the
    bucket's end. The overall records (scope "overall", see perplexity.py) are left out.
    """
    sources = list(sources) if sources is not None else [f"run {i + 1}" for i in range(len(docs))]
    bucket_docs = []
    for doc, source in zip(docs, sources):
        buckets, _ = split_ppl_records(doc, source)
        bucket_docs.append({**doc, "records": buckets})
    records = [record for doc in bucket_docs for record in doc["records"]]
    if not records:
        raise PlotError("these results hold no perplexity yet: plot them once a bucket is done")
    # Files of different texts are told apart by their dataset, not only their name.
    labels = [
        f"{source} ({dataset_name(doc)})" if len(docs) > 1 and dataset_name(doc) else source
        for doc, source in zip(docs, sources)
    ]
    series = _sweep_series(bucket_docs, labels)
    lengths = sorted({record["length"] for record in records})

    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = figure.subplots()
    for line in series:
        xs, ys = line.points("perplexity")
        if xs:
            ax.plot(xs, ys, marker=line.marker, markersize=4, color=line.color, linestyle=line.linestyle,
                    label=line.label)
        _draw_failures(ax, line)
    if len(lengths) > 1 and lengths[-1] / lengths[0] >= 4:
        ax.set_xscale("log")
    ax.set_xticks(lengths, [_length_label(n) for n in lengths])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("context length (tokens, bucket end)")
    pooled = any(pooled_books(doc) > 1 for doc in docs)
    ax.set_ylabel("perplexity of the tokens in the bucket" + (" (books pooled)" if pooled else ""))
    values = [record["perplexity"] for record in records if record.get("perplexity")]
    if values and max(values) / min(values) >= 20:
        # A cache that breaks down (perplexity in the thousands) would flatten the ones that do not.
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    figure.suptitle(_title(docs, "ppl"))
    return figure


# --- batch ------------------------------------------------------------------------


def _batch_panels(records: list[dict]) -> list[tuple[str, str]]:
    """(field, y label) per panel: throughput, then memory labelled by what was measured
    (torch allocated bytes on a GPU, else the process's RSS), then the KV cache's own bytes."""
    def has(field):
        return any(record.get(field) is not None for record in records)

    panels = [("throughput_tok_s", "decode throughput (tokens/s, all sequences)")]
    if has("peak_allocated_bytes"):
        panels.append(("peak_allocated_bytes", "peak torch allocated"))
    elif has("peak_rss_bytes"):
        panels.append(("peak_rss_bytes", "peak process RSS"))
    if has("cache_bytes"):
        panels.append(("cache_bytes", "KV cache held between forwards"))
    return panels


def _batch_lines(docs: Sequence[dict], sources: Sequence[str]) -> list[tuple[str, str, str, str, dict[int, dict]]]:
    """(label, colour, marker, linestyle, records by batch size) per method and file; a batch
    measured twice (a probe repeated) counts its last record."""
    lines = []
    for doc, method, label, color, marker, linestyle in _method_styles(docs, sources):
        by_batch: dict[int, dict] = {}
        for record in doc["records"]:
            if record["method"] == method and record.get("batch_size") is not None:
                by_batch[record["batch_size"]] = record
        lines.append((label, color, marker, linestyle, dict(sorted(by_batch.items()))))
    return lines


def build_batch_figure(docs: Sequence[dict], sources: Sequence[str] | None = None) -> Figure:
    """Throughput and peak memory against batch size (log2 axis), one line per method; OOM a red x.

    docs are loaded results dicts of kind "batch" (kvstress batch); every record is one
    (method, batch size) point at the run's context length.
    """
    sources = list(sources) if sources is not None else [f"run {i + 1}" for i in range(len(docs))]
    records = [record for doc in docs for record in doc["records"]]
    if not records:
        raise PlotError("these results hold no records yet: plot them once a batch size is done")
    lines = _batch_lines(docs, sources)
    panels = _batch_panels(records)
    batches = sorted({record["batch_size"] for record in records if record.get("batch_size") is not None})
    lengths = sorted({record["length"] for record in records})

    figure = Figure(figsize=(4.8 * len(panels), 4.4), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (field, ylabel) in zip(axes, panels):
        scale = 1.0
        if field.endswith("_bytes"):
            scale, unit = _byte_scale([r[field] for r in records if r.get(field) is not None])
            ylabel = f"{ylabel} ({unit})"
        for label, color, marker, linestyle, by_batch in lines:
            points = [(b, r[field]) for b, r in by_batch.items() if r["status"] == "ok" and r.get(field) is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] / scale for p in points], marker=marker, markersize=4,
                        color=color, linestyle=linestyle, label=label)
            for batch, record in by_batch.items():
                if record["status"] == "ok":
                    continue
                word = "OOM" if record["status"] == "oom" else "error"
                ax.plot([batch], [0.04], "x", color=_FAILURE_COLOR, markersize=10, markeredgewidth=2,
                        transform=ax.get_xaxis_transform(), clip_on=False, gid=f"failure:{label}",
                        label="_nolegend_")
                ax.annotate(f"{word} {label}", (batch, 0.09), xycoords=ax.get_xaxis_transform(), rotation=90,
                            fontsize=7, color=_FAILURE_COLOR, ha="center", va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("batch size (sequences)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    context = ", ".join(_length_label(n) for n in lengths)
    figure.suptitle(f"{_title(docs, 'batch')}, {context}-token context per sequence")
    return figure


# --- needle -----------------------------------------------------------------------

_NEEDLE_CMAP = "RdYlGn"


def build_needle_figure(docs: Sequence[dict], sources: Sequence[str] | None = None) -> Figure:
    """Retrieval accuracy heatmaps, depth (rows) x context length (columns), one panel per method
    and task (needle, RULER's multikey and vartrack: kvstress needle --task).

    docs are loaded results dicts of kind "needle" (cells are its "needle_cell" events,
    see needle.py). Every panel uses one color scale, 0 to 1, and each cell is annotated
    with its accuracy; a length where the method ran out of memory is marked OOM, a cell
    that was not run is grey with a dash.
    """
    import numpy as np

    sources = list(sources) if sources is not None else [f"run {i + 1}" for i in range(len(docs))]
    panels: list[tuple[str, dict, dict]] = []  # (title, cells by (length, depth), oom lengths)
    per_file = []
    for doc in docs:
        cells = needle_cells(doc)
        task = doc["config"].get("task", "needle")  # a file from before --task holds the needle's cells
        keys = list(dict.fromkeys([(c.get("task", task), c["method"]) for c in cells] +
                                  [(task, r["method"]) for r in doc["records"]]))
        per_file.append((doc, cells, task, keys))
    tasked = any(task != "needle" for *_, keys in per_file for task, _ in keys)
    labels = [f"{task}: {method}" if tasked else method for *_, keys in per_file for task, method in keys]
    collide = len(labels) > len(set(labels))
    for source, (doc, cells, file_task, keys) in zip(sources, per_file):
        for task, method in keys:
            mine = {(c["length"], float(c["depth"])): c for c in cells
                    if c["method"] == method and c.get("task", file_task) == task}
            oom = {r["length"]: r["status"] for r in doc["records"] if r["method"] == method and r["status"] != "ok"}
            for c in mine.values():
                if c.get("status") not in (None, "ok"):
                    oom.setdefault(c["length"], c["status"])
            title = f"{task}: {method}" if tasked else method
            panels.append((f"{source}: {title}" if collide else title, mine, oom))
    if not any(mine or oom for _, mine, oom in panels):
        raise PlotError("these results hold no needle cells yet: plot them once a cell is done")
    lengths = sorted({length for _, mine, oom in panels for length in [k[0] for k in mine] + list(oom)})
    depths = sorted({depth for _, mine, _ in panels for depth in (k[1] for k in mine)})
    for doc in docs:
        depths = sorted(set(depths) | {float(d) for d in doc["config"].get("depths", [])})
        lengths = sorted(set(lengths) | set(doc["config"].get("lengths", [])))

    figure = Figure(figsize=(1.2 + (0.9 * len(lengths) + 1.0) * len(panels), 1.4 + 0.55 * len(depths)),
                    layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    image = None
    for ax, (title, mine, oom) in zip(axes, panels):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for (length, depth), cell in mine.items():
            if cell.get("status") == "ok" and cell.get("accuracy") is not None:
                grid[depths.index(depth), lengths.index(length)] = cell["accuracy"]
        ax.set_facecolor("#dddddd")  # cells not run show the background
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=_NEEDLE_CMAP, vmin=0.0, vmax=1.0, aspect="auto")
        for i, depth in enumerate(depths):
            for j, length in enumerate(lengths):
                if length in oom:
                    text, color = oom[length].upper(), _FAILURE_COLOR
                    ax.add_patch(_hatched_cell(j, i))
                elif np.isnan(grid[i, j]):
                    text, color = "–", "black"
                else:
                    cell = mine[(length, depth)]
                    text = f"{grid[i, j]:.2f}"
                    if cell.get("partial"):
                        text += f"\n+{cell['partial']} partial"
                    color = "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color,
                        gid=f"cell:{title}:{length}:{depth:g}")
        ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("depth of the needle, asked key or chain's start (% of the haystack)" if tasked
                       else "needle depth (% of the haystack)")
    colorbar = figure.colorbar(image, ax=list(axes), shrink=0.9)
    colorbar.set_label("retrieval accuracy (exact / trials)")
    trials = sorted({c.get("trials") for _, mine, _ in panels for c in mine.values() if c.get("status") == "ok"})
    suffix = f", {'/'.join(map(str, trials))} trials per cell" if trials else ""
    figure.suptitle(_title(docs, "needle") + suffix)
    return figure


def _hatched_cell(column: int, row: int):
    from matplotlib.patches import Rectangle

    return Rectangle((column - 0.5, row - 0.5), 1, 1, facecolor="#f4cccc", edgecolor=_FAILURE_COLOR,
                     hatch="//", linewidth=0.5, gid="failure")


# --- frontier -----------------------------------------------------------------------


# Black is the full cache's star.
_POLICY_COLORS = tuple(color for color in _METHOD_COLORS if color != "black")


def _pareto(points: list[tuple[float, float]], lower_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats with fewer bytes: (bytes, value), by bytes."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or (y < front[-1][1] if lower_is_better else y > front[-1][1]):
            front.append((x, y))
    return front


def build_frontier_figure(docs: Sequence[dict], sources: Sequence[str] | None = None) -> Figure:
    """Quality and cost against the KV bytes held (log x), one line per policy, the full cache a star.

    One panel per quality measure (perplexity, each retrieval task's accuracy), each with its
    Pareto front (the best value reachable with at most that many bytes), and one for the decode
    step ÷ StreamingLLM's at the same budget. docs: one loaded results dict of kind "frontier".
    """
    from kvstress.events import frontier_points

    if len(docs) != 1:
        raise PlotError("plot one frontier file at a time: each is its own model, text and budgets")
    doc = docs[0]
    points = [p for p in frontier_points(doc) if p["cache_bytes"] is not None]
    if not points:
        raise PlotError("this frontier holds no measured point yet: plot it once a method's cost is measured")
    tasks = list(points[0]["accuracy"])
    scale, unit = _byte_scale([p["cache_bytes"] for p in points])
    panels = [("perplexity", "perplexity" + (" (books pooled; bars: books' SD)" if pooled_books(doc) > 1 else ""),
               lambda p: p["perplexity"], True)]
    panels += [(task, f"{task} accuracy (exact)", lambda p, task=task: p["accuracy"][task], False) for task in tasks]
    panels.append(("decode", "decode step ÷ StreamingLLM's (same budget)", lambda p: p["decode_ratio"], None))
    figure = Figure(figsize=(4.2 * len(panels), 4.4), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    policies = list(dict.fromkeys(p["policy"] for p in points))
    for ax, (name, label, value, lower_is_better) in zip(axes, panels):
        measured = [(p, value(p)) for p in points if value(p) is not None]
        for i, policy in enumerate(policies):
            mine = sorted(((p, y) for p, y in measured if p["policy"] == policy), key=lambda pair: pair[0]["cache_bytes"])
            if not mine:
                continue
            xs = [p["cache_bytes"] / scale for p, _ in mine]
            ys = [y for _, y in mine]
            if policy == "baseline":
                ax.plot(xs, ys, "*", markersize=14, color="black", label="full cache", zorder=5)
                continue
            style = {"color": _POLICY_COLORS[i % len(_POLICY_COLORS)], "marker": _METHOD_MARKERS[i % len(_METHOD_MARKERS)]}
            ax.plot(xs, ys, markersize=5, label=policy, **style)
            spreads = [(p["books"] or {}).get("perplexity_stdev") for p, _ in mine]
            if name == "perplexity" and any(sd is not None for sd in spreads):
                ax.errorbar(xs, ys, yerr=[sd or 0 for sd in spreads], fmt="none", ecolor=style["color"], alpha=0.4)
        if lower_is_better is not None and measured:
            front = _pareto([(p["cache_bytes"] / scale, y) for p, y in measured], lower_is_better)
            ax.step([x for x, _ in front], [y for _, y in front], where="post", color="grey", linewidth=3, alpha=0.35,
                    label="Pareto front", zorder=1, gid=f"pareto:{name}")
        if name == "decode":
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        if name == "perplexity":
            values = [y for _, y in measured]
            if values and max(values) / min(values) >= 20:
                ax.set_yscale("log")  # a policy that breaks down would flatten the others
        ax.set_xscale("log")
        for axis in (ax.xaxis,):  # plain numbers: a few MB apart reads better than powers of ten
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
        ax.set_xlabel(f"KV cache held at {doc['config'].get('tokens')} tokens ({unit}, log)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper", fontsize=8)
    mode = doc["config"].get("ppl_mode", "")
    figure.suptitle(f"{_title(docs, 'frontier')} — {dataset_name(doc) or 'text'}, perplexity {mode.split(' (')[0]}")
    return figure


FIGURE_BUILDERS: dict[str, Callable[[Sequence[dict], Sequence[str]], Figure]] = {
    "sweep": build_sweep_figure,
    "ppl": build_ppl_figure,
    "batch": build_batch_figure,
    "needle": build_needle_figure,
    "frontier": build_frontier_figure,
}
