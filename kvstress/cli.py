"""The kvstress command line: parse, validate, call, print. No measuring logic lives here.

Expected failures (a bad option, a missing file, a model that cannot load) print one
line on stderr that names the fix and exit with code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .caches import UnsupportedModelError
from .config import DEFAULT_LENGTHS, ConfigError, RunConfig, build_methods, parse_lengths
from .memory import format_bytes, parse_size
from .spec import SpecError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Long-context stress tests for KV-cache compression: full cache, StreamingLLM and H2O.",
)
console = Console(stderr=True)
USAGE_EXIT = 2


def _user_errors() -> tuple[type[Exception], ...]:
    from .models import ModelLoadError
    from .results import ResultsError
    from .texts import TextError

    return (ConfigError, SpecError, ModelLoadError, TextError, ResultsError, UnsupportedModelError)


@contextmanager
def user_errors(debug: bool):
    """Turn expected failures into one line on stderr and exit code 2."""
    try:
        yield
    except _user_errors() as error:
        if debug:
            raise
        console.print(f"[bold red]error:[/] {error}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(USAGE_EXIT) from None


def _size(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as error:
        raise ConfigError(f"--max-memory: {error}") from None


DEBUG_OPTION = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")
# Options that mean the same in every command that takes them.
METHOD_OPTION = typer.Option(
    ["all"], "--method", "-m",
    help="baseline, streaming, h2o, all, or spec strings such as h2o_4_32_256 (repeatable, or comma-separated).",
)
CAPACITY_OPTION = typer.Option(None, help="Tokens a compressed cache holds (default 256).")
SINK_OPTION = typer.Option(None, help="Attention-sink tokens kept from the start (default 4).")
WINDOW_OPTION = typer.Option(None, help="H2O's recent window (default capacity/8).")
MODEL_OPTION = typer.Option("smollm2-135m", help="HF id, local folder, smollm2-135m (bundled), random:<arch> or tiny-random.")
DATASET_OPTION = typer.Option(None, help="pg19, wikitext, shakespeare (bundled) or a text file; default pg19, else shakespeare.")
DEVICE_OPTION = typer.Option("auto", help="auto, cpu or cuda.")
DTYPE_OPTION = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), float32, float16 or bfloat16.")
POSITIONS_OPTION = typer.Option("original", help="Compressed caches: original (absolute) or shifted (positions inside the cache).")


@app.command()
def sweep(
    method: list[str] = METHOD_OPTION,
    capacity: Optional[int] = CAPACITY_OPTION,
    sink: Optional[int] = SINK_OPTION,
    window: Optional[int] = WINDOW_OPTION,
    lengths: str = typer.Option(
        ",".join(f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in DEFAULT_LENGTHS),
        help="Checkpoint context lengths, increasing: 2k,4k or 2048,4096.",
    ),
    chunk: int = typer.Option(512, help="Prefill chunk size in tokens."),
    decode_steps: int = typer.Option(16, help="Single-token steps at each checkpoint (1 warm-up/TTFT, 1 attention probe, the rest timed)."),
    batch_size: int = typer.Option(1, help="Sequences per batch, each a different segment of the text."),
    model: str = MODEL_OPTION,
    dataset: Optional[str] = DATASET_OPTION,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    positions: str = POSITIONS_OPTION,
    lazy: int = typer.Option(0, help="Let compressed caches run over capacity by this many tokens, then evict them at once."),
    max_memory: Optional[str] = typer.Option(None, help="Memory budget (e.g. 8GB) that counts as out-of-memory when exceeded."),
    out: Path = typer.Option(Path("results.json"), "--out", "-o", help="Results file (JSON), written as the run goes."),
    force: bool = typer.Option(False, "--force", help="Overwrite the results file if it exists."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted sweep in --out; finished points are kept, not redone."),
    isolate: bool = typer.Option(False, "--isolate", help="Run each method in a child process, so a hard crash is recorded and the sweep goes on."),
    compile: bool = typer.Option(False, "--compile", help="Compile the compressed caches' decode step (torch.compile; one CUDA graph per step on GPU). The full cache stays eager: it grows every step."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Stream ever-longer text through each cache; record memory, TTFT, TPOT and perplexity per length."""
    with user_errors(debug):
        if resume and force:
            raise ConfigError("--resume continues the results file and --force replaces it: give one of them")
        config = RunConfig(
            methods=build_methods(method, capacity, sink, window),
            lengths=parse_lengths(lengths),
            model=model,
            dataset=dataset,
            chunk=chunk,
            decode_steps=decode_steps,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            positions=positions,
            lazy=lazy,
            max_memory=_size(max_memory),
            compile=compile,
            out=out,
        )
        _run_sweep(config, force=force, resume=resume, isolate=isolate)


