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
    debug: bool = DEBUG_OPTION,
) -> None:
    """Stream ever-longer text through each cache; record memory, TTFT, TPOT and perplexity per length."""
    with user_errors(debug):
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
            out=out,
        )
        _run_sweep(config, force)


def _run_sweep(config: RunConfig, force: bool) -> None:
    from . import models, texts
    from .results import ResultsWriter, environment
    from .stream import SweepRunner

    torch_device = models.resolve_device(config.device)
    writer = ResultsWriter(config.out, "sweep", config.to_json(), environment(torch_device), overwrite=force)

    tokenizer = models.load_tokenizer(config.model)
    text = texts.load_text(config.dataset, tokenizer, config.tokens_needed * config.batch_size)
    tokens = texts.text_segments(text.tokens, config.batch_size, config.tokens_needed)
    console.print(f"text: {text.description}")
    writer.add_event({"type": "dataset", "name": text.name, "message": text.description})
    if text.fallback_note:
        console.print(f"[yellow]note:[/] {text.fallback_note}")
        writer.add_event({"type": "fallback", "message": text.fallback_note})

    loaded = models.load_model(config.model, device=config.device, dtype=config.dtype, seed=config.seed)
    console.print(f"model: {loaded.name} — {loaded.source}")
    writer.add_event({"type": "model", "name": loaded.name, "pretrained": loaded.pretrained, "message": loaded.source})
    if not loaded.pretrained:
        console.print("[yellow]note:[/] random weights: perplexity is not measured (speed and memory are faithful)")

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    ) as progress:
        bars = {spec.name: progress.add_task(spec.name, total=config.tokens_needed - 1) for spec in config.methods}

        def advance(method: str, tokens: int) -> None:
            progress.advance(bars[method], tokens)

        runner = SweepRunner(config, loaded.model, tokens, writer, score=loaded.pretrained, on_progress=advance)
        records = []
        for spec in config.methods:
            method_records = runner.run_method(spec, config.lengths)
            records.extend(method_records)
            if method_records and method_records[-1]["status"] == "oom":
                console.print(f"[red]{spec.name}: out of memory heading for {method_records[-1]['length']} tokens[/] — {method_records[-1]['error']}")
                progress.update(bars[spec.name], completed=progress.tasks[bars[spec.name]].total)
    writer.finish()
    print_summary(records)
    console.print(f"results: {config.out}   plot: kvstress plot {config.out}")


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
    # Piped output has no terminal width; keep the table readable in logs.
    Console(width=None if sys.stdout.isatty() else 160).print(table)


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
    Console(width=None if sys.stdout.isatty() else 160).print(table)


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