def _run_sweep(config: RunConfig, *, force: bool, resume: bool, isolate: bool) -> None:
    from . import models
    from .results import ResultsError, ResultsWriter, environment

    torch_device = models.resolve_device(config.device)
    if resume:
        if not config.out.exists():
            raise ResultsError(f"nothing to resume: {config.out} does not exist; drop --resume to start a new sweep")
        writer = ResultsWriter.resume(config.out, config.to_json(), environment(torch_device),
                                      defaults=RunConfig.json_defaults())
        console.print(f"resuming {config.out}: {len(writer.done_points())} points already measured")
    else:
        writer = ResultsWriter(config.out, "sweep", config.to_json(), environment(torch_device), overwrite=force)
    try:
        _measure_sweep(config, writer, isolate=isolate)
    except typer.Exit:
        raise  # an interrupted run keeps its file, even empty, so that --resume finds it
    except BaseException:
        # A run that fails before it measured anything leaves no file behind to block the rerun.
        if not resume and not writer.records:
            config.out.unlink(missing_ok=True)
        raise


def _measure_sweep(config: RunConfig, writer, *, isolate: bool) -> None:
    from .stream import RunInterrupted, load_run_model, load_run_text, stop_on_interrupt

    text, tokens = load_run_text(config)
    console.print(f"text: {text.description}")
    writer.add_event({"type": "dataset", "name": text.name, "message": text.description})
    if text.fallback_note:
        console.print(f"[yellow]note:[/] {text.fallback_note}")
        writer.add_event({"type": "fallback", "message": text.fallback_note})

    try:
        with stop_on_interrupt() as stop_requested:
            if isolate:
                _sweep_isolated(config, writer)
            else:
                loaded = load_run_model(config)
                console.print(f"model: {loaded.name} — {loaded.source}")
                writer.add_event({"type": "model", "name": loaded.name, "pretrained": loaded.pretrained, "message": loaded.source})
                if not loaded.pretrained:
                    console.print("[yellow]note:[/] random weights: perplexity is not measured (speed and memory are faithful)")
                _sweep_in_process(config, loaded, tokens, writer, stop_requested)
    except (RunInterrupted, KeyboardInterrupt):
        console.print(
            f"[yellow]interrupted:[/] {len(writer.records)} points are saved in {config.out}; "
            f"continue with the same command plus --resume"
        )
        raise typer.Exit(130) from None
    writer.finish()
    print_summary(writer.records)
    console.print(f"results: {config.out}   plot: kvstress plot {config.out}")


def _report_oom(records: list[dict]) -> None:
    for record in records:
        if record["status"] != "ok":
            console.print(f"[red]{record['method']}: {record['status']} heading for {record['length']} tokens[/] — {record['error']}")


def _sweep_in_process(config: RunConfig, loaded, tokens, writer, stop_requested) -> None:
    from .stream import SweepRunner

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    ) as progress:
        bars = {spec.name: progress.add_task(spec.name, total=config.tokens_needed - 1) for spec in config.methods}

        def advance(method: str, tokens: int) -> None:
            progress.advance(bars[method], tokens)

        runner = SweepRunner(config, loaded.model, tokens, writer, score=loaded.pretrained, on_progress=advance,
                             stop_requested=stop_requested)
        for spec in config.methods:
            _report_oom(runner.run_method(spec, config.lengths))
            progress.update(bars[spec.name], completed=progress.tasks[bars[spec.name]].total)


def _sweep_isolated(config: RunConfig, writer) -> None:
    from .isolate import describe_exit, run_method_isolated
    from .stream import RunInterrupted

    for spec in config.methods:
        console.print(f"{spec.name}: running in a child process")
        records, exit_code = run_method_isolated(config, spec.name, writer)
        _report_oom(records)
        if exit_code == 130:
            raise RunInterrupted(f"{spec.name} was interrupted")
        if exit_code != 0:
            console.print(f"[red]{spec.name}: the child process {describe_exit(exit_code)}; going on with the next method[/]")


def print_out(renderable, **kwargs) -> None:
    """Results go to stdout; piped output has no terminal width, so give tables room."""
    Console(width=None if sys.stdout.isatty() else 160).print(renderable, **kwargs)


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def print_summary(records: list[dict]) -> None:
    table = Table(title="kvstress sweep")
    for column in ("method", "length", "status", "TTFT (s)", "TPOT p50 (ms)", "TPOT p90 (ms)", "tok/s",
                   "attn (ms)", "peak mem", "KV cache", "cached", "PPL"):
        table.add_column(column, justify="left" if column in ("method", "status") else "right")
    for r in records:
        peak = r.get("peak_allocated_bytes") or r.get("peak_rss_bytes")
        table.add_row(
            r["method"], str(r["length"]), r["status"], _fmt(r.get("ttft_s")), _fmt(r.get("tpot_ms_median")),
            _fmt(r.get("tpot_ms_p90")), _fmt(r.get("throughput_tok_s"), ".1f"), _fmt(r.get("attn_ms_mean")),
            format_bytes(peak), format_bytes(r.get("cache_bytes")), _fmt(r.get("cache_tokens"), "d"),
            _fmt(r.get("perplexity")),
        )
    print_out(table)


@app.command()
def plot(
    results: list[Path] = typer.Argument(..., help="One or more results files from kvstress."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Figure path (.png, .pdf or .svg); default: next to the first results file."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Draw memory, time per token and perplexity against context length from results files."""
    from .plot import plot_results

    with user_errors(debug):
        target = out or results[0].with_suffix(".png")
        written = plot_results(results, target)
    console.print(f"figure: {written}")


# --- perplexity, report, compare (issue 4) --------------------------------------------


def _token_count(text: str, option: str) -> int:
    from .config import parse_length

    try:
        return parse_length(text)
    except ConfigError as error:
        raise ConfigError(f"{option}: {error}") from None


@contextmanager
def _ppl_progress(config):
    """A progress bar per method of a ppl run (perplexity.PplConfig); yields the callback that advances them."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    ) as progress:
        bars = {spec.name: progress.add_task(spec.name, total=config.tokens) for spec in config.methods}

        def advance(method: str, n: int) -> None:
            progress.advance(bars[method], n)

        yield advance


def _notify(message: str) -> None:
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def print_ppl_table(run) -> None:
    """Bucket and overall perplexity of a ppl run (perplexity.PplRun)."""
    table = Table(title=f"kvstress ppl — {run.text_name}, {run.config.mode}")
    for column in ("method", "context", "status", "scored", "NLL", "PPL", "TPOT (ms)"):
        table.add_column(column, justify="left" if column in ("method", "status") else "right")
    overall = {id(record) for record in run.overall.values()}
    starts = dict(zip(run.config.buckets, (0,) + run.config.buckets[:-1]))
    for r in run.records:
        context = "all" if id(r) in overall else f"{starts.get(r['length'], 0) + 1}–{r['length']}"
        table.add_row(r["method"], context, r["status"], _fmt(r.get("tokens_scored"), "d"), _fmt(r.get("nll_mean"), ".4f"),
                      _fmt(r.get("perplexity")), _fmt(r.get("tpot_ms_median")))
    print_out(table)


@app.command()
def ppl(
    method: list[str] = METHOD_OPTION,
    capacity: Optional[int] = CAPACITY_OPTION,
    sink: Optional[int] = SINK_OPTION,
    window: Optional[int] = WINDOW_OPTION,
    tokens: str = typer.Option("4k", help="Tokens of text to score (e.g. 4096 or 4k)."),
    chunk: int = typer.Option(1, help="Tokens per forward: 1 is exact streaming perplexity; more is faster but an approximation (tokens in a chunk see each other past the cache's capacity)."),
    buckets: Optional[str] = typer.Option(None, help="Length bucket edges, e.g. 1k,2k,4k; default 1k, 2k, 4k ... up to --tokens."),
    model: str = MODEL_OPTION,
    dataset: Optional[str] = DATASET_OPTION,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    positions: str = POSITIONS_OPTION,
    out: Path = typer.Option(Path("ppl.json"), "--out", "-o", help="Results file (JSON, kind ppl), written after each bucket."),
    force: bool = typer.Option(False, "--force", help="Overwrite the results file if it exists."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Streaming perplexity of a text under each cache: every token scored through the compressed cache."""
    from .perplexity import PplConfig, parse_buckets, run_ppl

    with user_errors(debug):
        count = _token_count(tokens, "--tokens")
        edges, note = parse_buckets(buckets, count)
        config = PplConfig(
            methods=build_methods(method, capacity, sink, window), tokens=count, buckets=edges, model=model,
            dataset=dataset, chunk=chunk, device=device, dtype=dtype, positions=positions, out=out,
        )
        run = run_ppl(config, force=force, notify=_notify, progress=_ppl_progress, bucket_note=note)
    print_ppl_table(run)
    console.print(f"results: {config.out}   table: kvstress report {config.out}")


@app.command()
def report(
    results: list[Path] = typer.Argument(..., help="Results files (ppl and sweep) to merge into one table."),
    format: str = typer.Option("markdown", "--format", "-f", help="markdown, csv or json."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """A comparison table (one row per method) from results files: perplexity, time and memory."""
    from .report import build_report, render

    with user_errors(debug):
        text = render(build_report(results), format)
    sys.stdout.write(text)


@app.command()
def compare(
    datasets: str = typer.Option("pg19,wikitext", help="Comma-separated: pg19, wikitext, shakespeare or text files."),
    tokens: str = typer.Option("4k", help="Tokens of each text to score."),
    chunk: int = typer.Option(1, help="Tokens per forward: 1 is exact; more is faster but an approximation."),
    buckets: Optional[str] = typer.Option(None, help="Length bucket edges, e.g. 1k,2k,4k."),
    model: str = MODEL_OPTION,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    positions: str = POSITIONS_OPTION,
    out_dir: Path = typer.Option(Path("compare"), "--out-dir", help="Folder for one results file per dataset."),
    format: str = typer.Option("markdown", "--format", "-f", help="Table format: markdown, csv or json."),
    force: bool = typer.Option(False, "--force", help="Overwrite results files that exist."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """The seed experiment's six configurations on each dataset, then the comparison table."""
    from .perplexity import run_compare
    from .report import build_report, render

    names = [name.strip() for name in datasets.split(",") if name.strip()]
    with user_errors(debug):
        run = run_compare(names, tokens=_token_count(tokens, "--tokens"), chunk=chunk, model=model, out_dir=out_dir,
                          device=device, dtype=dtype, positions=positions, buckets=buckets, force=force,
                          notify=_notify, progress=_ppl_progress)
        text = render(build_report(run.written, datasets=names), format)
    sys.stdout.write(text)
    console.print(f"results: {', '.join(map(str, run.written))}")


# --- batch throughput (issue 5) -------------------------------------------------------


def print_batch_table(run) -> None:
    """Every measured point of a batch run (batch.BatchRun), then the largest batch per method."""
    from .batch import describe_max_batch

    records = run.records
    gpu = any(r.get("peak_allocated_bytes") is not None for r in records)
    peak_field, peak_name = ("peak_allocated_bytes", "peak alloc") if gpu else ("peak_rss_bytes", "peak RSS")
    table = Table(title=f"kvstress batch — {run.config.length}-token context per sequence")
    for column in ("method", "batch", "status", "TPOT p50 (ms)", "TPOT p90 (ms)", "tok/s", peak_name, "KV cache"):
        table.add_column(column, justify="left" if column in ("method", "status") else "right")
    for r in records:
        table.add_row(
            r["method"], str(r["batch_size"]), r["status"], _fmt(r.get("tpot_ms_median")), _fmt(r.get("tpot_ms_p90")),
            _fmt(r.get("throughput_tok_s"), ".1f"), format_bytes(r.get(peak_field)), format_bytes(r.get("cache_bytes")),
        )
    print_out(table)
    best = Table(title="largest batch that fits")
    for column in ("method", "max batch", "first OOM", "limited by", "probes"):
        best.add_column(column, justify="left" if column in ("method", "limited by", "probes") else "right")
    for method, event in run.max_batch.items():
        best.add_row(method, _fmt(event["batch_size"], "d"), _fmt(event["first_oom"], "d"), event["limited_by"],
                     ",".join(map(str, event["probes"])))
    print_out(best)
    for event in run.max_batch.values():
        print_out(describe_max_batch(event), markup=False, highlight=False)


@contextmanager
def _point_progress(label: str, total: int):
    """A progress bar for one (method, batch size) point; yields the callback that advances it.

    Only on a terminal: in a log, the one line per point that follows says more.
    """
    if not console.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:
        task = progress.add_task(label, total=total)

        def advance(method: str, n: int) -> None:
            progress.advance(task, n)

        yield advance


@app.command()
def batch(
    method: list[str] = METHOD_OPTION,
    capacity: Optional[int] = CAPACITY_OPTION,
    sink: Optional[int] = SINK_OPTION,
    window: Optional[int] = WINDOW_OPTION,
    batch_sizes: str = typer.Option("1,2,4,8,16,32,64", help="Batch sizes to try in order, increasing, until OOM."),
    length: str = typer.Option("4k", help="Context length of every sequence (e.g. 4096 or 4k)."),
    max_batch: Optional[int] = typer.Option(None, help="Largest batch to try; with --find-max-batch the search's bound (default: the largest --batch-sizes)."),
    find_max_batch: bool = typer.Option(False, "--find-max-batch", help="Find the largest batch that fits: doubling until OOM, then binary search."),
    chunk: int = typer.Option(512, help="Prefill chunk size in tokens."),
    decode_steps: int = typer.Option(16, help="Single-token steps after the context (1 warm-up, 1 attention probe, the rest timed)."),
    model: str = MODEL_OPTION,
    dataset: Optional[str] = DATASET_OPTION,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    positions: str = POSITIONS_OPTION,
    max_memory: Optional[str] = typer.Option(None, help="Memory budget (e.g. 8GB) that counts as out-of-memory when exceeded."),
    out: Path = typer.Option(Path("batch.json"), "--out", "-o", help="Results file (JSON, kind batch), written after each point."),
    force: bool = typer.Option(False, "--force", help="Overwrite the results file if it exists."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Decode throughput (tok/s over all sequences) and peak memory per batch size; the largest batch that fits."""
    from .batch import BatchConfig, parse_batch_sizes, run_batch

    with user_errors(debug):
        config = BatchConfig(
            methods=build_methods(method, capacity, sink, window),
            batch_sizes=parse_batch_sizes(batch_sizes),
            length=_token_count(length, "--length"),
            max_batch=max_batch,
            find_max_batch=find_max_batch,
            model=model,
            dataset=dataset,
            chunk=chunk,
            decode_steps=decode_steps,
            device=device,
            dtype=dtype,
            positions=positions,
            max_memory=_size(max_memory),
            out=out,
        )
        run = run_batch(config, force=force, notify=_notify, progress=_point_progress)
    print_batch_table(run)
    console.print(f"results: {config.out}   plot: kvstress plot {config.out}")


# --- needle in a haystack (issue 8) --------------------------------------------------


@contextmanager
def _needle_progress(config):
    """A progress bar per method of a needle run (needle.NeedleConfig), counted in trials."""
    trials = len(config.lengths) * len(config.depths) * config.needles
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    ) as progress:
        bars = {spec.name: progress.add_task(spec.name, total=trials) for spec in config.methods}

        def advance(method: str, n: int) -> None:
            progress.advance(bars[method], n)

        yield advance


def print_needle_table(run) -> None:
    """Exact answers / trials per method and depth (rows) and length (columns)."""
    lengths = list(run.config.lengths)
    table = Table(title="kvstress needle — exact / trials (partial)")
    table.add_column("method")
    table.add_column("depth", justify="right")
    for length in lengths:
        table.add_column(str(length), justify="right")
    cells = {(c["method"], c["length"], c["depth"]): c for c in run.cells}
    for spec in run.config.methods:
        for depth in run.config.depths:
            row = []
            for length in lengths:
                cell = cells.get((spec.name, length, depth))
                if cell is None:
                    row.append("–")
                elif cell["status"] != "ok":
                    row.append(cell["status"].upper())
                else:
                    row.append(f"{cell['exact']}/{cell['trials']} ({cell['partial']})")
            table.add_row(spec.name, f"{depth:g}%", *row)
    print_out(table)


@app.command()
def needle(
    method: list[str] = METHOD_OPTION,
    capacity: Optional[int] = CAPACITY_OPTION,
    sink: Optional[int] = SINK_OPTION,
    window: Optional[int] = WINDOW_OPTION,
    lengths: str = typer.Option("1k,2k,4k,8k", help="Prompt lengths in tokens (haystack + needle + question), increasing."),
    depths: str = typer.Option("0,25,50,75,100", help="Where the needle sits, in percent of the haystack."),
    needles: int = typer.Option(3, help="Trials (needles) per length and depth, each its own haystack and number."),
    seed: int = typer.Option(0, help="Seeds the haystack segments and the numbers (and random weights)."),
    chunk: int = typer.Option(512, help="Prefill chunk size; the question always gets its own forward."),
    max_new_tokens: int = typer.Option(24, help="Most tokens generated per answer (stops after the first number)."),
    model: str = MODEL_OPTION,
    dataset: Optional[str] = DATASET_OPTION,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    positions: str = POSITIONS_OPTION,
    chat: bool = typer.Option(False, "--chat", help="Wrap the question in the tokenizer's chat template."),
    out: Path = typer.Option(Path("needle.json"), "--out", "-o", help="Results file (JSON, kind needle), written after each cell."),
    force: bool = typer.Option(False, "--force", help="Overwrite the results file if it exists."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Needle in a haystack: hide a number at each depth of real text, ask for it, score the answers."""
    from .needle import NeedleConfig, parse_depths, run_needle

    with user_errors(debug):
        config = NeedleConfig(
            methods=build_methods(method, capacity, sink, window), lengths=parse_lengths(lengths),
            depths=parse_depths(depths), needles=needles, seed=seed, model=model, dataset=dataset, chunk=chunk,
            max_new_tokens=max_new_tokens, device=device, dtype=dtype, positions=positions, chat=chat, out=out,
        )
        run = run_needle(config, force=force, notify=_notify, progress=_needle_progress)
    print_needle_table(run)
    console.print(f"results: {config.out}   plot: kvstress plot {config.out}")
